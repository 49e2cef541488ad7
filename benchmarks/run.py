"""Run the benchmark protocol and write ``results.json``, ``results.md`` and the plots.

    python -m benchmarks.run                                  # full suite -> benchmarks/results/
    python -m benchmarks.run --quick --out /tmp/bench         # smoke run (<= 3 min)
    python -m benchmarks.run --tasks mnist1d_mlp rosenbrock --optimizers adamw deep --seed 0 1 2

Protocol:
1. Per task and optimizer, an LR sweep on the selection seed (``--select-seed``, 10; never a
   reported seed) over >= 5 values on a half-decade log grid, extended past an edge, up to
   twice, when the best LR sits on it, selected on the final *validation* metric (loss; average
   final accuracy for the continual task). AdamW and SGD are swept first: Muon, M3 and deep-ns
   use AdamW's best LR for their non-matrix params.
2. The best LR runs on the reported seeds (``--seed``, 0 1 2). Reported numbers are on the
   *test* split: mean and 95% t-interval over those seeds; steps to the target are counted per
   seed. Shakespeare's final test loss is on the whole held-out play.
3. The forgetting frontier (``FRONTIER``): on the continual task, AdamW, its 1/C-lr control,
   MultiFrequency(AdamW) and torch Muon run every swept LR on the reported seeds, so that a
   MultiFrequency point can be compared with AdamW's whole accuracy-forgetting curve.
4. AssociativeMomentum is not swept: one confirming run per task at SGD's / AdamW's best LR,
   checked against the torch twin's run (bit-identical curves expected).
5. Equal step budgets per task (``tasks.CONFIG``); every run is cached as JSON under
   ``<out>/runs/<task>/<optimizer>/``: a crashed or interrupted suite continues where it stopped.
6. Two runs at a time (``--jobs 2``), each with ``torch.set_num_threads(1)``.
"""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# numpy, torch and the tasks are imported inside the functions: --help answers before they load
from examples import cli  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MAX_EXTENSIONS = 2      # grid extensions per side
# the names of tasks.TASKS and optimizers.OPTIMIZERS, spelled out so that --help needs neither
# (tests/test_cli.py checks that they agree)
TASK_NAMES = ["mnist1d_mlp", "mnist1d_cnn", "shakespeare_char", "rosenbrock", "noisy_quadratic",
              "continual_pmnist1d"]
OPTIMIZER_NAMES = ["sgd", "adamw", "muon", "assoc-sgd", "assoc-adamw", "delta", "delta-spectral", "deep",
                   "deep-ns", "m3", "mf-adamw", "mf-deep", "adamw-level-lr"]
#: task -> optimizers that run every swept LR on the reported seeds (the accuracy-forgetting frontier)
FRONTIER = {"continual_pmnist1d": ["adamw", "adamw-level-lr", "mf-adamw", "muon"]}
#: two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# --------------------------------------------------------------------------- one run
_TASK_CACHE = {}


def _get_task(name, quick):
    from benchmarks.tasks import EXTRA_TASKS, TASKS
    key = (name, quick)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = {**TASKS, **EXTRA_TASKS}[name](quick=quick)   # builds data (mnist1d reseeds globals here)
    return _TASK_CACHE[key]


def run_path(out: Path, job: dict) -> Path:
    aux = f"_aux{job['aux_lr']:.3g}" if job.get("aux_lr") is not None else ""
    return out / "runs" / job["task"] / job["optimizer"] / f"lr{job['lr']:.3g}{aux}_seed{job['seed']}.json"


def _budget(job: dict) -> dict:
    from benchmarks.tasks import CONFIG
    return CONFIG["quick" if job["quick"] else "full"][job["task"]]


def cached(out: Path, job: dict) -> dict | None:
    """The cached record of ``job``, or None (missing, unreadable, or made with another budget)."""
    path = run_path(out, job)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("budget") == _budget(job) else None


