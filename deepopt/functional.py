r"""deepopt.functional: the update rules as functions on tensors.

In the Nested Learning view an optimizer's state is an associative memory ``M`` that
compresses the gradient stream with its own inner objective. The pieces below are that view
made concrete, and the optimizer classes are thin compositions of them:

* value maps and gradient pre-processing (:func:`preprocess_grad`);
* memory writes: the dot-product objective ``-<M, V>`` with retention ``a`` gives the momentum
  write (:func:`momentum_write`); the L2 (delta-rule) objective adds a gradient-dependent
  forgetting term (:func:`delta_forget`, :func:`delta_momentum_write`); an MLP memory takes a
  closed-form proximal step on its objective (:func:`mlp_memory_step`);
* read-outs: momentum / Nesterov (:func:`momentum_readout`), the MLP memory
  (:func:`mlp_memory`), Newton-Schulz orthogonalisation (:func:`newton_schulz`, :func:`orthogonalise`; in
  :mod:`deepopt.newton_schulz`).

Every rule is written once, as an in-place ``_``-suffixed function that the optimizers call
under ``torch.no_grad()``. The out-of-place form (no suffix) clones the state first and runs
the same code, so it is autograd-safe and a model can run it inside its forward pass (test-time
memories). Rules accept leading batch dimensions (batch, heads) where noted. The exact op
sequences matter: the reductions to torch's SGD / Adam / AdamW / Muon are bit-exact because the
same torch ops run in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import *  # noqa: F401,F403  (in-context memory rules used by HOPE)
from .memory import __all__ as _memory_all
from .memory import silu_grad
from .newton_schulz import (NS_COEFFICIENTS, NS_DTYPES, cpu_has_native_bf16, newton_schulz,  # noqa: F401
                            orthogonalise, resolve_ns_dtype)

__all__ = [
    "preprocess_grad",
    "momentum_write",
    "momentum_write_",
    "momentum_readout",
    "momentum_readout_foreach",
    "adam_update_",
    "second_moment_write_",
    "delta_forget",
    "delta_forget_",
    "delta_momentum_write",
    "delta_momentum_write_",
    "spectral_norm_estimate",
    "row_keys",
    "mlp_memory",
    "mlp_memory_step",
    "mlp_memory_step_",
    "newton_schulz",
    "orthogonalise",
    "adjust_lr",
    "scale_free_precondition",
    "matrix_shape",
    "as_matrix",
    "NS_COEFFICIENTS",
    "NS_DTYPES",
    "resolve_ns_dtype",
    "cpu_has_native_bf16",
] + list(_memory_all)

def matrix_shape(t: Tensor) -> tuple[int, int]:
    """(rows, cols) of the matrix view the matrix rules use: 2-D as is, conv weights as
    ``(out, in*kh*kw)``."""
    return t.shape[0], math.prod(t.shape[1:])


def as_matrix(t: Tensor) -> Tensor:
    """The matrix view of :func:`matrix_shape` (a view where the layout allows)."""
    return t if t.ndim == 2 else t.reshape(matrix_shape(t))


# ------------------------------------------------------------------------------ values
def preprocess_grad(grad: Tensor, param: Tensor, *, weight_decay: float = 0.0,
                    maximize: bool = False) -> Tensor:
    """``G = -grad if maximize else grad``, then coupled weight decay ``G + wd * p``.

    Never modifies ``grad``. Keys and values of every rule are built from this ``G``.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)
    return g


def decay_and_preprocess(param: Tensor, grad: Tensor, *, lr, weight_decay: float, maximize: bool,
                         decoupled_weight_decay: bool) -> Tensor:
    """The gradient pre-processing for one param: decoupled weight decay ``p *= 1 - lr * wd`` (in
    place, before the update) or coupled decay in ``G``; returns ``G`` (see :func:`preprocess_grad`)."""
    if decoupled_weight_decay:
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        return preprocess_grad(grad, param, maximize=maximize)
    return preprocess_grad(grad, param, weight_decay=weight_decay, maximize=maximize)


