"""Checkpoint checks: a state dict is validated in full before anything is loaded, and floating
state keeps its own dtype across ``load_state_dict`` (torch would cast it to the param dtype)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._state import resolve_state_dtype


def targets_of(opt, state_dict: dict[str, Any]) -> dict[Any, tuple[Tensor, dict[str, Any], str]]:
    """``{saved param id: (param, its group merged from the saved one, "param i of group j")}``,
    after checking that the group and param counts match."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"this optimizer has {len(opt.param_groups)}")
    targets = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"loaded state dict's parameter group {gi} has {len(saved['params'])} params, "
                             f"this optimizer's has {len(group['params'])}")
        merged = {**opt.defaults, **{k: v for k, v in saved.items() if k != "params"}}
        for pi, (p, pid) in enumerate(zip(group["params"], saved["params"])):
            targets[pid] = (p, merged, f"param {pi} of group {gi} (shape {tuple(p.shape)})")
    return targets


#: group keys a checkpoint may carry beyond the optimizer's own options: torch's bookkeeping,
#: torch SGD/Adam checkpoints (which load), schedulers, MultiFrequency and create_optimizer
TOLERATED_GROUP_KEYS = {"params", "param_names", "initial_lr", "update_every", "mf_step", "lr_ratio",
                        "differentiable", "capturable", "amsgrad", "betas", "decoupled_weight_decay",
                        "foreach", "fused", "fused_backend"}
#: what an algorithm="adamw" group carries whatever the rule (deepopt/_optimizer.py)
ADAMW_GROUP_KEYS = {"algorithm", "beta2", "eps", "dampening"}


def check_groups(opt, state_dict: dict[str, Any]) -> None:
    """Each saved group must be a group of this optimizer's algorithm: no options that only another
    optimizer takes, and the same values for the options that define the algorithm
    (``opt._algorithm_options``). Plain hyperparameters (lr, momentum, ...) may differ: they are
    restored, as torch does."""
    name = f"deepopt.{type(opt).__name__}.load_state_dict"
    for gi, (group, saved) in enumerate(zip(opt.param_groups, state_dict["param_groups"])):
        allowed = set(opt.defaults) | TOLERATED_GROUP_KEYS
        if saved.get("algorithm") == "adamw":
            allowed |= ADAMW_GROUP_KEYS
        foreign = sorted(set(saved) - allowed)
        if foreign:
            raise ValueError(f"{name}: parameter group {gi} has options {foreign} that deepopt."
                             f"{type(opt).__name__} does not take; is this another optimizer's checkpoint?")
        for key in opt._algorithm_options + ("algorithm",):
            if key in saved and key in group and saved[key] != group[key]:
                raise ValueError(
                    f"{name}: parameter group {gi} was saved with {key}={saved[key]!r} and this optimizer has "
                    f"{key}={group[key]!r}; {key} defines the algorithm, so loading would change it. Build the "
                    f"optimizer with {key}={saved[key]!r} to load this checkpoint")


def check_state(opt, state_dict: dict[str, Any], targets) -> None:
    """Every saved param state has exactly the keys and shapes the optimizer expects."""
    name = f"deepopt.{type(opt).__name__}.load_state_dict"
    for pid, saved_state in state_dict["state"].items():
        if pid not in targets or not saved_state:
            continue
        p, merged, where = targets[pid]
        spec = opt._group_state_spec(merged, p)
        keys, expected = set(saved_state), set(spec)
        if keys != expected:
            raise ValueError(
                f"{name}: {where} has state keys {sorted(keys)}, expected {sorted(expected)} (missing "
                f"{sorted(expected - keys)}, unexpected {sorted(keys - expected)}); is this another "
                "optimizer's checkpoint?")
        for key, shape in spec.items():
            value = saved_state[key]
            got = tuple(value.shape) if isinstance(value, Tensor) else ()
            if key != "step" and got != tuple(shape):
                raise ValueError(f"{name}: {where}: state '{key}' has shape {got}, expected {tuple(shape)}")


def restore_state_dtypes(opt, state_dict: dict[str, Any], targets) -> None:
    """Undo torch's cast of floating state to the param dtype, from the original tensors."""
    for pid, saved_state in state_dict["state"].items():
        if pid not in targets:
            continue
        p, merged, _ = targets[pid]
        dtype = resolve_state_dtype(merged.get("state_dtype"), p)
        state = opt.state[p]
        for key, value in saved_state.items():
            if key != "step" and isinstance(value, Tensor) and value.is_floating_point() \
                    and state[key].dtype != dtype:
                state[key] = value.to(device=p.device, dtype=dtype, copy=True)
