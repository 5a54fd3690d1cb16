#!/bin/bash
# One arm run of docs/gated/ on the gated base, then its score: bash docs/gated/arm.sh NAME SEED SET "TRAIN FLAGS"
# ($BASE: the gated base's weights folder, default runs/gated/base2/weights; $CATEGORIES: what is scored,
# default "two_object color_attr"; $EVAL_DIR, $RUNS_DIR: where the JSON and the run go, default docs/gated/eval
# and runs/gated/arms)
# trains runs/gated/arms/NAME-seedSEED (2,000 steps, the shapes stream's precise untagged captions, one thread;
# --resume latest: a killed run continues) and scores its file on SET (dev|eval), two objects and colour
# attribution, into docs/gated/eval/NAME-seedSEED-SET.json. Run from a worktree of a commit (queue.sh).
set -e
name=$1 seed=$2 set=$3 flags=$4
SCI=${SCI:?the science worktree}
BASE=${BASE:-$SCI/runs/gated/base2/weights}
out=$SCI/${RUNS_DIR:-runs/gated/arms}/$name-seed$seed
python train.py --model tiny-sd3 --pretrained "$BASE" --data shapes --steps 2000 \
  --threads 1 --workers 1 --seed "$seed" --out "$out" --resume latest --log-every 500 $flags
file=$(ls "$out"/tokens.safetensors "$out"/lora.safetensors "$out"/prompt.safetensors "$out"/denoiser.safetensors 2>/dev/null | head -1)
python -m shapes.gated_eval --pretrained "$BASE" --threads 1 --set "$set" \
  --categories ${CATEGORIES:-two_object color_attr} --trained "$file" --name "$name-seed$seed" \
  --out "$SCI/${EVAL_DIR:-docs/gated/eval}/$name-seed$seed-$set.json"
