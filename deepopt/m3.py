r"""M3: Multi-scale Momentum Muon (Nested Learning, arXiv 2512.24695, Alg. 1).

Two momentum memories at two frequencies, both orthogonalised, sharing an Adam-style
second-moment preconditioner:

.. math::
    M_1 &\leftarrow \text{momentum write of } G \text{ (every step)}, \qquad
    S \leftarrow \beta_2 S + (1-\beta_2) G^2, \qquad \hat S = S / (1 - \beta_2^t) \\
    A &\leftarrow A + G; \quad \text{every } C \text{ steps: }
    M_2 \leftarrow \mu_s M_2 + (1-\mu_s) A / C,\; O_2 = \mathrm{NS}(M_2),\; A \leftarrow 0 \\
    O_1 &= \mathrm{NS}(\text{readout}(M_1)), \qquad U = O_1 + \alpha\, O_2, \qquad
    V = U / (\hat d + \epsilon) \text{ if precondition, else } U, \qquad
    \hat d = \frac{\sqrt{S}}{\mathrm{rms}(\sqrt{S})} \\
    W &\leftarrow W (1 - \text{lr}\,\lambda) - \text{lr}'\, V\, \frac{\mathrm{rms}(O_1)}{\mathrm{rms}(V)}

(:math:`\hat S` of Alg. 1 differs from ``S`` by a scalar, which the relative ``d`` cancels.) ``lr'`` is Muon's shape-adjusted lr. The published Alg. 1 is partly garbled (undecayed sums
``M1 += b1 g``, ``M2 += b3 sum g``, and a sign conflict with Eq. 75); deepopt's frozen reading
uses EMAs for both memories (the chunk average for the slow one) and ``O_2 = 0`` before the
first chunk boundary. The update has Muon's RMS (deepopt's choice): Alg. 1's
``U / (sqrt(S_hat) + eps)`` scales like ``1/|g|``, needed lrs of 1e-6..1e-4 and amplified last-bit
differences (DDP, compile) a million-fold. Here ``sqrt(S)`` is taken relative to its RMS
(``functional.scale_free_precondition``), and the result gets ``O_1``'s RMS: the slow memory and
the preconditioner set the update's direction, the lr sets its size as in Muon. (Without the
last rescale, the slow memory's ``+ alpha O_2`` doubled the step where the two memories agree:
the best lrs spread over 1.5 decades across the benchmark tasks, 1e-3 to 3.16e-2.)
``slow_weight=0, precondition=False, nesterov=True`` is ``torch.optim.Muon`` bit for bit.

M3 is for hidden matrices. A group with ``algorithm="adamw"`` runs AdamW (``betas =
(momentum, beta2)``) with the group's own hyperparameters; :meth:`M3.matrix_groups` builds the
usual split from a model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import Optimizer, _to_scalar

from . import _triton as T
from . import functional as Fn
from . import newton_schulz as NS
from ._optimizer import DeepOptimizer, Rule
from ._state import new_step
from ._validation import check_choice, check_range
from .functional import as_matrix

__all__ = ["M3"]


def _slow_memory_write_(state, *, chunk, slow_momentum):
    """At a chunk boundary: ``M2 <- lerp(M2, A / C, 1 - mu_s)``, ``A = 0``; returns ``M2`` to be
    orthogonalised into ``O2`` (None between boundaries)."""
    t = int(state["step"].item())   # a CPU counter: no device sync
    if t % chunk:
        return None
    slow = state["slow_buffer"].lerp_(state["chunk_sum"] / chunk, 1 - slow_momentum)
    state["chunk_sum"].zero_()
    return slow


def _m3_direction(x, state, *, slow_weight, precondition, eps, sums=None):
    """From ``X = NS(readout(M1))`` to M3's update: add ``alpha O2``, precondition, and give the
    result X's RMS (Muon's), so the slow memory and the preconditioner set the direction and the
    lr keeps Muon's meaning. (A fixed RMS: where ``O1`` and ``alpha O2`` nearly cancel, what is
    left is scaled up to Muon's step.)"""
    if slow_weight == 0 and not precondition:
        return x
    u = x.add(state["slow_output"], alpha=slow_weight) if slow_weight != 0 else x
    if precondition:
        return Fn.scale_free_precondition(as_matrix(u), as_matrix(state["exp_avg_sq"]), eps,
                                          like=as_matrix(x), sums=sums).reshape(x.shape)
    target, now = Fn.rms(as_matrix(x), sums), Fn.rms(as_matrix(u), sums)
    return u * (target / now.clamp_min(torch.finfo(now.dtype).tiny))


