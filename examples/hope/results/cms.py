"""Does the Continuum Memory System earn its place? Forgetting in continual adaptation.

    python examples/hope/results/cms.py           # -> examples/hope/results/cms.json

On the checkpoints of ``long_context.py``'s runs (CPU preset, lr 1e-2, seeds 1-3; trained here
when missing) ``continual.py --continual`` adapts each model to the first 70% of the held-out
play, one in-order pass, and reports the gain on its last 30% and the forgetting on the
original validation text (both bits/char), at several adaptation lrs (the matched-lr control:
a model that merely adapts less also forgets less). The rows:

* HOPE: its CMS levels adapt, each at its period (1, 4, 16 steps);
* HOPE, every level every step: the same weights, the levels at period 1 (the frequency control);
* HOPE w/o CMS: its one period-1 MLP of the same total width adapts;
* Transformer++: its MLPs adapt (period 1).

CMS earns its place here if at some lr HOPE forgets less than both HOPE w/o CMS and the
Transformer++ with disjoint 95% intervals while gaining at least as much on the new text, or if no
rival at any lr gains as much while forgetting as little (HOPE off the rivals' frontier).
"""
from __future__ import annotations

import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))
from examples import cli  # noqa: E402
from examples.hope.results.sweep_and_ablate import add_run_options, after_training, summary, train  # noqa: E402

ADAPT_LRS = [3e-4, 1e-3, 3e-3]
TRAIN_LR = 1e-2
#: row name -> (train.py --model, train.py flags, continual.py flags)
BEFORE = ["--anchor-init", "0", "--gen-chunk-size", "16"]
ROWS = {   # HOPE without the anchor gate, generator chunk 16 (the model before 2026-12-06, on which CMS was measured)
    "HOPE (CMS levels at periods 1/4/16)": ("hope", ["--cms", *BEFORE], []),
    "HOPE, every CMS level every step": ("hope", ["--cms", *BEFORE], ["--adapt-every-step"]),
    "HOPE w/o CMS (one period-1 MLP)": ("hope", ["--no-cms", *BEFORE], []),
    "Transformer++ (MLPs)": ("transformer", [], []),
}
CMS_ROW = "HOPE (CMS levels at periods 1/4/16)"
RIVALS = ("HOPE w/o CMS (one period-1 MLP)", "Transformer++ (MLPs)")


def verdict(rows: dict) -> str:
    """The plain sentence on CMS against its rivals, from the measured rows."""
    cms = rows[CMS_ROW]
    same_lr = []
    for lr, c in cms.items():
        hi = c["forgetting_bpc"]["mean"] + c["forgetting_bpc"]["ci95"]
        if all(hi < rows[r][lr]["forgetting_bpc"]["mean"] - rows[r][lr]["forgetting_bpc"]["ci95"]
               and c["gain_bpc"]["mean"] >= rows[r][lr]["gain_bpc"]["mean"] for r in RIVALS):
            same_lr.append(lr)
    frontier = []
    for lr, c in cms.items():
        beaten = [f"{r} at lr {lr2}" for r in RIVALS for lr2, o in rows[r].items()
                  if o["gain_bpc"]["mean"] >= c["gain_bpc"]["mean"] and o["forgetting_bpc"]["mean"] <= c["forgetting_bpc"]["mean"]]
        if not beaten:
            frontier.append(lr)
    if same_lr:
        return (f"CMS earns its place in forgetting: at adaptation lr {', '.join(same_lr)} HOPE forgets less than "
                f"both HOPE w/o CMS and the Transformer++ (disjoint 95% intervals) while gaining at least as much.")
    if frontier:
        return (f"CMS trades better, but not significantly: at adaptation lr {', '.join(frontier)} no rival gains as "
                f"much while forgetting as little (means), yet no lr gives disjoint 95% intervals against both.")
    return ("CMS does not earn its place in forgetting: at every adaptation lr some rival gains at least as much "
            "on the new text while forgetting no more (means).")


def table(result: dict) -> str:
    """docs/hope.md's CMS table (tests/test_docs.py checks it against the JSON)."""
    lrs = list(next(iter(result["rows"].values())))
    lines = ["| adapted part | " + " | ".join(f"lr {lr}: gain / forgetting" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for name, by_lr in result["rows"].items():
        cells = [f"{c['gain_bpc']['mean']:.3f} ± {c['gain_bpc']['ci95']:.3f} / "
                 f"{c['forgetting_bpc']['mean']:.3f} ± {c['forgetting_bpc']['ci95']:.3f}" for c in by_lr.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    add_run_options(ap)
    ap.add_argument("--lrs", type=cli.positive_float, nargs="+", default=ADAPT_LRS, help="adaptation lrs")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--extra", default="", help="more continual.py flags, one string (smoke tests: shorter windows)")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--out", default=str(HERE / "cms.json"), help="result file")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    extra = shlex.split(args.extra) + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = {(m, tuple(f), s): pool.submit(train, runs, m, list(f), TRAIN_LR, s, args.steps, args.preset, args.cache_dir)
                for m, f in {(m, tuple(f)) for m, f, _ in ROWS.values()} for s in args.seed}
        dirs = {key: job.result()["dir"] for key, job in dirs.items()}
        jobs = {}
        for name, (model, flags, cflags) in ROWS.items():
            for lr in args.lrs:
                for s in args.seed:
                    d = dirs[(model, tuple(flags), s)]
                    tag = "".join(f.strip("-").replace("-", "_") + "_" for f in cflags)
                    jobs[(name, lr, s)] = pool.submit(
                        after_training, "examples/hope/continual.py", d, Path(d) / f"continual_{tag}lr{lr:g}.json",
                        ["--model", model, "--continual", "--no-stream", "--lr", f"{lr:g}", *cflags, *extra])
        measured = {key: job.result()["models"][ROWS[key[0]][0]] for key, job in jobs.items()}
    rows = {}
    for name in ROWS:
        rows[name] = {}
        for lr in args.lrs:
            rs = [measured[(name, lr, s)] for s in args.seed]
            rows[name][f"{lr:g}"] = dict(
                gain_bpc=summary([r["new_before_bpc"] - r["new_after_bpc"] for r in rs]),
                forgetting_bpc=summary([r["val_after_bpc"] - r["val_before_bpc"] for r in rs]),
                new_after_bpc=summary([r["new_after_bpc"] for r in rs]),
                adapted_params=rs[0]["adapted_params"])
    result = dict(command="python examples/hope/results/cms.py " + " ".join(argv or sys.argv[1:]),
                  seeds=args.seed, train_lr=TRAIN_LR, lrs=[f"{lr:g}" for lr in args.lrs], rows=rows)
    result["verdict"] = verdict(rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result), result["verdict"], sep="\n\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main)
