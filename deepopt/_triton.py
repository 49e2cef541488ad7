r"""deepopt's multi-tensor apply for Triton: the launcher every rule's fused path uses.

A rule's fused path (``_fused_*`` in its own module) groups its tensors and calls
:func:`launch` with one of the kernels of :mod:`deepopt._triton_kernels`. One launch per
(device, param dtype, state dtype, mode) group and step: the kernel walks a *table* instead of
one launch per parameter. The table is one int64 tensor

    [ pointers (n_lists x n_tensors) | sizes (n) | chunk -> tensor (C) | chunk -> start (C) ]

plus, where a rule needs them, per-tensor fp32 columns. Every program of the launch processes
``ITERS`` chunks of ``BLOCK`` elements (chunk ``pid + i * n_programs``); a chunk looks up its
tensor, loads that tensor's base pointers from the table and casts them to typed pointers.
A table holds at most :data:`TABLE_CAPACITY` tensors; longer lists take several launches.

What runs here and what stays torch:

* elementwise work (momentum / delta-rule / Adam / M3 writes, read-outs, weight decay, the
  parameter update, gradient unscaling and the ``found_inf`` skip) runs in the kernels;
* the matrix products (delta-rule matrix keys, the MLP memory, Newton-Schulz) stay the same
  torch calls as the for-loop path (same precision) and the kernels fuse around them.

All arithmetic is fp32 (fp64 for Adam's bias corrections), for any param dtype: bf16/fp16
params with fp32 state read and write their own dtype. A tensor ``lr`` is read on the device
(no ``.item()``). With ``found_inf`` every store is masked off, so a skipped step changes
nothing; step counters are incremented by device ops and decremented by ``found_inf``.
Rules with host-side matrix work (delta ``keys="matrix"``, DeepMomentum matrices, M3) read
``found_inf`` once per step on the host, as GradScaler's unfused path does.

Triton is imported on first use only (never at ``import deepopt``). On CPU the kernels run
only under the interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any

import torch
from torch import Tensor

#: the most tensors one launch's table holds (tests set it small to exercise the split)
TABLE_CAPACITY = 2048
#: elements per chunk (one program iteration)
BLOCK_GPU = 4096
BLOCK_INTERPRETER = 256
#: programs per launch under the interpreter (each program instance costs ~2 ms there)
MAX_PROGRAMS_INTERPRETER = 64

# the momentum kernel's writes, one compile-time MODE per launch (their one home: the kernels
# read these numbers from here)
MODE_WRITE, MODE_FIRST, MODE_DELTA_ELEMENTWISE, MODE_DELTA_MATRIX = 0, 1, 2, 3


# ----------------------------------------------------------------------------- availability
@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(tensors) -> str | None:
    """Why the Triton path cannot run on these tensors (``None``: it can)."""
    err = _import_error()
    if err is not None:
        return f"Triton is not installed or fails to import ({err}); pip install 'triton>=3.6'"
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreter_enabled():
            continue
        return (f"the Triton kernels need CUDA tensors (got a {t.device.type} tensor of shape "
                f"{tuple(t.shape)}); on CPU they run only under TRITON_INTERPRET=1 (tests)")
    return None


#: ``fused=None`` picks the Triton path for CUDA tensors only once the kernels have passed
#: tests/test_fused.py on a GPU. They are verified under the CPU interpreter only so far, so the
#: default stays foreach; ``fused=True`` opts in (set this to True to make it the default).
AUTO_FUSED = False


def auto_fused(tensors) -> bool:
    """``fused=None``: the Triton path for CUDA tensors when enabled and Triton imports, else foreach."""
    tensors = list(tensors)
    return AUTO_FUSED and bool(tensors) and all(t.is_cuda for t in tensors) and _import_error() is None


# ----------------------------------------------------------------------------- kernels
def _kernels(interpret: bool) -> dict:
    """The kernels (triton is imported here, on first use). The interpreter choice is made when
    the kernels are defined, so the module is reloaded if ``TRITON_INTERPRET`` changed since."""
    import importlib

    from . import _triton_kernels as mod
    if getattr(mod, "_interpret", interpret) != interpret:
        mod = importlib.reload(mod)
    mod._interpret = interpret
    return mod.KERNELS


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


# ----------------------------------------------------------------------------- tables and launches
def _block(device: torch.device) -> int:
    return BLOCK_INTERPRETER if device.type == "cpu" else BLOCK_GPU


@functools.lru_cache(maxsize=64)
def _chunk_lists(sizes: tuple[int, ...], block: int) -> tuple[list[int], list[int]]:
    tensor_of, start_of = [], []
    for i, n in enumerate(sizes):
        starts = range(0, n, block)
        tensor_of.extend([i] * len(starts))
        start_of.extend(starts)
    return tensor_of, start_of


_table_cache: dict[Any, Tensor] = {}   # a pure function of its key: safe to share across threads
_INTERPRETER_LOCK = threading.Lock()


def _table(rows: list[list[int]], sizes: list[int], device, block):
    """(pointer table, sizes, chunk table, n_chunks) for one launch, as device views of one
    int64 buffer; the buffer is cached by content (pointers, sizes) so a step whose tensors did
    not move (data_ptr) or change reuses it."""
    n = len(sizes)
    key = (device, block, tuple(sizes), *(tuple(r) for r in rows))
    hit = _table_cache.get(key)
    tensor_of, start_of = _chunk_lists(tuple(sizes), block)
    c = len(tensor_of)
    if hit is None:
        flat = [x for r in rows for x in r] + list(sizes) + tensor_of + start_of
        host = torch.tensor(flat, dtype=torch.int64)
        if device.type == "cuda":
            hit = host.pin_memory().to(device, non_blocking=True)
        else:
            hit = host
        if len(_table_cache) > 256:
            _table_cache.clear()
        _table_cache[key] = hit
    k = len(rows)
    ptrs, rest = hit[:k * n], hit[k * n:]
    return ptrs, rest[:n], rest[n:], c


def _floats(values: list[float], device) -> Tensor:
    host = torch.tensor(values, dtype=torch.float32)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def launch(name: str, lists: list[list[Tensor | None]], args: tuple, consts: dict, *,
           cols: list[list[float]] | None = None, per_tensor: Tensor | None = None) -> None:
    """Launch kernel ``name`` over ``lists`` (row 0 decides sizes), split by TABLE_CAPACITY.

    ``cols``: per-tensor fp32 columns, passed (concatenated, column-major) right after the
    table arguments; ``per_tensor``: a per-tensor device vector (e.g. rms) sliced per launch.
    """
    total = len(lists[0])
    if total == 0:
        return
    device = lists[0][0].device
    kern = _kernels(interpreter_enabled())[name]
    block = _block(device)
    cap = max(1, int(TABLE_CAPACITY))
    for lo in range(0, total, cap):
        hi = min(total, lo + cap)
        sizes = [t.numel() for t in lists[0][lo:hi]]
        rows = [[_ptr(t) for t in row[lo:hi]] for row in lists]
        ptrs, sz, chunks, n_chunks = _table(rows, sizes, device, block)
        if n_chunks == 0:
            continue
        if device.type == "cpu":
            nprog = min(n_chunks, MAX_PROGRAMS_INTERPRETER)
        else:
            nprog = n_chunks
        iters = -(-n_chunks // nprog)
        extra = []
        if cols is not None:
            flat = [v for col in cols for v in col[lo:hi]]
            extra.append(_floats(flat, device))
        if per_tensor is not None:
            extra.append(per_tensor[lo:hi])
        # Triton's interpreter patches module-level state while it runs a kernel: one at a time
        with _INTERPRETER_LOCK if device.type == "cpu" else contextlib.nullcontext():
            kern[(nprog,)](ptrs, sz, chunks, hi - lo, n_chunks, nprog, *extra, *args,
                           ITERS=iters, BLOCK=block, **consts)


def lr_args(lr, device):
    """(float lr or 0.0, lr tensor on device or a dummy, LR_TENSOR)."""
    if isinstance(lr, Tensor):
        t = lr.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        return 0.0, t, True
    return float(lr), None, False


def dummy(device) -> Tensor:
    return _dummies(device)


@functools.lru_cache(maxsize=8)
def _dummies(device) -> Tensor:
    return torch.zeros(1, device=device)


def amp_args(amp, device):
    scale, inf = (amp or (None, None))
    d = dummy(device)
    return (scale.to(device) if scale is not None else d, inf.to(device) if inf is not None else d,
            scale is not None, inf is not None)


def skip_on_host(amp) -> bool:
    """For rules with host-side matrix work: one host read of found_inf (True: skip the step)."""
    if amp is None or amp[1] is None:
        return False
    return bool(amp[1].item() != 0)


def grouped(params, state_dtype) -> dict[Any, list[int]]:
    """Indices of params grouped by (device, param dtype, state dtype)."""
    from ._state import resolve_state_dtype
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, resolve_state_dtype(state_dtype, p)), []).append(i)
    return groups


def launch_by_mode(name: str, lists: list[list[Tensor | None]], modes: list[int], args: tuple, consts: dict,
                   *, per_tensor: Tensor | None = None) -> None:
    """:func:`launch` once per distinct ``modes`` value, with ``MODE`` a compile-time constant."""
    for mode in sorted(set(modes)):
        pick = [j for j, md in enumerate(modes) if md == mode]
        launch(name, [[row[j] for j in pick] for row in lists], args, {**consts, "MODE": mode},
               per_tensor=None if per_tensor is None else per_tensor[pick])


def dense(tensors: list[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


class Contiguous:
    """Contiguous stand-ins for non-contiguous tensors, written back on ``done()``."""

    def __init__(self):
        self.back: list[tuple[Tensor, Tensor]] = []

    def __call__(self, t: Tensor) -> Tensor:
        if t is None or t.is_contiguous():
            return t
        c = t.contiguous()
        self.back.append((t, c))
        return c

    def done(self):
        for t, c in self.back:
            t.copy_(c)


def real(t):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


# ----------------------------------------------------------------------------- shared pieces
def wd_mode(weight_decay, decoupled):
    """0: none; 1: coupled (in G); 2: decoupled (p *= 1 - lr wd)."""
    if weight_decay == 0:
        return 0
    return 2 if decoupled else 1


def device_steps(states, idx, device) -> list[Tensor]:
    """The ``step`` counters of ``idx`` as fp32 tensors on ``device`` (moved there once)."""
    steps = []
    for i in idx:
        step = states[i]["step"]
        if step.device != device or step.dtype != torch.float32:
            step = states[i]["step"] = step.to(device=device, dtype=torch.float32)
        steps.append(step)
    return steps


def count_steps(steps: list[Tensor], amp) -> None:
    """``step += 1``, undone by ``found_inf`` (device ops only)."""
    if not steps:
        return
    if steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)
    if amp is not None and amp[1] is not None:
        inf = amp[1].to(device=steps[0].device, dtype=torch.float32)
        torch._foreach_sub_(steps, [inf] * len(steps))


@functools.lru_cache(maxsize=64)
def hyper(device, *values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def apply_update_(params, updates, *, lr, lr_scales, weight_decay, amp=None):
    """The last step of the matrix rules (DeepMomentum, M3), one launch:
    ``p <- p (1 - lr wd) - lr * scale_t * X`` over matrices of one device
    and dtype. ``updates`` (X) share one dtype (bf16 after Newton-Schulz, or fp32 and wider)."""
    if not params:
        return
    device = params[0].device
    fix = Contiguous()
    ps = [fix(p) for p in params]
    xs = dense(updates)
    if any(x.dtype != xs[0].dtype for x in xs):   # one X_DT per launch
        raise ValueError(f"apply_update_: updates of mixed dtypes {sorted({str(x.dtype) for x in xs})}")
    lr_f, lr_t, lr_tensor = lr_args(lr, device)
    scales = [s if lr_tensor else lr_f * s for s in lr_scales]
    _, inf_t, _, has_inf = amp_args(amp, device)
    launch("apply", [ps, xs],
           (lr_f, lr_t if lr_tensor else dummy(device), inf_t, float(weight_decay),
            float(1 - lr_f * weight_decay)),
           dict(P_DT=tl_dtype(ps[0].dtype), X_DT=tl_dtype(xs[0].dtype),
                HAS_WD=weight_decay != 0, LR_TENSOR=lr_tensor, HAS_INF=has_inf),
           cols=[scales])
    fix.done()
