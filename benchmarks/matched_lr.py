"""The matched-lr controls for DeepMomentum's MLP memory: its twin without the memory, at its lr.

``deep-ns`` is Muon's rule plus DeepMomentum's MLP memory, and ``deep`` is SGD-momentum's plus
the memory, but the suite selects each optimizer's lr on its own (seed 10), so a difference
between two rows of the benchmark table can be the lr, not the memory. This script reruns torch
Muon at ``deep-ns``'s selected lr on the reported seeds of every task where both run (final test
loss and per-seed steps to the suite's target), and torch SGD at ``deep``'s selected lr on the
continual task (final accuracy and forgetting), with the suite's models, data, budgets and AdamW
group.

    python -m benchmarks.matched_lr            # -> benchmarks/results/matched_lr.json, ~2 min
    python -m benchmarks.matched_lr --table    # the docs/benchmarks.md tables from that file
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


def twin_runs(optimizer: str, task_name: str, lr: float, aux_lr: float, target: float, seeds) -> dict:
    """``optimizer`` on ``task_name`` at ``lr`` on ``seeds``, scored as the suite scores it."""
    import numpy as np
    import torch
    from benchmarks import optimizers as O
    from benchmarks.run import final_test_loss
    from benchmarks.tasks import TASKS, continual_metrics, train
    task = TASKS[task_name](quick=False)
    out = dict(lr=lr, final_test_loss=[], steps_to_target_per_seed=[], avg_acc=[], forgetting=[])
    for seed in seeds:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model = task.build(seed)
        opt = O.build(optimizer, model, lr, aux_lr=aux_lr, seed=seed, mf_periods=task.mf_periods)
        rec = train(task, model, opt, seed)
        out["final_test_loss"].append(final_test_loss(rec))   # (Shakespeare: the whole held-out play)
        out["steps_to_target_per_seed"].append(None if rec.get("diverged") else steps_to(rec["curve"], target))
        if task.kind == "continual" and not rec.get("diverged"):
            metrics = continual_metrics(rec["acc_matrix"]["test"])
            out["avg_acc"].append(metrics["avg_acc"])
            out["forgetting"].append(metrics["forgetting"])
    return out


def table(record: dict) -> str:
    from benchmarks.run import mean_ci_text
    lines = ["| task | lr | deep-ns test loss | torch Muon test loss | deep-ns steps to target | torch Muon steps to target |",
             "|---|---|---|---|---|---|"]
    for task, runs in record["tasks"].items():
        if "muon" not in runs:
            continue
        d, m = runs["deep-ns"], runs["muon"]
        per_seed = lambda xs: " / ".join("—" if x is None else str(x) for x in xs)  # noqa: E731
        loss = [mean_ci_text(rule["final_test_loss"]) or "diverged" for rule in (d, m)]
        lines.append(f"| {task} | {m['lr']:.3g} | {loss[0]} | {loss[1]} | "
                     f"{per_seed(d['steps_to_target_per_seed'])} | {per_seed(m['steps_to_target_per_seed'])} |")
    return "\n".join(lines)


def continual_table(record: dict) -> str:
    """``deep`` against torch SGD at ``deep``'s lr on the continual task."""
    from benchmarks.run import mean_ci_text
    lines = ["| task | lr | deep avg final acc | torch SGD avg final acc | deep forgetting | torch SGD forgetting |",
             "|---|---|---|---|---|---|"]
    for task, runs in record["tasks"].items():
        if "sgd" not in runs:
            continue
        d, m = runs["deep"], runs["sgd"]
        cells = [mean_ci_text(rule[key], "{:.3f}", "{:.3f}") or "diverged"
                 for key in ("avg_acc", "forgetting") for rule in (d, m)]
        lines.append(f"| {task} | {m['lr']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "results.json"), help="the suite's results (JSON)")
    ap.add_argument("--out", default=str(RESULTS / "matched_lr.json"), help="result file (JSON)")
    ap.add_argument("--table", action="store_true", help="print the docs/benchmarks.md table from --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        record = json.loads(Path(args.out).read_text())
        print(table(record) + "\n\n" + continual_table(record))
        return
    import torch
    torch.set_num_threads(1)
    suite = json.loads(Path(args.results).read_text())
    seeds = suite["meta"]["seeds"]
    record = dict(seeds=seeds, tasks={})
    for name, tr in suite["tasks"].items():
        opts = tr["optimizers"]
        aux, target = opts["adamw"]["best_lr"], tr["target_test_loss"]
        if tr["kind"] == "continual":   # deep's forgetting against SGD's at deep's lr
            deep = opts["deep"]
            record["tasks"][name] = {
                "deep": dict(lr=deep["best_lr"], avg_acc=deep["avg_acc"], forgetting=deep["forgetting"]),
                "sgd": twin_runs("sgd", name, deep["best_lr"], aux, target, seeds)}
        elif "muon" in opts and "deep-ns" in opts:
            deep = opts["deep-ns"]
            record["tasks"][name] = {
                "deep-ns": dict(lr=deep["best_lr"], final_test_loss=deep["final_test_loss"],
                                steps_to_target_per_seed=deep["steps_to_target_per_seed"]),
                "muon": twin_runs("muon", name, deep["best_lr"], aux, target, seeds)}
        else:
            continue
        print(f"{name}: done", flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(table(record) + "\n\n" + continual_table(record))


if __name__ == "__main__":
    cli.run(main)
