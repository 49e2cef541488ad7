"""Worker processes for tests/test_distributed.py: the same small model trained by every deepopt
optimizer (and MultiFrequency) under DDP, DDP with Newton-Schulz spread over the ranks, FSDP2 and
DCP save / load across world sizes, on CPU with gloo.

Each engine runs all configurations in one process group of 2 or 4 ranks and writes, per rank
and config, the whole (gathered) parameters to ``out_dir``, and for the Newton-Schulz configs the
matrices each rank orthogonalised and the bytes it received per step; the tests compare them
across ranks, with a single-process run on the same global batch and with the minimum.
"""

from __future__ import annotations

import gc
import os
import traceback

import torch
import torch.distributed as dist

import deepopt
from benchmarks.ns_step import Traffic
from deepopt import newton_schulz as NS

STEPS, GLOBAL_BATCH = 10, 8


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 6, bias=False))


CONFIGS = {
    "associative": lambda m: deepopt.AssociativeMomentum(m.parameters(), lr=0.05, weight_decay=0.01),
    "associative_adam": lambda m: deepopt.AssociativeMomentum(m.parameters(), lr=0.01, preconditioner="adam",
                                                              decoupled_weight_decay=True, weight_decay=0.1),
    "delta": lambda m: deepopt.DeltaMomentum(m.parameters(), lr=0.05, nesterov=True),
    "delta_elementwise": lambda m: deepopt.DeltaMomentum(m.parameters(), lr=0.05, keys="elementwise"),
    "deep": lambda m: deepopt.DeepMomentum(m.parameters(), lr=0.05, memory_lr=0.05),
    "deep_ns_l2": lambda m, **kw: deepopt.DeepMomentum(m.parameters(), lr=0.02, objective="l2",
                                                       output="newton_schulz", ns_dtype="float32", **kw),
    "m3": lambda m, **kw: deepopt.create_optimizer(m, "m3", lr=0.01, adamw_lr=1e-3, chunk=2, precondition=False,
                                                   ns_form="direct", **kw),
    # M3 at its defaults (lr 0.01, the scale-free preconditioner), a chunk boundary every 2 steps
    "m3_preconditioned": lambda m, **kw: deepopt.create_optimizer(m, "m3", adamw_lr=1e-3, chunk=2, ns_form="direct",
                                                                  **kw),
    # the recipe's Gram form (on the 16 x 8 matrix), in fp32
    "m3_gram": lambda m, **kw: deepopt.create_optimizer(m, "m3", adamw_lr=1e-3, chunk=2, ns_dtype="float32", **kw),
    "multifreq_adamw": lambda m: deepopt.MultiFrequency(torch.optim.AdamW(
        [{"params": m[0].parameters(), "update_every": 2},
         {"params": list(m[2].parameters()) + list(m[4].parameters())}], lr=0.01)),
    "multifreq_deep": lambda m: deepopt.MultiFrequency(deepopt.DeepMomentum(
        [{"params": m[0].parameters(), "update_every": 3},
         {"params": list(m[2].parameters()) + list(m[4].parameters())}], lr=0.05)),
}
#: Newton-Schulz runs in the "auto" dtype in m3 (bf16 where the CPU multiplies it natively, else fp32;
#: direct form; deep_ns_l2 and m3_gram run it in fp32: with the MLP
#: memory at the default proximal rate, or with the Gram form, a bf16 rounding flipped by the
#: all-reduce order grew to 8e-4 / 7e-5 in 10 steps): a last-bit difference in its input moves the result
NS_CONFIGS = {"deep_ns_l2", "m3", "m3_preconditioned", "m3_gram"}
#: the engines of one process group, in order (dcp_resume needs the other world size's checkpoints)
ENGINES = ("ddp", "ddp_ns", "fsdp2", "dcp")


def batches(steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randn(GLOBAL_BATCH, 6, generator=gen))
            for _ in range(steps)]


def train(model, opt, data, rank=0, world=1, traffic=None):
    per_rank = GLOBAL_BATCH // world
    for x, y in data:
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        if traffic is not None:
            traffic.new_step()
        opt.step()


