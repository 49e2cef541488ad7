"""The Newton-Schulz rules' step time against torch Muon, on one process and sharded over ranks.

    python -m benchmarks.ns_step                   # -> benchmarks/results/ns_step.json (+ markdown tables)
    python -m benchmarks.ns_step --part training   # only 3.: the Gram form in training (~15 min)
    python -m benchmarks.ns_step --part accuracy   # only the Gram form's bf16 accuracy (seconds)

1. One process (all cores): one optimizer step on a fixed, non-zero gradient for every matrix of
   nanoGPT's baby GPT (6 layers, width 384) and of GPT-2 124M (width 768, 4 of its 12 layers, to
   fit a CPU), for torch.optim.Muon and deepopt's rules in the same process, in alternating
   rounds (machine load hits all alike); medians, as ratios to Muon. Also Newton-Schulz alone:
   per matrix, batched, Gram form.
2. Ranks (gloo, one thread each): the baby GPT's step on 2 and 4 ranks, DDP-style (every rank
   holds every matrix; ``process_group`` splits the Newton-Schulz work) and FSDP2-style (DTensor
   row shards): step time, Newton-Schulz flops per rank against a perfect 1/N split, and the bytes
   each rank receives from the others (counted in the collectives the optimizer calls) against
   FSDP2's all-gather of the fp32 params.
3. Training: the Gram form against the direct form on the char-level GPT of
   ``benchmarks/char_gpt.py`` (each rule at its best lr there, seeds 0-4, paired).

The optimizers are built as create_optimizer's recipes build them ("deep-ns", "m3": momentum
0.95, Nesterov, Muon's lr adjustment, the Gram form), and with the direct form, at lr 0.02 (the
step cost does not depend on it).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from examples import cli  # noqa: E402

#: (rows, cols) of a transformer block's matrices: qkv, attention out, MLP in, MLP out
def block(width: int) -> list[tuple[int, int]]:
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]


MODELS = {"nanogpt_baby": block(384) * 6, "gpt2_124m_4_layers": block(768) * 4}


def optimizer_makers():
    import torch

    import deepopt
    from deepopt.create import RECIPES
    deep_ns, m3 = RECIPES["deep-ns"][2], RECIPES["m3"][2]
    lr = 0.02

    def deep(**kw):
        return lambda ps: deepopt.DeepMomentum(ps, lr=lr, **{**deep_ns, **kw})
    makers = {
        "torch Muon": lambda ps: torch.optim.Muon(ps, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True),
        "deepopt Muon (deep-ns, memory_lr=0, direct)": deep(memory_lr=0.0, ns_form="direct"),
        "deep-ns, direct": deep(ns_form="direct"),
        "deep-ns (recipe: gram)": deep(ns_form="gram"),
        "deep-ns, gram, polar_express": deep(ns_form="gram", ns_coefficients="polar_express"),
        "m3, direct": lambda ps: deepopt.M3(ps, lr=lr, **{**m3, "ns_form": "direct"}),
        "m3 (recipe: gram)": lambda ps: deepopt.M3(ps, lr=lr, **{**m3, "ns_form": "gram"}),
    }
    if not hasattr(torch.optim, "Muon"):
        del makers["torch Muon"]
    return makers


def fixed_params(shapes, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return params


def step_times(opt, steps):
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - start)
    return out


def one_process(shapes, rounds, steps) -> dict:
    makers = optimizer_makers()
    opts = {name: make(fixed_params(shapes)) for name, make in makers.items()}
    for opt in opts.values():
        opt.step()   # state allocated outside the timing
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            times[name] += step_times(opt, steps)
    reference = statistics.median(times.get("torch Muon", times["deep-ns, direct"]))
    return {name: dict(ms=statistics.median(t) * 1e3, ratio_to_muon=statistics.median(t) / reference)
            for name, t in times.items()}


def ns_only(shapes, rounds) -> dict:
    """Newton-Schulz alone on every matrix (bf16 where native, as ``ns_dtype="auto"``)."""
    import torch

    from deepopt import newton_schulz as NS
    dtype = NS.resolve_ns_dtype("auto", torch.device("cpu"))
    us = [p.grad for p in fixed_params(shapes)]
    variants = {"per matrix": dict(batched=False), "batched": dict(batched=True),
                "gram form": dict(batched=False, form="gram")}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, kw in variants.items():
            start = time.perf_counter()
            NS.orthogonalise(us, dtype=dtype, **kw)
            times[name].append(time.perf_counter() - start)
    per_matrix = statistics.median(times["per matrix"])
    flops = {"per matrix": sum(NS.ns_flops(s) for s in shapes), "batched": sum(NS.ns_flops(s) for s in shapes),
             "gram form": sum(NS.ns_flops(s, form="gram") for s in shapes)}
    return {name: dict(ms=statistics.median(t) * 1e3, ratio=statistics.median(t) / per_matrix, gflop=flops[name] / 1e9)
            for name, t in times.items()}


class Traffic:
    """Per optimizer step: the matrices this rank orthogonalised (their shapes), the bytes it
    received from other ranks and the bytes it all-reduced, in the collectives deepopt calls
    (broadcast, all_to_all_single, all_reduce; FSDP2's and DDP's own traffic is not counted).
    Call :meth:`new_step` before each ``opt.step()``."""

    def __init__(self):
        self.steps, self.patched = [], []

    def new_step(self):
        self.steps.append({"orthogonalised": [], "received": 0, "reduced": 0})

    def __enter__(self):
        import torch.distributed as dist

        from deepopt import newton_schulz as NS
        rank, steps = dist.get_rank(), self.steps

        def patch(module, name, wrap):
            original = getattr(module, name)
            setattr(module, name, wrap(original))
            self.patched.append((module, name, original))

        def orthogonalise(original):
            def run(us, **kw):
                if steps:
                    steps[-1]["orthogonalised"] += [tuple(u.shape) for u in us]
                return original(us, **kw)
            return run

        def broadcast(original):
            def run(tensor, src, group=None, **kw):
                if steps and src != rank:
                    steps[-1]["received"] += tensor.numel() * tensor.element_size()
                return original(tensor, src, group=group, **kw)
            return run

        def all_to_all_single(original):
            def run(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
                if steps:
                    others = sum(output_split_sizes) - output_split_sizes[dist.get_rank(group)]
                    steps[-1]["received"] += others * output.element_size()
                return original(output, input, output_split_sizes, input_split_sizes, group=group, **kw)
            return run

        def all_reduce(original):
            def run(tensor, *args, **kw):
                if steps:
                    steps[-1]["reduced"] += tensor.numel() * tensor.element_size()
                return original(tensor, *args, **kw)
            return run

        patch(NS, "orthogonalise", orthogonalise)
        for name, wrap in (("broadcast", broadcast), ("all_to_all_single", all_to_all_single),
                           ("all_reduce", all_reduce)):
            patch(dist, name, wrap)
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self.patched):
            setattr(module, name, original)


#: the recipes (Gram form), sharded
RANK_OPTIMIZERS = ("deep-ns (recipe: gram)", "m3 (recipe: gram)")


def _rank_worker(rank, world, shapes, steps, store, out):
    import gc

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from deepopt import newton_schulz as NS
    mesh = init_device_mesh("cpu", (world,))
    makers = optimizer_makers()
    result = {}
    for name in RANK_OPTIMIZERS:
        for layout in ("ddp", "ddp_sharded", "fsdp2"):
            params = fixed_params(shapes)
            if layout == "fsdp2":
                sharded = []
                for p in params:
                    q = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
                    q.grad = distribute_tensor(p.grad, mesh, [Shard(0)])
                    sharded.append(q)
                params = sharded
            opt = makers[name](params)
            if layout == "ddp_sharded":
                opt._ns_group = dist.group.WORLD   # (what process_group=... sets)
            opt.step()
            dist.barrier()
            with Traffic() as traffic:
                times = []
                for _ in range(steps):
                    traffic.new_step()
                    dist.barrier()
                    start = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - start)
            flops = [sum(NS.ns_flops(s) for s in t["orthogonalised"]) for t in traffic.steps]
            result[f"{name}/{layout}"] = dict(ms=statistics.median(times) * 1e3, ns_flops=statistics.median(flops),
                                              received=statistics.median(t["received"] for t in traffic.steps),
                                              reduced=statistics.median(t["reduced"] for t in traffic.steps))
            del opt, params
    gather = [None] * world
    dist.all_gather_object(gather, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gather))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def ranks(shapes, world, steps) -> dict:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_rank_worker, args=(world, shapes, steps, os.path.join(tmp, "store"), out),
                           nprocs=world, start_method="spawn")
        per_rank = json.loads(Path(out).read_text())
    from deepopt.newton_schulz import ns_flops
    params_bytes = sum(r * c for r, c in shapes) * 4
    model_flops = sum(ns_flops(s) for s in shapes)   # one unsharded step's Newton-Schulz
    summary = {}
    for key in per_rank[0]:
        rows = [r[key] for r in per_rank]
        flops = [row["ns_flops"] for row in rows]
        summary[key] = dict(ms=max(row["ms"] for row in rows),
                            ns_flops_max_over_mean=max(flops) / (sum(flops) / world),
                            ns_flops_share_of_total=max(flops) / model_flops,
                            received_bytes_max=max(row["received"] for row in rows),
                            all_reduced_bytes_max=max(row["reduced"] for row in rows),
                            fsdp2_param_all_gather_bytes=(world - 1) / world * params_bytes)
    return summary


def single_thread(shapes, rounds, steps) -> dict:
    """The unsharded step with one thread: what each rank would do alone."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        makers = optimizer_makers()
        out = {}
        for name in RANK_OPTIMIZERS:
            opt = makers[name](fixed_params(shapes))
            opt.step()
            out[name] = statistics.median(sum((step_times(opt, steps) for _ in range(rounds)), [])) * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def gram_accuracy(seeds=(0, 1, 2)) -> dict:
    """bf16 Gram form against the bf16 direct form: each one's relative distance to the fp64
    direct result (the exact iteration, tests/test_newton_schulz.py), on gradient-like matrices
    (rank 4 plus noise), Muon's and Polar Express's coefficients; the ratio gram / direct."""
    import torch

    from deepopt import newton_schulz as NS
    ratios = []
    for seed in seeds:
        for shape in [(64, 256), (300, 60), (7, 30), (384, 1536), (128, 384)]:
            gen = torch.Generator().manual_seed(seed)
            u = torch.randn(shape[0], 4, generator=gen) @ torch.randn(4, shape[1], generator=gen) \
                + 0.1 * torch.randn(*shape, generator=gen)
            for coefficients in NS.NS_COEFFICIENT_SETS:
                exact = NS.orthogonalise([u.double()], coefficients=coefficients, dtype=torch.float64)[0]
                error = {form: ((NS.orthogonalise([u], coefficients=coefficients, form=form)[0].double() - exact).norm()
                                / exact.norm()).item() for form in NS.NS_FORMS}
                ratios.append(error["gram"] / error["direct"])
    return dict(cases=len(ratios), mean_ratio=sum(ratios) / len(ratios), max_ratio=max(ratios))


