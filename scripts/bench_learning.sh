#!/usr/bin/env bash
# The learning checks of BENCHMARKS.md ("Learning checks"): is the RL wiring right (the advantage's sign,
# the reward plumbing, the coordinate frame)? On the bright-square toy task (train/toy.py) with the tiny
# model (rope_theta 10, taught the answer format; LoRA on the language model and the vision tower trained, as
# train/recipes/tiny-learn.yaml explains why):
#   1. SFT warm start with reasoning targets: format reward -> 1, held-out IoU well above chance;
#   2. GRPO (and DAPO) from that warm start, several seeds: held-out IoU vs seed-to-seed noise;
#   3. the same budget spent on more SFT instead (the honest baseline).
# Usage: scripts/bench_learning.sh OUT_DIR [grid|continuous]   (about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-learning}
LAYOUT=${2:-grid}
GEO=.venv/bin/geo-r1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
WARM=${WARM:-300}
RL=${RL:-100}
mkdir -p "$OUT"
[[ -f "$OUT/base/model.safetensors" ]] || $GEO tiny-model "$OUT/base" --rope-theta 10 --learn-format 300 --force
[[ -f "$OUT/data/dataset.json" ]] || .venv/bin/python -c "
from train.toy import ToyConfig, write_toy_dataset
write_toy_dataset(ToyConfig('$OUT/data', layout='$LAYOUT'))"
COMMON=(--data "$OUT/data" --model "$OUT/base" --config tiny-learn --force)
$GEO train sft "${COMMON[@]}" -o "$OUT/warm" --reasoning --max-steps "$WARM" --learning-rate 5e-3
# two runs at a time (one per core)
for s in 1 2; do
  $GEO train grpo "${COMMON[@]}" -o "$OUT/grpo-s$s" --init-adapter "$OUT/warm" --max-steps "$RL" --seed "$s" \
    --learning-rate 5e-4 --per-device-train-batch-size 32 > "$OUT/grpo-s$s.log" 2>&1 &
done
wait
$GEO train dapo "${COMMON[@]}" -o "$OUT/dapo-s1" --init-adapter "$OUT/warm" --max-steps "$RL" --seed 1 \
  --learning-rate 5e-4 --per-device-train-batch-size 32 > "$OUT/dapo-s1.log" 2>&1 &
$GEO train sft "${COMMON[@]}" -o "$OUT/sft-more" --init-adapter "$OUT/warm" --reasoning --max-steps "$RL" \
  --learning-rate 5e-3 > "$OUT/sft-more.log" 2>&1 &
wait
$GEO eval --data "$OUT/data" --model "$OUT/base" --split test --max-new-tokens 80 -o "$OUT/report" --no-base \
  --adapter warm="$OUT/warm" --adapter grpo-s1="$OUT/grpo-s1" --adapter grpo-s2="$OUT/grpo-s2" \
  --adapter dapo-s1="$OUT/dapo-s1" --adapter sft-more="$OUT/sft-more"
echo "report: $OUT/report/report.md"
