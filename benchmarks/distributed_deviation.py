"""Max deviation of DDP / FSDP2 / DCP-resharded runs from a single-process run, per optimizer.

    python benchmarks/distributed_deviation.py          # 2 and 4 gloo ranks on CPU, ~2 minutes

Reuses the configurations and workers of tests/test_distributed.py (tests/_dist_worker.py):
10 steps of a 3-layer MLP on a global batch of 8, split over 2 or 4 ranks; the DCP column saves a
checkpoint from 2 FSDP2 ranks after 10 steps and resumes it in one process for 10 more. Writes
benchmarks/results/distributed_deviation.json and prints a markdown table.
"""

import datetime
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
# torch and the workers are imported in main(): --help answers before they load
from examples import cli  # noqa: E402


#: the configurations of tests/_dist_worker.py as docs/distributed.md names them
LABELS = {"associative": "AssociativeMomentum (SGD)", "associative_adam": "AssociativeMomentum (AdamW)",
          "delta": "DeltaMomentum (matrix keys)", "delta_elementwise": "DeltaMomentum (elementwise keys)",
          "deep": "DeepMomentum", "deep_ns_l2": "DeepMomentum (L2, Newton-Schulz)", "m3": "M3 (no preconditioner)",
          "m3_preconditioned": "M3 at its defaults (scale-free preconditioner)",
          "m3_gram": "M3, the recipe's Gram form (fp32)",
          "multifreq_adamw": "MultiFrequency(AdamW)", "multifreq_deep": "MultiFrequency(DeepMomentum)"}


def table(result: dict) -> str:
    """docs/distributed.md's table from the JSON this script writes (tests/test_docs.py checks it)."""
    columns = [c for c in ("ddp-w2", "ddp-w4", "fsdp2-w2", "fsdp2-w4", "dcp_2_to_1")
               if c in next(iter(result["max_abs_deviation"].values()))]
    heads = {"ddp-w2": "DDP, 2 ranks", "ddp-w4": "DDP, 4 ranks", "fsdp2-w2": "FSDP2, 2 ranks",
             "fsdp2-w4": "FSDP2, 4 ranks", "dcp_2_to_1": "DCP 2 ranks -> 1"}
    lines = ["| optimizer | " + " | ".join(heads[c] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in result["max_abs_deviation"].items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{row[c]:.1e}" for c in columns) + " |")
    return "\n".join(lines)


def max_abs_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


def main(argv=None):
    cli.parser(__doc__).parse_args(argv)   # no options: --help
    import torch
    import torch.multiprocessing as mp

    import _dist_worker as W
    out = tempfile.mkdtemp()
    names = list(W.CONFIGS)
    for world in (2, 4):
        mp.start_processes(W.run, args=(world, ("ddp", "fsdp2", "dcp"), names, out), nprocs=world,
                           start_method="spawn")
    rows = {}
    for name in names:
        reference = W.single_process(name)
        row = {}
        for engine in ("ddp", "fsdp2"):
            for world in (2, 4):
                ranks = [torch.load(f"{out}/{engine}-w{world}-{name}-rank{r}.pt") for r in range(world)]
                row[f"{engine}-w{world}"] = max_abs_diff(ranks[0], reference)
                row[f"{engine}-w{world}_ranks_identical"] = all(
                    torch.equal(a, b) for other in ranks[1:] for a, b in zip(ranks[0], other))
        sharded = torch.load(f"{out}/dcp-w2-{name}-rank0.pt")
        row["dcp_2_to_1"] = max_abs_diff(sharded, W.resume_single_process(name, out, saved_on=2))
        rows[name] = row
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "machine": "CPU, gloo, 2 and 4 ranks", "max_abs_deviation": rows}
    path = os.path.join(ROOT, "benchmarks", "results", "distributed_deviation.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    same = all(v for row in rows.values() for k, v in row.items() if k.endswith("_ranks_identical"))
    print(f"parameters identical across ranks in every case: {same}")

if __name__ == "__main__":
    cli.run(main)
