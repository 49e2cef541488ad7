"""M3's design sweep on the validation split (seed 0): the relative ``eps`` floor x the lr, per task.

The logs of the runs behind M3's defaults (lr 0.01, eps 0.01; docs/optimizers.md "M3 at its defaults") are in
benchmarks/results/m3_design/. They were made with the commands

    python -m benchmarks.m3_design mnist1d_mlp --eps 1e-8 0.01 0.1 --lr 0.001 0.00316 0.01 0.0316
    python -m benchmarks.m3_design noisy_quadratic --eps 1e-8 0.01 0.1 --lr 0.00316 0.01 0.0316 0.1
    python -m benchmarks.m3_design rosenbrock --eps 1e-8 0.01 0.1 --lr 0.00316 0.01 0.0316
    python -m benchmarks.m3_design mnist1d_cnn --eps 1e-8 0.01 0.1 --lr 0.00316 0.01 0.0316
    python -m benchmarks.m3_design shakespeare_char --eps 1e-8 0.01 0.1 --lr 0.00316 0.01 0.0316

(2026-12-02, with the update rescaled to Muon's RMS.) Each line printed: task, eps, lr, final validation loss, diverged. The AdamW group runs at
AdamW's best lr for the task (betas 0.9, 0.999), as in the benchmark suite.
"""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# numpy, torch and deepopt are imported in main(): --help answers before they load
from examples import cli  # noqa: E402

#: AdamW's best lr per task (benchmarks/results/results.json), for the non-matrix params
ADAMW_LR = {"mnist1d_mlp": 0.01, "mnist1d_cnn": 0.01, "shakespeare_char": 0.00316, "rosenbrock": 0.316,
            "noisy_quadratic": 0.0316}


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("task", choices=list(ADAMW_LR), help="the benchmark task")
    ap.add_argument("--eps", type=cli.nonnegative_float, nargs="+", default=[1e-8, 0.01, 0.1],
                    help="M3's relative eps floors")
    ap.add_argument("--lr", type=cli.positive_float, nargs="+", default=[0.00316, 0.01, 0.0316, 0.1],
                    help="M3's learning rates")
    args = ap.parse_args(argv)
    import deepopt
    import numpy as np
    import torch
    from benchmarks.tasks import TASKS, train
    name = args.task
    torch.set_num_threads(1)
    task = TASKS[name](quick=False)
    for eps, lr in itertools.product(args.eps, args.lr):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        model = task.build(0)
        opt = deepopt.create_optimizer(model, "m3", lr=lr, adamw_lr=ADAMW_LR[name], adamw_beta2=0.999, eps=eps,
                                       ns_dtype="bfloat16")   # as the logs were made (and torch Muon runs)
        rec = train(task, model, opt, 0)
        print(name, eps, lr, rec["curve"]["val_loss"][-1], rec.get("diverged"), flush=True)


if __name__ == "__main__":
    cli.run(main)
