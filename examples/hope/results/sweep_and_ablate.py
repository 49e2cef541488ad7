"""HOPE vs Transformer++ on equal terms: an lr sweep per model on the validation split, then
each model at its own best lr on 3 seeds, and the ablations (HOPE without CMS, without
self-modification) and the variants with inner momentum at HOPE's best lr on the same seeds.
The cpu preset (500 steps of 32 x 128 characters), one thread per run, two runs at a time: 29
runs, about 55 minutes on 2 cores.

    python examples/hope/results/sweep_and_ablate.py        # -> examples/hope/results/ablations.json

Then, on the reported seeds' HOPE and Transformer++ checkpoints: the continual adaptation to
the held-out play (continual.py --continual) and the long-context diagnosis (long_context.py).

Runs go to ``--runs`` (one folder each, skipped when its train_log.json exists: the script
resumes). Selection reads only the sweep seed's validation bits/char; every row of the table
is the mean over the reported seeds with its 95% t-interval.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
from examples import cli  # noqa: E402

LRS = [1e-3, 3e-3, 1e-2, 3e-2]
#: row name -> (model, extra train.py flags). HOPE as it was measured (2026-12-01): with the CMS,
#: without the anchor gate, generator chunk 16; those defaults changed later (``long_context.py``
#: and ``gen_chunk.py`` compare them)
NO_ANCHOR = ["--anchor-init", "0", "--gen-chunk-size", "16"]
VARIANTS = {"HOPE": ("hope", ["--cms", *NO_ANCHOR]), "Transformer++": ("transformer", []),
            "HOPE w/o CMS (one period-1 MLP)": ("hope", ["--no-cms", *NO_ANCHOR]),
            "HOPE w/o self-modification (fixed k/v/eta/alpha projections)": ("hope", ["--cms", "--no-self-mod",
                                                                                     *NO_ANCHOR]),
            "HOPE with inner momentum 0.5": ("hope", ["--cms", "--inner-momentum", "0.5", *NO_ANCHOR]),
            "HOPE with inner momentum 0.9": ("hope", ["--cms", "--inner-momentum", "0.9", *NO_ANCHOR]),
            "HOPE with inner momentum 0.9, EMA (steps x 0.1)": ("hope", ["--cms", "--inner-momentum", "0.9",
                                                                     "--inner-momentum-ema", *NO_ANCHOR])}


def run_dir(runs: Path, model: str, flags: list[str], lr: float, seed: int, steps: int, preset: str) -> Path:
    tag = "".join(f.strip("-").replace("-", "_") + "_" for f in flags)
    kind = "" if preset == "cpu" else f"{preset}_"   # (a smoke run never lands in a cpu run's folder)
    return runs / f"{model}_{tag}{kind}lr{lr:g}_steps{steps}_seed{seed}"


def add_run_options(ap, seeds_help: str = "training seeds") -> None:
    """The options of the scripts that train through :func:`train`: --runs, --seed, --steps, --preset."""
    ap.add_argument("--runs", default="out/hope_ablate", help="folder of the training runs (reused when present)")
    ap.add_argument("--seed", type=cli.nonnegative_int, nargs="+", default=[1, 2, 3], help=seeds_help)
    ap.add_argument("--steps", type=cli.positive_int, default=500, help="training steps of each run")
    ap.add_argument("--preset", choices=["cpu", "tiny"], default="cpu", help="train.py's preset (tiny: smoke test)")


def train(runs: Path, model: str, flags: list[str], lr: float, seed: int, steps: int, preset: str,
          cache_dir: str | None = None) -> dict:
    out = run_dir(runs, model, flags, lr, seed, steps, preset)
    log = out / "train_log.json"
    if not log.exists():
        cmd = [sys.executable, "examples/hope/train.py", "--model", model, "--lr", f"{lr:g}", "--seed", str(seed),
               "--steps", str(steps), "--threads", "1", "--quiet", "--out", str(out), "--preset", preset, *flags]
        if cache_dir is not None:
            cmd += ["--cache-dir", str(cache_dir)]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rec = json.loads(log.read_text())["models"][model]
    return dict(lr=lr, seed=seed, val_bpc=rec["final_val_bpc"], tokens_per_s=rec["tokens_per_s"], dir=str(out))


def after_training(script: str, ckpt_dir: str, out: Path, extra: list[str]) -> dict:
    """Run ``script`` on a checkpoint folder once (its JSON is the cache) and return its JSON."""
    if not out.exists():
        cmd = [sys.executable, script, "--ckpt-dir", ckpt_dir, "--out", str(out), *extra]
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summary(values: list[float]) -> dict:
    from benchmarks.run import ci95   # (the suite's one 95% t-interval)
    mean, ci = statistics.mean(values), ci95(values)
    return dict(mean=mean, ci95=ci, values=values)


def table(result: dict) -> str:
    """The HOPE ablation table of docs/hope.md (tests/test_docs.py checks it against the JSON)."""
    lines = ["| model | lr (selected on seed %d) | val bits/char, seeds %s (mean ± 95%%) | per seed |"
             % (result["select_seed"], " ".join(map(str, result["seeds"]))), "|---|---|---|---|"]
    for name, row in result["rows"].items():
        s = row["val_bpc"]
        lines.append(f"| {name} | {row['lr']:g} | {s['mean']:.4f} ± {s['ci95']:.4f} | "
                     + " / ".join(f"{v:.4f}" for v in s["values"]) + " |")
    return "\n".join(lines)


def continual_table(result: dict) -> str:
    """docs/hope.md's continual-adaptation table (tests/test_docs.py checks it against the JSON)."""
    def cell(s):
        return f"{s['mean']:.3f} ± {s['ci95']:.3f}"
    lines = ["| model | held-out bits/char before -> after | forgetting on validation (bits/char) |", "|---|---|---|"]
    for name, c in result["continual"].items():
        lines.append(f"| {name} | {cell(c['new_before_bpc'])} -> {cell(c['new_after_bpc'])} | {cell(c['forgetting_bpc'])} |")
    return "\n".join(lines)


