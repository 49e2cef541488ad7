"""Where HOPE's CPU time goes, and what its trained gates hold (the numbers docs/hope.md quotes).

    python examples/hope/results/memory_cost.py     # -> examples/hope/results/memory_cost.json

* ``write``: one linear memory write with reads (self values, 4 heads of 32, chunks of 16),
  forward + backward, as HOPE wrote M_mem before (one call per 16-token chunk, the state passed
  between calls) and now (one chunkwise call over the sequence); median ms, one thread;
* ``gates`` (with a checkpoint): the learned anchor gates sigmoid(logit) and retention biases
  sigmoid(b_alpha) of a trained HOPE, min and max over heads and layers.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402

CKPT = "out/hope_ablate/hope_cms_anchor_init_0.9_gen_chunk_size_32_lr0.01_steps500_seed1/hope.pt"


def write_ms(batch: int, length: int, chunkwise: bool, repeats: int = 7) -> float:
    import torch
    import torch.nn.functional as F

    from deepopt.memory import linear_memory_write
    g = torch.Generator().manual_seed(0)
    H, d, c = 4, 32, 16
    unit = lambda: F.normalize(torch.randn(batch, H, length, d, generator=g), dim=-1)
    M0 = (torch.eye(d) + 0.02 * torch.randn(batch, H, d, d, generator=g)).requires_grad_()
    k, v, q = unit().requires_grad_(), unit().requires_grad_(), unit()
    eta = torch.rand(batch, H, length, generator=g).requires_grad_()
    alpha = (0.9 + 0.1 * torch.rand(batch, H, length, generator=g)).requires_grad_()

    def step():
        if chunkwise:
            y, M = linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, self_values=True)
        else:
            ys, M = [], M0
            for kc, vc, ec, ac, qc in zip(k.split(c, 2), v.split(c, 2), eta.split(c, 2), alpha.split(c, 2),
                                          q.split(c, 2)):
                yc, M = linear_memory_write(M, kc, vc, ec, ac, qc, chunk_size=c, self_values=True)
                ys.append(yc)
            y = torch.cat(ys, 2)
        (y.square().sum() + M.square().sum()).backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def gates(path: str) -> dict:
    import torch

    from examples.hope.continual import load_checkpoint
    model, _, _ = load_checkpoint(path)
    anchors = torch.cat([torch.sigmoid(p).flatten() for b in model.blocks for p in b.titans.anchor_logit.values()])
    biases = torch.cat([torch.sigmoid(b.titans.b_alpha).flatten() for b in model.blocks])
    return dict(checkpoint=path, anchor_gate=[anchors.min().item(), anchors.max().item()],
                retention_bias=[biases.min().item(), biases.max().item()])


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--ckpt", default=CKPT, help="a trained HOPE with the anchor gate (skipped when missing)")
    ap.add_argument("--out", default=str(HERE / "memory_cost.json"), help="result file")
    args = ap.parse_args(argv)
    import torch
    result = dict(command="python examples/hope/results/memory_cost.py", date=time.strftime("%Y-%m-%d"),
                  device=f"cpu ({platform.machine()})", torch=torch.__version__)
    torch.set_num_threads(1)
    result["write_ms"] = {f"batch {b} x {t}": dict(per_chunk_calls=write_ms(b, t, False), chunkwise=write_ms(b, t, True))
                          for b, t in ((32, 128), (2, 2048))}
    print(json.dumps(result["write_ms"]), flush=True)
    if Path(args.ckpt).exists():
        result["gates"] = gates(args.ckpt)
        print(json.dumps(result["gates"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
