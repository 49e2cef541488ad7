"""How much of DeepMomentum's update its MLP memory carries, per design, on the benchmark MLP.

For each design (a set of DeepMomentum options), train the MNIST-1D MLP (40-128-128-10, the
benchmark task, seeds 0..9, lr 0.1 unless the design says otherwise) and record, at chosen steps
and for each weight matrix, the MLP's share ``||rho f(K)|| / ||M||`` (``M`` the linear memory
after its write; with ``linear_memory=False`` the update is ``rho f(K)`` alone, and the share
is measured against the ``M`` that momentum would have kept), the cosine of ``rho f(K)`` with
the gradient, the same share and cosine for the MLP read before its write (what it recalls of the
gradient from past steps alone, not an echo of this one), ``||G|| / ||M||`` (the share a perfect
recall of the gradient would have), and the final validation loss. The designs and the chosen default are in
docs/optimizers.md ("DeepMomentum: does the memory matter?").

    python -m benchmarks.deep_memory --out benchmarks/results/deep_memory.json
"""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# numpy, torch and deepopt are imported inside the functions: --help answers before they load
from examples import cli  # noqa: E402

#: Muon's options in DeepMomentum (torch Muon bit for bit at memory_lr 0)
MUON = dict(momentum=0.95, dampening=0.95, nesterov=True, output="newton_schulz", adjust_lr="original",
            decoupled_weight_decay=True, ns_dtype="bfloat16", lr=0.00316)
#: name -> DeepMomentum options (lr 0.1 and momentum 0.9 unless given; the defaults otherwise)
DESIGNS = {
    "SGD-momentum (memory_lr 0)": dict(memory_lr=0.0),
    "SGD-momentum, Nesterov (memory_lr 0)": dict(memory_lr=0.0, nesterov=True),
    "SGD-momentum (memory_lr 0), lr 0.13": dict(memory_lr=0.0, lr=0.13),
    "l2, memory_lr 32, ridge 0.01, A ~ N(0, 1) (default)": dict(),
    "l2, memory_lr 2": dict(memory_lr=2.0),
    "l2, memory_lr 8": dict(memory_lr=8.0),
    "l2, memory_lr 128": dict(memory_lr=128.0),
    "l2, ridge 0": dict(memory_decay=0.0),
    "l2, ridge 0.1": dict(memory_decay=0.1),
    "l2, A ~ N(0, 1/d)": dict(memory_init=None),
    "l2, A ~ N(0, 9)": dict(memory_init=3.0),
    "l2, hidden 64": dict(hidden=64),
    "l2, no linear memory (DMGD)": dict(linear_memory=False),
    "l2, no linear memory (DMGD), lr 1": dict(linear_memory=False, lr=1.0),
    "dot, memory_lr 0.01": dict(objective="dot", memory_lr=0.01),
    "dot, memory_lr 0.01, ridge 0.1, A ~ N(0, 1/d)": dict(objective="dot", memory_lr=0.01, memory_decay=0.1,
                                                        memory_init=None),
    "Muon (memory_lr 0, Muon's options, lr 0.00316)": dict(MUON, memory_lr=0.0),
    "l2 memory with Muon's options, lr 0.00316": dict(MUON),
}
SEEDS = tuple(range(10))
RECORD_AT = (1, 10, 50, 100, 200, 400, 600)


def mlp_readouts(opt, model) -> dict:
    """Per weight matrix with an MLP state: ``(rho f(K), G)`` for the current gradient, read from
    the MLP as it is now (call before ``opt.step()`` for the recall from past writes only)."""
    import torch
    from deepopt import functional as Fn
    out = {}
    group = opt.param_groups[0]
    for name, p in model.named_parameters():
        if p.ndim < 2 or p.grad is None or "mlp_in" not in opt.state[p]:
            continue
        state = opt.state[p]
        g = Fn.as_matrix(p.grad.detach())
        scale = g.square().sum(-1).mean().sqrt()
        keys = Fn.row_keys(g, key_norm=group["key_norm"], eps=group["eps"] * scale + torch.finfo(g.dtype).tiny)
        out[name] = (scale * Fn.mlp_memory(keys, state["mlp_in"], state["mlp_out"]), g)
    return out


def memory_readings(opt, model, before: dict) -> dict:
    """Per weight matrix, from the state after a step: ``share`` = ||rho f(K)|| / ||M||,
    ``cos_with_grad`` = cos(rho f(K), G), ``grad_over_memory`` = ||G|| / ||M||, and the same share
    and cosine for ``before`` (the MLP read before its write: what it recalls of G from the past)."""
    from deepopt import functional as Fn
    from torch.nn.functional import cosine_similarity

    def cos(a, b):
        return cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    out = {}
    for name, (deep, g) in mlp_readouts(opt, model).items():
        size = Fn.as_matrix(opt.state[dict(model.named_parameters())[name]]["momentum_buffer"]).norm().clamp_min(1e-30)
        row = dict(share=(deep.norm() / size).item(), cos_with_grad=cos(deep, g), grad_over_memory=(g.norm() / size).item())
        if name in before:
            row.update(share_before_write=(before[name][0].norm() / size).item(), cos_before_write=cos(before[name][0], g))
        out[name] = row
    return out