def decay_and_preprocess_foreach(params: list[Tensor], grads: list[Tensor], *, lr, weight_decay: float,
                                 maximize: bool, decoupled_weight_decay: bool) -> list[Tensor]:
    """:func:`decay_and_preprocess` over lists of one device and dtype, op for op as torch's foreach
    paths. On CPU, torch's foreach kernels round a Python scalar to a bf16/fp16 list's dtype (a decay
    factor 0.998 becomes 0.996); this keeps that rounding, so the foreach path equals torch's foreach
    path and the for-loop equals torch's for-loop, in every dtype."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    return grads


# ------------------------------------------------------------------------------ linear memory, dot objective
def momentum_write_(buf: Tensor, g: Tensor, momentum: float, dampening: float, *,
                    lerp: bool = False) -> Tensor:
    r"""One gradient step of the memory on ``-<M, G>`` with retention ``a`` (momentum):

    .. math:: M \leftarrow a M + (1 - d)\, G

    ``lerp=True`` (the zero-init convention with ``d == a``) computes it as
    ``M.lerp_(G, 1 - a)``, the op sequence of torch's Adam and Muon.
    """
    if lerp:
        return buf.lerp_(g, 1 - momentum)
    return buf.mul_(momentum).add_(g, alpha=1 - dampening)


def momentum_write_foreach_(bufs: list[Tensor], gs: list[Tensor], momentum: float, dampening: float, *,
                            lerp: bool = False) -> None:
    """:func:`momentum_write_` over lists of one device and dtype (same ops, as foreach calls)."""
    if lerp:
        torch._foreach_lerp_(bufs, gs, 1 - momentum)
    else:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, gs, alpha=1 - dampening)


def momentum_write(buf: Tensor, g: Tensor, momentum: float, dampening: float, *,
                   lerp: bool = False) -> Tensor:
    """Out-of-place :func:`momentum_write_` (autograd-safe; any leading dims)."""
    return momentum_write_(buf.clone(), g, momentum, dampening, lerp=lerp)


def momentum_readout(g: Tensor, buf: Tensor, momentum: float, *, nesterov: bool,
                     lerp: bool = False) -> Tensor:
    """What the memory gives the parameter update: ``M``, or with Nesterov ``G + a M``
    (``G.lerp(M, a)`` in the zero-init convention with ``d == a``, as torch's Muon)."""
    if not nesterov:
        return buf
    if lerp:
        return g.lerp(buf, momentum)
    return g.add(buf, alpha=momentum)


def momentum_readout_foreach(gs: list[Tensor], bufs: list[Tensor], momentum: float, *, nesterov: bool,
                             lerp: bool = False) -> list[Tensor]:
    """:func:`momentum_readout` over lists of one device and dtype (same ops, as foreach calls)."""
    if not nesterov:
        return bufs
    if lerp:
        return torch._foreach_lerp(gs, bufs, momentum)
    return torch._foreach_add(gs, bufs, alpha=momentum)


# ------------------------------------------------------------------------------ Adam value map
def second_moment_write_(exp_avg_sq: Tensor, g: Tensor, beta2: float) -> Tensor:
    """The second-moment memory of Adam and M3: ``S <- beta2 S + (1 - beta2) G^2`` (torch's ops)."""
    return exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def second_moment_write_foreach_(exp_avg_sqs: list[Tensor], gs: list[Tensor], beta2: float) -> None:
    """:func:`second_moment_write_` over lists of one device and dtype."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, 1 - beta2)


def adam_update_(param: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, *,
                 lr, beta1: float, beta2: float, eps: float) -> None:
    r"""The memory with Adam's value map, op for op as torch's ``_single_tensor_adam``:

    .. math::
        M \leftarrow \beta_1 M + (1-\beta_1) G, \quad S \leftarrow \beta_2 S + (1-\beta_2) G^2,
        \quad p \leftarrow p - \frac{lr}{1-\beta_1^t} \frac{M}{\sqrt{S/(1-\beta_2^t)} + \epsilon}

    ``step`` is incremented here; weight decay is the caller's (coupled in ``g`` or decoupled
    on ``param`` before this call).
    """
    step += 1
    exp_avg.lerp_(g, 1 - beta1)
    second_moment_write_(exp_avg_sq, g, beta2)
    t = step.item()
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def adam_update_foreach_(params: list[Tensor], gs: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr, beta1: float,
                         beta2: float, eps: float) -> None:
    """:func:`adam_update_` over lists of one device and dtype, op for op as torch's
    ``_multi_tensor_adam`` (``capturable=False``)."""
    if steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    second_moment_write_foreach_(exp_avg_sqs, gs, beta2)
    bias_correction1 = [1 - beta1 ** s.item() for s in steps]
    bias_correction2 = [1 - beta2 ** s.item() for s in steps]
    step_size = [(lr / bc) * -1 for bc in bias_correction1]
    bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


# ------------------------------------------------------------------------------ linear memory, L2 objective
def spectral_norm_estimate(g: Tensor, iterations: int = 3) -> Tensor:
    """Top singular value of ``(..., r, c)`` matrices by power iteration on ``G^T G``, started
    from the squared column norms (deterministic, no RNG: every rank and run agree). A lower
    bound that tightens with each iteration; shape ``(..., 1, 1)``."""
    frobenius = torch.linalg.matrix_norm(g, keepdim=True)
    x = g / (frobenius + torch.finfo(g.dtype).tiny)            # scale-free: no overflow at |g| ~ 1e12
    v = x.square().sum(-2, keepdim=True).mT                    # (..., c, 1)
    for _ in range(iterations):
        v = x.mT @ (x @ v)
        v = v / (torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True) + torch.finfo(v.dtype).tiny)
    return frobenius * torch.linalg.vector_norm(x @ v, dim=(-2, -1), keepdim=True)


def delta_retention(buf: Tensor, g: Tensor, momentum: float, delta: float, keys: str, eps: float) -> Tensor:
    """matrix keys: the forgetting term ``(M Gh^T) Gh``; elementwise keys: the retention factor."""
    gh = g.to(buf.dtype)
    if keys in ("matrix", "spectral"):
        scale = torch.linalg.matrix_norm(gh, keepdim=True) if keys == "matrix" else spectral_norm_estimate(gh)
        gh = gh / (scale + eps)
        if buf.shape[-2] <= buf.shape[-1]:
            return (buf @ gh.mT) @ gh            # 2 r^2 c flops
        return buf @ (gh.mT @ gh)                # 2 c^2 r flops
    k = gh / (gh.square().mean().sqrt() + eps)
    return (momentum - delta * k.square()).clamp_(min=0)


def delta_forget_(buf: Tensor, g: Tensor, momentum: float, delta: float, *,
                  keys: str = "matrix", eps: float = 1e-8) -> Tensor:
    r"""Retention of the L2-regression (delta-rule) memory: forget along the gradient's directions.

    ``keys="matrix"`` (2-D, or any ``(..., rows, cols)``), with ``Gh = G / (||G||_F + eps)``:

    .. math:: M \leftarrow M (a I - \delta\, \hat G^\top \hat G) = a M - \delta (M \hat G^\top) \hat G

    evaluated in the cheaper association order. ``keys="spectral"``: the same with
    ``Gh = G / (sigma_1(G) + eps)`` (:func:`spectral_norm_estimate`, 3 power iterations), so the
    top singular direction decays by ``delta`` itself rather than ``delta s_1^2 / sum_j s_j^2``.
    ``keys="elementwise"``: per coordinate,
    ``k = g / (rms(G) + eps)`` (rms over the whole tensor) and ``M <- max(a - delta k^2, 0) * M``.
    """
    retention = delta_retention(buf, g, momentum, delta, keys, eps)
    if keys != "elementwise":
        return buf.mul_(momentum).sub_(retention, alpha=delta)
    return buf.mul_(retention)


def delta_forget(buf: Tensor, g: Tensor, momentum: float, delta: float, *,
                 keys: str = "matrix", eps: float = 1e-8) -> Tensor:
    """Out-of-place :func:`delta_forget_` (autograd-safe; leading batch dims)."""
    retention = delta_retention(buf, g, momentum, delta, keys, eps)
    if keys != "elementwise":
        return buf.mul(momentum).sub(retention, alpha=delta)
    return buf.mul(retention)


def delta_momentum_write_(buf: Tensor, g: Tensor, momentum: float, dampening: float,
                          delta: float, *, keys: str = "matrix", eps: float = 1e-8) -> Tensor:
    r"""The delta-rule memory write: :func:`delta_forget_` then ``M += (1 - d) G``.

    .. math:: M \leftarrow M (a I - \delta \hat G^\top \hat G) + (1 - d) G

    With ``delta == 0`` it is :func:`momentum_write_` bit for bit. Matrix and spectral keys still
    run their key code then (``M - 0 * R`` is ``M`` exactly), so that reduction exercises it;
    elementwise keys would round ``a`` to the state dtype in the retention factor, so there
    ``delta == 0`` is the momentum write itself.
    """
    if delta == 0 and keys == "elementwise":
        return momentum_write_(buf, g, momentum, dampening)
    delta_forget_(buf, g, momentum, delta, keys=keys, eps=eps)
    return buf.add_(g, alpha=1 - dampening)


def delta_momentum_write(buf: Tensor, g: Tensor, momentum: float, dampening: float,
                         delta: float, *, keys: str = "matrix", eps: float = 1e-8) -> Tensor:
    """Out-of-place :func:`delta_momentum_write_` (autograd-safe; leading batch dims)."""
    if delta == 0:
        return momentum_write(buf, g, momentum, dampening)
    return delta_forget(buf, g, momentum, delta, keys=keys, eps=eps).add(g, alpha=1 - dampening)


# ------------------------------------------------------------------------------ MLP memory
def row_keys(g: Tensor, *, key_norm: str = "row", eps: float = 1e-8) -> Tensor:
    """Keys of the MLP memory: the rows of ``G`` over their L2 norm (``"row"``) or over
    ``||G||_F`` (``"tensor"``), each plus ``eps``."""
    if key_norm == "row":
        return g / (torch.linalg.vector_norm(g, dim=-1, keepdim=True) + eps)
    return g / (torch.linalg.matrix_norm(g, keepdim=True) + eps)


def mlp_memory(keys: Tensor, mlp_in: Tensor, mlp_out: Tensor) -> Tensor:
    r"""The MLP part of the memory, applied to each row ``k`` of ``keys``:
    ``f(k) = B silu(A k)``, i.e. ``f(K) = silu(K A^T) B^T``. Shapes ``(..., r, d)``,
    ``A: (..., h, d)``, ``B: (..., d, h)``."""
    return F.silu(keys @ mlp_in.mT) @ mlp_out.mT


def _mlp_memory_grads(mlp_in: Tensor, mlp_out: Tensor, keys: Tensor, target: Tensor,
                      objective: str, sums=None, rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients ``(dL/dA, dL/dB)`` of the MLP memory's inner objective and the
    second moment of its hidden activations ``C = H^T H / r`` (the l2 objective's curvature in ``B``).
    ``sums``: for row shards of the keys, an in-place sum over the shards (an all-reduce), and
    ``rows`` the rows of all shards: the row means are then over the whole matrix."""
    z = keys @ mlp_in.mT
    hidden = F.silu(z)
    rows = max(keys.shape[-2] if rows is None else rows, 1)   # (an empty matrix: no rows, zero gradients)
    if objective == "dot":
        d_out = target / -rows
    else:
        d_out = (hidden @ mlp_out.mT - target) / rows
    d_z = (d_out @ mlp_out) * silu_grad(z)
    grads = d_z.mT @ keys, d_out.mT @ hidden, hidden.mT @ hidden / rows
    if sums is None:
        return grads
    flat = sums(torch.cat([t.reshape(-1) for t in grads]))
    return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in grads]), grads))


