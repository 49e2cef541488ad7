r"""DeepMomentum: Deep Momentum Gradient Descent (DMGD), momentum with an MLP memory.

Nested Learning (NeurIPS 2025 Eq. 23-24; arXiv 2512.24695 Eq. 50, 52) replaces momentum's
matrix-valued memory with a deep one, trained by its own inner objective. deepopt's definition
(the paper leaves the MLP, keys and inner rates open) is:

.. math::
    m(K) = M + s\, f(K), \qquad f(K) = \mathrm{silu}(K A^\top) B^\top, \qquad
    K = \text{rows of } G \text{ over their L2 norm}, \qquad s = \text{rms row norm of } G

* ``M`` (param shape) takes the momentum write ``M <- a M + (1 - d) G`` (zero-initialised);
* the MLP ``(A: h x d, B: d x h)`` takes one proximal (implicit) step on its own row-mean
  inner objective plus the ridge term ``memory_decay/2 (||A||^2 + ||B||^2)`` at rate
  ``memory_lr``: exact for ``B`` (the objective is quadratic in ``B``: an ``h x h`` solve),
  with the curvature bounded by ``tr(H^T H)/rows`` for ``A`` (:func:`deepopt.functional.mlp_memory_step_`);
  ``"l2"`` (default): ``1/2 mean_i ||f(k_i) - g_i / s||^2``, the delta rule: the MLP learns to
  recall the gradient from its direction; ``"dot"``: ``-mean_i <f(k_i), g_i / s>`` (momentum's
  objective, unbounded below). The MLP works in units of ``s``, so ``A`` and ``B`` are
  dimensionless and the inner step means the same at any gradient scale; the proximal step
  never grows the l2 residual, at any ``memory_lr``.
* the parameter reads the memory after its write: ``W <- W - lr * sigma(readout(M) + s f(K))``
  with ``sigma`` the identity or Newton-Schulz (``output="newton_schulz"``: Eq. 52, which with a
  linear memory is Muon).

``A ~ N(0, memory_init^2)`` (default 1: unit keys give pre-activations of std 1, in silu's
nonlinear range; ``None`` gives ``N(0, 1/d)``) from a generator seeded by ``(seed, index of the
param)`` (never the global RNG: DDP ranks agree and the user's RNG stream is untouched), ``B = 0``
so ``f = 0`` at the start. Params with ndim < 2 have no rows to key: they use the linear memory
only (momentum). ``linear_memory=False`` is the paper's DMGD form: the update reads the MLP
alone, ``s f(K)``. ``eps`` is relative to ``s`` (keys ``g_i / (||g_i|| + eps s)``), so the rule
is the same at every gradient scale.

How much the MLP carries (``benchmarks/deep_memory.py``, docs/optimizers.md): at these defaults
its part of the update, ``||s f(K)|| / ||M||``, is 0.458 after 100 steps on the benchmark MLP
(mean over 10 seeds and the three matrices; 0.404 on the 128 x 40 input layer, whose ceiling
``||G|| / ||M||`` is about 0.5 with momentum 0.9), and its read-out is close to the current
gradient: the MLP recalls ``G`` through a learned rank-``h`` nonlinear map.

Exact reductions (any objective: with ``memory_lr=0``, ``B`` stays 0): ``memory_lr=0, output="identity", dampening=0`` is
``torch.optim.SGD``; ``memory_lr=0, output="newton_schulz", dampening=momentum, nesterov,
decoupled_weight_decay=True, adjust_lr="original"`` is ``torch.optim.Muon``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import Optimizer, _to_scalar

from . import _triton as T
from . import functional as Fn
from . import newton_schulz as NS
from ._optimizer import DeepOptimizer, Rule
from ._state import new_step, resolve_state_dtype
from ._validation import check_choice, check_range
from .associative_momentum import _fused_momentum
from .functional import as_matrix

__all__ = ["DeepMomentum"]


def _readout_of(p, g, u, state, *, lr, objective, output, key_norm, eps, memory_lr, memory_decay,
                linear_memory, adjust_lr, shards=None, index=0):
    """From the linear read-out ``u`` to the memory's read-out before Newton-Schulz and the
    update's lr (one param; the MLP memory takes its step here). ``shards``: ``p`` is the
    ``index``-th of a group's row shards (:class:`deepopt._distributed.RowShards`)."""
    if p.ndim < 2:
        return u, lr
    mlp_in, mlp_out = state["mlp_in"], state["mlp_out"]
    g_matrix = as_matrix(g).to(mlp_in.dtype)
    shape = as_matrix(p).shape if shards is None else shards.shapes[index]
    sums = None if shards is None else shards.sums
    # the MLP works in units of the gradient's rms row norm s: targets G/s, read-out s f(K);
    # eps is relative to s, so the rule is the same at every gradient scale
    if sums is None:
        scale = g_matrix.square().sum(-1).mean().sqrt()
    else:
        scale = (sums(g_matrix.square().sum()) / shape[0]).sqrt()
    tiny = torch.finfo(scale.dtype).tiny   # (a zero gradient gives zero keys, not 0/0)
    keys = Fn.row_keys(g_matrix, key_norm=key_norm, eps=eps * scale + tiny)
    unit = 1 / scale.clamp_min(tiny)
    Fn.mlp_memory_step_(mlp_in, mlp_out, keys, g_matrix * unit, objective=objective, memory_lr=memory_lr,
                        memory_decay=memory_decay, sums=sums, rows=shape[0])
    deep = Fn.mlp_memory(keys, mlp_in, mlp_out).view(u.shape)
    u = u.add(deep * scale) if linear_memory else deep.mul(scale).to(u.dtype)   # (a tensor alpha would sync)
    return u, Fn.adjust_lr(lr, adjust_lr, shape)


