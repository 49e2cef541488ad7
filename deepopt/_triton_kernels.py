"""The Triton kernels of :mod:`deepopt._triton` (imported on first use: it imports triton).

Every kernel walks one multi-tensor table (see :mod:`deepopt._triton`): argument prefix
``(ptrs, sizes, chunks, n_tensors, n_chunks, nprog)``, then its own arguments; each program
runs ``ITERS`` chunks of ``BLOCK`` elements. All arithmetic is fp32 (fp64 for Adam's bias
corrections); stores are masked off when ``found_inf`` is set.
"""

import triton
import triton.language as tl

from deepopt import _triton as _launcher


@triton.jit
def _chunk(tab, n_tensors, n_chunks, pid, i, nprog, BLOCK: tl.constexpr):
    """(tensor index, element offsets, mask) of this program's i-th chunk."""
    c = pid + i * nprog
    valid = c < n_chunks
    t = tl.load(tab + c, mask=valid, other=0)
    start = tl.load(tab + n_chunks + c, mask=valid, other=0)
    return t, start, valid

@triton.jit
def _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK: tl.constexpr):
    """(tensor index, element offsets, in-bounds mask, chunk valid) of this program's i-th chunk.
    The size of an invalid chunk loads as 0, so the mask needs no ``valid &`` (a scalar/block mix
    that triton 3.9's interpreter rejects)."""
    t, start, valid = _chunk(chunks, n_tensors, n_chunks, pid, i, nprog, BLOCK)
    n = tl.load(sizes + t, mask=valid, other=0)
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < n, valid

@triton.jit
def _decay_factor(lr_v, wd, decay, LR_TENSOR: tl.constexpr):
    # decoupled weight decay 1 - lr * wd: on the device when lr is a tensor
    if LR_TENSOR:
        return 1.0 - lr_v * wd
    else:
        return decay

@triton.jit
def _lerp(a, b, w, W_SMALL: tl.constexpr):
    # torch's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
    if W_SMALL:
        return a + w * (b - a)
    else:
        return b - (b - a) * (1.0 - w)

@triton.jit
def _ptr(ptrs, row, n_tensors, t, valid, DT: tl.constexpr):
    return tl.load(ptrs + row * n_tensors + t, mask=valid, other=0).to(tl.pointer_type(DT))

@triton.jit
def _lr(lr, lr_ptr, LR_TENSOR: tl.constexpr):
    if LR_TENSOR:
        return tl.load(lr_ptr).to(tl.float32)
    else:
        return lr

