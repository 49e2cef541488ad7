"""Threads left after ``destroy_process_group()`` on gloo, with and without a functional collective
(a DTensor redistribute, as FSDP2's ``fully_shard`` runs at initialisation): 2 ranks, CPU.

    python benchmarks/gloo_threads.py       # prints the thread names of rank 0 per case

Counts the OS threads of the process (``/proc/self/task``, Linux) before ``init_process_group``
and after ``destroy_process_group()`` plus a garbage collection (docs/distributed.md, "Shutdown").
"""
import gc
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples import cli  # noqa: E402


def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def _worker(rank, world, case, store):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    before = threads()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    t = torch.ones(4)
    dist.all_reduce(t)
    if case == "dtensor redistribute":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (world,))
        distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]).full_tensor()
        del mesh
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    if rank == 0:
        print(f"{case}: {len(before)} threads before init {before}, {len(threads())} after destroy {threads()}",
              flush=True)


def main(argv=None):
    cli.parser(__doc__).parse_args(argv)
    import torch.multiprocessing as mp
    for case in ("all_reduce only", "dtensor redistribute"):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(2, case, os.path.join(tmp, "store")), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    cli.run(main)
