"""Data-parallel and sharded params: the whole-matrix rules (DeepMomentum, M3) across ranks.

* DDP (every rank holds every param): :func:`orthogonalise_sharded` spreads Newton-Schulz
  over the ranks, an owner per matrix, and broadcasts the results.
* FSDP2 (DTensor row shards on a 1-D mesh): :class:`RowShards` runs the rule on each rank's
  rows, all-reduces the few row sums it needs and gathers each matrix on its owner only for
  Newton-Schulz (two all-to-alls).
* Other DTensor layouts: :func:`update_gathered` gathers whole matrices on every rank.

Elementwise rules and DeltaMomentum's matrix keys run on DTensor shards as they are.
"""

from __future__ import annotations

import math
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
    by flops), which orthogonalises its matrices in batches and broadcasts them, packed, to
    the others: every rank gets every result, bit for bit the owner's, and receives exactly the
    results it did not compute (the minimum)."""
    import torch.distributed as dist
    from .newton_schulz import balanced_owners, ns_flops, orthogonalise
    options = dict(steps=steps, coefficients=coefficients, form=form, dtype=dtype)
    world = dist.get_world_size(process_group)
    if world == 1 or not matrices:
        return orthogonalise(matrices, **options)
    rank = dist.get_rank(process_group)
    owners = balanced_owners([ns_flops(m.shape, steps, form) for m in matrices], world)
    device = matrices[0].device
    out: list[Tensor | None] = [None] * len(matrices)
    # every rank computes its own first (the ranks work at once), then each owner broadcasts,
    # packed wide side up (a tall result is the transpose of a wide one, as unsharded): the same
    # values in the same layout on every rank, for the reductions that follow
    mine = [i for i, o in enumerate(owners) if o == rank]
    results = orthogonalise([matrices[i] for i in mine], **options)
    for owner in range(world):
        idx = [i for i, o in enumerate(owners) if o == owner]
        if not idx:
            continue
        if owner == rank:
            packed = torch.cat([_wide(x).reshape(-1) for x in results])
        else:
            packed = torch.empty(sum(matrices[i].numel() for i in idx), dtype=dtype, device=device)
        dist.broadcast(packed, src=dist.get_global_rank(process_group, owner), group=process_group)
        for i, part in zip(idx, packed.split([matrices[i].numel() for i in idx])):
            out[i] = _wide(part.view(_wide(matrices[i]).shape), like=matrices[i])
    return out


def _wide(x: Tensor, like: Tensor | None = None) -> Tensor:
    """``x`` transposed if ``like`` (default ``x``) is tall."""
    like = x if like is None else like
    return x.mT if like.size(0) > like.size(1) else x


class RowShards:
    """Row (dim-0) shards of a group's matrices on a 1-D device mesh, as FSDP2 lays them out.

    The rules run on each rank's rows: elementwise work stays local, the few sums over rows
    (the MLP memory's gradients, RMS values) are all-reduced (:meth:`sums`), and Newton-Schulz
    gathers each matrix on one owner rank and scatters the result back (:meth:`orthogonalise`).
    ``shapes``: the params' global shapes, as matrices ``(rows, rest)``.
    """

    def __init__(self, mesh, shapes) -> None:
        self.group, self.world, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.shapes = [(s[0], math.prod(s[1:])) for s in shapes]

    def sums(self, t: Tensor) -> Tensor:
        import torch.distributed as dist
        dist.all_reduce(t, group=self.group)
        return t

    def rows(self, total: int) -> list[int]:
        """Each rank's rows of a ``total``-row matrix (``torch.chunk``'s split, as FSDP2's)."""
        size = -(-total // self.world) if total else 0
        return [max(0, min(size, total - r * size)) for r in range(self.world)]

    def orthogonalise(self, local: list[Tensor], shapes, *, steps: int, coefficients, form: str,
                      dtype: torch.dtype) -> list[Tensor]:
        """Newton-Schulz of matrices held as row shards (``local[i]``: this rank's rows of a
        ``shapes[i]`` matrix). Each matrix has one owner (balanced by flops); one all-to-all
        brings it its matrices' rows, cast to ``dtype`` (the iteration's first op), it runs them
        in batches, and one all-to-all returns each rank its rows of the results."""
        import torch.distributed as dist
        from .newton_schulz import balanced_owners, ns_flops, orthogonalise
        world, rank = self.world, self.rank
        owners = balanced_owners([ns_flops(s, steps, form) for s in shapes], world)
        rows = [self.rows(s[0]) for s in shapes]
        mine = [i for i, o in enumerate(owners) if o == rank]
        device = local[0].device if local else torch.device("cpu")
        # to each owner: this rank's rows of its matrices
        send = [[local[i].reshape(-1) for i in range(len(local)) if owners[i] == o] for o in range(world)]
        send_sizes = [sum(t.numel() for t in parts) for parts in send]
        recv_sizes = [sum(rows[i][s] * shapes[i][1] for i in mine) for s in range(world)]
        flat = torch.cat([t for parts in send for t in parts]).to(dtype) if local else torch.empty(0, dtype=dtype)
        received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(received, flat, recv_sizes, send_sizes, group=self.group)
        whole = [torch.empty(shapes[i], dtype=dtype, device=device) for i in mine]
        for part, s in zip(received.split(recv_sizes), range(world)):
            offset = 0
            for matrix, i in zip(whole, mine):
                first, n = sum(rows[i][:s]), rows[i][s]
                matrix[first:first + n].copy_(part[offset:offset + n * shapes[i][1]].view(n, shapes[i][1]))
                offset += n * shapes[i][1]
        results = orthogonalise(whole, steps=steps, coefficients=coefficients, form=form, dtype=dtype)
        # back to each rank: its rows of this owner's results
        back = [results[k][sum(rows[i][:s]):sum(rows[i][:s + 1])].reshape(-1) for s in range(world)
                for k, i in enumerate(mine)]
        flat = torch.cat(back) if back else torch.empty(0, dtype=dtype, device=device)
        returned = torch.empty(sum(send_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(returned, flat, send_sizes, recv_sizes, group=self.group)
        out: list[Tensor | None] = [None] * len(local)
        for part, o in zip(returned.split(send_sizes), range(world)):
            offset = 0
            for i in (i for i in range(len(local)) if owners[i] == o):
                n = local[i].numel()
                out[i] = part[offset:offset + n].view(local[i].shape)
                offset += n
        return out


def row_shards(params) -> RowShards | None:
    """A :class:`RowShards` if every param is a DTensor sharded on dim 0 of one 1-D mesh with
    ``torch.chunk``'s row split (FSDP2's ``fully_shard``), else None."""
    from torch.distributed.tensor import Shard
    if not params or not all(is_dtensor(p) for p in params):
        return None
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or mesh.size() < 2 or any(p.device_mesh != mesh or tuple(p.placements) != (Shard(0),)
                                                   or p.ndim == 0 for p in params):
        return None
    shards = RowShards(mesh, [p.shape for p in params])
    if any(p.to_local().shape[0] != shards.rows(p.shape[0])[shards.rank] for p in params):
        return None
    return shards


def local_views(params, grads, states):
    """Each rank's part of params, grads and states (a DTensor's local tensor: a view)."""
    local = [p.to_local() if is_dtensor(p) else p for p in params]
    local_grads = [g.to_local() if is_dtensor(g) else g for g in grads]
    local_states = [{k: v.to_local() if is_dtensor(v) else v for k, v in s.items()} for s in states]
    return local, local_grads, local_states
