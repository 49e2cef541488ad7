"""Hyperparameter and argument checks: each error names the parameter and its valid range."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

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


def check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is None or state_dtype == "param":
        return
    if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"Invalid state_dtype value: {state_dtype!r} (state_dtype must be None, 'param' "
                         "or a floating torch.dtype)")


def split_names(params: list) -> tuple[list | None, list]:
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


