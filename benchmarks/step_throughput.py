"""Optimizer step throughput: deepopt's fused steps against the copy roofline and torch's fused steps.

One run on one GPU measures, for each parameter set,

* a device copy of all params (the bandwidth ceiling: it reads and writes every byte once),
* torch's fused SGD-momentum and fused AdamW,
* every deepopt optimizer on each of its implementations, chosen explicitly: ``foreach=True``,
  ``fused=True`` (Triton) and, for AssociativeMomentum, ``fused=True, fused_backend="cuda"``,

on (a) a model-shaped set: 24 layers of d=2048 (qkv 3d x d, out d x d, mlp 4d x d and d x 4d, two
norms) plus a 32000 x d embedding, ~1.27e9 fp32 params; (b) 4000 tensors of 128 x 256 (32768
elements). Params and gradients are random (never zeros). Times are CUDA-event based
(``triton.testing.do_bench`` when Triton is installed); ``--tiny`` runs the same code on CPU at
toy sizes with wall-clock timing (a smoke test: its numbers mean nothing).

Byte count for GB/s: (tensors read + tensors written) x numel x element
size, the same formula for torch's baselines; a copy reads 1 and writes 1. For the matrix rules
(delta-rule matrix keys, Newton-Schulz, M3) the count is the rule's elementwise traffic only, so
their GB/s is an effective figure; their matmuls are judged against the FLOP roofline instead.

    python benchmarks/step_throughput.py --out benchmarks/results/step_throughput.json
    python benchmarks/step_throughput.py --tiny --out /tmp/step_tiny.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's deepopt
# torch and deepopt are imported inside the functions: --help answers before they load
from examples import cli  # noqa: E402

# (tensors read, tensors written) per element of the rule's elementwise work
TRAFFIC = {
    "copy": (1, 1),
    "torch SGD fused": (3, 2),                     # p, g, buf -> p, buf
    "torch AdamW fused": (4, 3),                   # p, g, m, v -> p, m, v
    "AssociativeMomentum (sgd)": (3, 2),
    "AssociativeMomentum (adam)": (4, 3),
    "DeltaMomentum (elementwise)": (4, 2),         # + one read of g for the rms
    "DeltaMomentum (matrix)": (4, 2),              # + matmuls (not counted)
    "DeepMomentum (identity)": (3, 2),             # + MLP matmuls (not counted)
    "DeepMomentum (newton_schulz)": (3, 2),        # + MLP and NS matmuls (not counted)
    "M3": (6, 4),                                  # p, g, M1, S, A, O2 -> p, M1, S, A (+ NS)
    "torch Muon": (3, 2),
}


def model_shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    return shapes


def deepopt_configs() -> dict:
    """deepopt's configurations, each timed on every implementation it has (IMPLEMENTATIONS)."""
    import deepopt
    return {
        "AssociativeMomentum (sgd)": lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=1e-3, momentum=0.9, **f),
        "AssociativeMomentum (adam)": lambda ps, **f: deepopt.AssociativeMomentum(
            ps, lr=1e-3, preconditioner="adam", weight_decay=0.01, decoupled_weight_decay=True, **f),
        "DeltaMomentum (elementwise)": lambda ps, **f: deepopt.DeltaMomentum(ps, lr=1e-3, keys="elementwise", **f),
        "DeltaMomentum (matrix)": lambda ps, **f: deepopt.DeltaMomentum(ps, lr=1e-3, keys="matrix", **f),
        "DeepMomentum (identity)": lambda ps, **f: deepopt.DeepMomentum(ps, lr=1e-3, **f),
        "DeepMomentum (newton_schulz)": lambda ps, **f: deepopt.DeepMomentum(ps, lr=1e-3, output="newton_schulz",
                                                                             **f),
        "M3": lambda ps, **f: deepopt.M3(_m3_groups(ps), lr=0.02, **f),
    }

#: the implementations, chosen explicitly (never the fused=None default): foreach, the Triton
#: kernels, and the CUDA C++ kernels where a rule has them (AssociativeMomentum)
IMPLEMENTATIONS = {"foreach": dict(foreach=True), "triton": dict(fused=True),
                   "cuda": dict(fused=True, fused_backend="cuda")}


def optimizers(device: str) -> dict:
    """name -> factory(params) for every optimizer and implementation measured."""
    import torch
    cuda = device == "cuda"
    torch_fused = dict(fused=True) if cuda else {}
    opts = {
        "torch SGD fused": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **torch_fused),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, **torch_fused),
    }
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    for name, make in deepopt_configs().items():
        for impl, flags in IMPLEMENTATIONS.items():
            if impl == "cuda" and not (cuda and name.startswith("AssociativeMomentum")):
                continue
            if impl == "triton" and not (cuda or interpreter):
                continue
            opts[f"{name} [{impl}]"] = lambda ps, make=make, flags=flags: make(ps, **flags)
    if hasattr(torch.optim, "Muon"):
        opts["torch Muon"] = lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=0.02)
    return opts


