"""The matched-lr control for ``deep-ns``: torch Muon at the lr selected for ``deep-ns``.

``deep-ns`` is Muon's rule plus DeepMomentum's MLP memory, but the suite selects each optimizer's
lr on its own (seed 10), so a difference between the two rows of the benchmark table can be the
lr, not the memory. This script reruns torch Muon at ``deep-ns``'s selected lr on the reported
seeds of every task where both run, with the suite's models, data, budgets and AdamW group, and
sets the two side by side: final test loss and per-seed steps to the suite's target.

    python -m benchmarks.matched_lr            # -> benchmarks/results/matched_lr.json, ~2 min
    python -m benchmarks.matched_lr --table    # the docs/benchmarks.md table from that file
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# numpy, torch and deepopt are imported inside the functions: --help answers before they load
from examples import cli  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def steps_to(curve: dict, target: float):
    """The first evaluated step whose test loss is at or below ``target`` (None: never)."""
    return next((s for s, loss in zip(curve["step"], curve["test_loss"]) if loss <= target), None)


def muon_runs(task_name: str, lr: float, aux_lr: float, target: float, seeds) -> dict:
    import numpy as np
    import torch
    from benchmarks import optimizers as O
    from benchmarks.run import final_test_loss
    from benchmarks.tasks import TASKS, train
    task = TASKS[task_name](quick=False)
    losses, steps = [], []
    for seed in seeds:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = task.build(seed)
        opt = O.build("muon", model, lr, aux_lr=aux_lr, seed=seed, mf_periods=task.mf_periods)
        rec = train(task, model, opt, seed)
        losses.append(final_test_loss(rec))   # as the suite scores it (Shakespeare: the whole held-out play)
        steps.append(None if rec.get("diverged") else steps_to(rec["curve"], target))
    return dict(lr=lr, final_test_loss=losses, steps_to_target_per_seed=steps)


def table(record: dict) -> str:
    from benchmarks.run import mean_ci_text
    lines = ["| task | lr | deep-ns test loss | torch Muon test loss | deep-ns steps to target | torch Muon steps to target |",
             "|---|---|---|---|---|---|"]
    for task, runs in record["tasks"].items():
        d, m = runs["deep-ns"], runs["muon"]
        per_seed = lambda xs: " / ".join("—" if x is None else str(x) for x in xs)  # noqa: E731
        loss = [mean_ci_text(rule["final_test_loss"]) or "diverged" for rule in (d, m)]
        lines.append(f"| {task} | {m['lr']:.3g} | {loss[0]} | {loss[1]} | "
                     f"{per_seed(d['steps_to_target_per_seed'])} | {per_seed(m['steps_to_target_per_seed'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "results.json"), help="the suite's results (JSON)")
    ap.add_argument("--out", default=str(RESULTS / "matched_lr.json"), help="result file (JSON)")
    ap.add_argument("--table", action="store_true", help="print the docs/benchmarks.md table from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    import torch
    torch.set_num_threads(1)
    suite = json.loads(Path(args.results).read_text())
    seeds = suite["meta"]["seeds"]
    record = dict(seeds=seeds, tasks={})
    for name, tr in suite["tasks"].items():
        opts = tr["optimizers"]
        if tr["kind"] == "continual" or "muon" not in opts or "deep-ns" not in opts:
            continue
        deep = opts["deep-ns"]
        record["tasks"][name] = {
            "deep-ns": dict(lr=deep["best_lr"], final_test_loss=deep["final_test_loss"],
                            steps_to_target_per_seed=deep["steps_to_target_per_seed"]),
            "muon": muon_runs(name, deep["best_lr"], opts["adamw"]["best_lr"], tr["target_test_loss"], seeds)}
        print(f"{name}: done", flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(table(record))


if __name__ == "__main__":
    cli.run(main)
