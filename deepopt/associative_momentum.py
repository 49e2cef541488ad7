r"""AssociativeMomentum: momentum as an associative memory with the dot-product objective.

The memory ``M`` takes one gradient step per outer step on

.. math:: \tilde L(M) = -\langle M, V(G) \rangle + \tfrac{1-a}{2\eta} \lVert M \rVert^2

which is the write ``M <- a M + (1 - d) V(G)``, and the parameter reads it out:
``W <- W - lr * M``. The *value map* ``V`` decides what is stored:

* ``preconditioner=None``: ``V(G) = G``. This is SGD with momentum, exactly (torch's op sequence).
* ``preconditioner="adam"``: the same memory with Adam's per-coordinate preconditioned values
  and a second memory ``S`` of ``G^2`` at the same frequency. Nested Learning (arXiv
  2512.24695, App. B) derives Adam as the optimal memory of an L2 objective over gradients
  with values ``P = H^{1/2}/sqrt(beta2)``; with EMAs and bias correction this is torch's Adam /
  AdamW op for op. ``amsgrad`` is not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _to_scalar

from . import functional as Fn
from ._optimizer import DeepOptimizer, check_choice, check_range, new_step, resolve_state_dtype

__all__ = ["AssociativeMomentum"]


def _as_real(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _new_buffer(g: Tensor, state_dtype) -> Tensor:
    """SGD convention: the memory's first write stores ``G`` itself (contiguous, so that the
    matrix rules can write through a ``(rows, cols)`` view)."""
    return g.to(dtype=state_dtype, memory_format=torch.contiguous_format, copy=True)


# ------------------------------------------------------------------------------ SGD value map
# (complex params need no real view here: every op is a real-scalar mul/add)
def _single_tensor_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay,
                            nesterov, maximize, decoupled_weight_decay, state_dtype, write_=None):
    """SGD-convention memory; ``write_(buf, g)`` replaces the momentum write (DeltaMomentum)."""
    lr = _to_scalar(lr)
    for p, grad, state in zip(params, grads, states):
        g = Fn.decay_and_preprocess(p, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=decoupled_weight_decay)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = _new_buffer(g, resolve_state_dtype(state_dtype, p))
            elif write_ is None:
                Fn.momentum_write_(buf, g, momentum, dampening)
            else:
                write_(buf, g)
            g = Fn.momentum_readout(g, buf, momentum, nesterov=nesterov)
        p.add_(g, alpha=-lr)


def _multi_tensor_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay,
                           nesterov, maximize, decoupled_weight_decay, state_dtype, write_=None):
    lr = _to_scalar(lr)
    bufs = [s.get("momentum_buffer") for s in states]
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, bufs], with_indices=True)
    for (device_params, device_grads, device_bufs), indices in grouped.values():
        device_grads = Fn.decay_and_preprocess_foreach(
            device_params, device_grads, lr=lr, weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay)
        if momentum != 0:
            if write_ is None and all(b is not None for b in device_bufs):
                Fn.momentum_write_foreach_(device_bufs, device_grads, momentum, dampening)
            else:   # first steps (as torch, per tensor) or a per-tensor write rule
                device_bufs = list(device_bufs)
                for i, (p, g, buf) in enumerate(zip(device_params, device_grads, device_bufs)):
                    if buf is None:
                        buf = _new_buffer(g, resolve_state_dtype(state_dtype, p))
                        device_bufs[i] = states[indices[i]]["momentum_buffer"] = buf
                    elif write_ is None:
                        Fn.momentum_write_(buf, g, momentum, dampening)
                    else:
                        write_(buf, g)
            if nesterov:
                device_grads = torch._foreach_add(device_grads, device_bufs, alpha=momentum)
            else:
                device_grads = device_bufs
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


# ------------------------------------------------------------------------------ Adam value map
def _single_tensor_adam(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                        decoupled_weight_decay):
    lr = _to_scalar(lr)
    for p, grad, state in zip(params, grads, states):
        g = Fn.decay_and_preprocess(p, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=decoupled_weight_decay)
        p_r, g_r, m_r, s_r = _as_real([p, g, state["exp_avg"], state["exp_avg_sq"]])
        Fn.adam_update_(p_r, g_r, m_r, s_r, state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps)


def _multi_tensor_adam(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                       decoupled_weight_decay):
    lr = _to_scalar(lr)
    if isinstance(lr, Tensor):
        lr = lr.item()   # foreach scalar lists take floats (torch's foreach Adam refuses tensor lr)
    lists = [params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [s["step"] for s in states]]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists)
    for (device_params, device_grads, exp_avgs, exp_avg_sqs, steps), _ in grouped.values():
        device_params, device_grads = _as_real(device_params), _as_real(device_grads)
        exp_avgs, exp_avg_sqs = _as_real(exp_avgs), _as_real(exp_avg_sqs)
        device_grads = Fn.decay_and_preprocess_foreach(
            device_params, device_grads, lr=lr, weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay)
        Fn.adam_update_foreach_(device_params, device_grads, exp_avgs, exp_avg_sqs, steps,
                                lr=lr, beta1=beta1, beta2=beta2, eps=eps)


class AssociativeMomentum(DeepOptimizer):
    r"""Momentum as an associative memory (dot-product inner objective).

    .. math::
        G &= \nabla_W L \;(\text{negated if maximize}) + \lambda W \;(\text{coupled decay}) \\
        M &\leftarrow a M + (1 - d)\, V(G) \qquad W \leftarrow W - \text{lr} \cdot \text{readout}(M)

    With ``preconditioner=None`` this is ``torch.optim.SGD(lr, momentum, dampening,
    weight_decay, nesterov)`` bit for bit; with ``preconditioner="adam"`` it is
    ``torch.optim.Adam`` (``decoupled_weight_decay=True``: ``AdamW``) bit for bit, with
    ``betas = (momentum, beta2)``. Both are one memory with different value maps.

    Args:
        params: parameters or param groups.
        lr: outer learning rate (float or 1-element tensor), >= 0.
        momentum: retention ``a`` of the memory, in [0, 1). Adam's ``beta1``.
        dampening: ``d``; the write rate is ``1 - d``. ``None``: 0 (SGD) or ``momentum``
            ("adam", the only value allowed there).
        weight_decay: L2 penalty, >= 0; coupled (added to G) unless ``decoupled_weight_decay``.
        nesterov: Nesterov read-out ``G + a M`` (SGD value map, ``dampening == 0`` only).
        preconditioner: ``None`` (values ``G``) or ``"adam"``.
        beta2, eps: Adam's second-moment retention in [0, 1) and denominator epsilon >= 0.
        decoupled_weight_decay: ``W <- W (1 - lr * wd)`` before the update (AdamW).
        maximize: ascend instead of descend.
        foreach: use torch's multi-tensor ops (default: on for CPU/CUDA tensors).
        fused: ``True``: the Triton multi-tensor kernels (CUDA tensors, or Triton's CPU
            interpreter); ``None``: foreach until the kernels are verified on a GPU.
        state_dtype: ``None`` = fp32 (or wider) state; ``"param"`` = the param dtype
            (torch's behaviour); or a floating ``torch.dtype``.
        nonfinite: ``"propagate"`` (default, no check, as torch), ``"skip"`` (a step with a
            non-finite gradient changes nothing) or ``"raise"`` (``FloatingPointError``, nothing
            changed). The check costs one host sync per step.

    Complex parameters are supported (as ``torch.view_as_real``). State keys are torch's
    (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so SGD/Adam checkpoints load.
    """

    _supports_complex = True
    _supports_cuda_ext = True   # fused="cuda": deepopt/csrc (fp32 state, real params)

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=None, weight_decay=0.0,
                 nesterov=False, *, preconditioner=None, beta2=0.999, eps=1e-8,
                 decoupled_weight_decay=False, maximize=False, foreach=None, fused=None,
                 state_dtype=None, nonfinite="propagate"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, preconditioner=preconditioner, beta2=beta2, eps=eps,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, state_dtype=state_dtype, nonfinite=nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_choice("preconditioner", group["preconditioner"], (None, "adam"))
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        momentum, dampening = group["momentum"], group["dampening"]
        if group["preconditioner"] == "adam":
            check_range("beta2", group["beta2"], 0.0, 1.0, high_open=True)
            check_range("eps", group["eps"], 0.0)
            if dampening is not None and dampening != momentum:
                raise ValueError(f"invalid dampening={dampening}: with preconditioner='adam' the write rate "
                                 f"is 1 - momentum; leave dampening=None (got momentum={momentum})")
            if group["nesterov"]:
                raise ValueError("nesterov=True is not supported with preconditioner='adam'")
        else:
            if dampening is not None:
                check_range("dampening", dampening, 0.0, 1.0)
            if group["nesterov"] and (momentum <= 0 or (dampening or 0) != 0):
                raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                                 "(nesterov=True needs momentum > 0 and dampening = 0)")

    def _state_spec(self, group, p):
        if group["preconditioner"] == "adam":
            return {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}
        return {"momentum_buffer": p.shape} if group["momentum"] != 0 else {}

    def _init_state(self, group, p, state):
        if group["preconditioner"] == "adam":
            state["step"] = new_step()
            state["exp_avg"] = self._zeros(group, p)
            state["exp_avg_sq"] = self._zeros(group, p)
        # SGD value map: the memory is created by its first write (M = G)

    def _update(self, group, params, grads, states, foreach, *, fused=False, amp=None):
        common = dict(lr=group["lr"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                      decoupled_weight_decay=group["decoupled_weight_decay"])
        if fused and group["fused"] == "cuda":   # the optional CUDA C++ extension (deepopt/_cuda_ext.py)
            from . import _cuda_ext
            if group["preconditioner"] == "adam":
                _cuda_ext.adam_(params, grads, states, beta1=group["momentum"], beta2=group["beta2"],
                                eps=group["eps"], amp=amp, **common)
            else:
                _cuda_ext.sgd_(params, grads, states, momentum=group["momentum"], dampening=group["dampening"] or 0.0,
                               nesterov=group["nesterov"], amp=amp, **common)
            return
        if fused:   # Triton multi-tensor kernels (deepopt/_triton.py)
            from . import _triton
            state_dtype_of = lambda p: resolve_state_dtype(group["state_dtype"], p)  # noqa: E731
            if group["preconditioner"] == "adam":
                _triton.fused_adam_(params, grads, states, beta1=group["momentum"], beta2=group["beta2"],
                                    eps=group["eps"], state_dtype_of=state_dtype_of, amp=amp, **common)
            else:
                _triton.fused_momentum_(params, grads, states, momentum=group["momentum"],
                                        dampening=group["dampening"] or 0.0, nesterov=group["nesterov"],
                                        state_dtype_of=state_dtype_of, amp=amp, **common)
            return
        if group["preconditioner"] == "adam":
            fn = _multi_tensor_adam if foreach else _single_tensor_adam
            fn(params, grads, states, beta1=group["momentum"], beta2=group["beta2"], eps=group["eps"],
               **common)
        else:
            fn = _multi_tensor_momentum if foreach else _single_tensor_momentum
            fn(params, grads, states, momentum=group["momentum"], dampening=group["dampening"] or 0.0,
               nesterov=group["nesterov"], state_dtype=group["state_dtype"], **common)
