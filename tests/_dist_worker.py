"""Worker processes for tests/test_distributed.py: the same small model trained by every deepopt
optimizer (and MultiFrequency) under DDP, FSDP2 and a DCP save/load, on CPU with gloo.

Each engine runs all configurations in one 2-process group and writes, per rank and config, the
whole (gathered) parameters to ``out_dir``; the tests compare them across ranks and with a
single-process run on the same global batch.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

import deepopt

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
    "deep_ns_l2": lambda m: deepopt.DeepMomentum(m.parameters(), lr=0.02, objective="l2", output="newton_schulz",
                                                 ns_dtype="float32"),
    "m3": lambda m: deepopt.create_optimizer(m, "m3", lr=0.01, adamw_lr=1e-3, chunk=2, precondition=False),
    # M3 at its defaults (lr 0.01, the scale-free preconditioner), a chunk boundary every 2 steps
    "m3_preconditioned": lambda m: deepopt.create_optimizer(m, "m3", adamw_lr=1e-3, chunk=2),
    "multifreq_adamw": lambda m: deepopt.MultiFrequency(torch.optim.AdamW(
        [{"params": m[0].parameters(), "update_every": 2},
         {"params": list(m[2].parameters()) + list(m[4].parameters())}], lr=0.01)),
    "multifreq_deep": lambda m: deepopt.MultiFrequency(deepopt.DeepMomentum(
        [{"params": m[0].parameters(), "update_every": 3},
         {"params": list(m[2].parameters()) + list(m[4].parameters())}], lr=0.05)),
}
#: Newton-Schulz runs in bf16 (m3; deep_ns_l2 runs it in fp32: with its MLP memory at the default
#: proximal rate a bf16 rounding flipped by the all-reduce order grew to 8e-4 in 10 steps): a last-bit
#: difference in its input moves the result
NS_CONFIGS = {"deep_ns_l2", "m3", "m3_preconditioned"}


def batches(steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=gen), torch.randn(GLOBAL_BATCH, 6, generator=gen))
            for _ in range(steps)]


def train(model, opt, data, rank=0, world=1):
    per_rank = GLOBAL_BATCH // world
    for x, y in data:
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()


def whole(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def single_process(name, steps=STEPS):
    model = make_model()
    opt = CONFIGS[name](model)
    train(model, opt, batches(steps))
    return [p.detach().clone() for p in model.parameters()]


def _count_rule_calls(opt):
    """Count the rule's runs on whole gathered matrices (to see the round-robin split)."""
    target = getattr(opt, "inner", opt)
    calls = {"whole": 0}
    if not hasattr(target, "_update"):   # a torch optimizer inside MultiFrequency
        return calls
    rule = target._update

    def counting(group, params, grads, states, *args, **kw):
        calls["whole"] += sum(1 for p in params if not hasattr(p, "full_tensor") and p.ndim >= 2)
        return rule(group, params, grads, states, *args, **kw)

    target._update = counting
    return calls


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run(rank, world, engine, names, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/{engine}.store", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        for name in names:
            try:
                model = make_model()
                if engine == "ddp":
                    wrapped = torch.nn.parallel.DistributedDataParallel(model)
                    opt = CONFIGS[name](model)
                    train(wrapped, opt, batches(), rank, world)
                elif engine == "fsdp2":
                    opt = CONFIGS[name](shard(model, mesh))
                    calls = _count_rule_calls(opt)
                    train(model, opt, batches(), rank, world)
                    torch.save(calls, os.path.join(out_dir, f"{engine}-{name}-rank{rank}-calls.pt"))
                elif engine == "dcp":
                    _dcp_save_then_continue(name, model, mesh, rank, world, out_dir)
                result = [whole(p) for p in model.parameters()]
            except Exception:   # reported by the test, per config
                result = traceback.format_exc()
            torch.save(result, os.path.join(out_dir, f"{engine}-{name}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _dcp_save_then_continue(name, model, mesh, rank, world, out_dir):
    """FSDP2 on ``world`` ranks: STEPS steps, a DCP checkpoint, then STEPS more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opt = CONFIGS[name](shard(model, mesh))
    data = batches(2 * STEPS)
    train(model, opt, data[:STEPS], rank, world)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=os.path.join(out_dir, f"ckpt-{name}"))
    train(model, opt, data[STEPS:], rank, world)


def resume_single_process(name, out_dir):
    """World size 1, no process group: load the 2-rank DCP checkpoint and take the last STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model = make_model()
    opt = CONFIGS[name](model)
    checkpoint = os.path.join(out_dir, f"ckpt-{name}")
    if name.startswith("multifreq"):
        # dcp.load fills a template in place, and a fresh wrapper has no inner state yet for groups
        # that have not stepped: convert the whole checkpoint instead
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(checkpoint, checkpoint + ".pt")
        state = torch.load(checkpoint + ".pt", weights_only=False)
    else:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, batches(2 * STEPS)[STEPS:])
    return [p.detach().clone() for p in model.parameters()]
