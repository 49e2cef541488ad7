"""Does the delta rule (L2-regression momentum) make training more reliable on noisy data?

    python -m benchmarks.robustness                       # -> benchmarks/results/robustness/ (~15 min, 2 cores)
    python -m benchmarks.robustness --table               # the docs table from robustness.json
    python -m benchmarks.robustness --quick --out /tmp/rb # smoke run

The seeds' claim: the L2 objective "makes optimizers more reliable when data is noisy or
surprising". Measured on the benchmark MLP (MNIST-1D 40-128-128-10, 600 steps, batch 128), clean
and in four corrupted versions (``benchmarks.tasks``): 20% and 40% of the training labels flipped
(val/test clean), heavy-tailed gradient noise (tail index 1.5: infinite variance) and rare spikes
(2% of the steps, noise 30x the gradient's rms). ``delta`` (DeltaMomentum, delta 0.5) and
``deep`` (DeepMomentum's l2 MLP memory) against their own special case SGD-momentum, AdamW and
torch Muon, each at its best lr per task (4-7-point half-decade sweep on seed 10, the main
suite's grids), then seeds 0-4: test accuracy and loss, mean ± 95% interval, and one-sided
paired t-tests of delta and deep against SGD-momentum and against the best baseline of the task.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# numpy, torch and the tasks are imported inside the functions: --help answers before they load

TASKS = ["mnist1d_mlp", "mnist1d_labels20", "mnist1d_labels40", "mnist1d_heavy_tail", "mnist1d_spikes"]
OPTIMIZERS = ["adamw", "sgd", "muon", "delta", "deep"]
CHALLENGERS, BASELINES = ("delta", "deep"), ("sgd", "adamw", "muon")
SEEDS, SELECT_SEED = [0, 1, 2, 3, 4], 10
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "robustness"


def _acc_cell(e):
    if e.get("test_acc_mean") is None or not math.isfinite(e["test_acc_mean"]):
        return f"diverged ({e['diverged']} of {len(e['seeds'])} seeds)"
    return f"{e['test_acc_mean']:.3f} ± {e['test_acc_ci']:.3f}"


def _diff_cell(t):
    """A test of test accuracy (run on the negated accuracies): the difference in accuracy."""
    return "–" if t is None else f"{-t['mean_diff']:+.3f} ± {t['ci']:.3f} (p {t['p']:.2g})"


def table(results: dict) -> str:
    """Test accuracy per task and optimizer; delta's and deep's paired differences."""
    head = "| task | " + " | ".join(OPTIMIZERS) + " | delta − SGD-m | deep − SGD-m | delta − best baseline |"
    lines = [head, "|" + "---|" * (len(OPTIMIZERS) + 4)]
    for task, r in results["tasks"].items():
        e = r["entries"]
        cells = [f"{_acc_cell(e[o])} (lr {e[o]['lr']:.3g})" for o in OPTIMIZERS]
        tests = r["tests"]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {_diff_cell(tests['delta']['sgd'])} | "
                     f"{_diff_cell(tests['deep']['sgd'])} | {_diff_cell(tests['delta']['best'])} ({r['best_baseline']}) |")
    return "\n".join(lines)


def findings(results: dict) -> list[str]:
    """One plain line per challenger and task where a paired test says p < 0.05 either way."""
    lines = []
    for task, r in results["tasks"].items():
        for who in CHALLENGERS:
            for against in ("sgd", "best"):
                t = r["tests"][who][against]
                if t is None:
                    continue
                name = "SGD-momentum" if against == "sgd" else r["best_baseline"]
                if t["p"] < 0.05:
                    lines.append(f"{task}: {who} beats {name} by {-t['mean_diff']:.3f} accuracy (p {t['p']:.2g})")
                elif t["p"] > 0.95:
                    lines.append(f"{task}: {who} loses to {name} by {t['mean_diff']:.3f} accuracy (p {1 - t['p']:.2g} the other way)")
    return lines or ["no paired difference at p < 0.05 in either direction"]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5))
    tasks = list(results["tasks"])
    width = 0.8 / len(OPTIMIZERS)
    for j, o in enumerate(OPTIMIZERS):
        means = [results["tasks"][t]["entries"][o]["test_acc_mean"] for t in tasks]
        cis = [results["tasks"][t]["entries"][o]["test_acc_ci"] or 0 for t in tasks]
        ax.errorbar([i + (j - len(OPTIMIZERS) / 2 + 0.5) * width for i in range(len(tasks))], means, yerr=cis,
                    fmt="o", capsize=3, label=o)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set(ylabel="test accuracy (mean ± 95% interval)", title=f"MNIST-1D MLP, seeds {results['seeds']}, each at its best lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from benchmarks import run
    args = run.study_parser(__doc__, DEFAULT_OUT, "robustness.json").parse_args(argv)
    out = Path(args.out)
    if args.table:
        results = json.loads((out / "robustness.json").read_text())
        print(table(results) + "\n\n" + "\n".join(results["findings"]))
        return results
    from benchmarks.tasks import EXTRA_TASKS, TASKS as MAIN
    log = lambda *s: print(*s, flush=True)   # noqa: E731
    t0 = time.perf_counter()
    seeds = SEEDS[:2] if args.quick else SEEDS
    classes = {t: {**MAIN, **EXTRA_TASKS}[t] for t in TASKS}
    sw, aux, best = run.tune(classes, OPTIMIZERS, out, args.jobs, args.quick, log, SELECT_SEED)
    from benchmarks import optimizers as O
    jobs = [dict(task=t, optimizer=o, lr=lr, seed=s, aux_lr=aux[t] if O.spec(o).get("aux") else None)
            for (t, o), lr in best.items() for s in seeds]
    log(f"== seeds {seeds} at the best lrs")
    recs = {(r["task"], r["optimizer"], r["seed"]): r for r in run.run_jobs(jobs, out, args.jobs, args.quick, log)}
    results = dict(command="python -m benchmarks.robustness" + (" --quick" if args.quick else ""),
                   machine=run.machine(), date=time.strftime("%Y-%m-%d"), seeds=seeds, select_seed=SELECT_SEED,
                   tasks={})
    for t in TASKS:
        entries = {o: run.seed_summary([recs[(t, o, s)] for s in seeds]) for o in OPTIMIZERS}
        for e in entries.values():
            e["neg_test_acc"] = [-a for a in e["test_acc"]]
        best_baseline = max(BASELINES, key=lambda o: entries[o]["test_acc_mean"]   # (NaN: a diverged seed)
                            if math.isfinite(entries[o]["test_acc_mean"]) else -math.inf)
        tests = {who: {against: run.paired_comparison(entries[who], entries[ref], keys=("neg_test_acc",))["neg_test_acc"]
                       for against, ref in (("sgd", "sgd"), ("best", best_baseline))} for who in CHALLENGERS}
        for e in entries.values():
            e.pop("neg_test_acc")
        results["tasks"][t] = dict(description=run._get_task(t, args.quick).describe(), entries=entries,
                                   best_baseline=best_baseline, tests=tests,
                                   sweeps={o: {f"{lr:.3g}": run.final_value(r, "val") for lr, r in sorted(sw[(t, o)].items())}
                                           for o in OPTIMIZERS})
    results["findings"] = findings(results)
    results["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    (out / "robustness.md").write_text(f"# Robustness: label noise and gradient noise\n\n`{results['command']}`, "
                                       f"{results['machine']}, {results['date']}. Test accuracy, mean ± 95% interval "
                                       f"over seeds {seeds}; differences are paired, p one-sided.\n\n{table(results)}\n\n"
                                       + "\n".join(f"- {f}" for f in results["findings"]) + "\n")
    plot(results, out / "robustness.png")
    log(table(results) + "\n\n" + "\n".join(results["findings"]))
    return results


if __name__ == "__main__":
    from examples import cli
    cli.run(main)
