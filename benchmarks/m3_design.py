"""M3's design sweep on the validation split (seed 0): the relative ``eps`` floor x the lr, per task.

The logs of the runs behind M3's defaults (lr 0.01, eps 0.01; README "M3 at its defaults") are in
benchmarks/results/m3_design/. They were made with the commands

    python -m benchmarks.m3_design mnist1d_mlp 1e-8,0.01,0.1 0.00316,0.01,0.0316,0.1
    python -m benchmarks.m3_design mnist1d_mlp 1e-8,0.01 0.0001,0.000316,0.001     # mnist1d_mlp_low_lr.log
    python -m benchmarks.m3_design noisy_quadratic 1e-8,0.01,0.1 0.00316,0.01,0.0316,0.1
    python -m benchmarks.m3_design rosenbrock 1e-8,0.01 0.001,0.00316,0.01,0.0316,0.1
    python -m benchmarks.m3_design shakespeare_char 1e-8,0.01 0.00316,0.01,0.0316,0.1
    python -m benchmarks.m3_design mnist1d_cnn 1e-8,0.01 0.001,0.00316,0.01,0.0316

Each line printed: task, eps, lr, final validation loss, diverged. The AdamW group runs at
AdamW's best lr for the task (betas 0.9, 0.999), as in the benchmark suite.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import deepopt  # noqa: E402

#: AdamW's best lr per task (benchmarks/results/results.json), for the non-matrix params
ADAMW_LR = {"mnist1d_mlp": 0.01, "mnist1d_cnn": 0.01, "shakespeare_char": 0.00316, "rosenbrock": 0.316,
            "noisy_quadratic": 0.0316}


def main(argv=None):
    from benchmarks.tasks import TASKS, train
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        raise SystemExit("usage: python -m benchmarks.m3_design TASK EPS,EPS,... LR,LR,...")
    name, eps_list, lrs = argv[0], [float(e) for e in argv[1].split(",")], [float(x) for x in argv[2].split(",")]
    if name not in ADAMW_LR:
        raise SystemExit(f"task must be one of {sorted(ADAMW_LR)}, got {name!r}")
    torch.set_num_threads(1)
    task = TASKS[name](quick=False)
    for eps, lr in itertools.product(eps_list, lrs):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        model = task.build(0)
        opt = deepopt.create_optimizer(model, "m3", lr=lr, adamw_lr=ADAMW_LR[name], adamw_beta2=0.999, eps=eps)
        rec = train(task, model, opt, 0)
        print(name, eps, lr, rec["curve"]["val_loss"][-1], rec.get("diverged"), flush=True)


if __name__ == "__main__":
    main()
