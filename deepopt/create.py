"""``deepopt.create_optimizer``: the one way to build a correctly routed optimizer for a model.

Routing, as Muon users do it:

* hidden matrices (2-D weights and conv kernels, seen as ``(out, in*kh*kw)``) go to the rule;
* embeddings (``nn.Embedding`` params, or params named ``*embed*``), the output head (the model's
  last ``nn.Linear``, or params named ``*head*``) and every param with ndim < 2 (biases, norms)
  go, for the Newton-Schulz rules (``"deep-ns"``, ``"m3"``), to an ``algorithm="adamw"`` group
  of the same optimizer; for the other rules they stay with the rule (ndim < 2 params take its
  elementwise path);
* weight decay applies to params with ndim >= 2 only, and it is **decoupled** in every recipe
  by default: ``W <- W (1 - lr * weight_decay)`` before the update, as AdamW and Muon apply it.
  The class constructors keep torch's semantics (``weight_decay`` adds ``wd * W`` to the gradient,
  torch SGD's L2 penalty), which behind momentum ``a`` shrinks ``W`` by ``lr * wd / (1 - a)`` per
  step: at SGD's lr 0.1 and nanoGPT's wd 0.1, 10% per step, 1000 times AdamW's ``lr * wd`` at its
  lr 1e-3. ``decoupled_weight_decay=False`` asks for the coupled form (not for ``"m3"``, whose rule
  is decoupled only).

Every group keeps ``lr`` equal to the scheduled lr and carries ``lr_ratio`` (the optimizer
multiplies it in), so a training loop that writes one lr into every group
(``for g in opt.param_groups: g["lr"] = lr``, as nanoGPT does) drives AdamW at its own rate.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .associative_momentum import AssociativeMomentum
from .deep_momentum import DeepMomentum
from .delta_momentum import DeltaMomentum
from .m3 import M3
from .multi_frequency import MultiFrequency

__all__ = ["create_optimizer", "RECIPES", "split_params"]

#: name -> (class, recommended lr, the rule's options, whether the rest goes to AdamW).
#: Each lr is within a half-decade of the best swept lr on >= 4 of the 5 loss tasks, AdamW's on 3 (no
#: single AdamW lr does better there; benchmarks/results; tests/test_create.py checks the counts).
RECIPES: dict[str, tuple[type, float, dict[str, Any], bool]] = {
    "sgd": (AssociativeMomentum, 0.1, dict(momentum=0.9), False),
    "adamw": (AssociativeMomentum, 1e-2, dict(momentum=0.9, beta2=0.999, preconditioner="adam"), False),
    "delta": (DeltaMomentum, 0.1, dict(momentum=0.9, delta=0.5), False),
    "deep": (DeepMomentum, 0.1, dict(momentum=0.9), False),
    # ns_form="gram": the same Newton-Schulz to rounding in 0.7x the flops on wide matrices; it trains
    # as the direct form (benchmarks/results/ns_step.json, "training")
    "deep-ns": (DeepMomentum, 1e-2, dict(momentum=0.95, dampening=0.95, nesterov=True, output="newton_schulz",
                                         adjust_lr="original", ns_form="gram"), True),
    "m3": (M3, 1e-2, dict(ns_form="gram"), True),
}
#: the AdamW part of the Newton-Schulz recipes
ADAMW_DEFAULTS = dict(lr=1e-3, momentum=0.9, beta2=0.95, eps=1e-8)


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(hidden matrices, the rest)`` as ``(name, param)`` pairs, by the rule in the module docstring."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    if linears:
        excluded |= {id(p) for p in linears[-1].parameters()}
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or id(p) in excluded or "embed" in lowered or "head" in lowered:
            rest.append((name, p))
        else:
            matrices.append((name, p))
    return matrices, rest


def create_optimizer(model: nn.Module, name: str, lr: float | None = None, *, weight_decay: float = 0.0,
                     decoupled_weight_decay: bool = True, adamw_lr: float | None = None, periods: dict[str, int] | None = None,
                     reduce: str = "mean", **options):
    """Build the optimizer ``name`` for ``model``, routed as the module docstring says.

    Args:
        model: the module whose parameters to optimize.
        name: one of :data:`RECIPES` (``"sgd"``, ``"adamw"``, ``"delta"``, ``"deep"``,
            ``"deep-ns"``, ``"m3"``), or ``"multifreq:<name>"`` for the same recipe inside
            :class:`~deepopt.MultiFrequency` with ``periods``.
        lr: the rule's lr (default: the recipe's recommended lr), > 0.
        weight_decay: >= 0, applied to params with ndim >= 2 only.
        decoupled_weight_decay: ``True`` (default, every recipe): ``W <- W (1 - lr * weight_decay)``
            before the update, as AdamW and Muon; ``False``: torch SGD's coupled L2 penalty
            (``G + weight_decay * W``, which momentum amplifies by ``1 / (1 - momentum)``). The
            AdamW groups of ``"deep-ns"`` / ``"m3"`` are decoupled either way; ``"m3"`` has no
            coupled form.
        adamw_lr: lr of the AdamW group of ``"deep-ns"`` / ``"m3"`` (default 1e-3), kept as a
            ratio to ``lr`` so one schedule drives both.
        periods: ``{regex on the param name: update_every}`` (``"multifreq:..."`` only).
        reduce: ``"sum"`` or ``"mean"`` of a slow group's gradients (``"multifreq:..."`` only).
        **options: the rule's own options, overriding the recipe's (e.g. ``memory_lr``,
            ``delta``), and for the AdamW group ``adamw_momentum``, ``adamw_beta2``, ``adamw_eps``.

    Returns:
        One optimizer (a :class:`~deepopt.MultiFrequency` for ``"multifreq:..."``), so
        GradScaler, checkpoints and LR schedulers see one object.
    """
    if not isinstance(name, str):
        raise ValueError(f"Invalid optimizer name: {name!r} (name must be a str, one of {list(RECIPES)})")
    multifrequency = name.startswith("multifreq:")
    base = name.split(":", 1)[1] if multifrequency else name
    if base not in RECIPES:
        names = list(RECIPES) + [f"multifreq:{n}" for n in RECIPES]
        raise ValueError(f"Invalid optimizer name: {name!r} (name must be one of {names})")
    if periods is not None and not multifrequency:
        raise ValueError(f"periods is for 'multifreq:{base}'; got name={name!r}")
    if multifrequency and not periods:
        raise ValueError(f"name={name!r} needs periods={{regex on param names: update_every}}")
    cls, recommended_lr, recipe, rest_to_adamw = RECIPES[base]
    lr = recommended_lr if lr is None else lr
    _check_positive("lr", lr)
    if adamw_lr is not None:
        _check_positive("adamw_lr", adamw_lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (weight_decay must be a finite number >= 0)")
    if not isinstance(decoupled_weight_decay, bool):
        raise ValueError(f"Invalid decoupled_weight_decay value: {decoupled_weight_decay!r} (must be True or False)")
    if cls is M3 and not decoupled_weight_decay:
        raise ValueError("decoupled_weight_decay=False is not available for 'm3' (its weight decay is decoupled only)")
    decoupling = {} if cls is M3 else dict(decoupled_weight_decay=decoupled_weight_decay)   # (M3's is fixed)
    adamw = {k: options.pop(f"adamw_{k}") for k in ("momentum", "beta2", "eps") if f"adamw_{k}" in options}
    adamw = {**ADAMW_DEFAULTS, **adamw, "lr": ADAMW_DEFAULTS["lr"] if adamw_lr is None else adamw_lr}

    matrices, rest = split_params(model)
    if not rest_to_adamw:
        matrices, rest = [(n, p) for n, p in matrices + rest if p.ndim >= 2], \
                         [(n, p) for n, p in matrices + rest if p.ndim < 2]
    groups = []
    if matrices:   # the rule's group first: DeepMomentum seeds its MLPs by param index
        groups.append({"params": matrices, "weight_decay": weight_decay})
    if rest_to_adamw:
        decayed = [(n, p) for n, p in rest if p.ndim >= 2]
        plain = [(n, p) for n, p in rest if p.ndim < 2]
        for params, wd in ((decayed, weight_decay), (plain, 0.0)):
            if params:
                groups.append({"params": params, "algorithm": "adamw", "weight_decay": wd,
                               "lr_ratio": adamw["lr"] / lr, "momentum": adamw["momentum"],
                               "beta2": adamw["beta2"], "eps": adamw["eps"]})
    elif rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    if multifrequency:
        groups = _split_by_period(groups, periods)
    optimizer = cls(groups, lr=lr, **{**recipe, **decoupling, **options})
    return MultiFrequency(optimizer, reduce=reduce) if multifrequency else optimizer


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        what = "learning rate" if name == "lr" else f"{name} value"   # (torch's words for lr)
        raise ValueError(f"Invalid {what}: {value!r} ({name} must be a finite number > 0 in create_optimizer)")


def _split_by_period(groups: list[dict], periods: dict[str, int]) -> list[dict]:
    """Each group split by the first regex of ``periods`` that matches a param's name."""
    import re
    patterns = [(re.compile(pattern), period) for pattern, period in periods.items()]
    out = []
    for group in groups:
        buckets: dict[int, list] = {}
        for name, p in group["params"]:
            period = next((c for regex, c in patterns if regex.search(name)), 1)
            buckets.setdefault(period, []).append((name, p))
        for period, params in buckets.items():
            out.append({**group, "params": params, "update_every": period})
    return out
