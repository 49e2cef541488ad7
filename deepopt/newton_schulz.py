r"""Newton-Schulz orthogonalisation, the read-out of DeepMomentum (``output="newton_schulz"``) and M3.

Each matrix ``U`` is mapped close to its polar factor ``U (U^T U)^{-1/2}`` by an odd polynomial
iteration on ``X_0 = U / ||U||_F`` (transposed when rows > cols, so that ``X`` is wide):

.. math:: X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k, \qquad A_k = X_k X_k^\top

Coefficients (``coefficients=``):

* ``"muon"``: ``(3.4445, -4.7750, 2.0315)`` at every step (Jordan et al. 2024, torch.optim.Muon);
  in bf16 the op sequence is torch Muon's, so that Muon is an exact special case.
* ``"polar_express"``: the per-step minimax quintics of Amsel, Persson, Musco and Gower, "The
  Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm"
  (arXiv 2505.16932, Alg. 1, degree 5): steps beyond its table repeat the last polynomial; all
  but the last are divided by a safety factor 1.01 (``a/1.01, b/1.01^3, c/1.01^5``), and
  ``X_0 = U / (1.01 ||U||_F)``. Closer to orthogonal than Muon's quintic in the same 5 steps.

Forms (``form=``):

* ``"direct"``: the iteration above, ``2 n^2 m + n^3`` multiply-adds per step for an ``n x m``
  (``n <= m``) matrix;
* ``"gram"``: iterate on the ``n x n`` Gram matrix instead. The ``X_k`` are ``Q_k X_0`` with
  ``Q_k`` a polynomial in ``A_0``, so with ``H_k = a_k I + b_k A_k + c_k A_k^2``:
  ``Q_{k+1} = H_k Q_k``, ``A_{k+1} = H_k A_k H_k``, and ``X_K = Q_K X_0`` at the end: ``n^3``
  work per step and a few ``n^2 m`` products (4 at 5 steps). ``Q`` and ``A`` drift apart in low
  precision (in bf16 an uncorrected run lost the result entirely), so the iteration restarts
  from ``X = Q X_0`` before step 2 and then every 3 steps. Used only for shapes where it costs
  fewer flops than the direct form (``m > 1.5 n`` at 5 steps: ``4 n^2 m + 14 n^3`` against
  ``10 n^2 m + 5 n^3``). Equal to the direct form to rounding: ~2e-6 relative in fp32; in bf16
  its distance to the exact result was 1.2x the direct form's on average (2.7x at most) over 30
  gradient-like matrices (``python -m benchmarks.ns_step --part accuracy``);
  ``tests/test_newton_schulz.py`` bounds it at 3x. Other shapes run direct.

:func:`orthogonalise` runs a list of matrices, on CUDA the same-shape ones (a matrix and its
transpose included) as one batched chain of ``bmm`` / ``baddbmm``.
:func:`balanced_owners` splits the work between ranks (``deepopt._distributed``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._validation import check_choice

__all__ = ["newton_schulz", "orthogonalise", "orthogonalise_updates", "ns_flops", "balanced_owners", "coefficient_schedule",
           "NS_COEFFICIENTS", "NS_COEFFICIENT_SETS", "NS_DTYPES", "NS_FORMS", "resolve_ns_dtype",
           "cpu_has_native_bf16"]

#: Muon's quintic (a, b, c)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: Polar Express, degree 5 (arXiv 2505.16932, Alg. 1), before the safety factor
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS_SAFETY = 1.01
NS_COEFFICIENT_SETS = ("muon", "polar_express")
NS_FORMS = ("direct", "gram")
#: ``ns_dtype`` values of the Newton-Schulz rules (DeepMomentum, M3)
NS_DTYPES = ("auto", "bfloat16", "float32")
#: the Gram form restarts from X after this step, then every _GRAM_RESTART_EVERY steps
_GRAM_FIRST_RESTART, _GRAM_RESTART_EVERY = 2, 3


def coefficient_schedule(coefficients, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """``(per-step (a, b, c), normaliser)``: ``X_0 = U / (normaliser * ||U||_F)``.
    ``coefficients``: ``"muon"``, ``"polar_express"`` or one ``(a, b, c)`` for every step."""
    if coefficients == "polar_express":
        s = _POLAR_EXPRESS_SAFETY
        table = [(a / s, b / s**3, c / s**5) for a, b, c in _POLAR_EXPRESS[:-1]] + [_POLAR_EXPRESS[-1]]
        return [table[min(k, len(table) - 1)] for k in range(steps)], s
    abc = NS_COEFFICIENTS if coefficients == "muon" else tuple(coefficients)
    return [abc] * steps, 1.0


def _gram_restarts(steps: int) -> set[int]:
    return set(range(_GRAM_FIRST_RESTART, steps, _GRAM_RESTART_EVERY))


def _direct_macs(n: int, m: int, steps: int) -> int:
    return steps * (2 * n * n * m + n ** 3)


def _gram_macs(n: int, m: int, steps: int) -> int:
    restarts = _gram_restarts(steps)
    macs = n * n * m                                   # A_0
    for k in range(steps):
        if k in restarts:
            macs += 2 * n * n * m                      # X = Q X_0, A = X X^T
        macs += n ** 3                                 # A^2
        if k and k not in restarts:
            macs += n ** 3                             # Q <- H Q
        if k < steps - 1 and k + 1 not in restarts:
            macs += 2 * n ** 3                         # A <- H A H
    return macs + n * n * m                            # X_K = Q X_0


def _uses_gram(n: int, m: int, steps: int, form: str) -> bool:
    return form == "gram" and _gram_macs(n, m, steps) < _direct_macs(n, m, steps)


def ns_flops(shape, steps: int = 5, form: str = "direct") -> int:
    """Floating-point operations (2 per multiply-add) of one Newton-Schulz run on a ``shape`` matrix."""
    n, m = sorted(shape[-2:])
    macs = _gram_macs(n, m, steps) if _uses_gram(n, m, steps, form) else _direct_macs(n, m, steps)
    return 2 * macs


def _addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float = 1.0) -> Tensor:
    fn = torch.addmm if bias.ndim == 2 else torch.baddbmm
    return fn(bias, a, b, beta=beta, alpha=alpha)


def _iterate(x: Tensor, schedule, gram: bool) -> Tensor:
    """The iteration on a normalised wide ``x`` (``(n, m)`` or ``(B, n, m)``, ``n <= m``)."""
    if not gram:
        for a, b, c in schedule:
            A = x @ x.mT
            B = _addmm(A, A, A, beta=b, alpha=c)
            x = _addmm(x, B, x, beta=a)
        return x
    restarts, last = _gram_restarts(len(schedule)), len(schedule) - 1
    A, Q = x @ x.mT, None
    for k, (a, b, c) in enumerate(schedule):
        if k in restarts:
            x, Q = Q @ x, None
            A = x @ x.mT
        H = _addmm(A, A, A, beta=b, alpha=c)
        H.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = H if Q is None else H @ Q
        if k < last and k + 1 not in restarts:
            A = H @ A @ H
    return Q @ x


def newton_schulz(u: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16, form: str = "direct") -> Tensor:
    """Orthogonalise ``u`` (a matrix, or a batch ``(..., r, c)`` of them) in ``dtype``; returns
    ``dtype``. See the module docstring for ``coefficients`` and ``form``. Never changes ``u``."""
    if u.ndim == 2:
        return orthogonalise([u], steps=steps, coefficients=coefficients, eps=eps, dtype=dtype, form=form)[0]
    lead = u.shape[:-2]
    flat = u.reshape(-1, *u.shape[-2:])
    out = orthogonalise(list(flat), steps=steps, coefficients=coefficients, eps=eps, dtype=dtype, form=form)
    return torch.stack(out).reshape(*lead, *u.shape[-2:]) if out else u.to(dtype, copy=True)


def orthogonalise(us: Sequence[Tensor], *, steps: int = 5, coefficients="muon", eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16, form: str = "direct", batched: bool | None = None) -> list[Tensor]:
    """Newton-Schulz of each 2-D tensor in ``us``, in ``dtype`` (results may be views into a batch).

    ``batched``: run same-shape matrices on one device as one batch, ``(r, c)`` and ``(c, r)``
    together (one ``bmm`` / ``baddbmm`` chain instead of a launch per matrix). ``None``: on
    CUDA. On CPU batches took 0.91x / 0.94x the per-matrix time on nanoGPT's / GPT-2's matrices
    (``benchmarks/ns_step.py``), but CPU's small-matrix batched kernel rounds differently from
    ``mm``: there each matrix runs torch Muon's 2-D op sequence, bit for bit. Batches keep each
    matrix's layout through the first step (a tall matrix is Muon's transposed view: the layout
    decides the products' rounding), then the layouts join one contiguous batch."""
    schedule, normaliser = coefficient_schedule(coefficients, steps)
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(us):
        if batched is False or (batched is None and u.device.type != "cuda"):
            groups[(u.device, tuple(sorted(u.shape)), i)] = [i]
        else:
            groups.setdefault((u.device, tuple(sorted(u.shape))), []).append(i)
    out: list[Tensor | None] = [None] * len(us)
    for (device, (n, m), *_), idx in groups.items():
        gram = _uses_gram(n, m, steps, form)
        lone = len(idx) == 1   # (2-D ops: torch Muon's sequence exactly)
        parts, order = [], []
        for tall in (False, True):
            sub = [i for i in idx if (us[i].size(0) > us[i].size(1)) == tall]
            if not sub:
                continue
            # a copy, cast (the rule may pass its memory itself), in each matrix's own layout
            cast = torch.empty(len(sub), *us[sub[0]].shape, dtype=dtype, device=device)
            for slot, i in enumerate(sub):
                cast[slot].copy_(us[i])
            x = cast.mT if tall else cast
            norms = torch.stack([x[slot].norm() for slot in range(len(sub))])
            x.div_(_norm_divisor(norms, normaliser, eps)[:, None, None])
            if len(sub) == 1:   # (2-D ops: a batch of one may take another product kernel)
                x = x[0]
            if not gram:
                x = _iterate(x, schedule[:1], gram=False)
            parts.append(x if lone or x.ndim == 3 else x[None])
            order += [(i, tall) for i in sub]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = _iterate(x, schedule if gram else schedule[1:], gram)
        for slot, (i, tall) in enumerate(order):
            result = x if lone else x[slot]
            out[i] = result.mT if tall else result
    return out