def _outputs(params, updates, output, ns, shards=None) -> list:
    """The updates after the output map: Newton-Schulz of every matrix's in one call."""
    if output != "newton_schulz":
        return updates
    matrices = [i for i, p in enumerate(params) if p.ndim >= 2]
    updates = list(updates)
    shapes = None if shards is None else [shards.shapes[i] for i in matrices]
    for i, x in zip(matrices, NS.orthogonalise_updates([updates[i] for i in matrices], shapes=shapes, **ns)):
        updates[i] = x
    return updates


def _single_tensor_deep_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay,
                                 nesterov, maximize, decoupled_weight_decay, state_dtype=None, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    ns = NS.split_rule_options(rule)
    shards = NS.row_shards_of(ns)
    updates, lrs = [], []
    for i, (p, grad, state) in enumerate(zip(params, grads, states)):
        g = Fn.decay_and_preprocess(p, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=decoupled_weight_decay)
        state["step"] += 1
        buf = state["momentum_buffer"]
        Fn.momentum_write_(buf, g, momentum, dampening, lerp=lerp)
        u = Fn.momentum_readout(g, buf, momentum, nesterov=nesterov, lerp=lerp)
        u, step_lr = _readout_of(p, g, u, state, lr=lr, shards=shards, index=i, **rule)
        updates.append(u)
        lrs.append(step_lr)
    for p, u, step_lr in zip(params, _outputs(params, updates, rule["output"], ns, shards), lrs):
        p.add_(u, alpha=-step_lr)