def _mlp_memory_steps(mlp_in: Tensor, mlp_out: Tensor, keys: Tensor, target: Tensor, objective: str,
                      memory_lr: float, memory_decay: float, sums=None, rows=None) -> tuple[Tensor, Tensor]:
    """The steps ``(A - A', B - B')`` of :func:`mlp_memory_step_` (from the pre-step values)."""
    d_in, d_out, curvature = _mlp_memory_grads(mlp_in, mlp_out, keys, target, objective, sums, rows)
    eta, lam = memory_lr, memory_decay
    d_in = d_in.add(mlp_in, alpha=lam)
    d_out = d_out.add(mlp_out, alpha=lam)
    trace = curvature.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    step_in = d_in * (eta / (1 + eta * (trace + lam)))
    if objective == "dot":   # linear in B: its proximal step is a plain step, shrunk by the ridge term
        return step_in, d_out * (eta / (1 + eta * lam))
    # B's proximal step solves the h x h system (1 + eta lam) I + eta C (SPD), in fp32 at least;
    # solve_ex does not check for singularity, so it needs no host sync
    work = torch.promote_types(curvature.dtype, torch.float32)
    eye = torch.eye(curvature.shape[-1], dtype=work, device=curvature.device)
    system = curvature.to(work).mul(eta).add_(eye, alpha=1 + eta * lam)
    step_out = torch.linalg.solve_ex(system, d_out.mT.to(work))[0].mT.mul_(eta)
    return step_in, step_out.to(mlp_out.dtype)