def _norm_divisor(norm: Tensor, normaliser: float, eps: float) -> Tensor:
    # Muon: ||X|| clamped at eps; Polar Express: 1.01 ||X|| + eps
    return norm.clamp(min=eps) if normaliser == 1.0 else norm * normaliser + eps


def balanced_owners(costs: Sequence[float], world: int) -> list[int]:
    """An owner rank for each item, balancing the summed cost (largest first, each to the least
    loaded rank, ties to the lower rank): within the largest item's cost of perfect balance."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16)."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_ns_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype Newton-Schulz runs in. ``"auto"``: bf16 where matmuls run natively in it (CUDA,
    and CPUs with AMX or AVX512-BF16), fp32 on other CPUs, where bf16 matmuls are emulated:
    there a DeepMomentum step on a 3072 x 768 matrix took 40x as long with bf16 Newton-Schulz as
    with fp32, while on an AMX CPU it took 0.3x (``benchmarks/ns_dtype_cpu.py``)."""
    if ns_dtype == "auto":
        native = device.type != "cpu" or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, ns_dtype)


#: the Newton-Schulz options of a rule's keyword arguments (DeepMomentum, M3)
RULE_OPTIONS = ("ns_steps", "ns_dtype", "ns_coefficients", "ns_form", "ns_group")


