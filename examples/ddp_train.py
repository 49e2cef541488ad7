"""Distributed training with deepopt: DDP or FSDP2, with a torch.distributed.checkpoint checkpoint.

    torchrun --nproc_per_node=2 examples/ddp_train.py                          # DDP, DeepMomentum, CPU/gloo
    torchrun --nproc_per_node=2 examples/ddp_train.py --engine fsdp2 --optimizer m3
    torchrun --nproc_per_node=2 examples/ddp_train.py --ckpt /tmp/ddp_ckpt --stop-after 300   # then rerun: resumes

A small MLP classifies two spirals; each rank takes its slice of every global batch. deepopt
needs nothing distributed-specific: under DDP every rank sees the all-reduced gradients; under
FSDP2 every rule runs on each rank's rows: DeepMomentum's MLP memory all-reduces its small
gradients, and Newton-Schulz (DeepMomentum's, M3's) gathers each matrix on one owner rank,
balanced by flops, and sends each rank its rows of the result. Under DDP, pass
``process_group=dist.group.WORLD`` to a Newton-Schulz rule to split its work the same way.
"""

import gc
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]   # quickstart, and the repo root for examples.cli
# torch is imported in main(): --help answers before it loads
from quickstart import add_arguments, build_optimizer, default_lr, two_spirals  # noqa: E402
from examples import cli  # noqa: E402


def main():
    parser = cli.parser(__doc__)
    parser.add_argument("--engine", default="ddp", choices=["ddp", "fsdp2"], help="how the model is distributed")
    add_arguments(parser)
    parser.add_argument("--global-batch", type=cli.positive_int, default=256,
                        help="examples per step over all ranks (a multiple of the world size)")
    parser.add_argument("--ckpt", default=None,
                        help="DCP checkpoint folder: saved at the end, resumed if present (default: none)")
    args = parser.parse_args()
    lr = args.lr if args.lr is not None else default_lr(args.optimizer)
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if args.global_batch % dist.get_world_size():
        parser.error(f"--global-batch {args.global_batch} is not divisible by the world size {dist.get_world_size()}")
    train(args, lr, backend)
    # a clean shutdown: FSDP2's modules and their pending collectives sit in reference cycles.
    # Left to the interpreter's last collection at exit, freeing them aborted a rank ("terminate
    # called without an active exception", 3 runs in 50). Free them now, while every rank is alive,
    # then wait for all ranks and destroy the group (docs/distributed.md, "Shutdown").
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args, lr, backend):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")

    torch.manual_seed(args.seed)   # same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128),
                                torch.nn.Tanh(), torch.nn.Linear(128, 2)).to(device)
    if args.engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    # under DDP every rank holds every matrix: m3 splits its Newton-Schulz work over the ranks
    opt = build_optimizer(args.optimizer, model, lr, process_group=dist.group.WORLD if args.engine == "ddp" else None)

    start = 0
    if args.ckpt and os.path.exists(os.path.join(args.ckpt, ".metadata")):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}")

    x_train, y_train = two_spirals(8192, seed=1)
    x_val, y_val = two_spirals(1024, seed=2)
    per_rank = args.global_batch // world
    gen = torch.Generator().manual_seed(123 + args.seed)   # the same global batches on every rank
    for _ in range(start):
        torch.randint(0, len(x_train), (args.global_batch,), generator=gen)
    end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(start, end):
        idx = torch.randint(0, len(x_train), (args.global_batch,), generator=gen)[rank * per_rank:(rank + 1) * per_rank]
        loss = F.cross_entropy(wrapped(x_train[idx].to(device)), y_train[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == end - 1:
            with torch.no_grad():   # every rank runs the forward: FSDP2 gathers weights collectively
                accuracy = (wrapped(x_val.to(device)).argmax(1).cpu() == y_val).float().mean().item()
            if rank == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}  val acc {accuracy:.3f}  ({args.engine}, {world} ranks)")

    if args.ckpt:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(end)}, checkpoint_id=args.ckpt)


if __name__ == "__main__":
    cli.run(main)