#: the Gram form against the direct form in training: the char-level GPT of benchmarks/char_gpt.py
TRAINING = {"deep-ns": "deep-ns-gram", "m3": "m3-gram"}


def training(jobs: int, log=print) -> dict:
    """Does ``ns_form="gram"`` train as the direct form? Each rule's char-GPT runs (benchmarks/char_gpt.py:
    its best lr, seeds 0-4; the direct runs come from that study's cache) against the same seeds
    with the Gram form: the paired difference of the final val loss with its 95% interval."""
    from benchmarks import char_gpt, run
    study = json.loads((char_gpt.DEFAULT_OUT / "char_gpt.json").read_text())
    out = {}
    for rule, variant in TRAINING.items():
        lr = study["entries"][rule]["lr"]
        plan = [dict(task=char_gpt.TASK, optimizer=o, lr=lr, seed=s, aux_lr=study["aux_lr"])
                for o in (rule, variant) for s in char_gpt.SEEDS]
        recs = run.run_jobs(plan, char_gpt.DEFAULT_OUT, jobs, False, log)
        summary = {o: run.seed_summary([r for r in recs if r["optimizer"] == o]) for o in (rule, variant)}
        diff = run.paired_comparison(summary[variant], summary[rule], keys=("val_loss",))["val_loss"]
        out[rule] = dict(lr=lr, seeds=char_gpt.SEEDS, direct_val=summary[rule]["val_mean"],
                         direct_ci=summary[rule]["val_ci"], gram_val=summary[variant]["val_mean"],
                         gram_ci=summary[variant]["val_ci"], paired_diff=diff["mean_diff"], paired_ci=diff["ci"],
                         seed_spread=summary[rule]["val_ci"],
                         step_ms=dict(direct=summary[rule]["step_time_ms"], gram=summary[variant]["step_time_ms"]))
    return out