def long_context_table(result: dict) -> str:
    """docs/hope.md's long-context table: validation bits/char per 128-character position bucket of
    1,024-character windows (mean ± 95% over the reported seeds)."""
    first = next(iter(result["long_context"].values()))["carry_bpc"]
    lines = ["| model, memories | " + " | ".join(f"{128 * i}-{128 * (i + 1)}" for i in range(len(first))) + " |",
             "|---|" + "---|" * len(first)]
    labels = {"carry_bpc": "written over the whole window", "reset_bpc": "reset every 128 characters",
              "carry_state_distance": "state distance from init (whole window)"}
    for name, lc in result["long_context"].items():
        for key, label in labels.items():
            if key in lc:
                what = label if name == "HOPE" else "no memory state"
                lines.append(f"| {name}, {what} | " + " | ".join(f"{s['mean']:.3f} ± {s['ci95']:.3f}" for s in lc[key]) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    add_run_options(ap, "the reported seeds")
    ap.add_argument("--select-seed", type=cli.nonnegative_int, default=0, help="the seed of the lr sweep")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="runs at a time")
    ap.add_argument("--out", default=str(HERE / "ablations.json"), help="result file")
    args = ap.parse_args(argv)
    if args.select_seed in args.seed:
        ap.error("--select-seed must not be a reported seed")
    runs = Path(args.runs)
    with ThreadPoolExecutor(args.jobs) as pool:
        sweep = {name: list(pool.map(lambda lr, m=model, f=flags: train(runs, m, f, lr, args.select_seed, args.steps,
                                                                         args.preset), LRS))
                 for name, (model, flags) in VARIANTS.items() if name in ("HOPE", "Transformer++")}
        best = {name: min(points, key=lambda p: p["val_bpc"])["lr"] for name, points in sweep.items()}
        best.update({name: best["HOPE"] for name in VARIANTS if name not in best})
        jobs = {(name, s): pool.submit(train, runs, model, flags, best[name], s, args.steps, args.preset)
                for name, (model, flags) in VARIANTS.items() for s in args.seed}
        seeds = {key: job.result() for key, job in jobs.items()}
    rows = {name: dict(lr=best[name], val_bpc=summary([seeds[(name, s)]["val_bpc"] for s in args.seed]),
                       tokens_per_s=summary([seeds[(name, s)]["tokens_per_s"] for s in args.seed]))
            for name in VARIANTS}
    # test-time learning and long contexts, on the reported seeds of both models at their best lr
    continual, long_context = {}, {}
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = {}
        for name in ("HOPE", "Transformer++"):
            model = VARIANTS[name][0]
            for s in args.seed:
                d = seeds[(name, s)]["dir"]
                jobs[("continual", name, s)] = pool.submit(
                    after_training, "examples/hope/continual.py", d, Path(d) / "continual.json",
                    ["--model", model, "--continual"])
                jobs[("long", name, s)] = pool.submit(
                    after_training, "examples/hope/long_context.py", d, Path(d) / "long_context.json", ["--threads", "1"])
        for (stage, name, s), job in jobs.items():
            res = job.result()
            if stage == "continual":
                r = dict(res["models"][VARIANTS[name][0]])
                r["forgetting_bpc"] = r["val_after_bpc"] - r["val_before_bpc"]
                continual.setdefault(name, []).append(r)
            else:
                long_context.setdefault(name, []).append(res["models"][VARIANTS[name][0]])
    continual = {name: {key: summary([r[key] for r in rs]) for key in
                        ("new_before_bpc", "new_after_bpc", "forgetting_bpc", "val_before_bpc", "val_after_bpc")}
                 for name, rs in continual.items()}
    long_context = {name: {key: [summary([r[key][i] for r in rs]) for i in range(len(rs[0][key]))]
                           for key in rs[0]} for name, rs in long_context.items()}
    result = dict(command="python examples/hope/results/sweep_and_ablate.py " + " ".join(argv or sys.argv[1:]),
                  preset=args.preset, steps=args.steps, select_seed=args.select_seed, seeds=args.seed, lrs=LRS, sweep=sweep, rows=rows, continual=continual,
                  long_context=long_context,
                  note="val bits/char on the validation split (final_eval_windows of the cpu preset); "
                       "tokens/s from runs two at a time on a shared 2-core machine")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result), continual_table(result), long_context_table(result), sep="\n\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
