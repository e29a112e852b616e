#!/usr/bin/env bash
# Geo-R1's few-shot claim in miniature, with a model that has a prior (issue 18 §4; BENCHMARKS.md, "Few-shot
# from the sample model"). The shipped sample model was pretrained on two expressions of storage tanks ("the
# largest storage tank", "all storage tanks"). HELD picks what is held out of that pretraining:
#   HELD=smallest-tank (default)  a new kind of expression on a known category: "the smallest storage tank"
#                                 (REC, one box; Acc@0.5 and mean IoU, Geo-R1's REC metric);
#   HELD=building                 a new category: "all buildings" (multi; COCO mAP / AP50, Geo-R1's OVD metric).
# For each seed and K, a K-shot set of HELD from unseen sample scenes, then three arms from the same start
# (resources/sample_model) and the same wall-clock budget:
#   sft   the paper's SFT baseline prompt (no reasoning), the whole budget;
#   grpo  a short reasoning warm start (SFT), then GRPO for the rest;
#   dapo  the same warm start, then DAPO for the rest.
# Each adapter (and the base) is scored by `geo-r1 eval` on:
#   new     held-out scenes of HELD;
#   forget  held-out scenes of what the base model knew ("the largest storage tank" / "all storage tanks");
#   cross   held-out scenes of HELD read at 0.75 m instead of 0.5 m (a ground resolution training never saw).
# Then scripts/fewshot_table.py writes OUT/table.md (mean and spread over the seeds).
# Usage: scripts/bench_fewshot_sample.sh OUT_DIR ["SEEDS"] ["KS"]
# Knobs: HELD, SFT_S, WARM_S, SFT_LR, RL_LR, LIMIT, PARALLEL, TRAIN_SET (extra --set of the recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-fewshot-sample}
SEEDS=${2:-"1 2 3"}
KS=${3:-"1 5 10"}
export HELD=${HELD:-smallest-tank}
case $HELD in
  smallest-tank) export TASK=rec KNOWN=largest-tank NEW_SCENES=24 KNOWN_SCENES=8 TOKENS=100 ;;
  building) export TASK=multi KNOWN=tank NEW_SCENES=2 KNOWN_SCENES=2 TOKENS=200 ;;
  *) echo "HELD must be smallest-tank or building, got $HELD" >&2; exit 2 ;;
esac
export SFT_S=${SFT_S:-150} WARM_S=${WARM_S:-60} SFT_LR=${SFT_LR:-5e-3} RL_LR=${RL_LR:-5e-4} LIMIT=${LIMIT:-48} OUT
export TRAIN_SET=${TRAIN_SET:-}
PARALLEL=${PARALLEL:-2}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export GEO=$PWD/.venv/bin/geo-r1 MODEL=$PWD/resources/sample_model
mkdir -p "$OUT"
COMMON_DATA=(--scene-size 1024 --chip 224 --style all --test-scenes 2 --overwrite)
# The fixed test sets: seeds 4, 5 and 6 draw scenes 4000+, 5000+ and 6000+, which neither pretraining (0-199) nor
# any K-shot set (1000+, 2000+, 3000+) uses. A clearly smallest tank is in about a third of the scenes, hence
# more test scenes for it.
[[ -f "$OUT/forget/dataset.json" ]] || $GEO dataset synthetic -o "$OUT/forget" --shots 1 --seed 4 --categories "$KNOWN" "${COMMON_DATA[@]}" --test-scenes "$KNOWN_SCENES"
[[ -f "$OUT/cross/dataset.json" ]] || $GEO dataset synthetic -o "$OUT/cross" --shots 1 --seed 5 --categories "$HELD" --gsd 0.75 "${COMMON_DATA[@]}" --test-scenes "$NEW_SCENES"
if [[ $TASK == rec ]]; then
  [[ -f "$OUT/new/dataset.json" ]] || $GEO dataset synthetic -o "$OUT/new" --shots 1 --seed 6 --categories "$HELD" "${COMMON_DATA[@]}" --test-scenes "$NEW_SCENES"
fi

one() {  # one (seed, K): its data, three arms, three evaluations
  local seed=$1 k=$2 d="$OUT/s$1-k$2"
  mkdir -p "$d"
  {
    $GEO dataset synthetic -o "$d/data" --shots "$k" --seed "$seed" --categories "$HELD" \
      --scene-size 1024 --chip 224 --style all --test-scenes 2 --overwrite
    local train=(--data "$d/data" --model "$MODEL" --config tiny-learn $TRAIN_SET --task "$TASK" --force --threads 1
                 --max-steps 100000 --eval-limit 0 --seed "$seed" --max-completion-length "$TOKENS")
    $GEO train sft "${train[@]}" -o "$d/sft" --learning-rate "$SFT_LR" --max-seconds "$SFT_S"
    $GEO train sft "${train[@]}" -o "$d/warm" --reasoning --learning-rate "$SFT_LR" --max-seconds "$WARM_S"
    for rl in grpo dapo; do
      $GEO train "$rl" "${train[@]}" -o "$d/$rl" --init-adapter "$d/warm" --learning-rate "$RL_LR" \
        --per-device-train-batch-size 32 --max-seconds "$(( SFT_S - WARM_S ))"
    done
    local arms=(--adapter sft="$d/sft" --adapter grpo="$d/grpo" --adapter dapo="$d/dapo")
    for set in new forget cross; do
      local data="$OUT/$set"; [[ $set == new && $TASK == multi ]] && data="$d/data"
      $GEO eval --data "$data" --model "$MODEL" --task "$TASK" --split test --max-new-tokens "$TOKENS" \
        --limit "$LIMIT" --examples 8 -o "$d/eval-$set" "${arms[@]}"
    done
  } > "$d/log.txt" 2>&1 && echo "done s$seed k$k" || echo "FAILED s$seed k$k (see $d/log.txt)"
}
export -f one
for s in $SEEDS; do for k in $KS; do echo "$s $k"; done; done | xargs -P "$PARALLEL" -L 1 bash -c 'one $0 $1'
.venv/bin/python scripts/fewshot_table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