def run(design: dict, steps: int | None = None, seed: int = 0) -> dict:
    import deepopt
    import numpy as np
    import torch
    from benchmarks.tasks import TASKS
    task = TASKS["mnist1d_mlp"](quick=False)
    steps = steps or task.steps
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = task.build(seed)
    options = dict(dict(lr=0.1, momentum=0.9), **design)
    opt = deepopt.DeepMomentum(model.parameters(), seed=seed, **options)
    gen = torch.Generator().manual_seed(10_000 + seed)
    readings = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = task.loss(model, task.sample(step, gen))
        loss.backward()
        before = mlp_readouts(opt, model) if step in RECORD_AT else {}
        opt.step()
        if step in RECORD_AT:
            readings[step] = memory_readings(opt, model, before)
    model.eval()
    with torch.no_grad():
        val = task.evaluate(model, "val")
    return dict(options=options, val_loss=val["loss"], val_acc=val.get("acc"), readings=readings)


def summary(record: dict) -> dict:
    """Mean over the weight matrices and the seeds of the share and the cosine, per recorded step
    (NaN where a seed diverged), and the lowest per-matrix share (mean over the seeds) with its matrix."""
    import numpy as np
    rows = {}
    for step in record["readings"][0]:
        per_seed = [readings.get(step, {}) for readings in record["readings"]]
        rows[int(step)] = {key: float(np.mean([r[key] for per_param in per_seed for r in per_param.values()]))
                           for key in ("share", "cos_with_grad", "grad_over_memory", "share_before_write",
                                       "cos_before_write")
                           if all(key in r for per_param in per_seed for r in per_param.values())}
        names = sorted({name for per_param in per_seed for name in per_param})
        if names and all(set(per_param) == set(names) for per_param in per_seed):
            # the matrix whose MLP carries least (mean over the seeds): the one a design must not leave out
            per_matrix = {name: float(np.mean([per_param[name]["share"] for per_param in per_seed])) for name in names}
            rows[int(step)]["share_lowest_matrix"] = min(per_matrix.values())
            rows[int(step)]["lowest_matrix"] = min(per_matrix, key=per_matrix.get)
    return rows


def _mean_ci(xs) -> str:
    """``mean ± 95% t-half-width`` over the seeds, or "diverged (k of n)"."""
    from benchmarks.run import mean_ci_text
    bad = sum(1 for x in xs if not math.isfinite(x))
    return f"diverged ({bad} of {len(xs)})" if bad else mean_ci_text(xs, "{:.4f}", "{:.3f}")


#: the rows of README's short version of the table
README_ROWS = ("SGD-momentum (memory_lr 0)", "l2, memory_lr 32, ridge 0.01, A ~ N(0, 1) (default)", "l2, memory_lr 2",
               "l2, no linear memory (DMGD), lr 1",
               "Muon (memory_lr 0, Muon's options, lr 0.00316)", "l2 memory with Muon's options, lr 0.00316")


def table(results: dict, rows=None) -> str:
    """The ablation table of docs/optimizers.md (``rows``: only those designs, as README) from the
    JSON this script writes."""
    lines = ["| design (lr 0.1 unless noted) | share at step 100 / 600 | lowest matrix's share at 100 | "
             "cos(rho f, G) at 100 | before the write: share / cos at 100 | ‖G‖/‖M‖ at 100 | val loss after 600 |",
             "|---|---|---|---|---|---|---|"]
    for name, record in results.items():
        if rows is not None and name not in rows:
            continue
        summ = {int(k): v for k, v in record["summary"].items()}

        def cell(step, key):
            value = summ.get(step, {}).get(key)
            return "diverged" if value is None or value != value else f"{value:.3g}"
        lowest = summ.get(100, {}).get("lowest_matrix")
        lines.append(f"| {name} | {cell(100, 'share')} / {cell(600, 'share')} | "
                     f"{cell(100, 'share_lowest_matrix')}{f' ({lowest})' if lowest else ''} | {cell(100, 'cos_with_grad')} | "
                     f"{cell(100, 'share_before_write')} / {cell(100, 'cos_before_write')} | "
                     f"{cell(100, 'grad_over_memory')} | {_mean_ci(record['val_loss'])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deep_memory.json"),
                    help="result file (JSON)")
    ap.add_argument("--designs", nargs="+", choices=list(DESIGNS), metavar="DESIGN",
                    help="names of DESIGNS to run, quoted (default: all)")
    ap.add_argument("--seed", type=cli.nonnegative_int, nargs="+", default=list(SEEDS),
                    help="seeds; the table gives the mean and the 95%% t-interval over them")
    ap.add_argument("--steps", type=cli.positive_int, default=None, help="training steps (default: the task's 600)")
    ap.add_argument("--table", action="store_true", help="print the docs/optimizers.md table from --out and exit")
    ap.add_argument("--readme", action="store_true", help="with --table: README's rows only")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.out).read_text()), README_ROWS if args.readme else None))
        return
    import torch
    torch.set_num_threads(1)
    results = {}
    for name, design in DESIGNS.items():
        if args.designs and name not in args.designs:
            continue
        per_seed = [run(design, args.steps, seed) for seed in args.seed]
        record = dict(options=per_seed[0]["options"], seeds=list(args.seed),
                      val_loss=[r["val_loss"] for r in per_seed], val_acc=[r["val_acc"] for r in per_seed],
                      readings=[r["readings"] for r in per_seed])
        record["summary"] = summary(record)
        results[name] = record
        at100 = record["summary"].get(100, {})
        print(f"{name:60s} val {_mean_ci(record['val_loss'])}  share@100 {at100.get('share', float('nan')):.3f}  "
              f"cos@100 {at100.get('cos_with_grad', float('nan')):.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