def _m3_groups(ps):
    mats = [p for p in ps if p.ndim >= 2]
    vecs = [p for p in ps if p.ndim < 2]
    groups = [{"params": mats}]
    if vecs:
        groups.append({"params": vecs, "algorithm": "adamw", "lr": 3e-4})
    return groups


def _timer(device: str, warmup: int, rep: int):
    import torch
    if device == "cuda":
        try:
            from triton.testing import do_bench
            return lambda fn: float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except ImportError:
            pass

        def cuda_events(fn):
            for _ in range(3):
                fn()
            times = []
            for _ in range(max(5, rep // 20)):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2]
        return cuda_events

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    return wall


def measure_set(name: str, shapes, device: str, timer, only=None) -> list[dict]:
    import torch
    gen = torch.Generator(device=device).manual_seed(0)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    elsize = 4
    rows = []

    def row(opt_name, ms, extra=None):
        reads, writes = TRAFFIC[opt_name.split(" [")[0]]
        gbytes = (reads + writes) * numel * elsize / 1e9
        r = dict(set=name, optimizer=opt_name, ms=ms, gb_per_s=gbytes / (ms / 1e3) if ms else None,
                 bytes=int(gbytes * 1e9), tensors=len(shapes), params=numel)
        if extra:
            r.update(extra)
        rows.append(r)
        print(f"  {opt_name:32s} {ms:10.3f} ms", flush=True)

    # copy roofline
    src = torch.randn(numel, device=device, generator=gen)
    dst = torch.empty_like(src)
    row("copy", timer(lambda: dst.copy_(src)))
    src = dst = None   # freed before the optimizers' params

    for opt_name, make in optimizers(device).items():
        if only and opt_name not in only:
            continue
        params = [torch.randn(s, device=device, generator=gen).mul_(0.02).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=gen).mul_(1e-3)
        try:
            opt = make(params)
            opt.step()   # creates the state outside the timing
            row(opt_name, timer(opt.step))
        except Exception as e:   # report, keep going (e.g. torch Muon's shape rules)
            rows.append(dict(set=name, optimizer=opt_name, error=f"{type(e).__name__}: {e}"))
            print(f"  {opt_name:32s} error: {type(e).__name__}: {e}", flush=True)
        finally:
            del params
            if device == "cuda":
                torch.cuda.empty_cache()
    copy_gbps = rows[0]["gb_per_s"]
    sgd = next((r.get("ms") for r in rows if r["optimizer"] == "torch SGD fused"), None)
    adam = next((r.get("ms") for r in rows if r["optimizer"] == "torch AdamW fused"), None)
    for r in rows:
        if r.get("ms") is None:
            continue
        r["pct_of_copy"] = 100 * r["gb_per_s"] / copy_gbps
        # Adam-like rules against torch's fused AdamW, the others against its fused SGD
        baseline = adam if "adam" in r["optimizer"].lower() or r["optimizer"].startswith("M3") else sgd
        r["ratio_to_torch_fused"] = r["ms"] / baseline if baseline and r["optimizer"] != "copy" else None
    return rows


def print_table(rows):
    print(f"\n{'set':10s} {'optimizer':32s} {'ms':>10s} {'GB/s':>9s} {'% copy':>7s} {'x torch':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['set']:10s} {r['optimizer']:32s} error: {r['error'][:60]}")
            continue
        ratio = r.get("ratio_to_torch_fused")
        print(f"{r['set']:10s} {r['optimizer']:32s} {r['ms']:10.3f} {r['gb_per_s']:9.1f} "
              f"{r['pct_of_copy']:6.1f}% {ratio if ratio is not None else float('nan'):8.2f}")


def main(argv=None):
    ap = cli.parser(__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on CPU (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/step_throughput.json", help="result file (JSON)")
    ap.add_argument("--only", nargs="+", help="measure only these optimizers (names as printed) (default: all)")
    ap.add_argument("--warmup", type=cli.positive_int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=cli.positive_int, default=100, help="do_bench repetitions (ms)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1) if args.tiny else None
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        ap.error("no CUDA device: the full benchmark needs one GPU; use --tiny for the CPU smoke test")
    if args.tiny:
        sets = {"model": model_shapes(16, 2, 64), "many": [(8, 16)] * 40}
    else:
        sets = {"model": model_shapes(2048, 24, 32000), "many": [(128, 256)] * 4000}
    timer = _timer(device, args.warmup, args.rep)
    rows = []
    for name, shapes in sets.items():
        print(f"[{name}] {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes):.3e} params", flush=True)
        rows += measure_set(name, shapes, device, timer, only=set(args.only) if args.only else None)
    print_table(rows)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, tiny=args.tiny, timing="triton.testing.do_bench / CUDA events"
                if device == "cuda" else "wall clock (smoke test only)")
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    cli.run(main)