def mlp_memory_step_(mlp_in: Tensor, mlp_out: Tensor, keys: Tensor, target: Tensor, *,
                     objective: str = "l2", memory_lr: float = 32.0, memory_decay: float = 0.0, sums=None,
                     rows: int | None = None) -> None:
    r"""One proximal (implicit) step of the MLP memory ``f`` on its own inner objective plus a
    ridge term ``lambda/2 (||A||^2 + ||B||^2)``. With ``r`` rows, ``k_i`` the keys, ``g_i`` the
    targets, ``h_i = silu(A k_i)``:

    * ``"l2"``: ``L = 1/(2r) sum_i ||f(k_i) - g_i||^2`` (the MLP regresses the gradient);
    * ``"dot"``: ``L = -(1/r) sum_i <f(k_i), g_i>`` (momentum's objective; unbounded below).

    With ``Z = K A^T``, ``H = silu(Z)``, ``E = dL/df``, ``C = H^T H / r``: ``dB = E^T H + lambda B``,
    ``dA = (E B * silu'(Z))^T K + lambda A``; then, from the pre-step values,

    .. math::
        B \leftarrow B - \eta\, dB\, ig((1 + \eta\lambda) I + \eta Cig)^{-1}, \qquad
        A \leftarrow A - rac{\eta}{1 + \eta(\mathrm{tr}\, C + \lambda)}\, dA

    The l2 objective is quadratic in ``B`` with curvature ``C``, so ``B``'s step is its exact
    proximal step, ``argmin_B L + lambda/2 ||B||^2 + ||B - B_0||^2 / (2 eta)``: it never grows
    the residual at any ``eta`` (``C = 0`` for ``"dot"``). ``A``'s is the proximal step with the
    curvature taken as the scalar ``tr C + lambda`` (normalised LMS at small ``eta``); both tend
    to a finite step as ``eta`` grows. The explicit (normalised) step of the earlier releases fit
    ``B`` along ``C``'s top direction only, a ``1 / h`` of the rest. No autograd graph is built.
    For row shards of the keys and targets (FSDP2): ``sums`` an in-place sum over the shards (an
    all-reduce), ``rows`` the rows of all shards.
    """
    step_in, step_out = _mlp_memory_steps(mlp_in, mlp_out, keys, target, objective, memory_lr, memory_decay,
                                          sums, rows)
    mlp_in.sub_(step_in)
    mlp_out.sub_(step_out)


