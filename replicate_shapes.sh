#!/usr/bin/env bash
# The README's replication table on the shapes world, offline on 2 CPU cores:
# base / +SoftREPA / +AGSM for tiny-sd3 and tiny-sd1.5, three training seeds each, scored with the
# exact per-category checker and the held-out diffusion-classifier accuracy.
#   bash replicate_shapes.sh                 # everything (see the README for the time it took)
#   MODELS=tiny-sd3 SEEDS="0" bash replicate_shapes.sh
set -euo pipefail
cd "$(dirname "$0")"
MODELS=${MODELS:-"tiny-sd3 tiny-sd1.5"}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-300}
OUT=${OUT:-runs/replicate}
THREADS=${THREADS:-2}
PER_CATEGORY=${PER_CATEGORY:-80}   # prompts per category from data/shapes_eval.jsonl (80 = all 480)
LR=${LR:-1e-3}
VAL_EVERY=${VAL_EVERY:-50}
mkdir -p "$OUT"
PROMPTS="$OUT/prompts-$PER_CATEGORY.jsonl"
python -c "
import json, sys, shapes
records = shapes.load_eval_set()
with open(sys.argv[2], 'w') as f:
    for c in shapes.CATEGORIES:
        for r in [r for r in records if r['spec']['category'] == c][:int(sys.argv[1])]:
            f.write(json.dumps(r) + '\\n')
" "$PER_CATEGORY" "$PROMPTS"
for model in $MODELS; do
  base="$OUT/$model-base"
  [ -f "$base/records.jsonl" ] || python sample.py --model "$model" --no-tokens --prompts "$PROMPTS" \
      --seed 0 --batch 96 --threads "$THREADS" --out "$base"
  runs=("$base")
  for loss in softrepa agsm; do
    for seed in $SEEDS; do
      run="$OUT/$model-$loss-seed$seed"
      [ -f "$run/tokens.safetensors" ] || python train.py --model "$model" --loss "$loss" --seed "$seed" \
          --steps "$STEPS" --lr "$LR" --val-every "$VAL_EVERY" --val-n 8 --threads "$THREADS" --out "$run"
      [ -f "$run/records.jsonl" ] || python sample.py --model "$model" --tokens "$run/tokens.safetensors" \
          --prompts "$PROMPTS" --seed 0 --batch 96 --threads "$THREADS" --out "$run"
      runs+=("$run")
    done
  done
  python eval.py --runs "${runs[@]}" --metrics shapes classifier --model "$model" --classifier-n "$PER_CATEGORY" \
      --json "$OUT/$model.json" --plot "$OUT/$model.png" --tradeoff classifier shapes_mean --curve score_mean
done