def _multi_tensor_deep_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay,
                                nesterov, maximize, decoupled_weight_decay, state_dtype=None, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    ns = NS.split_rule_options(rule)
    lists = [params, grads, [s["momentum_buffer"] for s in states], [s["step"] for s in states]]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for (device_params, device_grads, bufs, steps), indices in grouped.values():
        device_grads = Fn.decay_and_preprocess_foreach(
            device_params, device_grads, lr=lr, weight_decay=weight_decay, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay)
        torch._foreach_add_(steps, 1)
        Fn.momentum_write_foreach_(bufs, device_grads, momentum, dampening, lerp=lerp)
        updates = Fn.momentum_readout_foreach(device_grads, bufs, momentum, nesterov=nesterov, lerp=lerp)
        if all(p.ndim < 2 for p in device_params) and rule["adjust_lr"] is None:
            torch._foreach_add_(device_params, updates, alpha=-lr)
            continue
        updates, lrs = list(updates), []
        for i, (p, g, u) in enumerate(zip(device_params, device_grads, updates)):
            updates[i], step_lr = _readout_of(p, g, u, states[indices[i]], lr=lr, **rule)
            lrs.append(step_lr)
        for p, u, step_lr in zip(device_params, _outputs(device_params, updates, rule["output"], ns), lrs):
            p.add_(u, alpha=-step_lr)


def _fused_deep_momentum(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov,
                         maximize, decoupled_weight_decay, state_dtype, amp=None, **rule):
    """One momentum-kernel launch writes every memory (and finishes the ndim < 2 params); the
    MLP memory and Newton-Schulz run as torch ops per matrix; one apply launch updates them."""
    lerp = dampening == momentum
    has_matrices = any(p.ndim >= 2 for p in params)
    if has_matrices and T.skip_on_host(amp):
        return
    for _, idx in T.grouped(params, state_dtype).items():
        T.count_steps(T.device_steps(states, idx, params[idx[0]].device), amp)
    if not has_matrices:
        _fused_momentum(params, grads, states, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, state_dtype=state_dtype,
                        amp=amp, zero_init=True)
        return
    # the matrices need G itself (keys, the MLP's targets): unscale and pre-process it once
    scale = amp[0] if amp is not None else None
    gs = [g / scale.to(g.device) if scale is not None else g for g in grads]
    gs = [Fn.preprocess_grad(g, p, weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                             maximize=maximize) for g, p in zip(gs, params)]
    _fused_momentum(params, gs, states, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay if decoupled_weight_decay else 0.0, nesterov=nesterov,
                    maximize=False, decoupled_weight_decay=True, state_dtype=state_dtype,
                    zero_init=True, finish_matrices=False)
    ns = NS.split_rule_options(rule)
    matrices, updates, scales = [], [], []
    for p, g, state in zip(params, gs, states):
        if p.ndim < 2:
            continue
        u = Fn.momentum_readout(g, state["momentum_buffer"], momentum, nesterov=nesterov, lerp=lerp)
        u, step_lr = _readout_of(p, g, u, state, lr=1.0, **rule)
        matrices.append(p)
        updates.append(u)
        scales.append(float(step_lr))
    by_group: dict = {}
    for p, u, lr_scale in zip(matrices, _outputs(matrices, updates, rule["output"], ns), scales):
        entry = by_group.setdefault((p.device, p.dtype, u.dtype), ([], [], []))
        entry[0].append(p)
        entry[1].append(u)
        entry[2].append(lr_scale)
    for ps, us, scales in by_group.values():
        T.apply_update_(ps, us, lr=lr, lr_scales=scales, weight_decay=weight_decay if decoupled_weight_decay else 0.0)


DEEP_MOMENTUM = Rule(_single_tensor_deep_momentum, _multi_tensor_deep_momentum, _fused_deep_momentum)


