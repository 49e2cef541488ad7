"""The cost of one optimizer step on the benchmark models, as a ratio to torch SGD's step timed in
the same process: every optimizer steps the same model on the same fixed gradient, in
alternating rounds (so that machine load hits all alike), one thread, CPU. Also the whole
training iteration (forward, backward, step on one fixed batch) as a ratio to SGD's: what a
user waits for.

    python -m benchmarks.step_cost           # -> benchmarks/results/step_cost.json

The optimizers are built as the benchmark suite builds them (benchmarks/optimizers.py), at lr
1e-3 (the step cost does not depend on it).
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from examples import cli  # noqa: E402

TASKS = ["mnist1d_mlp", "mnist1d_cnn", "shakespeare_char", "char_gpt"]


#: the optimizers whose whole training iteration is timed too
ITERATION_OPTIMIZERS = ["sgd", "adamw", "muon", "delta", "deep", "deep-ns", "m3"]


def step_times(opt, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def iteration_times(task, model, opt, batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def iteration_table(result: dict) -> str:
    """The training-iteration ratios (forward + backward + step) of docs/benchmarks.md."""
    names = [n for n in next(iter(result["tasks"].values())) if "iteration_ratio_to_sgd" in
             next(iter(result["tasks"].values()))[n]]
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, rows in result["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(
            f"{rows[n]['iteration_ratio_to_sgd']:.2f}x" if "iteration_ratio_to_sgd" in rows.get(n, {}) else "n/a"
            for n in names) + " |")
    return "\n".join(lines)


def table(result: dict) -> str:
    """docs/benchmarks.md's step-cost table (tests/test_docs.py checks it against the JSON)."""
    names = list(next(iter(result["tasks"].values())))
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, rows in result["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(
            f"{rows[n]['ratio_to_sgd']:.1f}x" if n in rows else "n/a" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--rounds", type=cli.positive_int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=cli.positive_int, default=20, help="timed steps per optimizer and round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost.json"), help="result file")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from benchmarks import optimizers as O
    from benchmarks.tasks import EXTRA_TASKS, TASKS as MAIN
    TASK_CLASSES = {**MAIN, **EXTRA_TASKS}
    result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
                  threads=1, rounds=args.rounds, steps=args.steps,
                  note="median step time; every optimizer in one process, alternating rounds; shared machine",
                  tasks={})
    for name in TASKS:
        task = TASK_CLASSES[name](quick=False)
        names = [o for o in O.OPTIMIZERS if O.applicable(task, o) and (o != "muon" or hasattr(torch.optim, "Muon"))]
        models, opts = {}, {}
        for o in names:
            torch.manual_seed(0)
            models[o] = task.build(0)
            gen = torch.Generator().manual_seed(1)
            for p in models[o].parameters():   # one fixed, non-zero gradient for all
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opts[o] = O.build(o, models[o], 1e-3, aux_lr=1e-3, seed=0, mf_periods=task.mf_periods)
            opts[o].step()   # state allocated outside the timing
        times = {o: [] for o in names}
        for _ in range(args.rounds):
            for o in names:
                times[o] += step_times(opts[o], args.steps)
        sgd = statistics.median(times["sgd"])
        result["tasks"][name] = {o: dict(ms=statistics.median(t) * 1e3, ratio_to_sgd=statistics.median(t) / sgd)
                                 for o, t in times.items()}
        batch = task.sample(1, torch.Generator().manual_seed(2))
        whole = {o: [] for o in ITERATION_OPTIMIZERS if o in names}
        for _ in range(args.rounds):
            for o in whole:
                whole[o] += iteration_times(task, models[o], opts[o], batch, args.steps)
        for o, t in whole.items():
            result["tasks"][name][o].update(iteration_ms=statistics.median(t) * 1e3,
                                            iteration_ratio_to_sgd=statistics.median(t) / statistics.median(whole["sgd"]))
        print(name, " ".join(f"{o} {r['ratio_to_sgd']:.1f}x" for o, r in result["tasks"][name].items()), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result) + "\n\n" + iteration_table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
