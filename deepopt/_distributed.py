"""Sharded params (FSDP2 / DTensor): run a whole-matrix rule on gathered matrices.

Elementwise rules and DeltaMomentum's matrix keys run on DTensor shards as they are. Rules that
need each matrix whole (an MLP over full rows, Newton-Schulz) go through :func:`update_gathered`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """A DTensor with ``like``'s mesh and placements from a whole (replicated) tensor; the
    Replicate -> Shard redistribution is a local slice, no communication."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


def _broadcast_(t: Tensor, source: int, process_group, device: torch.device) -> None:
    """In-place broadcast; tensors kept elsewhere (a CPU step counter with NCCL) travel via ``device``."""
    import torch.distributed as dist
    buffer = t if t.device == device else t.to(device)
    dist.broadcast(buffer, src=source, group=process_group)
    if buffer is not t:
        t.copy_(buffer)


def update_gathered(params, grads, states, update: Callable, state_keys: Callable) -> None:
    """Run ``update([p], [g], [state])`` on whole matrices gathered from their shards, then keep
    each rank's shard. ``state_keys(p)`` is the set of state keys a param has after its first step.

    Each sharded param, grad and param-shaped state is all-gathered. On a 1-D mesh the matrix
    work is spread round-robin, as distributed Muon does: rank ``i % world`` computes the
    ``i``-th matrix's update and broadcasts the whole param and state (replicated state such as
    the MLP memory included). On other meshes every rank computes every update.
    """
    import torch.distributed as dist
    matrices = 0
    for p, g, state in zip(params, grads, states):
        if not is_dtensor(p) or p.ndim < 2:   # vectors take the elementwise fallback, on shards
            update([p], [g], [state])
            continue
        i, matrices = matrices, matrices + 1
        whole_p, whole_g = p.full_tensor(), g.full_tensor()
        whole_state = {k: v.full_tensor() if is_dtensor(v) else v for k, v in state.items()}
        mesh = p.device_mesh
        if mesh.ndim == 1 and mesh.size() > 1 and set(whole_state) == set(state_keys(p)):
            process_group, owner = mesh.get_group(), i % mesh.size()
            if mesh.get_local_rank() == owner:
                update([whole_p], [whole_g], [whole_state])
            source = dist.get_global_rank(process_group, owner)
            for t in [whole_p] + [whole_state[k] for k in sorted(whole_state)]:
                _broadcast_(t, source, process_group, whole_p.device)
        else:
            update([whole_p], [whole_g], [whole_state])
        p.to_local().copy_(_shard_like(whole_p, p).to_local())
        for key, value in whole_state.items():
            current = state.get(key)
            if is_dtensor(current):
                current.to_local().copy_(_shard_like(value, current).to_local())
            elif current is None and value.shape == whole_p.shape:   # created by the rule
                state[key] = _shard_like(value, p)
            else:
                state[key] = value


def orthogonalise_sharded(matrices: list[Tensor], process_group, *, steps: int, coefficients, form: str,
                          dtype: torch.dtype) -> list[Tensor]:
    """Newton-Schulz of matrices that every rank of ``process_group`` holds (DDP), the work
    spread over the ranks: each matrix has one owner (:func:`deepopt.newton_schulz.balanced_owners`,
    by flops), which orthogonalises its matrices in batches; one all-gather then gives every
    rank every result, bit for bit the owner's. Each rank receives the others' results (the
    minimum) plus the padding that evens out the ranks' shares."""
    import torch.distributed as dist
    from .newton_schulz import balanced_owners, ns_flops, orthogonalise
    options = dict(steps=steps, coefficients=coefficients, form=form, dtype=dtype)
    world = dist.get_world_size(process_group)
    if world == 1 or not matrices:
        return orthogonalise(matrices, **options)
    rank = dist.get_rank(process_group)
    owners = balanced_owners([ns_flops(m.shape, steps, form) for m in matrices], world)
    owned = [[i for i, o in enumerate(owners) if o == r] for r in range(world)]
    width = max(sum(matrices[i].numel() for i in idx) for idx in owned)
    device = matrices[0].device
    mine = orthogonalise([matrices[i] for i in owned[rank]], **options)
    send = torch.zeros(width, dtype=dtype, device=device)
    if mine:
        flat = torch.cat([x.reshape(-1) for x in mine])
        send[:flat.numel()].copy_(flat)
    received = [torch.empty(width, dtype=dtype, device=device) for _ in range(world)]
    dist.all_gather(received, send, group=process_group)
    out: list[Tensor | None] = [None] * len(matrices)
    for r, idx in enumerate(owned):
        offset = 0
        for i in idx:
            size = matrices[i].numel()
            out[i] = received[r][offset:offset + size].view(matrices[i].shape)
            offset += size
    return out