def run_job(job: dict) -> dict:
    """Train one (task, optimizer, lr, seed) and cache the record (atomic write)."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from benchmarks import optimizers as O
    from benchmarks.tasks import continual_metrics, grad_stable_rank, train
    out = Path(job["out"])
    path = run_path(out, job)
    rec = cached(out, job)
    if rec is not None:
        return rec
    task = _get_task(job["task"], job["quick"])
    seed = job["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = task.build(seed)
    t0 = time.perf_counter()
    rec = dict(job)
    rec.pop("out", None)
    rec["budget"] = _budget(job)
    try:
        opt = O.build(job["optimizer"], model, job["lr"], aux_lr=job.get("aux_lr"), seed=seed,
                      mf_periods=task.mf_periods)
        rec.update(train(task, model, opt, seed))
        rec["error"] = None
    except Exception as e:   # a crashing optimizer is a result, not a crashed suite
        rec.update(curve=None, diverged=True, steps_done=0, step_time=None, train_time=0.0,
                   error=f"{type(e).__name__}: {e}")
    rec["wall"] = time.perf_counter() - t0
    if task.kind == "continual" and rec.get("acc_matrix"):
        rec["continual"] = {s: continual_metrics(R) for s, R in rec["acc_matrix"].items()}
    if job["optimizer"] == "delta" and seed == 0:
        torch.manual_seed(seed)
        rec["grad_stable_rank"] = grad_stable_rank(task, task.build(seed), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec, allow_nan=True))
    os.replace(tmp, path)
    return rec


def _init_worker():
    import torch
    torch.set_num_threads(1)


def run_jobs(jobs, out: Path, n_jobs: int, quick: bool, log=print):
    """Run the jobs not cached yet, ``n_jobs`` at a time; return all records."""
    for j in jobs:
        j["out"], j["quick"] = str(out), quick
    todo = [j for j in jobs if cached(out, j) is None]
    cost = {"shakespeare_char": 5, "mnist1d_cnn": 3, "continual_pmnist1d": 2}
    todo.sort(key=lambda j: -cost.get(j["task"], 1))     # longest first: better packing
    if todo:
        log(f"  {len(todo)} runs to do ({len(jobs) - len(todo)} cached)")
        if n_jobs <= 1:
            for i, j in enumerate(todo):
                r = run_job(j)
                _log_run(log, i, len(todo), r)
        else:
            fork = sys.platform.startswith("linux")
            if fork:   # build the data once here; the forked workers inherit it
                for name in {j["task"] for j in todo}:
                    _get_task(name, quick)
            ctx = mp.get_context("fork" if fork else "spawn")
            with ctx.Pool(n_jobs, initializer=_init_worker) as pool:
                for i, r in enumerate(pool.imap_unordered(run_job, todo)):
                    _log_run(log, i, len(todo), r)
    return [cached(out, j) for j in jobs]


_TRAINED = [0]


def _log_run(log, i, n, r):
    _TRAINED[0] += 1
    fin = final_value(r, "val")
    log(f"  [{i + 1}/{n}] {r['task']:<19} {r['optimizer']:<11} lr={r['lr']:<9.3g} seed={r['seed']} "
        f"val={fin:.4g} {'DIVERGED ' if r.get('diverged') else ''}{r.get('error') or ''}({r['wall']:.1f}s)")


# --------------------------------------------------------------------------- selection
def final_value(rec: dict, split: str = "val") -> float:
    """Selection/report scalar of a run (lower is better): final loss, or minus the average final
    accuracy for the continual task; +inf for a diverged or failed run."""
    if rec.get("diverged") or rec.get("curve") is None:
        return math.inf
    if rec.get("continual"):
        return -rec["continual"][split]["avg_acc"]
    v = rec["curve"][f"{split}_loss"][-1]
    return v if math.isfinite(v) else math.inf


def best_lr(recs: list[dict]) -> float:
    return min(recs, key=lambda r: (final_value(r, "val"), r["lr"]))["lr"]


def sweep(pairs, out, n_jobs, quick, aux, log, seed):
    """LR sweeps on ``seed`` with edge extension over (task, optimizer) ``pairs``;
    returns {(task, opt): {lr: record}}."""
    from benchmarks import optimizers as O
    grids = {(t, o): O.grid_for(t, o, quick) for t, o in pairs}
    ext = {k: [0, 0] for k in grids}
    results = {k: {} for k in grids}
    while True:
        jobs = []
        for (t, o), g in grids.items():
            for lr in g:
                if lr not in results[(t, o)]:
                    jobs.append(dict(task=t, optimizer=o, lr=lr, seed=seed, aux_lr=aux.get(t) if
                                     O.spec(o).get("aux") else None))
        if not jobs:
            return results
        for r in run_jobs(jobs, out, n_jobs, quick, log):
            results[(r["task"], r["optimizer"])][r["lr"]] = r
        for (t, o), g in grids.items():
            recs = results[(t, o)]
            b = best_lr(list(recs.values()))
            if all(math.isinf(final_value(r)) for r in recs.values()):
                b = g[0]          # everything diverged: look lower
            step = g[1] / g[0] if len(g) > 1 else math.sqrt(10)
            if b == g[0] and ext[(t, o)][0] < MAX_EXTENSIONS and not quick:
                g.insert(0, float(f"{g[0] / step:.3g}"))
                ext[(t, o)][0] += 1
            elif b == g[-1] and ext[(t, o)][1] < MAX_EXTENSIONS and not quick:
                g.append(float(f"{g[-1] * step:.3g}"))
                ext[(t, o)][1] += 1


def tune(tasks: dict, optimizers, out, n_jobs, quick, log, seed):
    """The LR sweeps of ``optimizers`` on ``tasks`` (``{name: Task class}``), AdamW's first (its
    best LR is the AdamW lr of the optimizers that route the rest to AdamW, ``aux``); returns
    ``(sweeps {(task, opt): {lr: record}}, aux {task: lr}, best {(task, opt): lr})``."""
    import torch
    from benchmarks import optimizers as O
    swept = [o for o in optimizers if O.spec(o)["grid"] is not None]
    first = [o for o in swept if not O.spec(o).get("aux")]
    second = [o for o in swept if O.spec(o).get("aux")]
    if not hasattr(torch.optim, "Muon") and "muon" in second:
        log("torch.optim.Muon is missing in this torch: skipping 'muon'")
        second.remove("muon")

    def pairs(opts):
        return [(t, o) for t in tasks for o in opts if O.applicable(tasks[t], o)]

    log(f"== sweep 1/2: {', '.join(first)}")
    sw = sweep(pairs(first), out, n_jobs, quick, {}, log, seed)
    aux = {t: best_lr(list(sw[(t, "adamw")].values())) for t in tasks}
    if second:
        log(f"== sweep 2/2: {', '.join(second)} (AdamW's best LR for their non-matrix params: {aux})")
        sw.update(sweep(pairs(second), out, n_jobs, quick, aux, log, seed))
    return sw, aux, {k: best_lr(list(v.values())) for k, v in sw.items()}


# --------------------------------------------------------------------------- aggregation
def _mean_std(xs):
    import numpy as np
    xs = np.asarray(xs, dtype=float)
    if len(xs) == 0:
        return None, None
    if not np.all(np.isfinite(xs)):
        return float("inf"), None
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def ci95(xs) -> float | None:
    """Half-width of the 95% t-interval of the mean of ``xs`` (None: fewer than 2 or not finite)."""
    m, sd = _mean_std(xs)
    if sd is None or len(xs) < 2 or not math.isfinite(m):
        return None
    return T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (Lentz's continued fraction)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):   # the fraction converges fast below the mean only
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-14:
            break
    return front * (f - 1)


def student_t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t < 0 else 1 - tail


def paired_t_test(xs, ys) -> dict | None:
    """One-sided paired t-test of ``mean(xs - ys) < 0`` (``xs`` lower, e.g. a loss, on the same
    seeds): ``{"mean_diff", "ci", "t", "p"}``, or None with fewer than 2 finite pairs."""
    diffs = [x - y for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x - y)]
    if len(diffs) < 2 or len(diffs) != len(xs):
        return None
    mean, sd = _mean_std(diffs)
    if sd == 0:
        return dict(mean_diff=mean, ci=0.0, t=-math.inf if mean < 0 else math.inf, p=0.0 if mean < 0 else 1.0)
    t = mean / (sd / math.sqrt(len(diffs)))
    return dict(mean_diff=mean, ci=ci95(diffs), t=t, p=student_t_cdf(t, len(diffs) - 1))


def mean_ci_text(xs, mean_fmt: str = "{:.4g}", ci_fmt: str = "{:.2g}") -> str | None:
    """``mean ± 95% half-width`` of ``xs`` as text (just the mean for one value), or None where
    ``xs`` is empty or an entry is None or not finite (a seed that never reached a target, or diverged)."""
    if not xs or any(x is None or not math.isfinite(x) for x in xs):
        return None
    ci = ci95(xs)
    return mean_fmt.format(sum(xs) / len(xs)) + ("" if ci is None else " ± " + ci_fmt.format(ci))


def final_test_loss(rec: dict) -> float:
    """The reported final test loss of a run: on the whole test split where the task scores so
    (Shakespeare's held-out play), else the curve's last point; +inf if diverged."""
    if rec.get("diverged") or rec.get("curve") is None:
        return math.inf
    return rec.get("final_test_loss_whole", rec["curve"]["test_loss"][-1])


def seed_summary(recs: list[dict], target: float | None = None) -> dict:
    """Runs of one optimizer at one lr on several seeds: the per-seed final validation / test
    losses (inf: diverged) and test accuracies, their mean ± 95% interval, the steps to ``target``
    on the validation curve, the median step time and the seed-mean validation curve."""
    import numpy as np
    val = [final_value(r, "val") for r in recs]
    test = [final_test_loss(r) for r in recs]
    out = dict(lr=recs[0]["lr"], aux_lr=recs[0].get("aux_lr"), seeds=[r["seed"] for r in recs], val_loss=val,
               test_loss=test, val_mean=float(np.mean(val)), val_ci=ci95(val), test_mean=float(np.mean(test)),
               test_ci=ci95(test), diverged=sum(bool(r.get("diverged")) for r in recs),
               step_time_ms=float(np.median([r["step_time"] for r in recs if r.get("step_time")]) * 1e3)
               if any(r.get("step_time") for r in recs) else None)
    if all(r.get("curve") and "test_acc" in r["curve"] for r in recs):
        out["test_acc"] = [r["curve"]["test_acc"][-1] if not r.get("diverged") else float("nan") for r in recs]
        out["test_acc_mean"], out["test_acc_ci"] = float(np.mean(out["test_acc"])), ci95(out["test_acc"])
    curves = [r["curve"] for r in recs if r.get("curve") and not r.get("diverged")]
    if curves and len(curves) == len(recs):
        out["curve"] = dict(step=curves[0]["step"], val_loss_mean=np.mean([c["val_loss"] for c in curves], 0).tolist())
    if target is not None:
        out["steps_to_target"] = [next((s for s, v in zip(r["curve"]["step"], r["curve"]["val_loss"]) if v <= target), None)
                                  if r.get("curve") and not r.get("diverged") else None for r in recs]
    return out


def paired_comparison(entry: dict, reference: dict, keys=("val_loss", "test_loss")) -> dict:
    """One-sided paired t-tests of ``entry`` below ``reference`` (two :func:`seed_summary`) on their
    shared seeds, per key (for an accuracy, pass its negation or read ``p`` as "lower")."""
    seeds = [s for s in entry["seeds"] if s in reference["seeds"]]

    def on(e, key):
        return [e[key][e["seeds"].index(s)] for s in seeds]
    return {key: paired_t_test(on(entry, key), on(reference, key)) for key in keys}


def _stack(recs, key):
    """(steps, array seeds x evals) of a curve key; diverged runs padded with +inf."""
    import numpy as np
    curves = [r["curve"] for r in recs if r.get("curve")]
    if not curves:
        return [], np.zeros((0, 0))
    steps = max((c["step"] for c in curves), key=len)
    arr = np.full((len(recs), len(steps)), np.inf)
    for i, r in enumerate(recs):
        c = r.get("curve")
        if c and key in c:
            v = np.asarray(c[key], dtype=float)
            arr[i, :len(v)] = v
            if not r.get("diverged"):
                arr[i, len(v):] = v[-1] if len(v) else np.inf
    return steps, arr


def aggregate(task, opt, sweep_recs, seed_recs) -> dict:
    """One (task, optimizer) entry of results.json."""
    import numpy as np
    with np.errstate(invalid="ignore"):
        return _aggregate(task, opt, sweep_recs, seed_recs)


def _aggregate(task, opt, sweep_recs, seed_recs) -> dict:
    import numpy as np
    steps, loss = _stack(seed_recs, "test_loss")
    _, vloss = _stack(seed_recs, "val_loss")
    _, times = _stack(seed_recs, "time")
    entry = {
        "sweep": {f"{lr:.3g}": final_value(r, "val") for lr, r in sorted(sweep_recs.items())},
        "best_lr": seed_recs[0]["lr"],
        "seeds": [r["seed"] for r in seed_recs],
        "diverged_seeds": int(sum(bool(r.get("diverged")) for r in seed_recs)),
        "errors": sorted({r["error"] for r in seed_recs if r.get("error")}),
        "final_test_loss": [float(final_test_loss(r)) for r in seed_recs] if loss.size else [],
        "final_test_loss_curve_subset": [float(loss[i, -1]) for i in range(len(seed_recs))] if loss.size else [],
        "step_time_ms": float(np.median([r["step_time"] for r in seed_recs if r.get("step_time")]) * 1e3)
        if any(r.get("step_time") for r in seed_recs) else None,
        "wall_s": float(sum(r["wall"] for r in seed_recs)),
        "curve": {"step": steps,
                  "test_loss_mean": np.mean(loss, 0).tolist() if loss.size else [],
                  "test_loss_std": (np.std(loss, 0, ddof=1) if len(loss) > 1 else np.zeros(loss.shape[1])).tolist()
                  if loss.size else [],
                  "val_loss_mean": np.mean(vloss, 0).tolist() if vloss.size else [],
                  "time_mean": np.mean(np.where(np.isfinite(times), times, np.nan), 0).tolist() if times.size else []},
    }
    entry["test_loss_mean"], entry["test_loss_std"] = _mean_std(entry["final_test_loss"])
    entry["test_loss_ci"] = ci95(entry["final_test_loss"])
    entry["test_curves"] = loss.tolist() if loss.size else []   # per seed: steps to target, per seed
    if task.kind != "loss":
        acc = [r["curve"]["test_acc"][-1] if r.get("curve") and not r.get("diverged") else float("nan")
               for r in seed_recs]
        entry["final_test_acc"] = acc
        entry["test_acc_mean"], entry["test_acc_std"] = _mean_std(acc)
    if task.kind == "continual":
        cm = [(r.get("continual") or {}).get("test") for r in seed_recs if not r.get("diverged")]
        ok = [c for c in cm if c]
        entry["avg_acc"] = [c["avg_acc"] for c in ok]
        entry["forgetting"] = [c["forgetting"] for c in ok]
        entry["avg_acc_mean"], entry["avg_acc_std"] = _mean_std(entry["avg_acc"])
        entry["forgetting_mean"], entry["forgetting_std"] = _mean_std(entry["forgetting"])
        entry["avg_acc_ci"], entry["forgetting_ci"] = ci95(entry["avg_acc"]), ci95(entry["forgetting"])
        ms = [r["acc_matrix"]["test"] for r in seed_recs if r.get("acc_matrix") and
              len(r["acc_matrix"]["test"]) == task.n_tasks]
        entry["acc_matrix_mean"] = np.mean(ms, 0).tolist() if ms else None
    for r in (sweep_recs.get(entry["best_lr"], {}), *seed_recs):   # (recorded by seed 0's run)
        if "grad_stable_rank" in r:
            entry["grad_stable_rank"] = r["grad_stable_rank"]
            break
    return entry


def add_targets(task_res: dict):
    """Target = the worst of AdamW's per-seed final test losses on the curves (a fixed threshold
    that every AdamW seed reaches); steps to reach it per seed (mean and 95% interval when every
    seed reaches it), and steps/time on the seed-mean curve."""
    if "adamw" not in task_res or not task_res["adamw"].get("final_test_loss_curve_subset"):
        return None
    target = max(task_res["adamw"]["final_test_loss_curve_subset"])
    if not math.isfinite(target):
        return None
    vc = task_res["adamw"]["curve"].get("val_loss_mean") or [math.inf]
    vtarget = vc[-1]
    for e in task_res.values():
        c = e["curve"]
        hit = [i for i, v in enumerate(c["test_loss_mean"]) if v <= target]
        e["steps_to_target"] = c["step"][hit[0]] if hit else None
        per_seed = []
        for curve in e.get("test_curves", []):
            first = [i for i, v in enumerate(curve) if v <= target]
            per_seed.append(c["step"][first[0]] if first else None)
        e["steps_to_target_per_seed"] = per_seed
        reached = [s for s in per_seed if s is not None]
        e["steps_to_target_mean"] = sum(reached) / len(reached) if per_seed and len(reached) == len(per_seed) else None
        e["steps_to_target_ci"] = ci95(reached) if e["steps_to_target_mean"] is not None else None
        e["time_to_target_s"] = c["time_mean"][hit[0]] if hit and c["time_mean"] else None
        # the same on the validation split (AdamW's seed-mean final validation loss)
        vhit = [i for i, v in enumerate(c.get("val_loss_mean", [])) if v <= vtarget]
        e["steps_to_val_target"] = c["step"][vhit[0]] if vhit else None
    task_res["adamw"]["val_target"] = vtarget
    return target


def frontier_points(sweep_recs, recs_by_lr) -> list[dict]:
    """Per swept LR: test average final accuracy and forgetting over the reported seeds (mean, 95%
    interval), and the validation metric the selection saw."""
    points = []
    for lr in sorted(recs_by_lr):
        ok = [r["continual"]["test"] for r in recs_by_lr[lr] if r.get("continual") and not r.get("diverged")]
        acc, forg = [c["avg_acc"] for c in ok], [c["forgetting"] for c in ok]
        points.append(dict(lr=lr, seeds=len(ok), avg_acc_mean=_mean_std(acc)[0], avg_acc_ci=ci95(acc),
                           forgetting_mean=_mean_std(forg)[0], forgetting_ci=ci95(forg),
                           select_val=final_value(sweep_recs[lr], "val")))
    return points


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=TASK_NAMES, metavar="TASK",
                   help=f"any of {', '.join(TASK_NAMES)} (default: all)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZER_NAMES, default=OPTIMIZER_NAMES, metavar="OPT",
                   help=f"any of {', '.join(OPTIMIZER_NAMES)} (default: all; adamw is always added: it sets "
                   "the target)")
    p.add_argument("--seed", type=cli.nonnegative_int, nargs="+", default=None,
                   help="the reported seeds, run at the best LRs (default: 0 1 2; 0 1 with --quick)")
    p.add_argument("--select-seed", type=cli.nonnegative_int, default=10,
                   help="the seed of the LR sweeps (selection on validation); must not be a reported seed")
    p.add_argument("--quick", action="store_true", help="tiny budgets and 3-point grids (smoke test)")
    p.add_argument("--out", default=None, help=f"output dir (default: {DEFAULT_OUT}; --quick: <that>/quick)")
    p.add_argument("--jobs", type=cli.positive_int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--no-plots", action="store_true", help="write results.json and results.md only")
    a = p.parse_args(argv)
    a.tasks, a.optimizers = list(dict.fromkeys(a.tasks)), list(dict.fromkeys(a.optimizers))   # no repeats
    if "adamw" not in a.optimizers:
        a.optimizers.insert(0, "adamw")
    a.seeds = list(dict.fromkeys(a.seed or range(2 if a.quick else 3)))
    if a.select_seed in a.seeds:
        p.error(f"--select-seed {a.select_seed} is one of the reported seeds {a.seeds}: LRs must be "
                "selected on a seed that is not reported")
    a.out = Path(a.out) if a.out else (DEFAULT_OUT / "quick" if a.quick else DEFAULT_OUT)
    return a


def study_parser(doc: str, default_out: Path, result_file: str):
    """The command line of the studies built on this protocol (benchmarks/char_gpt.py,
    benchmarks/robustness.py): ``--out``, ``--quick``, ``--jobs``, ``--table``."""
    ap = cli.parser(doc.split("\n")[0])
    ap.add_argument("--out", default=str(default_out), help="output dir (runs are cached there)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 3-point grids, 2 seeds (smoke test)")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--table", action="store_true", help=f"print the table from <out>/{result_file} and exit")
    return ap


def machine() -> str:
    import torch
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}, Python {platform.python_version()}")


def main(argv=None):
    a = parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from benchmarks import optimizers as O
    from benchmarks.tasks import CONFIG, TASKS
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda *s: print(*s, flush=True)   # noqa: E731
    tasks = {t: TASKS[t] for t in a.tasks}
    sw, aux, best = tune(tasks, a.optimizers, a.out, a.jobs, a.quick, log, a.select_seed)

    log(f"== seeds {a.seeds} at the best LRs, and AssociativeMomentum confirming runs")
    jobs = []
    for (t, o), lr in best.items():
        x = aux[t] if O.OPTIMIZERS[o].get("aux") else None
        jobs += [dict(task=t, optimizer=o, lr=lr, seed=s, aux_lr=x) for s in a.seeds]
    confirm = [(t, o, O.OPTIMIZERS[o]["twin"]) for t in a.tasks for o in a.optimizers
               if O.OPTIMIZERS[o].get("twin") and (t, O.OPTIMIZERS[o]["twin"]) in best]
    jobs += [dict(task=t, optimizer=o, lr=best[(t, twin)], seed=a.seeds[0], aux_lr=None) for t, o, twin in confirm]
    n_main = len(jobs)
    frontier = [(t, o) for t, opts in FRONTIER.items() for o in opts if (t, o) in sw]
    for t, o in frontier:
        x = aux[t] if O.OPTIMIZERS[o].get("aux") else None
        jobs += [dict(task=t, optimizer=o, lr=lr, seed=s, aux_lr=x) for lr in sw[(t, o)] for s in a.seeds]
    recs = run_jobs(jobs, a.out, a.jobs, a.quick, log)
    by = {}
    for r in recs[:n_main]:   # the best-LR and confirming runs (the frontier's are read below)
        by.setdefault((r["task"], r["optimizer"]), {})[r["seed"]] = r

    results = {"meta": {
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "date": datetime.date.today().isoformat(), "quick": a.quick,
        "seeds": a.seeds, "select_seed": a.select_seed, "jobs": a.jobs, "threads_per_run": 1,
        "budgets": {t: CONFIG["quick" if a.quick else "full"][t] for t in a.tasks},
    }, "tasks": {}}
    for t in a.tasks:
        task = _get_task(t, a.quick)
        tr = {}
        for o in a.optimizers:
            if (t, o) in best:
                tr[o] = aggregate(task, o, sw[(t, o)], [by[(t, o)][s] for s in a.seeds])
        for o, twin in [(c[1], c[2]) for c in confirm if c[0] == t]:
            r, ref = by[(t, o)][a.seeds[0]], by[(t, twin)][a.seeds[0]]
            same = (r.get("curve") is not None and ref.get("curve") is not None and
                    all(r["curve"][k] == ref["curve"][k] for k in ref["curve"] if k != "time"))
            diffs = [abs(u - v) for k in ("val_loss", "test_loss") if r.get("curve") and ref.get("curve")
                     for u, v in zip(r["curve"][k], ref["curve"][k])]
            tr[o] = {"confirming_run": True, "twin": twin, "lr": r["lr"], "identical_to_twin": bool(same),
                     "max_abs_diff": max(diffs) if diffs else None,
                     "final_test_loss": r["curve"]["test_loss"][-1] if r.get("curve") else None,
                     "twin_final_test_loss": ref["curve"]["test_loss"][-1] if ref.get("curve") else None,
                     "step_time_ms": r["step_time"] * 1e3 if r.get("step_time") else None,
                     "wall_s": r["wall"]}
        target = add_targets({k: v for k, v in tr.items() if not v.get("confirming_run")})
        for _, o in [f for f in frontier if f[0] == t]:
            runs = {(r["lr"], r["seed"]): r for r in recs if (r["task"], r["optimizer"]) == (t, o)}   # (one per seed)
            tr[o]["frontier"] = frontier_points(sw[(t, o)], {lr: [r for (x, _), r in runs.items() if x == lr]
                                                                   for lr in sw[(t, o)]})
        uniq = {(r["optimizer"], r["lr"], r.get("aux_lr"), r["seed"]): r["wall"]
                for r in [*(r for (tt, _), v in sw.items() if tt == t for r in v.values()),
                          *(r for r in recs if r["task"] == t)]}
        runs_wall = sum(uniq.values())
        results["tasks"][t] = {"description": task.describe(), "kind": task.kind,
                               "steps": task.steps, "eval_every": task.eval_every,
                               "target_test_loss": target, "mf_periods": task.mf_periods,
                               "runs_wall_s": runs_wall, "optimizers": tr,
                               "not_applicable": [o for o in a.optimizers if not O.applicable(tasks[t], o)]}
    results["meta"]["total_wall_s"] = time.perf_counter() - t_start
    # every invocation (a resumed or cached re-run is fast: keep the history of what each did)
    hist_path = a.out / "invocations.json"
    try:
        hist = json.loads(hist_path.read_text())
    except (OSError, ValueError):
        hist = []
    hist.append({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": results["meta"]["command"], "wall_s": round(results["meta"]["total_wall_s"], 1),
                 "runs_trained": _TRAINED[0], "machine": results["meta"]["machine"]})
    hist_path.write_text(json.dumps(hist, indent=1))
    results["meta"]["invocations"] = hist
    cached_total = sum(v["runs_wall_s"] for v in results["tasks"].values())
    results["meta"]["sum_of_run_walls_s"] = cached_total
    (a.out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    from benchmarks import report
    report.write_report(results, a.out, plots=not a.no_plots)
    log(f"== done in {results['meta']['total_wall_s']:.0f}s (sum of run walls {cached_total:.0f}s): "
        f"{a.out / 'results.json'}, {a.out / 'results.md'}")
    return results


if __name__ == "__main__":
    cli.run(main)