def whole(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def single_process(name, steps=STEPS):
    model = make_model()
    opt = CONFIGS[name](model)
    train(model, opt, batches(steps))
    return [p.detach().clone() for p in model.parameters()]


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run(rank, world, engines, names, out_dir, resume_from=None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store-{world}-{engines[0]}-{resume_from}",
                            rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        for engine in engines:
            for name in names:
                if engine == "ddp_ns" and name not in NS_CONFIGS:
                    continue
                source = f"-from{resume_from}" if engine == "dcp_resume" else ""
                tag = f"{engine}{source}-w{world}-{name}-rank{rank}"
                try:
                    result = _run_engine(engine, name, mesh, rank, world, out_dir, tag, resume_from)
                except Exception:   # reported by the test, per config
                    result = traceback.format_exc()
                torch.save(result, os.path.join(out_dir, f"{tag}.pt"))
                dist.barrier()
    finally:
        # the clean shutdown of examples/ddp_train.py (docs/distributed.md, "Shutdown"): FSDP2's
        # reference cycles collected while the interpreter is whole, then every rank done, then the group
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _run_engine(engine, name, mesh, rank, world, out_dir, tag, resume_from):
    model = make_model()
    if engine in ("ddp", "ddp_ns"):
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        opt = CONFIGS[name](model, process_group=dist.group.WORLD) if engine == "ddp_ns" else CONFIGS[name](model)
        with Traffic() as traffic:
            train(wrapped, opt, batches(), rank, world, traffic)
        torch.save(traffic.steps, os.path.join(out_dir, f"{tag}-traffic.pt"))
    elif engine == "fsdp2":
        opt = CONFIGS[name](shard(model, mesh))
        with Traffic() as traffic:
            train(model, opt, batches(), rank, world, traffic)
        torch.save(traffic.steps, os.path.join(out_dir, f"{tag}-traffic.pt"))
    elif engine == "dcp":
        _dcp_save_then_continue(name, model, mesh, rank, world, out_dir)
    elif engine == "dcp_resume":
        opt = CONFIGS[name](shard(model, mesh))
        _dcp_load(model, opt, os.path.join(out_dir, f"ckpt-w{resume_from}-{name}"))
        train(model, opt, batches(2 * STEPS)[STEPS:], rank, world)
    return [whole(p) for p in model.parameters()]


def _dcp_save_then_continue(name, model, mesh, rank, world, out_dir):
    """FSDP2 on ``world`` ranks: STEPS steps, a DCP checkpoint, then STEPS more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opt = CONFIGS[name](shard(model, mesh))
    data = batches(2 * STEPS)
    train(model, opt, data[:STEPS], rank, world)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(out_dir, f"ckpt-w{world}-{name}"))
    train(model, opt, data[STEPS:], rank, world)


def _dcp_load(model, opt, checkpoint):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def save_single_process(name, out_dir):
    """World size 1, no process group: STEPS steps, a DCP checkpoint, STEPS more (written as
    ``dcp-w1-<name>-rank0.pt``, for the resume on 2 ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model = make_model()
    opt = CONFIGS[name](model)
    data = batches(2 * STEPS)
    train(model, opt, data[:STEPS])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(out_dir, f"ckpt-w1-{name}"))
    train(model, opt, data[STEPS:])
    torch.save([whole(p) for p in model.parameters()], os.path.join(out_dir, f"dcp-w1-{name}-rank0.pt"))


def resume_single_process(name, out_dir, saved_on=2):
    """World size 1, no process group: load a DCP checkpoint saved on ``saved_on`` ranks and
    take the last STEPS."""
    model = make_model()
    opt = CONFIGS[name](model)
    checkpoint = os.path.join(out_dir, f"ckpt-w{saved_on}-{name}")
    if name.startswith("multifreq"):
        # dcp.load fills a template in place, and a fresh wrapper has no inner state yet for groups
        # that have not stepped: convert the whole checkpoint instead
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        dcp_to_torch_save(checkpoint, checkpoint + ".pt")
        state = torch.load(checkpoint + ".pt", weights_only=False)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    else:
        _dcp_load(model, opt, checkpoint)
    train(model, opt, batches(2 * STEPS)[STEPS:])
    return [p.detach().clone() for p in model.parameters()]


def single_process_traffic(name, steps=STEPS):
    """The matrices one process orthogonalises per step (what the ranks share between them)."""
    model = make_model()
    opt = CONFIGS[name](model)
    record = []
    original = NS.orthogonalise

    def counting(us, **kw):
        record[-1] += [tuple(u.shape) for u in us]
        return original(us, **kw)

    NS.orthogonalise = counting
    try:
        for x, y in batches(steps):
            record.append([])
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        NS.orthogonalise = original
    return record
