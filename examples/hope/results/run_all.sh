#!/usr/bin/env bash
# Reproduce examples/hope/results (CPU, one thread per run, one run at a time).
set -e
for s in 0 1 2; do
  python examples/hope/train.py --seed $s --threads 1 --quiet --out out/hope_seed$s
done
python examples/hope/recall.py --seed 0 1 2 --lr-transformer 1e-2 --out out/recall   # HOPE runs (+ Transformer at lr 1e-2)
python examples/hope/recall.py --model transformer --seed 0 1 2 --out out/recall_tr   # Transformer at lr 1e-3
python examples/hope/continual.py --ckpt-dir out/hope_seed0 --continual --eval-lengths 128 256 512 1024 2048
python examples/hope/train.py --throughput --threads 1 --out out/throughput
python examples/hope/recall.py --model transformer --lr 1e-3 --steps 2000 --out out/recall_tr_long
python examples/hope/results/sweep_and_ablate.py --runs out/hope_ablate   # ablations.json
python examples/hope/results/make_results.py --runs out
