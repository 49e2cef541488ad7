#!/usr/bin/env bash
# Reproduce examples/hope/results (CPU, one thread per run, one run at a time).
set -e
for s in 0 1 2; do
  python examples/hope/train.py --seed $s --threads 1 --quiet --out out/hope_seed$s
done
python examples/hope/recall.py --seeds 0 1 2 --out out/recall
python examples/hope/continual.py --ckpt-dir out/hope_seed0 --continual
python examples/hope/results/make_results.py --runs out
