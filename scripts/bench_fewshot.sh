#!/usr/bin/env bash
# The paper's few-shot comparison in miniature (BENCHMARKS.md, "Few-shot: SFT vs GRPO"): the same K shots and
# the same wall-clock budget, scored on held-out chips by `geo-r1 eval`.
#   A. the SFT baseline (the paper's SFT prompt, no reasoning) for the whole budget;
#   B. a short reasoning warm start (SFT), then GRPO for the rest of the budget.
# On the bright-square toy task (train/toy.py), K train chips, 48 held-out test chips, the tiny model
# (scripts/bench_learning.sh explains the settings). A and B run side by side, one core each.
# Usage: scripts/bench_fewshot.sh OUT_DIR [K] [BUDGET_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-fewshot}
K=${2:-10}
BUDGET=${3:-480}
WARM_S=${WARM_S:-90}
GEO=.venv/bin/geo-r1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$OUT"
[[ -f "$OUT/base/model.safetensors" ]] || $GEO tiny-model "$OUT/base" --rope-theta 10 --learn-format 300 --force
rm -rf "$OUT/data"
.venv/bin/python -c "
from train.toy import ToyConfig, write_toy_dataset
write_toy_dataset(ToyConfig('$OUT/data', n_train=$K, n_val=16, n_test=48, seed=7))"
COMMON=(--data "$OUT/data" --model "$OUT/base" --config tiny-learn --force --max-steps 100000 --eval-limit 16)
$GEO train sft "${COMMON[@]}" -o "$OUT/sft" --learning-rate 5e-3 --max-seconds "$BUDGET" > "$OUT/sft.log" 2>&1 &
(
  $GEO train sft "${COMMON[@]}" -o "$OUT/warm" --reasoning --learning-rate 5e-3 --max-seconds "$WARM_S"
  $GEO train grpo "${COMMON[@]}" -o "$OUT/grpo" --init-adapter "$OUT/warm" --learning-rate 5e-4 \
    --per-device-train-batch-size 32 --max-seconds "$(( BUDGET - WARM_S ))"
) > "$OUT/grpo.log" 2>&1 &
wait
$GEO eval --data "$OUT/data" --model "$OUT/base" --split test --max-new-tokens 80 -o "$OUT/report" \
  --adapter sft="$OUT/sft" --adapter warm="$OUT/warm" --adapter grpo="$OUT/grpo"
echo "report: $OUT/report/report.md"
