"""The base class every deepopt optimizer shares: the torch.optim contract in one place.

A subclass supplies three things and nothing else:

* ``_state_spec(group, param)``: the state a parameter will hold, ``{key: shape}``
  (used to check a checkpoint before loading it);
* ``_init_state(group, param, state)``: create that state on the parameter's first step;
* ``_update(group, params, grads, states, foreach)``: the rule, calling the functional core.

Everything around the rule lives here: gradient collection and input checks done before any
tensor changes (a failed step leaves no half-updated parameter), the non-finite gradient policy,
the state dtype (fp32 state for low-precision params, kept across ``load_state_dict``),
checkpoint validation, and the ``foreach`` / ``fused`` dispatch point.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from . import _triton

_NONFINITE_POLICIES = ("propagate", "skip", "raise")


# ----------------------------------------------------------------------------- validation
# torch's wording where torch has a message for the same check ("Invalid learning rate: -1")
_TORCH_LABELS = {"lr": "learning rate", "eps": "epsilon value", "beta2": "beta parameter at index 1"}


def check_range(name: str, value: Any, low: float, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and its range unless ``low <= value <= high``
    (open ends as asked). The message starts as torch's does for the same check."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        number = value.item()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if math.isnan(number) or below or above:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        label = _TORCH_LABELS.get(name, f"{name} value")
        raise ValueError(f"Invalid {label}: {value} ({name} must lie in {left}{low}, {high}{right})")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name} value: {value!r} ({name} must be one of {choices})")


def resolve_state_dtype(state_dtype: Any, param: Tensor) -> torch.dtype:
    """``None``: fp32 or wider (``promote_types(param.dtype, float32)``); ``"param"``: the
    param's own dtype (torch's behaviour); or an explicit floating ``torch.dtype``."""
    if state_dtype is None:
        if param.is_complex():
            return torch.promote_types(param.dtype, torch.complex64)
        return torch.promote_types(param.dtype, torch.float32)
    if state_dtype == "param":
        return param.dtype
    return state_dtype


def _check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is None or state_dtype == "param":
        return
    if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"Invalid state_dtype value: {state_dtype!r} (state_dtype must be None, 'param' "
                         "or a floating torch.dtype)")


def new_step(value: float = 0.0) -> Tensor:
    """A step counter as torch's Adam keeps it: a CPU scalar tensor, fp64 under a float64
    default dtype and fp32 otherwise."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype)


def _split_names(params: list) -> tuple[list | None, list]:
    """``(names, tensors)`` of a group's params: all ``(name, tensor)`` pairs or all tensors."""
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return None, params
    if not all(named):
        first_plain = named.index(False) if named[0] else named.index(True)
        raise ValueError(
            "all optimizer params should be with/without names. Some param names are missing: "
            f"params[0] is {'a (name, tensor) pair' if named[0] else 'a tensor'}, params[{first_plain}] "
            f"is {'a tensor' if named[0] else 'a (name, tensor) pair'}")
    for i, pair in enumerate(params):
        if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], Tensor):
            raise ValueError(f"params[{i}] must be a (str, Tensor) pair, got {tuple(type(x).__name__ for x in pair)}")
    return [n for n, _ in params], [p for _, p in params]


def matrix_shape(t: Tensor) -> tuple[int, int]:
    """(rows, cols) of the matrix view: 2-D as is, conv weights as (out, in*kh*kw)."""
    return t.shape[0], math.prod(t.shape[1:])


