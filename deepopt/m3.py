r"""M3: Multi-scale Momentum Muon (Nested Learning, arXiv 2512.24695, Alg. 1).

Two momentum memories at two frequencies, both orthogonalised, sharing an Adam-style
second-moment preconditioner:

.. math::
    M_1 &\leftarrow \text{momentum write of } G \text{ (every step)}, \qquad
    S \leftarrow \beta_2 S + (1-\beta_2) G^2, \qquad \hat S = S / (1 - \beta_2^t) \\
    A &\leftarrow A + G; \quad \text{every } C \text{ steps: }
    M_2 \leftarrow \mu_s M_2 + (1-\mu_s) A / C,\; O_2 = \mathrm{NS}(M_2),\; A \leftarrow 0 \\
    U &= \mathrm{NS}(\text{readout}(M_1)) + \alpha\, O_2, \qquad
    U \leftarrow U / (\sqrt{\hat S} + \epsilon) \text{ if precondition}, \qquad
    W \leftarrow W (1 - \text{lr}\,\lambda) - \text{lr}' U

``lr'`` is Muon's shape-adjusted lr. The published Alg. 1 is partly garbled (undecayed sums
``M1 += b1 g``, ``M2 += b3 sum g``, and a sign conflict with Eq. 75); deepopt's frozen reading
uses EMAs for both memories (the chunk average for the slow one) and ``O_2 = 0`` before the
first chunk boundary. With ``precondition=True`` the update scales like ``1/|g|`` (unlike Adam
or Muon, whose updates are scale-free): sweep the lr over a wide log grid.
``slow_weight=0, precondition=False, nesterov=True`` is ``torch.optim.Muon`` bit for bit.

M3 is for hidden matrices. A group with ``algorithm="adamw"`` runs AdamW (``betas =
(momentum, beta2)``) with the group's own hyperparameters; :meth:`M3.matrix_groups` builds the
usual split from a model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import Optimizer, _to_scalar

from . import functional as Fn
from ._optimizer import DeepOptimizer, as_matrix, check_choice, check_range, new_step
from .associative_momentum import _multi_tensor_adam, _single_tensor_adam

__all__ = ["M3"]


def _m3_update_(p, g, state, *, lr, momentum, nesterov, lerp, slow_momentum, beta2, slow_weight,
                chunk, eps, precondition, ns_steps, adjust_lr):
    """Everything after the every-step writes of M1, S and A (one param)."""
    t = int(state["step"].item())
    if t % chunk == 0:
        slow = state["slow_buffer"].lerp_(state["chunk_sum"] / chunk, 1 - slow_momentum)
        state["slow_output"].copy_(Fn.newton_schulz(as_matrix(slow), steps=ns_steps).reshape(p.shape))
        state["chunk_sum"].zero_()
    u = Fn.momentum_readout(g, state["momentum_buffer"], momentum, nesterov=nesterov, lerp=lerp)
    u = Fn.newton_schulz(as_matrix(u), steps=ns_steps).reshape(p.shape)
    if slow_weight != 0:
        u = u.add(state["slow_output"], alpha=slow_weight)
    if precondition:
        u = u / ((state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps))
    p.add_(u, alpha=-Fn.adjust_lr(lr, adjust_lr, as_matrix(p).shape))


def _single_tensor_m3(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    for p, grad, state in zip(params, grads, states):
        g = Fn.preprocess_grad(grad, p, maximize=maximize)
        state["step"] += 1
        Fn.momentum_write_(state["momentum_buffer"], g, momentum, dampening, lerp=lerp)
        state["exp_avg_sq"].mul_(rule["beta2"]).addcmul_(g, g, value=1 - rule["beta2"])
        state["chunk_sum"].add_(g)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        _m3_update_(p, g, state, lr=lr, momentum=momentum, lerp=lerp, **rule)


def _multi_tensor_m3(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    beta2 = rule["beta2"]
    lists = [params, grads] + [[s[k] for s in states] for k in
                               ("momentum_buffer", "exp_avg_sq", "chunk_sum", "step")]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for (device_params, device_grads, bufs, exp_avg_sqs, chunk_sums, steps), indices in grouped.values():
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        torch._foreach_add_(steps, 1)
        Fn.momentum_write_foreach_(bufs, device_grads, momentum, dampening, lerp=lerp)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        torch._foreach_add_(chunk_sums, device_grads)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)   # as torch's foreach AdamW
        for i, (p, g) in enumerate(zip(device_params, device_grads)):
            _m3_update_(p, g, states[indices[i]], lr=lr, momentum=momentum, lerp=lerp, **rule)


class M3(DeepOptimizer):
    r"""Multi-scale Momentum Muon: a fast and a slow (every ``chunk`` steps) momentum memory,
    both orthogonalised by Newton-Schulz, with an optional second-moment preconditioner.

    .. math::
        W \leftarrow W(1 - \text{lr}\,\lambda) - \text{lr}'\,
        \frac{\mathrm{NS}(\text{readout}(M_1)) + \alpha\, \mathrm{NS}(M_2)}{\sqrt{\hat S} + \epsilon}

    Args:
        params: matrices (ndim >= 2; conv weights are seen as ``(out, in*kh*kw)``) or groups;
            use :meth:`matrix_groups` to route the rest to AdamW.
        lr: outer lr >= 0 (Muon's scale; ``adjust_lr`` rescales it per matrix shape).
        momentum: fast retention in [0, 1) (AdamW groups: ``beta1``).
        dampening: ``None`` = ``momentum`` (zero-init convention; ``M1.lerp_(G, 1 - a)``).
        weight_decay: decoupled weight decay >= 0: ``W <- W (1 - lr * wd)``.
        nesterov: Nesterov read-out of the fast memory (``G.lerp(M1, a)`` when d == a).
        slow_momentum: slow retention in [0, 1).
        beta2: second-moment retention in [0, 1).
        slow_weight: ``alpha`` >= 0, weight of the slow memory's output.
        chunk: slow update period ``C``, an int >= 1.
        eps: preconditioner epsilon >= 0.
        precondition: divide the update by ``sqrt(S_hat) + eps``.
        ns_steps: Newton-Schulz iterations, 1..99.
        adjust_lr: ``"original"`` (default), ``"match_rms_adamw"`` or ``None``.
        maximize, foreach, fused, state_dtype, nonfinite: as :class:`~deepopt.AssociativeMomentum`.

    State: ``step``, ``momentum_buffer`` (M1), ``exp_avg_sq`` (S), ``chunk_sum`` (A),
    ``slow_buffer`` (M2), ``slow_output`` (O2); AdamW groups: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, dampening=None, weight_decay=0.0,
                 nesterov=False, *, slow_momentum=0.99, beta2=0.95, slow_weight=1.0, chunk=16, eps=1e-8,
                 precondition=True, ns_steps=5, adjust_lr="original", maximize=False, foreach=None,
                 fused=None, state_dtype=None, nonfinite="propagate"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, slow_momentum=slow_momentum, beta2=beta2,
                        slow_weight=slow_weight, chunk=chunk, eps=eps, precondition=precondition,
                        ns_steps=ns_steps, adjust_lr=adjust_lr, algorithm="m3", maximize=maximize,
                        foreach=foreach, fused=fused, state_dtype=state_dtype, nonfinite=nonfinite)
        super().__init__(params, defaults)

    @classmethod
    def matrix_groups(cls, model: nn.Module, **adamw_group_options) -> list[dict]:
        """Param groups for ``M3(groups, lr=...)``: hidden matrices to M3; embeddings (params of
        ``nn.Embedding`` or named ``*embed*``), the head (the model's last ``nn.Linear`` or params
        named ``*head*``), and every param with ndim < 2 (norms, biases) to AdamW.

        ``adamw_group_options`` set the AdamW group (defaults: ``lr=3e-4, momentum=0.9,
        beta2=0.95, weight_decay=0``; ``momentum`` and ``beta2`` are AdamW's betas).
        """
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        if linears:
            excluded |= {id(p) for p in linears[-1].parameters()}
        matrices, others = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            lowered = name.lower()
            if p.ndim < 2 or id(p) in excluded or "embed" in lowered or "head" in lowered:
                others.append(p)
            else:
                matrices.append(p)
        options = dict(lr=3e-4, momentum=0.9, beta2=0.95, weight_decay=0.0)
        options.update(adamw_group_options)
        groups = []
        if matrices:
            groups.append({"params": matrices})
        if others:
            groups.append({"params": others, "algorithm": "adamw", **options})
        return groups

    def _validate_group(self, group):
        check_choice("algorithm", group["algorithm"], ("m3", "adamw"))
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        momentum, dampening = group["momentum"], group["dampening"]
        if group["algorithm"] == "adamw":
            if dampening is not None and dampening != momentum:
                raise ValueError(f"invalid dampening={dampening} in an algorithm='adamw' group: leave it None")
            return
        if dampening is not None:
            check_range("dampening", dampening, 0.0, 1.0)
        d = momentum if dampening is None else dampening
        if group["nesterov"] and d not in (0, momentum):
            raise ValueError(f"nesterov=True requires dampening = 0 or dampening = momentum (got {dampening})")
        check_range("slow_momentum", group["slow_momentum"], 0.0, 1.0, high_open=True)
        check_range("slow_weight", group["slow_weight"], 0.0)
        if not isinstance(group["chunk"], int) or group["chunk"] < 1:
            raise ValueError(f"invalid chunk={group['chunk']!r}: must be an int >= 1")
        if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
            raise ValueError(f"invalid ns_steps={group['ns_steps']!r}: must be an int in [1, 99]")
        check_choice("adjust_lr", group["adjust_lr"], (None, "original", "match_rms_adamw"))

    def _check_params(self, group):
        if group["algorithm"] != "m3":
            return
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                name = f"'{names[i]}'" if names else f"#{i}"
                raise ValueError(
                    f"M3 param {name} has shape {tuple(p.shape)} (ndim < 2): M3 is for matrices. "
                    "Route embeddings, heads, norms and biases to AdamW with "
                    "deepopt.M3(deepopt.M3.matrix_groups(model), lr=...) or a group with algorithm='adamw'")

    def _needs_whole_matrices(self, group):
        return group["algorithm"] == "m3"

    def _state_spec(self, group, p):
        if group["algorithm"] == "adamw":
            return {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}
        return {"step": (), "momentum_buffer": p.shape, "exp_avg_sq": p.shape, "chunk_sum": p.shape,
                "slow_buffer": p.shape, "slow_output": p.shape}

    def _init_state(self, group, p, state):
        state["step"] = new_step()
        for key in self._state_spec(group, p):
            if key != "step":
                state[key] = self._zeros(group, p).contiguous()

    def _update(self, group, params, grads, states, foreach, *, fused=False, amp=None):
        momentum, lr = group["momentum"], group["lr"]
        if group["algorithm"] == "adamw":
            fn = _multi_tensor_adam if foreach else _single_tensor_adam
            if fused:   # Triton multi-tensor Adam kernel
                from functools import partial

                from . import _triton
                from ._optimizer import resolve_state_dtype
                fn = partial(_triton.fused_adam_, amp=amp,
                             state_dtype_of=lambda p: resolve_state_dtype(group["state_dtype"], p))
            fn(params, grads, states, lr=lr, beta1=momentum, beta2=group["beta2"], eps=group["eps"],
               weight_decay=group["weight_decay"], maximize=group["maximize"], decoupled_weight_decay=True)
            return
        fn = _multi_tensor_m3 if foreach else _single_tensor_m3
        if fused:   # Triton multi-tensor kernels around the Newton-Schulz torch ops
            from functools import partial

            from . import _triton
            from ._optimizer import resolve_state_dtype
            fn = partial(_triton.fused_m3_, amp=amp,
                         state_dtype_of=lambda p: resolve_state_dtype(group["state_dtype"], p))
        dampening = momentum if group["dampening"] is None else group["dampening"]
        fn(params, grads, states, lr=lr, momentum=momentum, dampening=dampening,
           weight_decay=group["weight_decay"], maximize=group["maximize"], nesterov=group["nesterov"],
           slow_momentum=group["slow_momentum"], beta2=group["beta2"], slow_weight=group["slow_weight"],
           chunk=group["chunk"], eps=group["eps"], precondition=group["precondition"],
           ns_steps=group["ns_steps"], adjust_lr=group["adjust_lr"])
