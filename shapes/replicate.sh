#!/usr/bin/env bash
# Replication on the shapes world (issue: both papers at a real training budget): for each backbone,
# tokens trained with plain score matching on matched pairs (dsm, AGSM Table 4 (i)), SoftREPA and AGSM,
# one run per training seed, each with its dev-set validation curve in log.csv; then the protocol
# (4 sampling seeds per prompt fixed by rule, 95% bootstrap intervals, over-counting) on a prompt set,
# base and every token file side by side. Runs are resumable: a run that was stopped continues
# (--resume latest), one that finished is skipped.
#   MODELS=tiny-sd1.5 SEEDS="0" STEPS=2000 SET=dev PER_CATEGORY=20 bash shapes/replicate.sh
#   SET=eval PER_CATEGORY=0 bash shapes/replicate.sh      # the final measurement, all 480 eval prompts
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
MODELS=${MODELS:-"tiny-sd3 tiny-sd1.5"}
SEEDS=${SEEDS:-"0 1 2"}
LOSSES=${LOSSES:-"dsm softrepa agsm"}
STEPS=${STEPS:-2000}
VAL_EVERY=${VAL_EVERY:-500}
SET=${SET:-dev}
PER_CATEGORY=${PER_CATEGORY:-20}
OUT=${OUT:-runs/replicate}
THREADS=${THREADS:-2}
PROTOCOL=${PROTOCOL:-1}          # 0: train only (the protocol runs later, e.g. on the eval set)
for model in $MODELS; do
  tokens=()
  for loss in $LOSSES; do
    for seed in $SEEDS; do
      run="$OUT/$model-$loss-seed$seed"
      if [ ! -f "$run/tokens.safetensors" ]; then
        start=$(date +%s)      # wall time of this invocation (a resumed run counts only its last part)
        python train.py --model "$model" --loss "$loss" --seed "$seed" --steps "$STEPS" \
            --val-every "$VAL_EVERY" --val-n 8 --threads "$THREADS" --out "$run" --resume latest
        echo $(( $(date +%s) - start )) > "$run/wall_s"
      fi
      tokens+=("$run/tokens.safetensors")
    done
  done
  [ "$PROTOCOL" = 1 ] || continue
  python eval.py --protocol "$SET" --n-per-category "$PER_CATEGORY" --model "$model" --threads "$THREADS" \
      --tokens "${tokens[@]}" --json "$OUT/$model-$SET.json" --grid "$OUT/$model-$SET.png"
done