def training_table(result: dict) -> str:
    """docs/benchmarks.md's table of the Gram form in training."""
    lines = ["| rule (char GPT, 5 seeds) | direct form: val loss | Gram form: val loss | Gram - direct (paired, 95%) | "
             "step time, Gram / direct |", "|---|---|---|---|---|"]
    for rule, row in result["training"].items():
        lines.append(f"| {rule} (lr {row['lr']:g}) | {row['direct_val']:.4f} ± {row['direct_ci']:.4f} | "
                     f"{row['gram_val']:.4f} ± {row['gram_ci']:.4f} | {row['paired_diff']:+.4f} ± {row['paired_ci']:.4f} | "
                     f"{row['step_ms']['gram'] / row['step_ms']['direct']:.2f}x |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """README's sentence on the step time (tests/test_docs.py checks it against the JSON)."""
    one = result["one_process"]

    def ratios(name):
        return " / ".join(f"{one[m][name]['ratio_to_muon']:.2f}x" for m in one)
    models = " / ".join(one)
    r4 = result["ranks"].get("4", {}).get(f"{RANK_OPTIMIZERS[0]}/fsdp2")
    sharded = ("" if not r4 else
               f" On 4 gloo ranks (FSDP2) the busiest rank does {r4['ns_flops_share_of_total']:.2f} of the "
               f"Newton-Schulz flops and receives {r4['received_bytes_max'] / 1e6:.1f} MB a step against "
               f"FSDP2's {r4['fsdp2_param_all_gather_bytes'] / 1e6:.1f} MB param all-gather.")
    return (f"One CPU process, step time as a ratio to torch Muon's ({models}): the deep-ns recipe (Gram form) "
            f"{ratios('deep-ns (recipe: gram)')} (direct form {ratios('deep-ns, direct')}); the m3 recipe "
            f"{ratios('m3 (recipe: gram)')} (direct {ratios('m3, direct')}).{sharded}")


def table(result: dict) -> str:
    """docs/benchmarks.md's one-process table (tests/test_docs.py checks it against the JSON)."""
    models = list(result["one_process"])
    names = list(result["one_process"][models[0]])
    lines = ["| optimizer | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{result['one_process'][m][name]['ms']:.0f} ms ({result['one_process'][m][name]['ratio_to_muon']:.2f}x)"
            for m in models) + " |")
    return "\n".join(lines)