def mlp_memory_step(mlp_in: Tensor, mlp_out: Tensor, keys: Tensor, target: Tensor, *,
                    objective: str = "l2", memory_lr: float = 32.0, memory_decay: float = 0.0) -> tuple[Tensor, Tensor]:
    """Out-of-place :func:`mlp_memory_step_`: returns the new ``(A, B)`` (autograd-safe)."""
    step_in, step_out = _mlp_memory_steps(mlp_in, mlp_out, keys, target, objective, memory_lr, memory_decay)
    return mlp_in - step_in, mlp_out - step_out


# ------------------------------------------------------------------------------ nonlinear read-out
# Newton-Schulz lives in deepopt/newton_schulz.py (re-exported above)


def rms(t: Tensor, sums=None) -> Tensor:
    """Root mean square over the last two dims (keepdim), of any dtype, in at least fp32.
    ``sums``: for a shard of a 2-D matrix, an in-place sum over the shards (an all-reduce)."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    if sums is None:
        return t.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    total = sums(torch.stack([t.square().sum().double(), t.new_tensor(t.numel(), dtype=torch.float64)]))
    return (total[0] / total[1].clamp_min(1)).sqrt().to(t.dtype).view(1, 1)


def scale_free_precondition(u: Tensor, exp_avg_sq: Tensor, eps: float, like: Tensor | None = None,
                            sums=None) -> Tensor:
    r"""M3's preconditioner without its ``1/|g|`` scale: divide by the second-moment root taken
    relative to its own RMS, then give the result the RMS of ``like`` (default ``u``).

    .. math::
        d = \sqrt{S} / \mathrm{rms}(\sqrt{S}), \qquad v = u / (d + \epsilon), \qquad
        \text{out} = v\, \mathrm{rms}(\text{like}) / \mathrm{rms}(v)

    ``eps`` is relative to the typical ``sqrt(S)``: it caps a coordinate's weight at ``1/eps``
    times the typical one. The output does not depend on the gradient's scale, and scales with
    ``like`` as Muon's update does. A scalar factor of ``S`` (Adam's bias correction ``1 - beta2^t``)
    cancels, so none is applied. Matrices ``(..., r, c)``; computed in fp32 or wider. ``sums``: as
    :func:`rms`, for row shards.
    """
    d = exp_avg_sq.sqrt()
    tiny = torch.finfo(d.dtype).tiny
    d = d / rms(d, sums).clamp_min(tiny)
    v = u.to(d.dtype) / (d + eps)
    return v * (rms(u if like is None else like, sums) / rms(v, sums).clamp_min(tiny))


def adjust_lr(lr, mode: str | None, shape) -> float:
    """Muon's shape-dependent lr scale for a ``(rows, cols)`` matrix: ``None`` keeps ``lr``;
    ``"original"``: ``lr * sqrt(max(1, rows/cols))``; ``"match_rms_adamw"``:
    ``lr * 0.2 * sqrt(max(rows, cols))``."""
    rows, cols = shape[0], shape[1]
    if rows == 0 or cols == 0:   # an empty matrix has no update to scale
        return lr
    if mode == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if mode == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr
