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

from . import _triton as T
from . import functional as Fn
from ._optimizer import DeepOptimizer, Rule
from ._state import new_step, resolve_state_dtype
from ._validation import check_choice, check_range

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
            device_grads = Fn.momentum_readout_foreach(device_grads, device_bufs, momentum, nesterov=nesterov)
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


# ------------------------------------------------------------------------------ Adam value map
def _single_tensor_adam(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                        decoupled_weight_decay, state_dtype=None):
    lr = _to_scalar(lr)
    for p, grad, state in zip(params, grads, states):
        g = Fn.decay_and_preprocess(p, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=decoupled_weight_decay)
        p_r, g_r, m_r, s_r = _as_real([p, g, state["exp_avg"], state["exp_avg_sq"]])
        Fn.adam_update_(p_r, g_r, m_r, s_r, state["step"], lr=lr, beta1=beta1, beta2=beta2, eps=eps)


def _multi_tensor_adam(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                       decoupled_weight_decay, state_dtype=None):
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


# ------------------------------------------------------------------------------ fused (Triton)
def _fused_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                    decoupled_weight_decay, state_dtype, amp=None, delta=0.0, keys="elementwise", eps=1e-8,
                    zero_init=False, finish_matrices=True):
    """The momentum kernel: this rule's SGD value map, DeltaMomentum's writes (both key modes)
    and DeepMomentum's linear memory (``zero_init``: ``M`` exists, ``lerp`` when d == a;
    ``finish_matrices=False``: matrices get only the write, DeepMomentum finishes them)."""
    lerp = zero_init and dampening == momentum
    write_rate = 1 - momentum if lerp else 1 - dampening
    for (device, _, s_dtype), idx in T.grouped(params, state_dtype).items():
        fix = T.Contiguous()
        ps = [fix(T.real(params[i])) for i in idx]
        gs = T.dense([T.real(grads[i]) for i in idx])
        scale_t, inf_t, has_scale, has_inf = T.amp_args(amp, device)
        modes = [T.MODE_WRITE] * len(idx)
        bufs: list[Tensor | None] = [None] * len(idx)
        retained: list[Tensor | None] = [None] * len(idx)
        if momentum != 0 or zero_init:
            firsts = []
            for j, i in enumerate(idx):
                buf = states[i].get("momentum_buffer")
                if buf is None:
                    buf = states[i]["momentum_buffer"] = torch.empty_like(
                        grads[i], dtype=s_dtype, memory_format=torch.contiguous_format)
                    modes[j] = T.MODE_FIRST
                    firsts.append(i)
                bufs[j] = fix(T.real(buf))
            if firsts and has_inf and T.skip_on_host(amp):
                for i in firsts:   # a skipped first step must not leave a memory behind
                    del states[i]["momentum_buffer"]
                continue
        if delta != 0 and keys != "elementwise":   # R = (M Gh^T) Gh by torch matmuls, then the kernel
            if T.skip_on_host(amp):
                continue
            for j, i in enumerate(idx):
                if modes[j] == T.MODE_FIRST or params[i].ndim < 2:
                    continue
                g = grads[i] / amp[0].to(grads[i].device) if has_scale else grads[i]
                g = Fn.preprocess_grad(g, params[i], weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                                       maximize=maximize)
                buf = bufs[j]
                retained[j] = Fn.delta_retention(buf.view(buf.shape[0], -1), g.reshape(g.shape[0], -1), momentum,
                                                 delta, keys, eps).view(buf.shape)
                modes[j] = T.MODE_DELTA_MATRIX
        if delta != 0:
            modes = [T.MODE_DELTA_ELEMENTWISE if md == T.MODE_WRITE else md for md in modes]
            rms = _rms_plus_eps(ps, gs, weight_decay if not decoupled_weight_decay else 0.0, maximize,
                                scale_t, has_scale, eps, device)
        else:
            rms = torch.ones(len(idx), device=device)
        lr_f, lr_t, lr_tensor = T.lr_args(lr, device)
        consts = dict(P_DT=T.tl_dtype(ps[0].dtype), G_DT=T.tl_dtype(gs[0].dtype), S_DT=T.tl_dtype(s_dtype),
                      MAXIMIZE=maximize, WD_MODE=T.wd_mode(weight_decay, decoupled_weight_decay),
                      HAS_MOMENTUM=momentum != 0 or zero_init, NESTEROV=bool(nesterov), LERP=lerp,
                      W_SMALL=abs(write_rate) < 0.5, A_SMALL=abs(momentum) < 0.5, LR_TENSOR=lr_tensor,
                      HAS_SCALE=has_scale, HAS_INF=has_inf)
        args = (lr_f, lr_t if lr_tensor else T.dummy(device), scale_t, inf_t, float(momentum), float(write_rate),
                float(delta), float(weight_decay), float(1 - lr_f * weight_decay if not lr_tensor else 0.0))
        finish = [finish_matrices or params[i].ndim < 2 for i in idx]
        for done in (True, False):   # FINISH (the parameter update) is a compile-time constant too
            pick = [j for j in range(len(idx)) if finish[j] == done]
            if pick:
                T.launch_by_mode("momentum", [[row[j] for j in pick] for row in (ps, gs, bufs, retained)],
                                 [modes[j] for j in pick], args, {**consts, "FINISH": done}, per_tensor=rms[pick])
        fix.done()


def _rms_plus_eps(ps, gs, coupled_wd, maximize, scale_t, has_scale, eps, device) -> Tensor:
    """Per tensor ``rms(G) + eps`` of the pre-processed gradient (one multi-tensor reduction):
    DeltaMomentum's elementwise keys."""
    acc = torch.zeros(len(ps), device=device, dtype=torch.float32)
    T.launch("sumsq", [ps, gs], (float(coupled_wd), scale_t),
             dict(P_DT=T.tl_dtype(ps[0].dtype), G_DT=T.tl_dtype(gs[0].dtype), MAXIMIZE=bool(maximize),
                  COUPLED_WD=coupled_wd != 0, HAS_SCALE=has_scale), per_tensor=acc)
    sizes = torch.tensor([max(1, p.numel()) for p in ps], dtype=torch.float32)
    sizes = sizes.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else sizes
    return (acc / sizes).sqrt_().add_(eps)


def _fused_adam(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                decoupled_weight_decay, state_dtype, amp=None):
    """The Adam kernel: torch's Adam / AdamW op for op, in fp32 (fp64 bias corrections)."""
    w1, w2 = 1 - beta1, 1 - beta2
    for (device, _, _), idx in T.grouped(params, state_dtype).items():
        fix = T.Contiguous()
        ps = [fix(T.real(params[i])) for i in idx]
        gs = T.dense([T.real(grads[i]) for i in idx])
        ms = [fix(T.real(states[i]["exp_avg"])) for i in idx]
        vs = [fix(T.real(states[i]["exp_avg_sq"])) for i in idx]
        steps = T.device_steps(states, idx, device)
        T.count_steps(steps, amp)
        scale_t, inf_t, has_scale, has_inf = T.amp_args(amp, device)
        lr_f, lr_t, lr_tensor = T.lr_args(lr, device)
        T.launch("adam", [ps, gs, ms, vs, steps],
                 (T.hyper(device, float(beta1), float(beta2)), lr_f, lr_t if lr_tensor else T.dummy(device),
                  scale_t, inf_t, float(w1), float(w2), float(eps), float(weight_decay)),
                 dict(P_DT=T.tl_dtype(ps[0].dtype), G_DT=T.tl_dtype(gs[0].dtype), S_DT=T.tl_dtype(ms[0].dtype),
                      MAXIMIZE=bool(maximize), WD_MODE=T.wd_mode(weight_decay, decoupled_weight_decay),
                      W_SMALL=abs(w1) < 0.5, LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf))
        fix.done()


# ------------------------------------------------------------------------------ fused (CUDA C++)
def _cuda_momentum(params, grads, states, *, state_dtype, **hyper):
    from . import _cuda_ext
    _cuda_ext.sgd_(params, grads, states, **hyper)


def _cuda_adam(params, grads, states, *, state_dtype, **hyper):
    from . import _cuda_ext
    _cuda_ext.adam_(params, grads, states, **hyper)


#: the SGD value map (also the write DeltaMomentum and DeepMomentum build on) and the Adam value map
MOMENTUM = Rule(_single_tensor_momentum, _multi_tensor_momentum, _fused_momentum, _cuda_momentum)
ADAM = Rule(_single_tensor_adam, _multi_tensor_adam, _fused_adam, _cuda_adam)


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
        fused: ``True``: the multi-tensor kernels (CUDA tensors, or Triton's CPU interpreter);
            ``None``: foreach until the kernels are verified on a GPU; ``False``: never.
        fused_backend: ``"triton"`` (default) or ``"cuda"``, the CUDA C++ kernels of ``csrc/``
            (compiled on first use; fp32 state, real params).
        state_dtype: ``None`` = fp32 (or wider) state; ``"param"`` = the param dtype
            (torch's behaviour); or a floating ``torch.dtype``.
        nonfinite: ``"propagate"`` (default, no check, as torch), ``"skip"`` (a step with a
            non-finite gradient changes nothing) or ``"raise"`` (``FloatingPointError``, nothing
            changed). The check costs one host sync per step.

    Complex parameters are supported (as ``torch.view_as_real``). State keys are torch's
    (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so SGD/Adam checkpoints load.
    """

    _supports_complex = True

    _algorithm_options = ("preconditioner",)

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=None, weight_decay=0.0,
                 nesterov=False, *, preconditioner=None, beta2=0.999, eps=1e-8,
                 decoupled_weight_decay=False, maximize=False, foreach=None, fused=None,
                 fused_backend="triton", state_dtype=None, nonfinite="propagate"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, preconditioner=preconditioner, beta2=beta2, eps=eps,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, fused_backend=fused_backend, state_dtype=state_dtype,
                        nonfinite=nonfinite)
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

    def _rule(self, group):
        common = dict(lr=group["lr"], weight_decay=group["weight_decay"], maximize=group["maximize"],
                      decoupled_weight_decay=group["decoupled_weight_decay"])
        if group["preconditioner"] == "adam":
            return ADAM, dict(beta1=group["momentum"], beta2=group["beta2"], eps=group["eps"], **common)
        return MOMENTUM, dict(momentum=group["momentum"], dampening=group["dampening"] or 0.0,
                              nesterov=group["nesterov"], **common)