def check_options(group: dict) -> None:
    """Validate a group's ``ns_steps``, ``ns_dtype``, ``ns_coefficients`` and ``ns_form``."""
    steps = group["ns_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps < 100:
        raise ValueError(f"invalid ns_steps={steps!r}: must be an int in [1, 99]")
    check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
    check_choice("ns_coefficients", group["ns_coefficients"], NS_COEFFICIENT_SETS)
    check_choice("ns_form", group["ns_form"], NS_FORMS)


def split_rule_options(rule: dict) -> dict:
    """Remove and return the Newton-Schulz options from a rule's keyword arguments."""
    return {key: rule.pop(key) for key in RULE_OPTIONS}


def row_shards_of(ns: dict):
    """The :class:`deepopt._distributed.RowShards` a rule's ``ns_group`` holds (FSDP2), else None."""
    from ._distributed import RowShards
    return ns["ns_group"] if isinstance(ns["ns_group"], RowShards) else None


def orthogonalise_updates(us: Sequence[Tensor], *, ns_steps: int, ns_dtype: str, ns_coefficients: str,
                          ns_form: str, ns_group=None, shapes=None) -> list[Tensor]:
    """The rules' entry point: Newton-Schulz of each update (ndim >= 2, seen as ``(rows, rest)``)
    in the dtype ``ns_dtype`` gives on its device, shaped as the update. ``ns_group``: a process
    group of data-parallel ranks, which all hold every update: each matrix is computed by one
    owner rank and the results are broadcast (:func:`deepopt._distributed.orthogonalise_sharded`);
    or the :class:`~deepopt._distributed.RowShards` of FSDP2 params, ``us`` their row shards and
    ``shapes`` the whole matrices' shapes."""
    from ._distributed import RowShards
    if isinstance(ns_group, RowShards):
        matrices = [u.reshape(u.shape[0], math.prod(u.shape[1:])) for u in us]
        out = ns_group.orthogonalise(matrices, shapes, steps=ns_steps, coefficients=ns_coefficients, form=ns_form,
                                     dtype=resolve_ns_dtype(ns_dtype, us[0].device if us else torch.device("cpu")))
        return [x.reshape(u.shape) for x, u in zip(out, us)]
    out: list[Tensor | None] = [None] * len(us)
    by_device: dict = {}
    for i, u in enumerate(us):
        by_device.setdefault(u.device, []).append(i)
    for device, idx in by_device.items():
        options = dict(steps=ns_steps, coefficients=ns_coefficients, form=ns_form,
                       dtype=resolve_ns_dtype(ns_dtype, device))
        matrices = [us[i].reshape(us[i].shape[0], math.prod(us[i].shape[1:])) for i in idx]
        if ns_group is not None:
            from ._distributed import orthogonalise_sharded
            results = orthogonalise_sharded(matrices, ns_group, **options)
        else:
            results = orthogonalise(matrices, **options)
        for i, result in zip(idx, results):
            out[i] = result.reshape(us[i].shape)
    return out
