set -e
export OMP_NUM_THREADS=1
cd /work/sci
for lr in 1e-4 5e-4; do
  python -m shapes.pretrain --model tiny-sd3 --init shapes/weights/tiny-sd3 --freeze-text --loose 0 --batch 4 --lr $lr --warmup 200 --ema 0.995 --steps 14500 --cooldown 2000 --threads 1 --device cpu --seed 0 --out runs/pilot/whole-lr$lr --work runs/pilot/whole-lr$lr-work --ckpt-every 500 > runs/pilot/whole-lr$lr.out 2>&1
  python -m shapes.ladder_eval --set docs/ladder/pilot/dev-color_attr.jsonl --seeds 4 --pretrained runs/pilot/whole-lr$lr --out runs/pilot/whole-lr$lr.json --base-cache runs/pilot/base-devca.json > runs/pilot/whole-lr$lr.eval.out 2>&1
done
