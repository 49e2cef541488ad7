r"""Fused multi-tensor update kernels (Triton) for every deepopt optimizer.

One launch per (device, param dtype, state dtype) group and step: the kernel walks a *table*
instead of one launch per parameter. The table is one int64 tensor

    [ pointers (n_lists x n_tensors) | sizes (n) | modes (n) | chunk -> tensor (C) | chunk -> start (C) ]

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
import math
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

# modes of the momentum kernel (low bits) and its "write only" flag
MODE_WRITE, MODE_FIRST, MODE_DELTA_ELEMENTWISE, MODE_DELTA_MATRIX = 0, 1, 2, 3
MODE_NO_FINISH = 8


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


def _tl_dtype(dtype: torch.dtype):
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


def _table(rows: list[list[int]], sizes: list[int], modes: list[int] | None, device, block):
    """(pointer table, sizes, modes, chunk table, n_chunks) for one launch, as device views of one
    int64 buffer; the buffer is cached by content (pointers, sizes, modes) so a step whose
    tensors did not move (data_ptr) or change reuses it."""
    n = len(sizes)
    key = (device, block, tuple(sizes), tuple(modes) if modes else None, *(tuple(r) for r in rows))
    hit = _table_cache.get(key)
    tensor_of, start_of = _chunk_lists(tuple(sizes), block)
    c = len(tensor_of)
    if hit is None:
        flat = [x for r in rows for x in r] + list(sizes) + (modes or [0] * n) + tensor_of + start_of
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
    return ptrs, rest[:n], rest[n:2 * n], rest[2 * n:], c


def _floats(values: list[float], device) -> Tensor:
    host = torch.tensor(values, dtype=torch.float32)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _launch(name: str, lists: list[list[Tensor | None]], args: tuple, consts: dict, *,
            modes: list[int] | None = None, cols: list[list[float]] | None = None,
            per_tensor: Tensor | None = None) -> None:
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
        ptrs, sz, md, chunks, n_chunks = _table(rows, sizes, modes[lo:hi] if modes else None, device, block)
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
            kern[(nprog,)](ptrs, sz, md, chunks, hi - lo, n_chunks, nprog, *extra, *args,
                           ITERS=iters, BLOCK=block, **consts)


def _lr_args(lr, device):
    """(float lr or 0.0, lr tensor on device or a dummy, LR_TENSOR)."""
    if isinstance(lr, Tensor):
        t = lr.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        return 0.0, t, True
    return float(lr), None, False


def _dummy(device) -> Tensor:
    return _dummies(device)


@functools.lru_cache(maxsize=8)
def _dummies(device) -> Tensor:
    return torch.zeros(1, device=device)


def _amp_args(amp, device):
    scale, inf = (amp or (None, None))
    d = _dummy(device)
    return (scale.to(device) if scale is not None else d, inf.to(device) if inf is not None else d,
            scale is not None, inf is not None)


def _skip_on_host(amp) -> bool:
    """For rules with host-side matrix work: one host read of found_inf (True: skip the step)."""
    if amp is None or amp[1] is None:
        return False
    return bool(amp[1].item() != 0)


def _grouped(params, grads, states, state_dtype_of):
    """Indices of params grouped by (device, param dtype, state dtype)."""
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, state_dtype_of(p)), []).append(i)
    return groups


def _dense(tensors: list[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


class _Contig:
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


def _real(t):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


# ----------------------------------------------------------------------------- public wrappers
def _wd_mode(weight_decay, decoupled):
    if weight_decay == 0:
        return 0
    return 2 if decoupled else 1


def fused_momentum_(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                    decoupled_weight_decay, state_dtype_of, amp=None, delta=0.0, keys="elementwise",
                    eps=1e-8, zero_init=False, finish_matrices=True):
    """AssociativeMomentum (SGD value map), DeltaMomentum (both key modes) and the momentum part
    of DeepMomentum (``zero_init=True``: ``M`` exists and the write is ``lerp`` when d == a).

    Returns, for DeepMomentum with ``finish_matrices=False``, nothing: matrices only get the
    memory write (the caller finishes them with :func:`fused_apply_`).
    """
    from . import functional as Fn

    lerp = zero_init and dampening == momentum
    write_rate = 1 - momentum if lerp else 1 - dampening
    for (device, p_dtype, s_dtype), idx in _grouped(params, grads, states, state_dtype_of).items():
        fix = _Contig()
        ps = [fix(_real(params[i])) for i in idx]
        gs = _dense([_real(grads[i]) for i in idx])
        scale_t, inf_t, has_scale, has_inf = _amp_args(amp, device)
        modes = [MODE_WRITE] * len(idx)
        bufs: list[Tensor | None] = [None] * len(idx)
        rs: list[Tensor | None] = [None] * len(idx)
        if momentum != 0 or zero_init:
            firsts = []
            for j, i in enumerate(idx):
                buf = states[i].get("momentum_buffer")
                if buf is None:
                    buf = states[i]["momentum_buffer"] = torch.empty_like(
                        grads[i], dtype=s_dtype, memory_format=torch.contiguous_format)
                    modes[j] = MODE_FIRST
                    firsts.append(i)
                bufs[j] = fix(_real(buf))
            if firsts and has_inf and _skip_on_host(amp):
                for i in firsts:   # a skipped first step must not leave a memory behind
                    del states[i]["momentum_buffer"]
                continue
        matrix_delta = delta != 0 and keys != "elementwise"
        elem_delta = delta != 0
        rms = None
        if matrix_delta:
            if _skip_on_host(amp):
                continue
            for j, i in enumerate(idx):
                if modes[j] == MODE_FIRST or params[i].ndim < 2:
                    continue
                g = grads[i]
                if has_scale:
                    g = g / amp[0].to(g.device)
                g = Fn.preprocess_grad(g, params[i], weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                                       maximize=maximize)
                buf = bufs[j]
                rs[j] = Fn._delta_retention(buf.view(buf.shape[0], -1), g.reshape(g.shape[0], -1), momentum,
                                            delta, keys, eps).view(buf.shape)
                modes[j] = MODE_DELTA_MATRIX
        if elem_delta:
            for j in range(len(idx)):
                if modes[j] == MODE_WRITE:
                    modes[j] = MODE_DELTA_ELEMENTWISE
            rms = _rms_plus_eps(ps, gs, weight_decay if not decoupled_weight_decay else 0.0, maximize,
                                scale_t, has_scale, eps, device)
        else:
            rms = torch.ones(len(idx), device=device)
        if zero_init and not finish_matrices:
            modes = [md | (MODE_NO_FINISH if params[i].ndim >= 2 else 0) for md, i in zip(modes, idx)]
        lr_f, lr_t, lr_tensor = _lr_args(lr, device)
        decay = 1 - lr_f * weight_decay if not lr_tensor else 0.0
        dummy = _dummy(device)
        _launch("momentum", [ps, gs, bufs, rs],
                (lr_f, lr_t if lr_tensor else dummy, scale_t, inf_t,
                 float(momentum), float(write_rate), float(delta), float(weight_decay), float(decay)),
                dict(P_DT=_tl_dtype(ps[0].dtype), G_DT=_tl_dtype(gs[0].dtype), S_DT=_tl_dtype(s_dtype),
                     MAXIMIZE=maximize, WD_MODE=_wd_mode(weight_decay, decoupled_weight_decay),
                     HAS_MOMENTUM=momentum != 0 or zero_init, NESTEROV=bool(nesterov), LERP=lerp,
                     W_SMALL=abs(write_rate) < 0.5, A_SMALL=abs(momentum) < 0.5, LR_TENSOR=lr_tensor,
                     HAS_SCALE=has_scale, HAS_INF=has_inf),
                modes=modes, per_tensor=rms)
        fix.done()


def _rms_plus_eps(ps, gs, coupled_wd, maximize, scale_t, has_scale, eps, device) -> Tensor:
    """Per tensor ``rms(G) + eps`` of the pre-processed gradient (one multi-tensor reduction)."""
    acc = torch.zeros(len(ps), device=device, dtype=torch.float32)
    _launch("sumsq", [ps, gs], (float(coupled_wd), scale_t),
            dict(P_DT=_tl_dtype(ps[0].dtype), G_DT=_tl_dtype(gs[0].dtype), MAXIMIZE=bool(maximize),
                 COUPLED_WD=coupled_wd != 0, HAS_SCALE=has_scale), per_tensor=acc)
    sizes = torch.tensor([max(1, p.numel()) for p in ps], dtype=torch.float32)
    sizes = sizes.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else sizes
    return (acc / sizes).sqrt_().add_(eps)


def _device_steps(states, idx, device) -> list[Tensor]:
    """The ``step`` counters of ``idx`` as fp32 tensors on ``device`` (moved there once)."""
    steps = []
    for i in idx:
        step = states[i]["step"]
        if step.device != device or step.dtype != torch.float32:
            step = states[i]["step"] = step.to(device=device, dtype=torch.float32)
        steps.append(step)
    return steps


def _count_steps(steps: list[Tensor], amp) -> None:
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


def fused_adam_(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, maximize,
                decoupled_weight_decay, state_dtype_of, amp=None):
    """AssociativeMomentum(preconditioner="adam") and M3's AdamW groups: torch's Adam/AdamW."""
    w1, w2 = 1 - beta1, 1 - beta2
    for (device, p_dtype, s_dtype), idx in _grouped(params, grads, states, state_dtype_of).items():
        fix = _Contig()
        ps = [fix(_real(params[i])) for i in idx]
        gs = _dense([_real(grads[i]) for i in idx])
        ms = [fix(_real(states[i]["exp_avg"])) for i in idx]
        vs = [fix(_real(states[i]["exp_avg_sq"])) for i in idx]
        steps = _device_steps(states, idx, device)
        _count_steps(steps, amp)
        scale_t, inf_t, has_scale, has_inf = _amp_args(amp, device)
        lr_f, lr_t, lr_tensor = _lr_args(lr, device)
        hp = _hyper(device, float(beta1), float(beta2))
        _launch("adam", [ps, gs, ms, vs, steps],
                (hp, lr_f, lr_t if lr_tensor else _dummy(device), scale_t, inf_t, float(w1), float(w2),
                 float(eps), float(weight_decay)),
                dict(P_DT=_tl_dtype(ps[0].dtype), G_DT=_tl_dtype(gs[0].dtype), S_DT=_tl_dtype(ms[0].dtype),
                     MAXIMIZE=bool(maximize), WD_MODE=_wd_mode(weight_decay, decoupled_weight_decay),
                     W_SMALL=abs(w1) < 0.5, LR_TENSOR=lr_tensor, HAS_SCALE=has_scale, HAS_INF=has_inf))
        fix.done()


@functools.lru_cache(maxsize=64)
def _hyper(device, *values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def fused_apply_(params, updates, *, lr, lr_scales, weight_decay, state_dtype, amp=None, slow=None,
                 slow_weight=0.0, exp_avg_sqs=None, bias_corrections2=None, eps=0.0):
    """``p <- p (1 - lr wd) - lr * scale_t * U`` over matrices of one device and dtype, with
    ``U = X [+ slow_weight * O] [/ (sqrt(S / bc2_t) + eps)]`` (DeepMomentum's and M3's last step).
    ``updates`` (X) share one dtype (bf16 after Newton-Schulz, or the state dtype)."""
    if not params:
        return
    device = params[0].device
    fix = _Contig()
    ps = [fix(p) for p in params]
    xs = _dense(updates)
    lr_f, lr_t, lr_tensor = _lr_args(lr, device)
    first = [s if lr_tensor else lr_f * s for s in lr_scales]
    cols = [first, bias_corrections2 if bias_corrections2 is not None else [1.0] * len(ps)]
    _, inf_t, _, has_inf = _amp_args(amp, device)
    has_slow = slow is not None and slow_weight != 0
    precond = exp_avg_sqs is not None
    none = [None] * len(ps)
    _launch("apply", [ps, xs, slow if has_slow else none, exp_avg_sqs if precond else none],
            (lr_f, lr_t if lr_tensor else _dummy(device), inf_t, float(weight_decay),
             float(1 - lr_f * weight_decay), float(slow_weight), float(eps)),
            dict(P_DT=_tl_dtype(ps[0].dtype), X_DT=_tl_dtype(xs[0].dtype), S_DT=_tl_dtype(state_dtype),
                 HAS_WD=weight_decay != 0, HAS_SLOW=has_slow, PRECOND=precond, LR_TENSOR=lr_tensor,
                 HAS_INF=has_inf),
            cols=cols)
    fix.done()


def fused_deep_momentum_(params, grads, states, *, lr, momentum, dampening, weight_decay, nesterov,
                         maximize, decoupled_weight_decay, state_dtype_of, amp=None, **rule):
    """DeepMomentum: one launch writes every memory (and finishes the ndim < 2 params); the MLP
    memory and Newton-Schulz run as torch ops per matrix; one more launch updates the matrices."""
    from . import functional as Fn
    from .deep_momentum import _update_of

    lerp = dampening == momentum
    has_matrices = any(p.ndim >= 2 for p in params)
    if has_matrices and _skip_on_host(amp):
        return
    for _, idx in _grouped(params, grads, states, state_dtype_of).items():
        _count_steps(_device_steps(states, idx, params[idx[0]].device), amp)
    if not has_matrices:
        fused_momentum_(params, grads, states, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay, state_dtype_of=state_dtype_of,
                        amp=amp, zero_init=True)
        return
    # the matrices need G itself (keys, the MLP's targets): unscale and pre-process it once
    scale = amp[0] if amp is not None else None
    gs = [g / scale.to(g.device) if scale is not None else g for g in grads]
    gs = [Fn.preprocess_grad(g, p, weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                             maximize=maximize) for g, p in zip(gs, params)]
    fused_momentum_(params, gs, states, lr=lr, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay if decoupled_weight_decay else 0.0, nesterov=nesterov,
                    maximize=False, decoupled_weight_decay=True, state_dtype_of=state_dtype_of,
                    zero_init=True, finish_matrices=False)
    by_group: dict[Any, tuple[list, list, list]] = {}
    for p, g, state in zip(params, gs, states):
        if p.ndim < 2:
            continue
        u = Fn.momentum_readout(g, state["momentum_buffer"], momentum, nesterov=nesterov, lerp=lerp)
        u, step_lr = _update_of(p, g, u, state, lr=1.0, **rule)
        entry = by_group.setdefault((p.device, p.dtype, u.dtype, state_dtype_of(p)), ([], [], []))
        entry[0].append(p)
        entry[1].append(u)
        entry[2].append(float(step_lr))
    for (_, _, _, s_dtype), (ps, us, scales) in by_group.items():
        fused_apply_(ps, us, lr=lr, lr_scales=scales,
                     weight_decay=weight_decay if decoupled_weight_decay else 0.0, state_dtype=s_dtype)


def fused_m3_(params, grads, states, *, lr, momentum, dampening, weight_decay, maximize, nesterov,
              slow_momentum, beta2, slow_weight, chunk, eps, precondition, ns_steps, adjust_lr,
              state_dtype_of, amp=None):
    """M3: one launch for the every-step writes (M1, S, A, decay); the chunk-boundary update of the
    slow memory and both Newton-Schulz calls as torch ops; one launch for the update."""
    from . import functional as Fn
    from ._optimizer import as_matrix

    if _skip_on_host(amp):
        return
    lerp = dampening == momentum
    write_rate = 1 - momentum if lerp else 1 - dampening
    scale = amp[0] if amp is not None else None
    for (device, p_dtype, s_dtype), idx in _grouped(params, grads, states, state_dtype_of).items():
        ps = [params[i] for i in idx]
        gs = [grads[i] / scale.to(device) if scale is not None else grads[i] for i in idx]
        gs = _dense([-g if maximize else g for g in gs])
        sts = [states[i] for i in idx]
        steps = [s["step"] for s in sts]
        torch._foreach_add_(steps, 1)   # host counters: the chunk schedule is decided on the host
        lr_f, lr_t, lr_tensor = _lr_args(lr, device)
        fix = _Contig()
        fps = [fix(p) for p in ps]
        _launch("m3_write", [fps, gs, [s["momentum_buffer"] for s in sts], [s["exp_avg_sq"] for s in sts],
                             [s["chunk_sum"] for s in sts]],
                (lr_f, lr_t if lr_tensor else _dummy(device), _dummy(device), _dummy(device), float(momentum),
                 float(write_rate), float(beta2), float(weight_decay), float(1 - lr_f * weight_decay)),
                dict(P_DT=_tl_dtype(p_dtype), G_DT=_tl_dtype(gs[0].dtype), S_DT=_tl_dtype(s_dtype), LERP=lerp,
                     W_SMALL=abs(write_rate) < 0.5, HAS_WD=weight_decay != 0, LR_TENSOR=lr_tensor,
                     HAS_SCALE=False, HAS_INF=False))
        fix.done()
        xs, scales, bcs = [], [], []
        for p, g, state in zip(ps, gs, sts):
            t = int(state["step"].item())   # a CPU counter: no device sync
            if t % chunk == 0:
                slow = state["slow_buffer"].lerp_(state["chunk_sum"] / chunk, 1 - slow_momentum)
                state["slow_output"].copy_(Fn.newton_schulz(as_matrix(slow), steps=ns_steps).reshape(p.shape))
                state["chunk_sum"].zero_()
            u = Fn.momentum_readout(g, state["momentum_buffer"], momentum, nesterov=nesterov, lerp=lerp)
            xs.append(Fn.newton_schulz(as_matrix(u), steps=ns_steps).reshape(p.shape))
            scales.append(float(Fn.adjust_lr(1.0, adjust_lr, as_matrix(p).shape)))
            bcs.append(1 - beta2 ** t)
        fused_apply_(ps, xs, lr=lr, lr_scales=scales, weight_decay=0.0, state_dtype=s_dtype,
                     slow=[s["slow_output"] for s in sts], slow_weight=slow_weight,
                     exp_avg_sqs=[s["exp_avg_sq"] for s in sts] if precondition else None,
                     bias_corrections2=bcs, eps=eps)
