"""The base class every deepopt optimizer shares: the torch.optim contract and the one dispatch point.

A subclass supplies its rule and nothing else:

* ``_rule(group)``: the rule's implementations (:class:`Rule`: for-loop, foreach, and where
  they exist the Triton and CUDA C++ paths) and the keyword arguments they all take;
* ``_state_spec(group, param)``: the state a parameter will hold, ``{key: shape}`` (checked
  before a checkpoint loads);
* ``_init_state(group, param, state)``: create that state on the parameter's first step;
* ``_validate_group(group)`` (hyperparameters, before params are read) and, if needed,
  ``_check_params(group)`` and ``_needs_whole_matrices(group)``.

Here, once for every rule: gradient collection and input checks before any tensor changes (a
failed step leaves no half-updated parameter), the non-finite gradient policy, the state dtype
(fp32 state for low-precision params, kept across ``load_state_dict``), the choice of
implementation from ``foreach`` / ``fused`` / ``fused_backend`` and the tensors, per-group
``lr_ratio``, and groups with ``algorithm="adamw"`` (the Adam rule of
:mod:`deepopt.associative_momentum`), so that a matrix rule and AdamW for the rest are one
optimizer. Checkpoint checks live in :mod:`deepopt._checkpoint`, sharded params in
:mod:`deepopt._distributed`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from . import _checkpoint, _distributed, _triton
from ._state import new_step, resolve_state_dtype
from ._validation import check_choice, check_range, check_state_dtype, split_names

_NONFINITE_POLICIES = ("propagate", "skip", "raise")
_FUSED_BACKENDS = ("triton", "cuda")
#: what an ``algorithm="adamw"`` group uses when the optimizer's defaults have no such key
ADAMW_GROUP_FALLBACKS = dict(beta2=0.999)
#: AdamW's eps unless the group sets one (a rule's own ``eps`` means something else: M3's
#: preconditioner floor, DeepMomentum's key epsilon)
ADAMW_EPS = 1e-8


class Rule(NamedTuple):
    """The implementations of one rule. Each takes ``(params, grads, states, *, state_dtype,
    **hyperparameters)``; the fused ones also take ``amp = (grad_scale, found_inf)`` or None."""
    forloop: Callable
    foreach: Callable
    fused: Callable | None = None   # Triton multi-tensor kernels (deepopt/_triton.py)
    cuda: Callable | None = None    # the CUDA C++ extension (csrc/, deepopt/_cuda_ext.py)


class DeepOptimizer(Optimizer):
    """Shared machinery; see the module docstring. Not part of the public API."""

    #: the rule supports complex params through ``torch.view_as_real`` (elementwise rules only)
    _supports_complex = False
    #: the ``algorithm`` a group runs unless it says ``"adamw"`` (M3 names its own)
    _algorithm: str | None = None
    #: options that define the algorithm: a checkpoint saved with other values does not load
    _algorithm_options: tuple[str, ...] = ()
    #: the data-parallel process group a Newton-Schulz rule spreads its work over (its
    #: ``process_group`` argument; not in the state dict, and None after unpickling)
    _ns_group = None

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        self._validate_hyperparameters(defaults)   # before params are read, as torch
        super().__init__(params, defaults)

    # -- groups and their checks --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters (with the defaults filled in) are validated first."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        if param_group.get("algorithm") == "adamw":
            for key, value in ADAMW_GROUP_FALLBACKS.items():
                param_group.setdefault(key, self.defaults.get(key, value))
            param_group.setdefault("dampening", None)   # AdamW writes at 1 - momentum, whatever the rule's default
            param_group.setdefault("eps", ADAMW_EPS)
        merged = {**self.defaults, **param_group}
        names, merged["params"] = split_names(params)
        if names is not None:
            merged["param_names"] = names
        self._validate_hyperparameters(merged)
        self._check_params(merged)
        self._check_fused(merged)
        super().add_param_group(param_group)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        """The checks every rule shares, then the rule's own; needs no params."""
        check_range("lr", group["lr"], 0.0)
        check_range("lr_ratio", group.get("lr_ratio", 1.0), 0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_choice("nonfinite", group.get("nonfinite", "propagate"), _NONFINITE_POLICIES)
        check_state_dtype(group.get("state_dtype"))
        fused = group.get("fused")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"Invalid fused value: {fused!r} (fused must be True, False or None; "
                             "choose the CUDA C++ kernels with fused_backend='cuda')")
        check_choice("fused_backend", group.get("fused_backend", "triton"), _FUSED_BACKENDS)
        if fused and group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        algorithm = group.get("algorithm", self._algorithm)
        check_choice("algorithm", algorithm, (self._algorithm, "adamw"))
        if algorithm == "adamw":
            _validate_adamw_group(group)
        else:
            self._validate_group(group)

    def _revalidate(self, group: dict[str, Any]) -> None:
        """Validate a group again if a hyperparameter changed since its last check (a tuple
        comparison per group and step; tensor values, such as a tensor lr, are not re-read)."""
        lr = group["lr"]
        if not isinstance(lr, Tensor) and not lr >= 0:   # schedulers change lr every step: check it alone
            check_range("lr", lr, 0.0)
        snapshot = tuple((k, v) for k, v in group.items()
                         if k not in ("params", "param_names", "lr") and not k.startswith("mf_")
                         and not isinstance(v, (Tensor, list, dict)))
        checked = self.__dict__.setdefault("_checked_groups", {})
        if checked.get(id(group)) != snapshot:
            self._validate_hyperparameters({**self.defaults, **group})
            checked[id(group)] = snapshot

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's rule hyperparameters; raise ``ValueError`` naming the bad one."""

    def _check_params(self, group: dict[str, Any]) -> None:
        """Per-rule check of a new group's params (e.g. M3's matrices only)."""

    def _check_fused(self, group: dict[str, Any]) -> None:
        """``fused=True`` where the kernels cannot run raises here, before the group is added."""
        if not group.get("fused"):
            return
        rule = self._rule_of(group)[0]
        if group.get("fused_backend", "triton") == "cuda":
            from . import _cuda_ext
            if rule.cuda is None:
                raise RuntimeError(f"fused_backend='cuda': the CUDA C++ kernels cover AssociativeMomentum only; "
                                   f"use the Triton backend for deepopt.{type(self).__name__}")
            reason = _cuda_ext.unavailable_reason(group["params"])
            if reason is None and any(resolve_state_dtype(group.get("state_dtype"), p) != torch.float32
                                      for p in group["params"]):
                reason = "the CUDA C++ kernels keep fp32 state (state_dtype=None with fp32/bf16/fp16 params)"
            if reason is not None:
                raise RuntimeError(f"fused_backend='cuda': {reason}")
            return
        reason = "params are DTensors (FSDP2); use foreach" if any(map(_distributed.is_dtensor, group["params"])) \
            else _triton.unavailable_reason(group["params"])
        if reason is not None:
            raise RuntimeError(f"fused=True: deepopt.{type(self).__name__} cannot use its fused kernels: "
                               f"{reason}. Use fused=None (default) or foreach=True")

    # -- the one dispatch point ---------------------------------------------------------------
    def _rule(self, group: dict[str, Any]) -> tuple[Rule, dict[str, Any]]:
        """The rule of a group and its hyperparameters (``lr`` included)."""
        raise NotImplementedError

    def _rule_of(self, group: dict[str, Any]) -> tuple[Rule, dict[str, Any]]:
        if group.get("algorithm") == "adamw":
            from .associative_momentum import ADAM
            rule, hyper = ADAM, dict(lr=group["lr"], beta1=group["momentum"], beta2=group["beta2"],
                                     eps=group["eps"], weight_decay=group["weight_decay"],
                                     maximize=group["maximize"], decoupled_weight_decay=True)
        else:
            rule, hyper = self._rule(group)
        ratio = group.get("lr_ratio", 1.0)
        if ratio != 1.0:   # (ratio 1 leaves lr untouched: the exact reductions stay exact)
            hyper["lr"] = hyper["lr"] * ratio
        return rule, hyper

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """``"fused"`` (``fused=True``, or ``None`` on CUDA tensors once the kernels are the
        default there), ``"foreach"`` (``foreach=True``, or ``None`` where torch would) or ``"forloop"``."""
        fused = group.get("fused")
        if fused is None:
            fused = (group.get("foreach") is None and self._rule_of(group)[0].fused is not None
                     and _triton.auto_fused(params) and not any(map(_distributed.is_dtensor, params)))
        if fused:
            return "fused"
        foreach = group["foreach"]
        if foreach is None:
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        return "foreach" if foreach else "forloop"

    def _update(self, group, params, grads, states, implementation: str, amp=None, ns_group=False) -> None:
        """Run the group's rule; ``ns_group`` (unless False) replaces the optimizer's process group."""
        rule, hyper = self._rule_of(group)
        hyper["state_dtype"] = group["state_dtype"]
        if ns_group is not False and "ns_group" in hyper:
            hyper["ns_group"] = ns_group
        if implementation == "fused":
            fn = rule.cuda if group.get("fused_backend", "triton") == "cuda" else rule.fused
            fn(params, grads, states, amp=amp, **hyper)
        else:
            getattr(rule, implementation)(params, grads, states, **hyper)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when every group runs fused: GradScaler then hands ``grad_scale`` / ``found_inf``
        to ``step()`` (the kernels unscale and skip) instead of unscaling ``p.grad`` itself."""
        override = self.__dict__.get("_amp_scaling_override")
        if override is not None:
            return override
        groups = self.__dict__.get("param_groups") or []
        return bool(groups) and all(self._implementation(g, g["params"]) == "fused" for g in groups)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value) -> None:
        self.__dict__["_amp_scaling_override"] = value

    # -- step --------------------------------------------------------------------------------
    def _collect(self, group: dict[str, Any]):
        """Params with a gradient, their grads and their states; validates before any change."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"deepopt.{type(self).__name__} does not support sparse gradients")
            if p.is_complex() and not (self._supports_complex or group.get("algorithm") == "adamw"):
                raise RuntimeError(
                    f"deepopt.{type(self).__name__} does not support complex parameters (shape "
                    f"{tuple(p.shape)}); optimize torch.view_as_real(p) as a real parameter instead")
            params.append(p)
            grads.append(p.grad)
            # a new param's state joins self.state only once the step filled it (see step)
            states.append(self.state[p] if p in self.state else {})
        return params, grads, states

    def _nonfinite_action(self, batches) -> str | None:
        """'raise' / 'skip' if a group asking for a check holds a non-finite grad, else None."""
        action = None
        for group, (_, grads, _) in batches:
            policy = group.get("nonfinite", "propagate")
            if policy == "propagate" or not grads:
                continue
            # one host sync for the whole group
            finite = torch.stack([g.detach().isfinite().all().to(grads[0].device) for g in grads]).all()
            if not bool(finite):
                if policy == "raise":
                    return "raise"
                action = "skip"
        return action

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step; returns the closure's loss (if a closure is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:   # hyperparameters edited in param_groups since the last check
            self._revalidate(group)
        batches = [(group, self._collect(group)) for group in self.param_groups]
        action = self._nonfinite_action(batches)
        if action == "raise":
            raise FloatingPointError(
                f"deepopt.{type(self).__name__}: non-finite gradient (nonfinite='raise'); "
                "no parameter or state was changed")
        if action == "skip":
            return loss
        for group, (params, grads, states) in batches:
            if not params:
                continue
            for p, state in zip(params, states):
                if len(state) == 0:
                    self._init_group_state(group, p, state)
            # rules compute in the state dtype (bf16 grads -> fp32 G with fp32 state; a no-op otherwise)
            grads = [g.to(resolve_state_dtype(group["state_dtype"], p)) for p, g in zip(params, grads)]
            if group.get("algorithm") != "adamw" and self._needs_whole_matrices(group) \
                    and any(map(_distributed.is_dtensor, params)):
                shards = _distributed.row_shards(params)
                if shards is not None:   # FSDP2: the rule on each rank's rows
                    self._update(group, *_distributed.local_views(params, grads, states), "forloop",
                                 ns_group=shards)
                else:                    # the owner's matrices, gathered whole
                    _distributed.update_gathered(
                        params, grads, states,
                        lambda ps, gs, sts: self._update(group, ps, gs, sts, "forloop", ns_group=None),
                        lambda p: self._group_state_spec(group, p))
                continue
            implementation = self._implementation(group, params)
            amp = None
            if implementation == "fused" and self._step_supports_amp_scaling \
                    and getattr(self, "found_inf", None) is not None:
                amp = (getattr(self, "grad_scale", None), self.found_inf)
            self._update(group, params, grads, states, implementation, amp)
        for group, (params, _, states) in batches:   # a rule that keeps no state leaves none (torch SGD)
            for p, state in zip(params, states):
                if state and p not in self.state:
                    self.state[p] = state
        return loss

    def _needs_whole_matrices(self, group: dict[str, Any]) -> bool:
        """True for rules that need each matrix whole (an MLP over full rows, Newton-Schulz)."""
        return False

    # -- state ---------------------------------------------------------------------------------
    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _group_state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, tuple[int, ...]]:
        if group.get("algorithm") == "adamw":
            return {"step": (), "exp_avg": p.shape, "exp_avg_sq": p.shape}
        return self._state_spec(group, p)

    def _init_group_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        if group.get("algorithm") == "adamw":
            state["step"] = new_step()
            state["exp_avg"] = self._zeros(group, p)
            state["exp_avg_sq"] = self._zeros(group, p)
        else:
            self._init_state(group, p, state)

    def _zeros(self, group: dict[str, Any], p: Tensor, shape=None) -> Tensor:
        dtype = resolve_state_dtype(group["state_dtype"], p)
        if shape is None:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    # -- checkpoints ---------------------------------------------------------------------------
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)   # (torch adds "differentiable" to defaults; deepopt has no such flag)
        # state dicts written before a flag existed load with its default
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":
                    group.setdefault(key, value)
        # older torch Adam checkpoints store "step" as a Python number; torch converts it on load
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not isinstance(step, Tensor):
                param_state["step"] = new_step(step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking every param's state keys and shapes.

        The check runs before anything changes: a checkpoint of another optimizer, with
        missing keys or wrong shapes, raises a ``ValueError`` naming the parameter and the
        mismatch and leaves this optimizer as it was. Floating state keeps its own dtype
        (fp32 state for bf16 params stays fp32; torch would cast it to the param dtype).
        """
        targets = _checkpoint.targets_of(self, state_dict)
        _checkpoint.check_groups(self, state_dict)
        _checkpoint.check_state(self, state_dict, targets)
        super().load_state_dict(state_dict)
        _checkpoint.restore_state_dtypes(self, state_dict, targets)


def _validate_adamw_group(group: dict[str, Any]) -> None:
    """An ``algorithm="adamw"`` group: AdamW with ``betas = (momentum, beta2)``."""
    check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_range("beta2", group["beta2"], 0.0, 1.0, high_open=True)
    check_range("eps", group["eps"], 0.0)
    dampening = group.get("dampening")
    if dampening is not None and dampening != group["momentum"]:
        raise ValueError(f"Invalid dampening value: {dampening} (an algorithm='adamw' group writes at rate "
                         "1 - momentum: leave dampening None)")