def _m3_updates(params, grads, states, *, momentum, nesterov, lerp, slow_momentum, beta2, slow_weight,
                chunk, eps, precondition, adjust_lr, ns):
    """Everything after the every-step writes of M1, S and A: the slow memory at chunk
    boundaries, both Newton-Schulz read-outs (in one batched call) and the direction. Returns
    each param's update and its lr scale."""
    fast, slow, slow_of = [], [], []
    for i, (g, state) in enumerate(zip(grads, states)):
        fast.append(Fn.momentum_readout(g, state["momentum_buffer"], momentum, nesterov=nesterov, lerp=lerp))
        boundary = _slow_memory_write_(state, chunk=chunk, slow_momentum=slow_momentum)
        if boundary is not None:
            slow.append(boundary)
            slow_of.append(i)
    shards = NS.row_shards_of(ns)   # (FSDP2: params are row shards)
    shapes = [as_matrix(p).shape for p in params] if shards is None else shards.shapes
    outputs = NS.orthogonalise_updates(fast + slow, shapes=shapes + [shapes[i] for i in slow_of], **ns)
    for i, slow_output in zip(slow_of, outputs[len(fast):]):
        states[i]["slow_output"].copy_(slow_output)
    sums = None if shards is None else shards.sums
    updates = [_m3_direction(x, state, slow_weight=slow_weight, precondition=precondition, eps=eps, sums=sums)
               for x, state in zip(outputs[:len(fast)], states)]
    return updates, [Fn.adjust_lr(1.0, adjust_lr, shape) for shape in shapes]