class DeepMomentum(DeepOptimizer):
    r"""Deep Momentum Gradient Descent: momentum whose memory is linear + a trained 2-layer MLP.

    .. math::
        M &\leftarrow a M + (1-d) G, \qquad K = \mathrm{rownorm}(G), \qquad
        f(K) = \mathrm{silu}(K A^\top) B^\top \\
        (A, B) &\leftarrow \operatorname{prox}_{\eta_m}\Big(\tilde L(f; K, G/\rho)
            + \tfrac{\lambda_m}{2}\|(A, B)\|^2\Big), \qquad \rho = \text{rms row norm of } G \\
        W &\leftarrow W - \text{lr}\; \sigma\big(\text{readout}(M) + \rho f(K)\big)

    See the module docstring for the definition and the exact reductions to SGD and Muon.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, decoupled_weight_decay,
        maximize, foreach, fused, state_dtype, nonfinite: as :class:`~deepopt.AssociativeMomentum`,
            with the zero-init convention: ``M`` starts at 0; ``dampening == momentum`` writes
            ``M.lerp_(G, 1 - a)``; Nesterov needs ``dampening`` 0 or ``momentum``.
        hidden: MLP width ``h`` >= 1.
        memory_lr: inner rate ``eta_m`` >= 0 of the proximal step (0 freezes the MLP; any value
            is stable for the l2 objective, and the share saturates from about 8: 32 is the
            default). The dot objective is unbounded below: keep it small (~0.01) there.
        memory_decay: the inner ridge weight ``lambda_m`` >= 0 (default 0.01; 0.1 already pulls
            ``A`` towards 0 and switches the MLP off on the benchmark MLP).
        memory_init: std of ``A``'s entries, > 0 (default 1), or ``None`` for ``1/sqrt(d)``.
        linear_memory: ``True``: the update reads ``M + s f(K)``; ``False``: ``s f(K)`` alone
            (DMGD; params with ndim < 2 keep the momentum read-out).
        objective: ``"l2"`` (the MLP regresses ``G``) or ``"dot"`` (momentum's) inner objective.
        output: ``"identity"`` or ``"newton_schulz"`` (params with ndim >= 2).
        key_norm: ``"row"`` (each row of G over its norm) or ``"tensor"`` (over ``||G||_F``).
        eps: key epsilon > 0, relative to the gradient's rms row norm.
        adjust_lr: ``None``, ``"original"`` (``lr * sqrt(max(1, rows/cols))``) or
            ``"match_rms_adamw"`` (``lr * 0.2 * sqrt(max(rows, cols))``), matrix params only.
        ns_steps: Newton-Schulz iterations, 1..99.
        ns_coefficients: ``"muon"`` (torch Muon's quintic) or ``"polar_express"`` (per-step
            minimax quintics, closer to orthogonal in as many steps); :mod:`deepopt.newton_schulz`.
        ns_form: ``"direct"`` (torch Muon's iteration) or ``"gram"`` (on the small Gram matrix:
            the same result to rounding, 0.7x the flops on matrices with an aspect ratio of 3-4).
        process_group: the data-parallel (DDP) ranks, which hold the same params and grads: each
            matrix's Newton-Schulz runs on one rank (balanced by flops) and the results are
            broadcast. ``None`` (default): each rank runs all. DTensor (FSDP2) params always
            spread the work over their mesh.
        ns_dtype: the dtype Newton-Schulz runs in: ``"auto"`` (bf16 where matmuls run natively in it;
            fp32 on other CPUs, where bf16 is emulated and slow), ``"bfloat16"`` (torch Muon's, needed for its exact reduction)
            or ``"float32"``.
        seed: seed of the MLP initialisation (combined with the param's index).

    State: ``step``, ``momentum_buffer`` and, for ndim >= 2, ``mlp_in`` (A) and ``mlp_out`` (B).
    """

    _algorithm_options = ("objective", "output", "linear_memory", "key_norm")

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, hidden=16, memory_lr=32.0, memory_decay=0.01, memory_init=1.0,
                 linear_memory=True, objective="l2", output="identity", key_norm="row", eps=1e-8,
                 decoupled_weight_decay=False,
                 adjust_lr=None, ns_steps=5, ns_dtype="auto", ns_coefficients="muon", ns_form="direct", seed=0,
                 maximize=False, foreach=None, fused=None,
                 state_dtype=None, nonfinite="propagate", process_group=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, hidden=hidden, memory_lr=memory_lr, memory_decay=memory_decay,
                        memory_init=memory_init, linear_memory=linear_memory, objective=objective, output=output, key_norm=key_norm, eps=eps,
                        decoupled_weight_decay=decoupled_weight_decay, adjust_lr=adjust_lr,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_coefficients=ns_coefficients, ns_form=ns_form,
                        seed=seed, maximize=maximize, foreach=foreach, fused=fused,
                        state_dtype=state_dtype, nonfinite=nonfinite)
        self._index_of: dict[int, int] = {}
        self._ns_group = process_group
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        if group["nesterov"] and group["dampening"] not in (0, group["momentum"]):
            raise ValueError(f"nesterov=True requires dampening = 0 or dampening = momentum "
                             f"(got dampening={group['dampening']}, momentum={group['momentum']})")
        if not isinstance(group["hidden"], int) or group["hidden"] < 1:
            raise ValueError(f"invalid hidden={group['hidden']!r}: must be an int >= 1")
        check_range("memory_lr", group["memory_lr"], 0.0, math.inf, high_open=True)
        check_range("memory_decay", group["memory_decay"], 0.0)
        if group["memory_init"] is not None:
            check_range("memory_init", group["memory_init"], 0.0, low_open=True)
        check_choice("linear_memory", group["linear_memory"], (True, False))
        check_choice("objective", group["objective"], ("dot", "l2"))
        check_choice("output", group["output"], ("identity", "newton_schulz"))
        check_choice("key_norm", group["key_norm"], ("row", "tensor"))
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_choice("adjust_lr", group["adjust_lr"], (None, "original", "match_rms_adamw"))
        NS.check_options(group)
        if not isinstance(group["seed"], int):
            raise ValueError(f"invalid seed={group['seed']!r}: must be an int")

    def _needs_whole_matrices(self, group):
        return True

    def _state_spec(self, group, p):
        spec = {"step": (), "momentum_buffer": p.shape}
        if p.ndim >= 2:
            cols = as_matrix(p).shape[1]
            spec.update(mlp_in=(group["hidden"], cols), mlp_out=(cols, group["hidden"]))
        return spec

    def _param_index(self, p) -> int:
        if id(p) not in self._index_of:
            flat = [q for group in self.param_groups for q in group["params"]]
            self._index_of = {id(q): i for i, q in enumerate(flat)}
        return self._index_of[id(p)]

    def _init_state(self, group, p, state):
        state["step"] = new_step()
        state["momentum_buffer"] = self._zeros(group, p).contiguous()
        if p.ndim >= 2:
            cols = as_matrix(p).shape[1]
            dtype = resolve_state_dtype(group["state_dtype"], p)
            # a fixed mix of (seed, param index): the same on every rank, Python and platform
            seed = (group["seed"] * 0x9E3779B97F4A7C15 + self._param_index(p)) % 2**63
            generator = torch.Generator().manual_seed(seed)
            # entries ~ N(0, memory_init^2): pre-activations of unit-norm keys have std memory_init
            # (None: 1/sqrt(cols), whose pre-activations sit in silu's nearly linear range)
            std = (cols ** -0.5 if cols else 1.0) if group["memory_init"] is None else group["memory_init"]
            mlp_in = torch.randn(group["hidden"], cols, generator=generator, dtype=torch.float32) * std
            state["mlp_in"] = mlp_in.to(device=p.device, dtype=dtype)
            state["mlp_out"] = torch.zeros(cols, group["hidden"], device=p.device, dtype=dtype)

    def _rule(self, group):
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "decoupled_weight_decay",
                "objective", "output", "key_norm", "eps", "memory_lr", "memory_decay", "linear_memory", "adjust_lr",
                "ns_steps", "ns_dtype", "ns_coefficients", "ns_form")
        return DEEP_MOMENTUM, dict({k: group[k] for k in keys}, ns_group=self._ns_group)
