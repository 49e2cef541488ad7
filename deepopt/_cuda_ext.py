"""Optional CUDA C++ multi-tensor kernels for AssociativeMomentum (``fused=True, fused_backend="cuda"``).

The sources live in the repository's top-level ``csrc/`` (apex's layout: one multi-tensor-apply
header, a functor per rule); setup.py copies them into the wheel as ``deepopt/csrc``. They are
compiled just in time on first use
with ``torch.utils.cpp_extension.load`` (cached by torch under ``TORCH_EXTENSIONS_DIR``). Nothing
is compiled at install or at ``import deepopt``, so a CPU-only install never needs a toolchain:
without one, :func:`unavailable_reason` says why and the Triton / foreach paths serve instead.

Covered: the SGD value map (momentum, dampening, Nesterov, coupled/decoupled weight decay,
maximize) and the Adam value map (Adam / AdamW), fp32 state with fp32/bf16/fp16 params, tensor
``lr`` read on the device, GradScaler's ``grad_scale`` / ``found_inf``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor

def _csrc() -> Path:
    """``csrc/`` of a source checkout (editable install), else the copy inside the wheel."""
    checkout = Path(__file__).resolve().parent.parent / "csrc"
    return checkout if (checkout / "multi_tensor_apply.cuh").exists() else Path(__file__).parent / "csrc"


CSRC = _csrc()
SOURCES = [CSRC / "bindings.cpp", CSRC / "multi_tensor_kernels.cu"]
HEADERS = [CSRC / "multi_tensor.h", CSRC / "multi_tensor_apply.cuh"]


def _toolchain_problem() -> str | None:
    if not torch.cuda.is_available() and not os.environ.get("DEEPOPT_BUILD_WITHOUT_GPU"):
        return "no CUDA device is available"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return ("no CUDA toolkit found (nvcc; set CUDA_HOME) to compile deepopt's CUDA kernels "
                "just in time")
    missing = [str(s) for s in SOURCES + HEADERS if not s.exists()]
    if missing:
        return f"the CUDA sources are missing from this install: {missing}"
    return None


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """Compile (first call) and import the extension; raises ``RuntimeError`` with the reason."""
    problem = _toolchain_problem()
    if problem is not None:
        raise RuntimeError(f"deepopt's CUDA extension is unavailable: {problem}. "
                           "Use fused_backend='triton' or foreach instead.")
    from torch.utils.cpp_extension import load as _load
    extra_include = [str(p) for p in os.environ.get("DEEPOPT_EXTRA_INCLUDE", "").split(os.pathsep) if p]
    try:
        return _load(name="deepopt_multi_tensor", sources=[str(s) for s in SOURCES],
                     extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                     extra_include_paths=[str(CSRC), *extra_include], verbose=verbose)
    except Exception as e:   # compiler errors, missing headers
        raise RuntimeError(f"deepopt's CUDA extension failed to build: {e}") from e


def unavailable_reason(tensors=()) -> str | None:
    """Why ``fused_backend="cuda"`` cannot run (``None``: it can); never raises, may compile."""
    for t in tensors:
        if not t.is_cuda:
            return f"the CUDA kernels need CUDA tensors (got a {t.device.type} tensor)"
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


def _opt(t: Tensor | None, device) -> Tensor | None:
    return None if t is None else t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def sgd_(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
         decoupled_weight_decay, amp=None) -> None:
    """AssociativeMomentum(preconditioner=None) over params of one device (fp32 state)."""
    ext = load()
    device = params[0].device
    if amp is not None and amp[1] is not None and momentum != 0 \
            and any("momentum_buffer" not in s for s in states) and bool(amp[1].item()):
        return   # a skipped first step leaves no memory behind (one host read, first step only)
    bufs, first = [], []
    for g, s in zip(grads, states):
        if momentum != 0 and "momentum_buffer" not in s:
            s["momentum_buffer"] = torch.empty_like(g, dtype=torch.float32, memory_format=torch.contiguous_format)
            first.append(1)
        else:
            first.append(0)
        bufs.append(s.get("momentum_buffer", g))
    lr_t = _opt(lr, device) if isinstance(lr, Tensor) else None
    scale, inf = amp if amp is not None else (None, None)
    ext.sgd_update(list(params), [g.float().contiguous() for g in grads], bufs, first,
                   0.0 if lr_t is not None else float(lr), lr_t, float(momentum), float(dampening),
                   float(weight_decay), bool(decoupled_weight_decay), bool(nesterov), bool(maximize),
                   _opt(scale, device), _opt(inf, device))


def adam_(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay,
          amp=None) -> None:
    """AssociativeMomentum(preconditioner="adam") over params of one device (fp32 state)."""
    ext = load()
    device = params[0].device
    steps = []
    for s in states:
        if s["step"].device != device or s["step"].dtype != torch.float32:
            s["step"] = s["step"].to(device=device, dtype=torch.float32)
        steps.append(s["step"])
    torch._foreach_add_(steps, 1)
    scale, inf = amp if amp is not None else (None, None)
    if inf is not None:
        torch._foreach_sub_(steps, [inf.to(device=device, dtype=torch.float32)] * len(steps))
    lr_t = _opt(lr, device) if isinstance(lr, Tensor) else None
    ext.adam_update(list(params), [g.float().contiguous() for g in grads], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], steps, 0.0 if lr_t is not None else float(lr), lr_t,
                    float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled_weight_decay),
                    bool(maximize), _opt(scale, device), _opt(inf, device))