def _single_tensor_m3(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize,
                      state_dtype=None, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    ns = NS.split_rule_options(rule)
    gs = []
    for p, grad, state in zip(params, grads, states):
        g = Fn.decay_and_preprocess(p, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=True)
        state["step"] += 1
        Fn.momentum_write_(state["momentum_buffer"], g, momentum, dampening, lerp=lerp)
        Fn.second_moment_write_(state["exp_avg_sq"], g, rule["beta2"])
        state["chunk_sum"].add_(g)
        gs.append(g)
    updates, scales = _m3_updates(params, gs, states, momentum=momentum, lerp=lerp, ns=ns, **rule)
    for p, u, scale in zip(params, updates, scales):
        p.add_(u, alpha=-lr * scale)


def _multi_tensor_m3(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize,
                     state_dtype=None, **rule):
    lr = _to_scalar(lr)
    lerp = dampening == momentum
    ns = NS.split_rule_options(rule)
    beta2 = rule["beta2"]
    lists = [params, grads] + [[s[k] for s in states] for k in
                               ("momentum_buffer", "exp_avg_sq", "chunk_sum", "step")]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for (device_params, device_grads, bufs, exp_avg_sqs, chunk_sums, steps), indices in grouped.values():
        device_grads = Fn.decay_and_preprocess_foreach(device_params, device_grads, lr=lr, weight_decay=weight_decay,
                                                       maximize=maximize, decoupled_weight_decay=True)
        torch._foreach_add_(steps, 1)
        Fn.momentum_write_foreach_(bufs, device_grads, momentum, dampening, lerp=lerp)
        Fn.second_moment_write_foreach_(exp_avg_sqs, device_grads, beta2)
        torch._foreach_add_(chunk_sums, device_grads)
        updates, scales = _m3_updates(device_params, device_grads, [states[i] for i in indices], momentum=momentum,
                                      lerp=lerp, ns=ns, **rule)
        for p, u, scale in zip(device_params, updates, scales):
            p.add_(u, alpha=-lr * scale)


def _fused_m3(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize, nesterov,
              slow_momentum, beta2, slow_weight, chunk, eps, precondition, adjust_lr, state_dtype, amp=None, **ns):
    """One launch for the every-step writes (M1, S, A, decay); the chunk-boundary update of the
    slow memory and both Newton-Schulz calls as torch ops; one apply launch for the update."""
    if T.skip_on_host(amp):
        return
    lerp = dampening == momentum
    write_rate = 1 - momentum if lerp else 1 - dampening
    scale = amp[0] if amp is not None else None
    for (device, p_dtype, s_dtype), idx in T.grouped(params, state_dtype).items():
        ps = [params[i] for i in idx]
        gs = [grads[i] / scale.to(device) if scale is not None else grads[i] for i in idx]
        gs = T.dense([-g if maximize else g for g in gs])
        sts = [states[i] for i in idx]
        torch._foreach_add_([s["step"] for s in sts], 1)   # host counters: the chunk schedule is decided on the host
        lr_f, lr_t, lr_tensor = T.lr_args(lr, device)
        fix = T.Contiguous()
        fps = [fix(p) for p in ps]
        T.launch("m3_write", [fps, gs, [s["momentum_buffer"] for s in sts], [s["exp_avg_sq"] for s in sts],
                              [s["chunk_sum"] for s in sts]],
                 (lr_f, lr_t if lr_tensor else T.dummy(device), T.dummy(device), T.dummy(device), float(momentum),
                  float(write_rate), float(beta2), float(weight_decay), float(1 - lr_f * weight_decay)),
                 dict(P_DT=T.tl_dtype(p_dtype), G_DT=T.tl_dtype(gs[0].dtype), S_DT=T.tl_dtype(s_dtype), LERP=lerp,
                      W_SMALL=abs(write_rate) < 0.5, HAS_WD=weight_decay != 0, LR_TENSOR=lr_tensor,
                      HAS_SCALE=False, HAS_INF=False))
        fix.done()
        # (the slow memory and the preconditioner need reductions per matrix: torch ops, as the for-loop path)
        xs, scales = _m3_updates(ps, gs, sts, momentum=momentum, nesterov=nesterov, lerp=lerp,
                                 slow_momentum=slow_momentum, beta2=beta2, slow_weight=slow_weight, chunk=chunk,
                                 eps=eps, precondition=precondition, adjust_lr=adjust_lr, ns=ns)
        # (xs share one dtype: Newton-Schulz's, or at least fp32 once the slow memory or S enter)
        T.apply_update_(ps, xs, lr=lr, lr_scales=scales, weight_decay=0.0)


M3_RULE = Rule(_single_tensor_m3, _multi_tensor_m3, _fused_m3)


class M3(DeepOptimizer):
    r"""Multi-scale Momentum Muon: a fast and a slow (every ``chunk`` steps) momentum memory,
    both orthogonalised by Newton-Schulz, with an optional second-moment preconditioner.

    .. math::
        W \leftarrow W(1 - \text{lr}\,\lambda) - \text{lr}'\,
        R\Big(P\big(\mathrm{NS}(\text{readout}(M_1)) + \alpha\, \mathrm{NS}(M_2)\big)\Big)

    with ``P`` the scale-free preconditioner (module docstring) or the identity and ``R`` the
    rescale to ``NS(readout(M1))``'s RMS (Muon's step size).

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
        eps: preconditioner floor >= 0, relative to the typical ``sqrt(S)``: no coordinate gets
            more than ``1/eps`` times the typical weight.
        precondition: reweight the update by ``1 / (sqrt(S) / rms(sqrt(S)) + eps)``. With it or
            with ``slow_weight > 0``, the update is rescaled to ``rms(NS(readout(M1)))``.
        ns_steps: Newton-Schulz iterations, 1..99.
        ns_dtype: ``"auto"`` (bf16 where matmuls run natively in it, fp32 on other CPUs), ``"bfloat16"`` (torch Muon's, needed
            for its exact reduction) or ``"float32"``: the dtype Newton-Schulz runs in.
        ns_coefficients, ns_form, process_group: as :class:`~deepopt.DeepMomentum` (Polar
            Express coefficients, the Gram form, Newton-Schulz spread over DDP ranks).
        adjust_lr: ``"original"`` (default), ``"match_rms_adamw"`` or ``None``.
        maximize, foreach, fused, state_dtype, nonfinite: as :class:`~deepopt.AssociativeMomentum`.

    State: ``step``, ``momentum_buffer`` (M1), ``exp_avg_sq`` (S), ``chunk_sum`` (A),
    ``slow_buffer`` (M2), ``slow_output`` (O2); AdamW groups: ``step``, ``exp_avg``, ``exp_avg_sq``.
    """

    _algorithm = "m3"

    _algorithm_options = ("precondition",)

    def __init__(self, params, lr=0.01, momentum=0.95, dampening=None, weight_decay=0.0,
                 nesterov=False, *, slow_momentum=0.99, beta2=0.95, slow_weight=1.0, chunk=16, eps=0.01,
                 precondition=True, ns_steps=5, ns_dtype="auto", ns_coefficients="muon", ns_form="direct",
                 adjust_lr="original", maximize=False, foreach=None, fused=None, state_dtype=None,
                 nonfinite="propagate", process_group=None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, slow_momentum=slow_momentum, beta2=beta2,
                        slow_weight=slow_weight, chunk=chunk, eps=eps, precondition=precondition,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, ns_coefficients=ns_coefficients, ns_form=ns_form,
                        adjust_lr=adjust_lr, algorithm="m3", maximize=maximize,
                        foreach=foreach, fused=fused, state_dtype=state_dtype, nonfinite=nonfinite)
        self._ns_group = process_group
        super().__init__(params, defaults)

    @classmethod
    def matrix_groups(cls, model: nn.Module, **adamw_group_options) -> list[dict]:
        """Param groups for ``M3(groups, lr=...)``: hidden matrices to M3; embeddings (params of
        ``nn.Embedding`` or named ``*embed*``), the head (the model's last ``nn.Linear`` or params
        named ``*head*``), and every param with ndim < 2 (norms, biases) to AdamW.

        ``adamw_group_options`` set the AdamW group (defaults: ``lr=3e-4, momentum=0.9,
        beta2=0.95, weight_decay=0``; ``momentum`` and ``beta2`` are AdamW's betas).
        """
        from .create import split_params   # (the one routing rule; create imports this module)
        matrices, others = ([p for _, p in named] for named in split_params(model))
        options = dict(lr=3e-4, momentum=0.9, beta2=0.95, weight_decay=0.0)
        options.update(adamw_group_options)
        groups = []
        if matrices:
            groups.append({"params": matrices})
        if others:
            groups.append({"params": others, "algorithm": "adamw", **options})
        return groups

    def _validate_group(self, group):
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("beta2", group["beta2"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        momentum, dampening = group["momentum"], group["dampening"]
        if dampening is not None:
            check_range("dampening", dampening, 0.0, 1.0)
        d = momentum if dampening is None else dampening
        if group["nesterov"] and d not in (0, momentum):
            raise ValueError(f"nesterov=True requires dampening = 0 or dampening = momentum (got {dampening})")
        check_range("slow_momentum", group["slow_momentum"], 0.0, 1.0, high_open=True)
        check_range("slow_weight", group["slow_weight"], 0.0)
        if not isinstance(group["chunk"], int) or group["chunk"] < 1:
            raise ValueError(f"invalid chunk={group['chunk']!r}: must be an int >= 1")
        NS.check_options(group)
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
        return {"step": (), "momentum_buffer": p.shape, "exp_avg_sq": p.shape, "chunk_sum": p.shape,
                "slow_buffer": p.shape, "slow_output": p.shape}

    def _init_state(self, group, p, state):
        state["step"] = new_step()
        for key in self._state_spec(group, p):
            if key != "step":
                state[key] = self._zeros(group, p).contiguous()

    def _rule(self, group):
        keys = ("lr", "momentum", "weight_decay", "maximize", "nesterov", "slow_momentum", "beta2", "slow_weight",
                "chunk", "eps", "precondition", "ns_steps", "ns_dtype", "ns_coefficients", "ns_form", "adjust_lr")
        dampening = group["momentum"] if group["dampening"] is None else group["dampening"]
        return M3_RULE, dict({k: group[k] for k in keys}, dampening=dampening, ns_group=self._ns_group)
