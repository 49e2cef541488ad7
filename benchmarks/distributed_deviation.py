"""Max deviation of DDP / FSDP2 / DCP-resharded runs from a single-process run, per optimizer.

    python benchmarks/distributed_deviation.py          # 2 gloo ranks on CPU, ~1 minute

Reuses the configurations and workers of tests/test_distributed.py (tests/_dist_worker.py):
10 steps of a 3-layer MLP on a global batch of 8, split over 2 ranks; the DCP column saves a
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
          "multifreq_adamw": "MultiFrequency(AdamW)", "multifreq_deep": "MultiFrequency(DeepMomentum)"}


def table(result: dict) -> str:
    """docs/distributed.md's table from the JSON this script writes (tests/test_docs.py checks it)."""
    lines = ["| optimizer | DDP | FSDP2 | DCP 2 ranks -> 1 |", "|---|---|---|---|"]
    for name, row in result["max_abs_deviation"].items():
        lines.append(f"| {LABELS.get(name, name)} | {row['ddp']:.1e} | {row['fsdp2']:.1e} | {row['dcp_2_to_1']:.1e} |")
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
    for engine in ("ddp", "fsdp2", "dcp"):
        mp.start_processes(W.run, args=(2, engine, names, out), nprocs=2, start_method="spawn")
    rows = {}
    for name in names:
        reference = W.single_process(name)
        row = {}
        for engine in ("ddp", "fsdp2"):
            rank0, rank1 = (torch.load(f"{out}/{engine}-{name}-rank{r}.pt") for r in range(2))
            row[engine] = max_abs_diff(rank0, reference)
            row[f"{engine}_ranks_identical"] = all(torch.equal(a, b) for a, b in zip(rank0, rank1))
        sharded = torch.load(f"{out}/dcp-{name}-rank0.pt")
        row["dcp_2_to_1"] = max_abs_diff(sharded, W.resume_single_process(name, out))
        rows[name] = row
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "machine": "CPU, gloo, 2 ranks", "max_abs_deviation": rows}
    path = os.path.join(ROOT, "benchmarks", "results", "distributed_deviation.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    same = all(row["ddp_ranks_identical"] and row["fsdp2_ranks_identical"] for row in rows.values())
    print(f"parameters identical across ranks in every case: {same}")

if __name__ == "__main__":
    cli.run(main)
