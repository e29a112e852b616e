#!/usr/bin/env bash
# `make demo-train`: the fine-tuning loop end to end on the CPU, in about 7 minutes on 2 cores:
# a synthetic few-shot dataset, the SFT baseline, a reasoning warm start, GRPO and DAPO from it, and the
# evaluation report comparing the base model, SFT, GRPO and DAPO.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-train-out}
GEO=.venv/bin/geo-r1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Each step runs with as many torch threads as cores, but no more: OpenMP threads spin-waiting for cores
# they do not get make a small model many times slower (BENCHMARKS.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
SFT_STEPS=${SFT_STEPS:-300}
WARM_STEPS=${WARM_STEPS:-200}
RL_STEPS=${RL_STEPS:-60}
SHOTS=${SHOTS:-10}
START=$(date +%s)
say() { printf '[demo-train %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

mkdir -p "$OUT"
if [[ -f "$OUT/base/model.safetensors" ]]; then
  say "1/7 tiny base model: reusing $OUT/base"
else
  say "1/7 tiny Qwen2.5-VL base -> $OUT/base (random, rope_theta 10, 300 steps on the answer format)"
  $GEO tiny-model "$OUT/base" --rope-theta 10 --learn-format 300 --force
fi
say "2/7 synthetic $SHOTS-shot dataset from the sample scenes -> $OUT/data"
rm -rf "$OUT/data"
$GEO dataset synthetic -o "$OUT/data" --shots "$SHOTS"
COMMON=(--data "$OUT/data" --model "$OUT/base" --config tiny-learn --force)
say "3/7 SFT baseline (the paper's SFT prompt, no reasoning), $SFT_STEPS steps -> $OUT/sft"
$GEO train sft "${COMMON[@]}" -o "$OUT/sft" --max-steps "$SFT_STEPS" --learning-rate 5e-3
say "4/7 reasoning warm start (SFT on templated <think> + <answer>), $WARM_STEPS steps -> $OUT/warm"
$GEO train sft "${COMMON[@]}" -o "$OUT/warm" --reasoning --max-steps "$WARM_STEPS" --learning-rate 5e-3
say "5/7 GRPO from the warm start, $RL_STEPS steps -> $OUT/grpo"
$GEO train grpo "${COMMON[@]}" -o "$OUT/grpo" --init-adapter "$OUT/warm" --max-steps "$RL_STEPS" \
  --learning-rate 5e-4 --per-device-train-batch-size 32
say "6/7 DAPO from the warm start, $RL_STEPS steps -> $OUT/dapo"
$GEO train dapo "${COMMON[@]}" -o "$OUT/dapo" --init-adapter "$OUT/warm" --max-steps "$RL_STEPS" \
  --learning-rate 5e-4 --per-device-train-batch-size 32
say "7/7 evaluation on the held-out test chips -> $OUT/report"
rm -rf "$OUT/report"
$GEO eval --data "$OUT/data" --model "$OUT/base" --split test --max-new-tokens 96 -o "$OUT/report" \
  --adapter sft="$OUT/sft" --adapter warm="$OUT/warm" --adapter grpo="$OUT/grpo" --adapter dapo="$OUT/dapo"
cat <<MSG

[demo-train] done in $(( $(date +%s) - START )) s. The report: $(realpath "$OUT/report/report.md")
[demo-train]   with its plots beside it (accuracy.png, iou_hist.png, examples.png, learning_curves.png);
[demo-train]   the adapters: $OUT/{sft,warm,grpo,dapo} (each with geo_r1_adapter.json, train_log.jsonl, curves.png).
[demo-train] What this shows: the whole loop runs for real (annotations -> chips -> trl SFT/GRPO/DAPO with
[demo-train]   LoRA -> adapters the engine serves -> Geo-R1's metrics), with real rewards and logs.
[demo-train] What it cannot show: accuracy. The model is a 248k-parameter toy built on this machine, trained
[demo-train]   for minutes on a CPU; its numbers say nothing about Geo-R1 at 3B. BENCHMARKS.md records the learning
[demo-train]   checks on a controlled toy task. For real weights on a GPU, see README.md, "Fine-tuning".
MSG
