r"""DeltaMomentum: the momentum memory with an L2-regression (delta-rule) objective.

Momentum's dot-product objective only ever adds; its memory forgets at one fixed rate ``a``.
The L2 objective ``||M K^T - V||^2`` with the normalised gradient as key makes forgetting
gradient-dependent: before writing, the memory first erases what it stored along the current
gradient's directions (Nested Learning, arXiv 2512.24695 Eq. 49, right-multiplied form):

.. math::
    \hat G = G / (\lVert G \rVert_F + \epsilon), \qquad
    M \leftarrow M (a I - \delta\, \hat G^\top \hat G) + (1 - d)\, G, \qquad
    W \leftarrow W - \text{lr} \cdot \text{readout}(M)

Read-out and first write follow SGD (the first step stores ``G``; Nesterov allowed with
``dampening == 0``). ``delta == 0`` is :class:`~deepopt.AssociativeMomentum` bit for bit.

Note: with Frobenius-normalised keys the decay along singular direction ``i`` is
``delta * s_i^2 / sum_j s_j^2``; on large full-rank gradients that is small (about
``4 delta / n`` for ``n x n``) and the rule behaves close to momentum.
"""

from __future__ import annotations

from functools import partial

from . import functional as Fn
from ._optimizer import DeepOptimizer, Rule
from ._validation import check_choice, check_range
from .associative_momentum import _fused_momentum, _multi_tensor_momentum, _single_tensor_momentum
from .functional import as_matrix, matrix_shape

__all__ = ["DeltaMomentum"]


def _delta_write_(buf, g, *, momentum, dampening, delta, keys, eps):
    """One param's delta-rule write; matrices (ndim >= 2) are seen as (rows, cols)."""
    if keys != "elementwise" and buf.ndim >= 2:
        Fn.delta_momentum_write_(buf.view(matrix_shape(buf)), as_matrix(g), momentum, dampening, delta,
                                 keys=keys, eps=eps)
    else:
        Fn.delta_momentum_write_(buf, g, momentum, dampening, delta, keys="elementwise", eps=eps)


def _single_tensor_delta(params, grads, states, *, delta, keys, eps, **momentum_rule):
    """The momentum rule's for-loop with the delta-rule write (``delta=0`` runs the key code
    too, so the reduction to AssociativeMomentum exercises it)."""
    write_ = partial(_delta_write_, momentum=momentum_rule["momentum"], dampening=momentum_rule["dampening"],
                     delta=delta, keys=keys, eps=eps)
    _single_tensor_momentum(params, grads, states, write_=write_, **momentum_rule)


def _multi_tensor_delta(params, grads, states, *, delta, keys, eps, **momentum_rule):
    """``delta=0`` keeps the foreach momentum write: torch's foreach kernels round the momentum
    scalar to a bf16 list's dtype, and a per-tensor write would not."""
    write_ = None if delta == 0 else partial(
        _delta_write_, momentum=momentum_rule["momentum"], dampening=momentum_rule["dampening"],
        delta=delta, keys=keys, eps=eps)
    _multi_tensor_momentum(params, grads, states, write_=write_, **momentum_rule)


def _delta_of(group) -> float:
    """``delta``, or its default ``min(0.5, momentum)`` (it must not exceed momentum)."""
    return min(0.5, group["momentum"]) if group["delta"] is None else group["delta"]


#: the fused path is the momentum kernel's delta modes (deepopt/associative_momentum.py)
DELTA = Rule(_single_tensor_delta, _multi_tensor_delta, _fused_momentum)


class DeltaMomentum(DeepOptimizer):
    r"""Momentum with an L2-regression (delta-rule) memory: gradient-dependent forgetting.

    .. math::
        M \leftarrow M (a I - \delta\, \hat G^\top \hat G) + (1 - d) G, \quad
        \hat G = G / (\lVert G \rVert_F + \epsilon), \quad W \leftarrow W - \text{lr}\, M

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, fused,
        state_dtype, decoupled_weight_decay, nonfinite: as :class:`~deepopt.AssociativeMomentum`
            with ``preconditioner=None`` (``dampening=None`` means 0).
        delta: forgetting strength, ``0 <= delta <= momentum`` (keeps ``aI - delta Gh^T Gh`` a
            contraction since ``||Gh||_2 <= 1``). ``0`` gives SGD-momentum exactly. ``None``
            (default): ``min(0.5, momentum)``.
        keys: ``"matrix"`` (the rule above; conv weights seen as ``(out, in*kh*kw)``, evaluated
            in the cheaper of ``(M Gh^T) Gh`` and ``M (Gh^T Gh)``); ``"spectral"``: the same with
            ``Gh = G / (sigma_1(G) + eps)`` from 3 power iterations, so the top direction decays by
            ``delta`` whatever the gradient's rank (the power iteration estimates sigma_1 from
            below, so ``||Gh||_2`` can slightly exceed 1); or ``"elementwise"``: per coordinate
            ``k = g / (rms(G) + eps)``, ``M <- max(a - delta k^2, 0) M + (1-d) G``. Params with
            ndim < 2 always use ``"elementwise"``.
        eps: key normalisation epsilon, > 0.

    State: ``momentum_buffer`` (as torch SGD).
    """

    _algorithm_options = ("keys",)

    def __init__(self, params, lr=1e-3, momentum=0.9, dampening=None, weight_decay=0.0,
                 nesterov=False, *, delta=None, keys="matrix", eps=1e-8, decoupled_weight_decay=False,
                 maximize=False, foreach=None, fused=None, state_dtype=None, nonfinite="propagate"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, delta=delta, keys=keys, eps=eps,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, state_dtype=state_dtype, nonfinite=nonfinite)
        super().__init__(params, defaults)

    def _validate_group(self, group):
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if group["dampening"] is not None:
            check_range("dampening", group["dampening"], 0.0, 1.0)
        if group["delta"] is not None and not 0 <= group["delta"] <= group["momentum"]:
            raise ValueError(f"Invalid delta value: {group['delta']} (delta must lie in [0.0, momentum="
                             f"{group['momentum']}]: delta <= momentum keeps a I - delta Gh^T Gh a contraction)")
        check_choice("keys", group["keys"], ("matrix", "spectral", "elementwise"))
        check_range("eps", group["eps"], 0.0, low_open=True)
        if group["nesterov"] and (group["momentum"] <= 0 or (group["dampening"] or 0) != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                             "(nesterov=True needs momentum > 0 and dampening = 0)")

    def _state_spec(self, group, p):
        return {"momentum_buffer": p.shape} if group["momentum"] != 0 else {}

    def _init_state(self, group, p, state):
        pass  # the memory is created by its first write (M = G), as torch SGD

    def _rule(self, group):
        return DELTA, dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"] or 0.0,
                           weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                           maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"],
                           delta=_delta_of(group), keys=group["keys"], eps=group["eps"])
