#!/usr/bin/env bash
# The quick start, like nanoGPT's shakespeare_char: on the gated base (shapes/weights/tiny-sd3-gated, a
# tiny-sd3 that binds colours well only when the word "exactly" stands before the prompt), train from
# untagged captions, with the same loss and steps, (1) one learned vector at the text encoder's input
# (--params prompt) and (2) the papers' soft tokens in the denoiser's text stream; then sample the dev
# colour-attribution prompts with 4 fixed seeds each, untagged, with the word, and with each file, and print
# each one's score, its paired difference against untagged and its share of the word's gain (CPU, minutes).
# Writes runs/quickstart/{prompt/, tokens/, grid.png, scores.json}.
#   bash shapes/quickstart.sh                   # LOSS=dsm (default) | softrepa; STEPS=2000; THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-2000}
THREADS=${THREADS:-2}
LOSS=${LOSS:-dsm}
BASE=shapes/weights/tiny-sd3-gated
# Redirected to a file, every progress-bar redraw would be a line of the log (thousands): there, a bar
# redraws at most every 30 s (tqdm >= 4.66 reads its defaults from TQDM_* variables).
if [ ! -t 1 ] || [ ! -t 2 ]; then export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}; fi
# The flags of docs/gated/'s table (lr 1e-2 for both; the prompt: one vector started from the word "a").
common=(--model tiny-sd3 --pretrained "$BASE" --data shapes --loss "$LOSS" --lr 1e-2 --steps "$STEPS"
        --val-every 0 --log-every 500 --threads "$THREADS" --resume latest)
python train.py "${common[@]}" --params prompt --out "$OUT/prompt"
python train.py "${common[@]}" --n-tokens 16 --layers 4 --out "$OUT/tokens"
python -m shapes.gated_demo --pretrained "$BASE" --set dev --categories color_attr --threads "$THREADS" \
    --trained prompt="$OUT/prompt/prompt.safetensors" tokens="$OUT/tokens/tokens.safetensors" \
    --grid "$OUT/grid.png" --json "$OUT/scores.json"