def as_matrix(t: Tensor) -> Tensor:
    """The matrix view used by the matrix rules (a view where the layout allows)."""
    return t if t.ndim == 2 else t.reshape(matrix_shape(t))


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """A DTensor with ``like``'s mesh and placements from a whole (replicated) tensor; the
    Replicate -> Shard redistribution is a local slice, no communication."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements)


def _local_shard(whole: Tensor, like: Tensor) -> Tensor:
    return _shard_like(whole, like).to_local()


def _broadcast_(t: Tensor, source: int, process_group, device: torch.device) -> None:
    """In-place broadcast; tensors kept elsewhere (a CPU step counter with NCCL) travel via ``device``."""
    import torch.distributed as dist
    buffer = t if t.device == device else t.to(device)
    dist.broadcast(buffer, src=source, group=process_group)
    if buffer is not t:
        t.copy_(buffer)


# ----------------------------------------------------------------------------- base class
class DeepOptimizer(Optimizer):
    """Shared machinery; see the module docstring. Not part of the public API."""

    #: the rule supports complex params through ``torch.view_as_real`` (elementwise rules only)
    _supports_complex = False

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        self._validate_hyperparameters(defaults)   # before params are read, as torch
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters (with the defaults filled in) are validated first."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        merged = {**self.defaults, **param_group}
        names, merged["params"] = _split_names(params)
        if names is not None:
            merged["param_names"] = names
        self._validate_hyperparameters(merged)
        self._check_params(merged)
        self._check_fused(merged)
        super().add_param_group(param_group)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        """The checks every rule shares, then the rule's own (:meth:`_validate_group`); needs no params."""
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_choice("nonfinite", group.get("nonfinite", "propagate"), _NONFINITE_POLICIES)
        _check_state_dtype(group.get("state_dtype"))
        if group.get("fused") and group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._validate_group(group)

    def _check_params(self, group: dict[str, Any]) -> None:
        """Per-rule check of a new group's params (e.g. M3's matrices only)."""

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's rule hyperparameters; raise ``ValueError`` naming the bad one."""

    # -- fused kernels (deepopt/_triton.py) ---------------------------------------------------
    def _check_fused(self, group: dict[str, Any]) -> None:
        """``fused=True`` where the kernels cannot run raises here, before the group is added."""
        if not group.get("fused"):
            return
        if group["fused"] == "cuda":   # the optional CUDA C++ extension (deepopt/_cuda_ext.py)
            from . import _cuda_ext
            if not getattr(self, "_supports_cuda_ext", False):
                raise RuntimeError(f"fused='cuda': the CUDA C++ kernels cover AssociativeMomentum only; "
                                   f"use fused=True (Triton) for deepopt.{type(self).__name__}")
            reason = _cuda_ext.unavailable_reason(group["params"])
            if reason is not None:
                raise RuntimeError(f"fused='cuda': {reason}")
            return
        reason = "params are DTensors (FSDP2); use foreach" if any(_is_dtensor(p) for p in group["params"]) \
            else _triton.unavailable_reason(group["params"])
        if reason is not None:
            raise RuntimeError(f"fused=True: deepopt.{type(self).__name__} cannot use its fused kernels: "
                               f"{reason}. Use fused=None (default: fused on CUDA, else foreach) or foreach=True")

    def _fused_group(self, group: dict[str, Any]) -> bool:
        """``fused=True``: the Triton kernels; ``None``: them for CUDA tensors (with Triton
        installed and ``foreach`` not set), else foreach; ``False``: never."""
        fused = group.get("fused")
        if fused is None:
            return (group.get("foreach") is None and _triton.auto_fused(group["params"])
                    and not any(_is_dtensor(p) for p in group["params"]))
        return bool(fused)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when every group runs fused: GradScaler then hands ``grad_scale`` / ``found_inf``
        to ``step()`` (the kernels unscale and skip) instead of unscaling ``p.grad`` itself."""
        override = self.__dict__.get("_amp_scaling_override")
        if override is not None:
            return override
        groups = self.__dict__.get("param_groups") or []
        return bool(groups) and all(self._fused_group(g) for g in groups)

    @_step_supports_amp_scaling.setter
    def _step_supports_amp_scaling(self, value) -> None:
        self.__dict__["_amp_scaling_override"] = value

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

    # -- step --------------------------------------------------------------------------------
    def _collect(self, group: dict[str, Any]):
        """Params with a gradient, their grads and their states; validates before any change."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"deepopt.{type(self).__name__} does not support sparse gradients")
            if p.is_complex() and not self._supports_complex:
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
                    self._init_state(group, p, state)
            # rules compute in the state dtype (bf16 grads -> fp32 G with fp32 state; a no-op otherwise)
            grads = [g.to(resolve_state_dtype(group["state_dtype"], p)) for p, g in zip(params, grads)]
            if self._needs_whole_matrices(group) and any(_is_dtensor(p) for p in params):
                self._update_gathered(group, params, grads, states)
                continue
            if self._fused_group(group):
                amp = None
                if self._step_supports_amp_scaling and getattr(self, "found_inf", None) is not None:
                    amp = (getattr(self, "grad_scale", None), self.found_inf)
                self._update(group, params, grads, states, False, fused=True, amp=amp)
                continue
            foreach = group["foreach"]
            if foreach is None:
                _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
            self._update(group, params, grads, states, bool(foreach))
        for group, (params, _, states) in batches:   # a rule that keeps no state leaves none (torch SGD)
            for p, state in zip(params, states):
                if state and p not in self.state:
                    self.state[p] = state
        return loss

    # -- sharded params (FSDP2 / DTensor) ----------------------------------------------------
    def _needs_whole_matrices(self, group: dict[str, Any]) -> bool:
        """True for rules that need each matrix whole (an MLP over full rows, Newton-Schulz).
        Elementwise rules and DeltaMomentum's matrix keys run on DTensor shards as they are."""
        return False

    def _update_gathered(self, group, params, grads, states) -> None:
        """Run the rule on whole matrices gathered from their shards, then keep each rank's shard.

        Each sharded param, grad and param-shaped state is all-gathered. On a 1-D mesh the
        matrix work is spread round-robin, as distributed Muon does: rank ``i % world`` computes
        the ``i``-th matrix's update and broadcasts the whole param and state (replicated state such as
        the MLP memory included). On other meshes every rank computes every update.
        """
        import torch.distributed as dist
        matrices = 0
        for p, g, state in zip(params, grads, states):
            if not _is_dtensor(p) or p.ndim < 2:   # vectors take the elementwise fallback, on shards
                self._update(group, [p], [g], [state], False)
                continue
            i, matrices = matrices, matrices + 1
            whole_p, whole_g = p.full_tensor(), g.full_tensor()
            whole_state = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in state.items()}
            mesh = p.device_mesh
            if mesh.ndim == 1 and mesh.size() > 1 and set(whole_state) == set(self._state_spec(group, p)):
                process_group, owner = mesh.get_group(), i % mesh.size()
                if mesh.get_local_rank() == owner:
                    self._update(group, [whole_p], [whole_g], [whole_state], False)
                source = dist.get_global_rank(process_group, owner)
                for t in [whole_p] + [whole_state[k] for k in sorted(whole_state)]:
                    _broadcast_(t, source, process_group, whole_p.device)
            else:
                self._update(group, [whole_p], [whole_g], [whole_state], False)
            p.to_local().copy_(_local_shard(whole_p, p))
            for key, value in whole_state.items():
                current = state.get(key)
                if _is_dtensor(current):
                    current.to_local().copy_(_local_shard(value, current))
                elif current is None and value.shape == whole_p.shape:   # created by the rule
                    state[key] = _shard_like(value, p)
                else:
                    state[key] = value

    # -- subclass interface ------------------------------------------------------------------
    def _state_spec(self, group: dict[str, Any], p: Tensor) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _update(self, group, params, grads, states, foreach: bool, *, fused: bool = False, amp=None) -> None:
        """``fused=True``: the Triton path; ``amp = (grad_scale, found_inf)`` from GradScaler or None."""
        raise NotImplementedError

    def _zeros(self, group: dict[str, Any], p: Tensor, shape=None) -> Tensor:
        dtype = resolve_state_dtype(group["state_dtype"], p)
        if shape is None:
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    # -- checkpoints -------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking every param's state keys and shapes.

        The check runs before anything changes: a checkpoint of another optimizer, with
        missing keys or wrong shapes, raises a ``ValueError`` naming the parameter and the
        mismatch and leaves this optimizer as it was. Floating state keeps its own dtype
        (fp32 state for bf16 params stays fp32; torch would cast it to the param dtype).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}")
        targets: dict[Any, tuple[Tensor, dict[str, Any], str]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {gi} has {len(saved['params'])} params, "
                    f"this optimizer's has {len(group['params'])}")
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
                targets[pid] = (p, merged, f"param {pi} of group {gi} (shape {tuple(p.shape)})")
        for pid, saved_state in state_dict["state"].items():
            if pid not in targets or not saved_state:
                continue
            p, merged, where = targets[pid]
            spec = self._state_spec(merged, p)
            keys, expected = set(saved_state), set(spec)
            if keys != expected:
                raise ValueError(
                    f"deepopt.{type(self).__name__}.load_state_dict: {where} has state keys "
                    f"{sorted(keys)}, expected {sorted(expected)} (missing {sorted(expected - keys)}, "
                    f"unexpected {sorted(keys - expected)}); is this another optimizer's checkpoint?")
            for key, shape in spec.items():
                value = saved_state[key]
                got = tuple(value.shape) if isinstance(value, Tensor) else ()
                if key != "step" and got != tuple(shape):
                    raise ValueError(
                        f"deepopt.{type(self).__name__}.load_state_dict: {where}: state "
                        f"'{key}' has shape {got}, expected {tuple(shape)}")
        super().load_state_dict(state_dict)
        # undo torch's cast of floating state to the param dtype, from the original tensors
        for pid, saved_state in state_dict["state"].items():
            if pid not in targets:
                continue
            p, merged, _ = targets[pid]
            dtype = resolve_state_dtype(merged.get("state_dtype"), p)
            state = self.state[p]
            for key, value in saved_state.items():
                if key != "step" and isinstance(value, Tensor) and value.is_floating_point() \
                        and state[key].dtype != dtype:
                    state[key] = value.to(device=p.device, dtype=dtype, copy=True)
