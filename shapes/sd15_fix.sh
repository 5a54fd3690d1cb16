#!/usr/bin/env bash
# Issue 33 item 4: one short try of the cheap fix for tiny-sd1.5's tokens -- a learning rate matched to the
# tokens' scale. The BOS x m init has RMS 0.93 per coordinate, tiny-sd3's N(0, 0.02) init 0.0206: 45x, so
# lr 1e-3 x 45 = 4.5e-2. SoftREPA (the loss that moved tiny-sd3 most), seed 0, 2,000 steps, otherwise the
# replication's flags; scored with the eval protocol beside the replication's SoftREPA seed 0 (lr 1e-3),
# both against the same base. Re-runnable; one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
R=runs/ladder
D=docs/ladder
out=$R/sd15-softrepa-lr4.5e-2-seed0
mkdir -p "$out" "$D/runs" "$D/eval"
cmd=(python train.py --model tiny-sd1.5 --loss softrepa --seed 0 --steps 2000 --lr 4.5e-2 --device cpu --threads 1
  --val-every 0 --resume latest --out "$out")
if [ ! -f "$out/DONE" ]; then
  { echo "commit $(git rev-parse HEAD)"; echo "command ${cmd[*]}"; } > "$out/PROVENANCE.txt"
  echo "$(date -u +%FT%TZ),start,sd15-softrepa-lr4.5e-2-seed0" >> "$D/times.csv"
  t0=$SECONDS
  "${cmd[@]}" > "$out/stdout.txt" 2>&1
  echo $((SECONDS - t0)) > "$out/wall_s"
  echo "$(date -u +%FT%TZ),end,sd15-softrepa-lr4.5e-2-seed0,$((SECONDS - t0))" >> "$D/times.csv"
  touch "$out/DONE"
  mkdir -p "$D/runs/sd15-softrepa-lr4.5e-2-seed0"
  cp "$out"/{config.json,log.csv,tokens.safetensors,PROVENANCE.txt,wall_s} "$D/runs/sd15-softrepa-lr4.5e-2-seed0/"
fi
for v in sd15-softrepa-lr4.5e-2-seed0:$out/tokens.safetensors \
         sd15-softrepa-lr1e-3-seed0:docs/results/rep-tiny-sd1.5-softrepa-seed0/tokens.safetensors; do
  name=${v%%:*} tok=${v#*:}
  [ -f "$D/eval/sd15/$name.json" ] && continue
  mkdir -p "$D/eval/sd15"
  echo "$(date -u +%FT%TZ),start,eval-$name" >> "$D/times.csv"
  t0=$SECONDS
  python -m shapes.ladder_eval --model tiny-sd1.5 --set eval --base-cache "$D/eval/sd15/base.json" --threads 1 \
    --name "$name" --tokens "$tok" --out "$D/eval/sd15/$name.json" > "$R/eval-$name.txt" 2>&1
  echo "$(date -u +%FT%TZ),end,eval-$name,$((SECONDS - t0))" >> "$D/times.csv"
done
git add "$D" shapes/sd15_fix.sh >/dev/null 2>&1 && git commit -qm "docs/ladder: tiny-sd1.5 lr matched to the token scale (one run)" || true
