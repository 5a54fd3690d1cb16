#!/usr/bin/env bash
# The quick start, like nanoGPT's shakespeare_char: train AGSM soft tokens on the shipped tiny-sd3 (CPU,
# a few minutes), then sample the dev prompts with 4 fixed seeds each, with and without the tokens, and
# print the per-category scores with 95% intervals and the paired difference against the base. Writes
# runs/quickstart/{tokens.safetensors, log.csv, val/, grid.png (base | tokens, same seeds; each row
# headed by its prompt, each image by its variant and the checker's verdict), protocol.json}.
#   bash shapes/quickstart.sh                      # STEPS=1500: 289 s on 2 CPU cores (README)
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root
OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-1500}
THREADS=${THREADS:-2}
# Redirected to a file, every progress-bar redraw would be a line of the log (thousands): there, a bar
# redraws at most every 30 s (tqdm >= 4.66 reads its defaults from TQDM_* variables).
if [ ! -t 1 ] || [ ! -t 2 ]; then export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}; fi
python train.py --model tiny-sd3 --loss agsm --steps "$STEPS" --val-every 500 --val-n 4 --threads "$THREADS" --out "$OUT"
python eval.py --protocol dev --n-per-category 20 --model tiny-sd3 --tokens "$OUT/tokens.safetensors" \
    --grid "$OUT/grid.png" --json "$OUT/protocol.json"