def ranks_table(result: dict) -> str:
    """docs/benchmarks.md's table of the sharded runs."""
    lines = ["| run | ranks | step (slowest rank) | vs 1 rank, 1 thread | NS flops of the busiest rank / all | "
             "bytes received / rank | FSDP2 param all-gather / rank |", "|---|---|---|---|---|---|---|"]
    alone = result["single_thread_ms"]
    for world, rows in result["ranks"].items():
        for key, row in rows.items():
            name = key.split("/")[0]
            lines.append(f"| {key} | {world} | {row['ms']:.0f} ms | {row['ms'] / alone[name]:.2f}x | "
                         f"{row['ns_flops_share_of_total']:.2f} | {row['received_bytes_max'] / 1e6:.2f} MB | "
                         f"{row['fsdp2_param_all_gather_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--rounds", type=cli.positive_int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=cli.positive_int, default=3, help="timed steps per optimizer and round")
    ap.add_argument("--worlds", default="2,4", help="rank counts of the sharded runs (comma-separated)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ns_step.json"), help="result file")
    ap.add_argument("--part", default="all", choices=["all", "speed", "training", "accuracy"],
                    help="speed: the step times; training: the Gram form's char-GPT runs (kept in the same file)")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="parallel training runs")
    args = ap.parse_args(argv)
    if args.part in ("training", "accuracy"):   # one part, kept in the same file
        result = json.loads(Path(args.out).read_text())
        result[args.part if args.part == "training" else "gram_accuracy"] = (
            training(args.jobs) if args.part == "training" else gram_accuracy())
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(training_table(result) if args.part == "training" else result["gram_accuracy"])
        return
    import torch
    result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
                  machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  rounds=args.rounds, steps=args.steps,
                  note="median step time, every optimizer in one process, alternating rounds; shared machine",
                  models={name: shapes for name, shapes in MODELS.items()}, one_process={}, ns_only={})
    for model, shapes in MODELS.items():
        result["one_process"][model] = one_process(shapes, args.rounds, args.steps)
        result["ns_only"][model] = ns_only(shapes, args.rounds)
        print(model, {k: f"{v['ratio_to_muon']:.2f}x" for k, v in result["one_process"][model].items()},
              {k: f"{v['ratio']:.2f}x" for k, v in result["ns_only"][model].items()}, flush=True)
    shapes = MODELS["nanogpt_baby"]
    result["single_thread_ms"] = single_thread(shapes, args.rounds, args.steps)
    result["ranks"] = {}
    for world in (int(w) for w in args.worlds.split(",") if w):
        result["ranks"][str(world)] = ranks(shapes, world, args.rounds * args.steps)
        print(world, "ranks", {k: f"{v['ms']:.0f} ms" for k, v in result["ranks"][str(world)].items()}, flush=True)
    result["gram_accuracy"] = gram_accuracy()
    if args.part == "all":
        result["training"] = training(args.jobs)
    elif Path(args.out).exists():   # --part speed keeps the training part of the file
        result["training"] = json.loads(Path(args.out).read_text()).get("training")
        if result["training"] is None:
            del result["training"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result) + "\n\n" + ranks_table(result) + ("\n\n" + training_table(result) if "training" in result else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
