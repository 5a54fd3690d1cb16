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
mkdir -p "$OUT"
for model in $MODELS; do
  base="$OUT/$model-base"
  [ -f "$base/records.jsonl" ] || python sample.py --model "$model" --no-tokens --prompts data/shapes_eval.jsonl \
      --seed 0 --batch 96 --threads "$THREADS" --out "$base"
  runs=("$base")
  for loss in softrepa agsm; do
    for seed in $SEEDS; do
      run="$OUT/$model-$loss-seed$seed"
      [ -f "$run/tokens.safetensors" ] || python train.py --model "$model" --loss "$loss" --seed "$seed" \
          --steps "$STEPS" --val-every 50 --val-n 8 --threads "$THREADS" --out "$run"
      [ -f "$run/records.jsonl" ] || python sample.py --model "$model" --tokens "$run/tokens.safetensors" \
          --prompts data/shapes_eval.jsonl --seed 0 --batch 96 --threads "$THREADS" --out "$run"
      runs+=("$run")
    done
  done
  python eval.py --runs "${runs[@]}" --metrics shapes classifier --model "$model" \
      --json "$OUT/$model.json" --plot "$OUT/$model.png"
done