@triton.jit
def _grad(ptrs, n_tensors, t, valid, offs, m, scale_ptr, HAS_SCALE: tl.constexpr, G_DT: tl.constexpr):
    g = tl.load(_ptr(ptrs, 1, n_tensors, t, valid, G_DT) + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
    return g

@triton.jit
def _preprocessed(p_ptr, ptrs, n_tensors, t, valid, offs, m, scale_ptr, wd, HAS_SCALE: tl.constexpr,
                  G_DT: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr,
                  LOAD_P: tl.constexpr):
    """(G, p) in fp32: the unscaled gradient, negated if maximize, plus coupled weight decay
    (the pre-processing of functional.decay_and_preprocess). ``p`` is read only when
    the caller needs it (``LOAD_P``) or the decay does; otherwise it is 0."""
    g = _grad(ptrs, n_tensors, t, valid, offs, m, scale_ptr, HAS_SCALE, G_DT)
    if MAXIMIZE:
        g = -g
    if LOAD_P or COUPLED_WD:
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        p = tl.zeros_like(g)
    if COUPLED_WD:
        g = g + wd * p
    return g, p

@triton.jit
def _ok(m, offs, inf_ptr, HAS_INF: tl.constexpr):
    # found_inf loaded as a (broadcast) block: the interpreter mishandles scalar float compares
    if HAS_INF:
        return m & (tl.load(inf_ptr + offs * 0, mask=m, other=1.0) == 0.0)
    else:
        return m

# -- sum of squares of the pre-processed gradient, per tensor (delta-rule elementwise keys)
@triton.jit
def sumsq_kernel(ptrs, sizes, chunks, n_tensors, n_chunks, nprog, acc, wd, scale_ptr,
                 P_DT: tl.constexpr, G_DT: tl.constexpr, MAXIMIZE: tl.constexpr,
                 COUPLED_WD: tl.constexpr, HAS_SCALE: tl.constexpr, ITERS: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    for i in range(ITERS):
        t, offs, m, valid = _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK)
        g, _ = _preprocessed(_ptr(ptrs, 0, n_tensors, t, valid, P_DT), ptrs, n_tensors, t, valid, offs, m,
                             scale_ptr, wd, HAS_SCALE, G_DT, MAXIMIZE, COUPLED_WD, False)
        tl.atomic_add(acc + t, tl.sum(g * g, 0), mask=valid)

# -- one helper per formula (the Python home of each is deepopt/functional.py) ----------------
@triton.jit
def _momentum_write(b, g, momentum, write_rate, LERP: tl.constexpr, W_SMALL: tl.constexpr):
    # functional.momentum_write_: M <- a M + (1 - d) G, or M.lerp_(G, 1 - a) (zero-init, d == a)
    if LERP:
        return _lerp(b, g, write_rate, W_SMALL)
    else:
        return b * momentum + write_rate * g

@triton.jit
def _nesterov_readout(g, b, momentum, LERP: tl.constexpr, A_SMALL: tl.constexpr):
    # functional.momentum_readout with nesterov: G + a M, or G.lerp(M, a)
    if LERP:
        return _lerp(g, b, momentum, A_SMALL)
    else:
        return g + momentum * b

@triton.jit
def _second_moment(v, g, beta2, one_minus_beta2):
    # S <- beta2 S + (1 - beta2) G^2 (Adam's exp_avg_sq, M3's S)
    return v * beta2 + one_minus_beta2 * (g * g)

@triton.jit
def _elementwise_delta_retention(g, rms_plus_eps, momentum, delta):
    # functional.delta_forget_, elementwise keys: max(a - delta k^2, 0), k = g / (rms(G) + eps)
    k = g / rms_plus_eps
    return tl.maximum(momentum - delta * (k * k), 0.0)

# -- the momentum family: SGD convention, zero-init convention, delta-rule writes.
# MODE (a compile-time constant per launch): the write of this launch's tensors.
# (numbers from deepopt._triton, their one home: WRITE M <- a M + (1 - d) G; FIRST M <- G, the SGD
# convention's first step; DELTA_MATRIX M <- a M - delta R + (1 - d) G, R = (M Gh^T) Gh from torch)
MODE_WRITE = tl.constexpr(_launcher.MODE_WRITE)
MODE_FIRST = tl.constexpr(_launcher.MODE_FIRST)
MODE_DELTA_ELEMENTWISE = tl.constexpr(_launcher.MODE_DELTA_ELEMENTWISE)
MODE_DELTA_MATRIX = tl.constexpr(_launcher.MODE_DELTA_MATRIX)

@triton.jit
def momentum_kernel(ptrs, sizes, chunks, n_tensors, n_chunks, nprog, rms,
                    lr, lr_ptr, scale_ptr, inf_ptr, momentum, write_rate, delta, wd, decay,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, MODE: tl.constexpr,
                    FINISH: tl.constexpr, MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr,
                    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, LERP: tl.constexpr,
                    W_SMALL: tl.constexpr, A_SMALL: tl.constexpr, LR_TENSOR: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lr_v = _lr(lr, lr_ptr, LR_TENSOR)
    decay_v = _decay_factor(lr_v, wd, decay, LR_TENSOR)
    for i in range(ITERS):
        t, offs, m, valid = _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK)
        st = _ok(m, offs, inf_ptr, HAS_INF)
        p_ptr = _ptr(ptrs, 0, n_tensors, t, valid, P_DT)
        g, p = _preprocessed(p_ptr, ptrs, n_tensors, t, valid, offs, m, scale_ptr, wd, HAS_SCALE, G_DT,
                             MAXIMIZE, WD_MODE == 1, FINISH)
        u = g
        if HAS_MOMENTUM:
            b_ptr = _ptr(ptrs, 2, n_tensors, t, valid, S_DT)
            if MODE == MODE_FIRST:
                nb = g
            else:
                b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
                if MODE == MODE_DELTA_ELEMENTWISE:
                    ret = _elementwise_delta_retention(g, tl.load(rms + t, mask=valid, other=1.0), momentum, delta)
                    nb = b * ret + write_rate * g
                elif MODE == MODE_DELTA_MATRIX:
                    r = tl.load(_ptr(ptrs, 3, n_tensors, t, valid, S_DT) + offs, mask=m, other=0.0).to(tl.float32)
                    nb = (b * momentum - delta * r) + write_rate * g
                else:
                    nb = _momentum_write(b, g, momentum, write_rate, LERP, W_SMALL)
            nb = nb.to(S_DT).to(tl.float32)
            tl.store(b_ptr + offs, nb.to(S_DT), mask=st)
            if NESTEROV:
                u = _nesterov_readout(g, nb, momentum, LERP, A_SMALL)
            else:
                u = nb
        if FINISH:   # (matrices of DeepMomentum take only the write here; apply_kernel finishes them)
            if WD_MODE == 2:
                p = p * decay_v
            p = p + (-lr_v) * u
            tl.store(p_ptr + offs, p.to(P_DT), mask=st)

# -- Adam / AdamW (the adam value map; M3's AdamW groups)
@triton.jit
def _pow(b, e):
    # b ** e for an integer-valued e >= 0, by repeated squaring (fp64, no libdevice)
    r = tl.full((), 1.0, tl.float64)
    while e > 0:
        if e % 2 == 1:
            r = r * b
        b = b * b
        e = e // 2
    return r

@triton.jit
def adam_kernel(ptrs, sizes, chunks, n_tensors, n_chunks, nprog, hp,
                lr, lr_ptr, scale_ptr, inf_ptr, w1, w2, eps, wd,
                P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                MAXIMIZE: tl.constexpr, WD_MODE: tl.constexpr, W_SMALL: tl.constexpr,
                LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lr_v = _lr(lr, lr_ptr, LR_TENSOR)
    beta1 = tl.load(hp)
    beta2 = tl.load(hp + 1)
    for i in range(ITERS):
        t, offs, m, valid = _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK)
        st = _ok(m, offs, inf_ptr, HAS_INF)
        step = tl.load(_ptr(ptrs, 4, n_tensors, t, valid, tl.float32), mask=valid, other=1.0)
        e = step.to(tl.int32)
        bc1 = 1.0 - _pow(beta1, e)
        bc2 = 1.0 - _pow(beta2, e)
        step_size = (lr_v.to(tl.float64) / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
        p_ptr = _ptr(ptrs, 0, n_tensors, t, valid, P_DT)
        m_ptr = _ptr(ptrs, 2, n_tensors, t, valid, S_DT)
        v_ptr = _ptr(ptrs, 3, n_tensors, t, valid, S_DT)
        g, p = _preprocessed(p_ptr, ptrs, n_tensors, t, valid, offs, m, scale_ptr, wd, HAS_SCALE, G_DT,
                             MAXIMIZE, WD_MODE == 1, True)
        if WD_MODE == 2:
            p = p * (1.0 - lr_v * wd)
        ma = tl.load(m_ptr + offs, mask=m, other=0.0).to(tl.float32)
        va = tl.load(v_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ma = _lerp(ma, g, w1, W_SMALL).to(S_DT).to(tl.float32)
        va = _second_moment(va, g, beta2.to(tl.float32), w2).to(S_DT).to(tl.float32)
        denom = tl.sqrt(va) / bc2_sqrt + eps
        p = p + (-step_size) * (ma / denom)
        tl.store(m_ptr + offs, ma.to(S_DT), mask=st)
        tl.store(v_ptr + offs, va.to(S_DT), mask=st)
        tl.store(p_ptr + offs, p.to(P_DT), mask=st)

# -- M3's every-step writes: M1, S, A and the decoupled decay
@triton.jit
def m3_write_kernel(ptrs, sizes, chunks, n_tensors, n_chunks, nprog,
                    lr, lr_ptr, scale_ptr, inf_ptr, momentum, write_rate, beta2, wd, decay,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
                    LERP: tl.constexpr, W_SMALL: tl.constexpr, HAS_WD: tl.constexpr,
                    LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                    ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lr_v = _lr(lr, lr_ptr, LR_TENSOR)
    decay_v = _decay_factor(lr_v, wd, decay, LR_TENSOR)
    for i in range(ITERS):
        t, offs, m, valid = _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK)
        st = _ok(m, offs, inf_ptr, HAS_INF)
        g = _grad(ptrs, n_tensors, t, valid, offs, m, scale_ptr, HAS_SCALE, G_DT)
        b_ptr = _ptr(ptrs, 2, n_tensors, t, valid, S_DT)
        s_ptr = _ptr(ptrs, 3, n_tensors, t, valid, S_DT)
        a_ptr = _ptr(ptrs, 4, n_tensors, t, valid, S_DT)
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
        b = _momentum_write(b, g, momentum, write_rate, LERP, W_SMALL)
        s = _second_moment(tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32), g, beta2, 1.0 - beta2)
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32) + g
        tl.store(b_ptr + offs, b.to(S_DT), mask=st)
        tl.store(s_ptr + offs, s.to(S_DT), mask=st)
        tl.store(a_ptr + offs, a.to(S_DT), mask=st)
        if HAS_WD:
            p_ptr = _ptr(ptrs, 0, n_tensors, t, valid, P_DT)
            p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(p_ptr + offs, (p * decay_v).to(P_DT), mask=st)

# -- the last step of the matrix rules: p <- p * decay - lr_t * X
@triton.jit
def apply_kernel(ptrs, sizes, chunks, n_tensors, n_chunks, nprog, cols,
                 lr, lr_ptr, inf_ptr, wd, decay,
                 P_DT: tl.constexpr, X_DT: tl.constexpr,
                 HAS_WD: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_INF: tl.constexpr,
                 ITERS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lr_v = _lr(lr, lr_ptr, LR_TENSOR)
    decay_v = _decay_factor(lr_v, wd, decay, LR_TENSOR)
    for i in range(ITERS):
        t, offs, m, valid = _elements(chunks, sizes, n_tensors, n_chunks, pid, i, nprog, BLOCK)
        st = _ok(m, offs, inf_ptr, HAS_INF)
        # cols: the lr scale (lr tensor) or the adjusted lr (float lr) of each tensor
        lr_t = tl.load(cols + t, mask=valid, other=0.0)
        if LR_TENSOR:
            lr_t = lr_v * lr_t
        p_ptr = _ptr(ptrs, 0, n_tensors, t, valid, P_DT)
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(_ptr(ptrs, 1, n_tensors, t, valid, X_DT) + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_WD:
            p = p * decay_v
        p = p + (-lr_t) * u
        tl.store(p_ptr + offs, p.to(P_DT), mask=st)


KERNELS = dict(sumsq=sumsq_kernel, momentum=momentum_kernel, adam=adam_kernel, m3_write=m3_write_kernel,
               apply=apply_kernel)
