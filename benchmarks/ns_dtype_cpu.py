"""Why ``ns_dtype="auto"`` runs Newton-Schulz in fp32 on CPU: one optimizer step of each
Newton-Schulz rule with ``ns_dtype="bfloat16"`` and ``"float32"``, timed side by side (alternating
rounds, one process) on the hidden matrices of nanoGPT-shaped models, and how far the two
precisions' updates differ.

    python -m benchmarks.ns_dtype_cpu              # -> benchmarks/results/ns_dtype_cpu.json
    ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.ns_dtype_cpu --params nanogpt-cpu gpt2-mlp-matrix \
        --out benchmarks/results/ns_dtype_cpu_avx2.json   # as on a CPU without native bf16 matmuls
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from examples import cli  # noqa: E402


def block_matrices(layers: int, d: int) -> list[tuple[int, int]]:
    """The hidden matrices of a GPT: (qkv, attention out, MLP in, MLP out) per layer."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


MODELS = {"nanogpt-cpu": ("nanoGPT cpu config (4 x d=128)", block_matrices(4, 128)),
          "gpt2-small": ("GPT-2 small (12 x d=768)", block_matrices(12, 768)),
          "gpt2-mlp-matrix": ("one GPT-2 MLP matrix (3072 x 768)", [(3072, 768)])}


def time_steps(make, params, grads, rounds: int) -> list[float]:
    opt = make(params)
    times = []
    for r in range(rounds + 1):
        for p, g in zip(params, grads):
            p.grad = g
        start = time.perf_counter()
        opt.step()
        if r:   # the first step allocates the state
            times.append(time.perf_counter() - start)
    return times


def table(amx: dict, no_native: dict) -> str:
    """docs/numerics.md's table from the two JSON files (tests/test_docs.py checks it)."""
    def ms(v):
        return f"{v / 1e3:.1f} s" if v >= 1e3 else f"{v:.1f} ms"
    other = {(r["model"], r["rule"]): r for r in no_native["rows"]}
    lines = ["| params | rule | AMX: bf16 / fp32 | no native bf16: bf16 / fp32 |", "|---|---|---|---|"]
    for r in amx["rows"]:
        o = other.get((r["model"], r["rule"]))
        cell = f"{ms(o['bf16_ms'])} / {ms(o['fp32_ms'])} ({o['bf16_over_fp32']:.0f}x)" if o else "not run"
        lines.append(f"| {r['model']} | {r['rule']} | {ms(r['bf16_ms'])} / {ms(r['fp32_ms'])} | {cell} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = cli.parser(__doc__)
    ap.add_argument("--params", nargs="+", choices=list(MODELS), default=list(MODELS), help="parameter sets")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per setting and round")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ns_dtype_cpu.json"), help="JSON file")
    args = ap.parse_args(argv)

    import torch
    import deepopt
    torch.set_num_threads(args.threads)
    rules = {
        "DeepMomentum(output='newton_schulz')": lambda ps, nd: deepopt.DeepMomentum(
            ps, lr=0.02, output="newton_schulz", ns_dtype=nd),
        "M3": lambda ps, nd: deepopt.M3(ps, lr=0.02, ns_dtype=nd),
    }
    rows = []
    for key in args.params:
        model, shapes = MODELS[key]
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        grads = [torch.randn(p.shape, generator=gen) for p in start]
        for rule, make in rules.items():
            ms, after = {}, {}
            for _ in range(2):   # alternate the two settings so that machine load hits both alike
                for nd in ("bfloat16", "float32"):
                    params = [p.detach().clone().requires_grad_() for p in start]
                    ms.setdefault(nd, []).extend(t * 1e3 for t in time_steps(lambda ps: make(ps, nd), params,
                                                                             grads, args.rounds))
                    after[nd] = params
            moved = max((a - s).abs().max().item() for a, s in zip(after["float32"], start))
            diff = max((a - b).abs().max().item() for a, b in zip(after["float32"], after["bfloat16"]))
            row = dict(model=model, rule=rule, bf16_ms=statistics.median(ms["bfloat16"]),
                       fp32_ms=statistics.median(ms["float32"]), max_param_change=moved,
                       max_param_diff_bf16_vs_fp32=diff)
            row["bf16_over_fp32"] = row["bf16_ms"] / row["fp32_ms"]
            rows.append(row)
            print(f"{model:32s} {rule:38s} bf16 {row['bf16_ms']:8.1f} ms  fp32 {row['fp32_ms']:8.1f} ms  "
                  f"ratio {row['bf16_over_fp32']:5.1f}x  |diff| {diff:.2e} of |change| {moved:.2e}")
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), threads=args.threads,
                cpu_has_native_bf16=deepopt.functional.cpu_has_native_bf16(),
                onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset)"), rounds=args.rounds,
                note="median step time over 2 alternating rounds; the params move by max_param_change per "
                     f"{args.rounds + 1} steps")
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
