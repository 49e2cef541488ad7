"""The state a parameter keeps: its dtype and its step counter."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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


def new_step(value: float = 0.0) -> Tensor:
    """A step counter as torch's Adam keeps it: a CPU scalar tensor, fp64 under a float64
    default dtype and fp32 otherwise."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(value), dtype=dtype)
