"""Char-level GPT: every recipe against torch Muon and AdamW where users train.

    python -m benchmarks.char_gpt                        # -> benchmarks/results/char_gpt/ (~60 min, 2 cores)
    python -m benchmarks.char_gpt --table                # the docs table from char_gpt.json
    python -m benchmarks.char_gpt --quick --out /tmp/cg  # smoke run (~1 min)

The task (``benchmarks.tasks.CharGPT``): nanoGPT's baby-GPT size, Transformer++ 4 layers x 128,
4 heads, ctx 64, batch 12, 600 steps, warmup 60 then cosine to lr/10, Shakespeare from the
package's cache. Protocol, as the main suite's (``benchmarks/run.py``):

1. An lr sweep of 4 half-decade points per optimizer (extended past an edge, up to twice, when
   the best lr sits on it) on the selection seed 10, scored on the final validation loss. AdamW
   first: its best lr is the AdamW lr of Muon, deep-ns and M3 (embeddings, head, norms).
2. Seeds 0-4 at each best lr. Reported: the final validation loss on 2400 fixed windows of the
   validation split (200 batches of 12) and the test loss on the whole held-out play, mean and
   95% t-interval; a one-sided paired t-test (same seeds: same init and batches) of each
   optimizer against torch Muon and against AdamW; steps to AdamW's mean final validation loss
   (evaluations every 100 steps).
3. What carries deep-ns: its ablations at deep-ns's lr (``memory_lr`` 0 = Muon's rule inside
   deepopt, ``memory_lr`` 2, the dot objective, hidden 64); ``memory_lr`` 0 is the matched-lr
   control, torch Muon at deep-ns's lr (one torch Muon run checks that it is so, bit for bit).
4. Weight decay as a user brings it from AdamW: ``create_optimizer(model, name, lr,
   weight_decay=0.1)`` for sgd / delta / deep at their best lr, decoupled (the default) and
   coupled (``decoupled_weight_decay=False``, torch SGD's), seeds 0-2.
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

TASK = "char_gpt"
OPTIMIZERS = ["adamw", "sgd", "muon", "delta", "deep", "deep-ns", "m3"]
ABLATIONS = ["deep-ns-mlr0", "deep-ns-mlr2", "deep-ns-dot", "deep-ns-h64"]
WEIGHT_DECAY_RUNS = [f"{r}-wd{c}" for r in ("sgd", "delta", "deep") for c in ("", "-coupled")]
MATCHED = "muon@deep-ns-lr"
SEEDS, WD_SEEDS, SELECT_SEED = [0, 1, 2, 3, 4], [0, 1, 2], 10
P_BAR = 0.01
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "char_gpt"


def verdict(results: dict) -> str:
    """The plain sentence on deep-ns against torch Muon."""
    e = results["entries"]["deep-ns"]
    test = e["vs_muon"]["val_loss"]
    if test is None:
        return "deep-ns against torch Muon: not testable (a seed diverged)."
    better = test["p"] < P_BAR
    return (f"deep-ns {'beats' if better else 'does not beat'} torch Muon at p < {P_BAR}: final val loss "
            f"{e['val_mean']:.4f} vs {results['entries']['muon']['val_mean']:.4f}, paired difference "
            f"{test['mean_diff']:+.4f} ± {test['ci']:.4f} (95%), one-sided p = {test['p']:.2g} over "
            f"{len(e['seeds'])} seeds.")


def _cell(mean, ci, digits=4):
    if mean is None or not math.isfinite(mean):
        return "diverged"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def _test_cell(t):
    return "–" if t is None else f"{t['mean_diff']:+.4f} ± {t['ci']:.4f} (p {t['p']:.2g})"


def table(results: dict, rows=None) -> str:
    """The markdown table of docs/benchmarks.md from the JSON this script writes (``rows``: those
    entries only, as README)."""
    lines = ["| optimizer | lr | val loss (2400 windows) | test loss (held-out play) | val − Muon (paired, p one-sided) "
             "| val − AdamW (paired, p) | steps to AdamW's final val |",
             "|---|---|---|---|---|---|---|"]
    for name, e in results["entries"].items():
        if rows is not None and name not in rows:
            continue
        steps = e.get("steps_to_target") or []
        reached = [s for s in steps if s is not None]
        steps_cell = (f"{sum(reached) / len(reached):.0f}" + (f" ({len(reached)} of {len(steps)} seeds)"
                      if len(reached) < len(steps) else "")) if reached else "not reached"
        lines.append(f"| {name} | {e['lr']:.3g} | {_cell(e['val_mean'], e['val_ci'])} | {_cell(e['test_mean'], e['test_ci'])} | "
                     f"{_test_cell((e.get('vs_muon') or {}).get('val_loss'))} | {_test_cell((e.get('vs_adamw') or {}).get('val_loss'))} | "
                     f"{steps_cell} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in OPTIMIZERS:
        c = results["entries"][name].get("curve")
        if c:
            left.plot(c["step"][1:], c["val_loss_mean"][1:], label=name, marker="o", ms=3)
    left.axhline(results["target_val_loss"], color="grey", ls=":", lw=1, label="AdamW's final val")
    left.set(xlabel="step", ylabel="validation loss (mean over seeds)", title="char-level GPT, at each best lr")
    left.legend(fontsize=8)
    names = list(results["entries"])
    for i, name in enumerate(names):
        e = results["entries"][name]
        if math.isfinite(e["val_mean"]):
            right.errorbar(e["val_mean"], i, xerr=e["val_ci"] or 0, fmt="o", capsize=3)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set(xlabel="final validation loss, mean ± 95% interval", title=f"seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from benchmarks import run
    args = run.study_parser(__doc__, DEFAULT_OUT, "char_gpt.json").parse_args(argv)
    out = Path(args.out)
    if args.table:
        results = json.loads((out / "char_gpt.json").read_text())
        print(table(results) + "\n\n" + results["verdict"])
        return results
    from benchmarks.tasks import EXTRA_TASKS
    log = lambda *s: print(*s, flush=True)   # noqa: E731
    t0 = time.perf_counter()
    seeds, wd_seeds = (SEEDS[:2], WD_SEEDS[:1]) if args.quick else (SEEDS, WD_SEEDS)
    sw, aux, best = run.tune({TASK: EXTRA_TASKS[TASK]}, OPTIMIZERS, out, args.jobs, args.quick, log, SELECT_SEED)
    from benchmarks import optimizers as O
    plan = {o: (o, best[(TASK, o)], seeds) for o in OPTIMIZERS if (TASK, o) in best}
    plan.update({a: (a, best[(TASK, "deep-ns")], seeds) for a in ABLATIONS})
    plan[MATCHED] = ("muon", best[(TASK, "deep-ns")], seeds[:1])   # == deep-ns-mlr0 (exact reduction)
    plan.update({w: (w, best[(TASK, O.spec(w)["recipe"])], wd_seeds) for w in WEIGHT_DECAY_RUNS})
    jobs = [dict(task=TASK, optimizer=o, lr=lr, seed=s, aux_lr=aux[TASK] if O.spec(o).get("aux") else None)
            for o, lr, ss in plan.values() for s in ss]
    log(f"== {len(plan)} entries at their lrs, seeds {seeds} (weight decay: {wd_seeds})")
    recs = {(r["optimizer"], r["lr"], r["seed"]): r for r in run.run_jobs(jobs, out, args.jobs, args.quick, log)}
    by_entry = {name: [recs[(o, lr, s)] for s in ss] for name, (o, lr, ss) in plan.items()}
    target = run.seed_summary(by_entry["adamw"])["val_mean"]
    entries = {name: run.seed_summary(rs, target) for name, rs in by_entry.items()}
    for name, e in entries.items():
        e["vs_muon"] = run.paired_comparison(e, entries["muon"]) if name != "muon" else None
        e["vs_adamw"] = run.paired_comparison(e, entries["adamw"]) if name != "adamw" else None
        e["sweep"] = {f"{lr:.3g}": run.final_value(r, "val") for lr, r in sorted(sw.get((TASK, name), {}).items())}
    control, twin = by_entry[MATCHED][0], by_entry["deep-ns-mlr0"][0]
    entries[MATCHED]["identical_to_deep-ns-mlr0"] = bool(control.get("curve") and twin.get("curve") and all(
        control["curve"][k] == twin["curve"][k] for k in control["curve"] if k != "time"))
    task = run._get_task(TASK, args.quick)
    results = dict(command="python -m benchmarks.char_gpt" + (" --quick" if args.quick else ""),
                   machine=run.machine(), date=time.strftime("%Y-%m-%d"), task=task.describe(),
                   budget=run._budget(dict(task=TASK, quick=args.quick)), seeds=seeds, weight_decay_seeds=wd_seeds,
                   select_seed=SELECT_SEED, aux_lr=aux[TASK], weight_decay=O.WEIGHT_DECAY, target_val_loss=target,
                   params=sum(p.numel() for p in task.build(0).parameters()), entries=entries,
                   wall_s=time.perf_counter() - t0)
    results["verdict"] = verdict(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "char_gpt.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    (out / "char_gpt.md").write_text(f"# Char-level GPT\n\n{results['task']}; {results['params']:,} parameters. "
                                     f"`{results['command']}`, {results['machine']}, {results['date']}.\n\n"
                                     f"{table(results)}\n\n{results['verdict']}\n")
    plot(results, out / "char_gpt.png")
    log(table(results) + "\n\n" + results["verdict"])
    return results


if __name__ == "__main__":
    from examples import cli
    cli.run(main)
