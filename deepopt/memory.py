r"""deepopt.memory: in-context memory rules as functions on tensors (HOPE's test-time memories).

Everything here is out-of-place and autograd-safe: gradients of an outer loss flow through every
write into the initial memory state (HOPE meta-learns it) and into the keys, values, write rates
and retention. Leading batch dims ``(...)`` (e.g. ``(batch, heads)``) are allowed everywhere.

Notation for one sequence of T tokens: keys ``k_t`` (dk), values ``v_t``, write rate ``eta_t`` > 0,
retention ``alpha_t`` in (0, 1], queries ``q_t``. A *chunk* of c tokens starting at state ``M_s``
evaluates every inner gradient at ``M_s`` (so a chunk is parallel), with a per-token state

    M_t = (prod_{u<=t} alpha_u) M_s + sum_{j<=t} (prod_{j<u<=t} alpha_u) eta_j U_j(M_s)

where ``-U_j(M_s)`` is the inner-objective gradient of token j at ``M_s``, and the read-out of token
t is ``y_t = M_t(q_t)`` (read after write; tokens > t never enter). With chunk size 1 this is the
exact token-by-token recurrence. The next chunk starts from ``M_end = M_c``.

Self-generated values (HOPE's "each memory makes its own value"): with ``self_values=True`` the
regression target of token t is ``v_hat_t = M_s(v_t)``, the memory's own read of ``v_t`` at the
chunk start.

Linear memory ``M(x) = M x`` (``M``: dv x dk)::

    objective="dot":  DGD on -<M k, v_hat>:  M <- M (alpha I - eta k k^T) + eta v_hat k^T
    objective="l2":   GD on 1/2||M k - v_hat||^2 with retention: M <- alpha M - eta (M k - v_hat) k^T
    both:             M <- alpha M + eta (v_hat - M k) k^T

The L2 objective's gradient already holds the ``k k^T`` decay, so DGD's decay is not applied a
second time: for a linear memory the two objectives give the same closed form:

    M_end = (prod alpha) M_s + sum_t (prod_{u>t} alpha_u) eta_t (v_hat_t - M_s k_t) k_t^T

Without momentum a linear chunk's write is affine in its start state, ``M_end = M_s P + b``, so
:func:`linear_memory_write` builds the maps and reads of all chunks as batched matmuls and passes
the state from chunk to chunk with one small matmul each (the chunkwise form of linear attention
and DeltaNet); with momentum it loops over the chunks. With an ``anchor`` the retention pulls
toward the anchor instead of zero (``M_t = alpha_t M_{t-1} + (1 - alpha_t) anchor + step``).

Residual 2-layer MLP memory ``m(x) = x + mlp_out silu(mlp_in x)`` (``mlp_in``: h x d, the first
layer; ``mlp_out``: d x h; the same names and order as DeepMomentum's MLP memory): with
``z = mlp_in k``, ``a = silu(z)`` and ``e = dL/dm`` (``-v_hat`` for dot, ``m(k) - v_hat`` for l2)
the inner gradients are ``dL/dmlp_out = e a^T`` and ``dL/dmlp_in = ((mlp_out^T e) * silu'(z)) k^T``.
One (chunk-wise) gradient step with retention alpha; for ``"dot"`` the DGD decay
``- eta mlp_in k k^T`` applies to the first layer (as in the paper), for ``"l2"`` no extra decay.
Reads inside a chunk are parallel too: ``mlp_in_t q`` and ``mlp_out_t a(q)`` are sums of rank-1
terms, so each is an attention-like (c x c) product.

Reference loops (``*_reference``) evaluate the same chunk-start semantics one token at a time
(the MLP one takes its inner gradients from autograd); they are slow and exist for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "linear_memory_read", "linear_memory_write", "linear_memory_reference",
    "mlp_memory_read", "mlp_memory_write", "mlp_memory_reference", "silu_grad",
]

_OBJECTIVES = ("dot", "l2")


def _check(objective, T, chunk_size):
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    c = T if chunk_size is None else int(chunk_size)
    if c < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(c, 1)


def _chunks(c, k, v, eta, alpha, q):
    """Per chunk of ``c`` tokens: (k, v, eta, alpha, q or None). Split, not sliced: a slice's
    backward writes a zero tensor of the whole sequence, T/c of them would cost O(T^2)."""
    parts = [t.split(c, dim=-2) for t in (k, v)] + [t.split(c, dim=-1) for t in (eta, alpha)]
    parts.append(q.split(c, dim=-2) if q is not None else [None] * len(parts[0]))
    return zip(*parts)


def _decays(alpha):
    """Log-cumulative retention of a chunk: A_t = sum_{u<=t} log alpha_u, (..., c)."""
    return torch.cumsum(torch.log(alpha.clamp_min(1e-12)), dim=-1)


def _intra(A):
    """D[t, j] = prod_{j<u<=t} alpha_u for j <= t, else 0: (..., c, c)."""
    c = A.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=A.device).tril()
    diff = (A[..., :, None] - A[..., None, :]).masked_fill(~causal, float("-inf"))
    return diff.exp()


# --------------------------------------------------------------------------- linear memory
def linear_memory_read(M, x):
    """``M x`` for every token: M (..., dv, dk), x (..., T, dk) -> (..., T, dv)."""
    return x @ M.transpose(-1, -2)


def _momentum_weights(beta: float, c: int, like):
    """B[i, j] = beta^(i-j) for j <= i, else 0 (with beta^0 = 1, also for beta = 0): (c, c)."""
    idx = torch.arange(c, device=like.device)
    gap = idx[:, None] - idx[None, :]
    return torch.where(gap >= 0, torch.tensor(float(beta), dtype=like.dtype, device=like.device) ** gap.clamp_min(0),
                       torch.zeros((), dtype=like.dtype, device=like.device))


def linear_memory_write(M, k, v, eta, alpha, q=None, *, chunk_size=None, objective="dot",
                        self_values=False, momentum=0.0, S=None, anchor=None):
    """Chunk-wise write of a linear memory over a sequence; returns ``(y, M_end)``, or
    ``(y, M_end, S_end)`` when a momentum state ``S`` is passed.

    M: (..., dv, dk) initial state; k: (..., T, dk); v: (..., T, dv) (or (..., T, dk) with
    ``self_values``, target ``M_s v_t``); eta, alpha: (..., T); q: (..., T, dk) or None
    (then y is None). ``chunk_size=None``: the whole sequence is one chunk.

    ``momentum`` beta in [0, 1) with its state ``S`` (shaped as M; zeros to start): the write
    goes through a momentum of the inner gradient steps, ``S_t = beta S_{t-1} + eta_t (v_hat_t -
    M_s k_t) k_t^T``, ``M_t = alpha_t M_{t-1} + S_t`` (the paper's inner momentum; beta = 0 is the
    plain write). Inside a chunk both recurrences are linear, so the chunk stays parallel: with
    ``D[t, i] = prod_{i<u<=t} alpha_u`` and ``B[i, j] = beta^(i-j)``, token j's step enters M_t with
    weight ``(D B)[t, j]`` and the carried ``S_s`` with ``sum_i D[t, i] beta^i``.

    ``anchor`` (shaped as M, or broadcastable; None: zero): retention pulls the memory toward the
    anchor instead of toward zero, ``M_t = alpha_t M_{t-1} + (1 - alpha_t) anchor + step_t``, i.e.
    the deviation ``M - anchor`` decays by alpha. With the meta-learned initial state as anchor a
    memory streamed far past its training window keeps a fixed point it was trained near
    (``anchor = 0`` is the plain write).
    """
    T = k.shape[-2]
    c = _check(objective, T, chunk_size)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if momentum and S is None:
        raise ValueError("momentum > 0 needs its state S (zeros shaped as M to start)")
    if S is None:
        return _linear_chunkwise_write(M, k, v, eta, alpha, q, c, self_values, anchor)
    ys = []         # with momentum: chunk by chunk (the momentum state is not affine-composed here)
    for kc, vc, ec, ac, qc in _chunks(c, k, v, eta, alpha, q):
        n = kc.shape[-2]
        vhat = linear_memory_read(M, vc) if self_values else vc
        u = ec[..., None] * (vhat - linear_memory_read(M, kc))          # eta_j (v_hat_j - M_s k_j)
        A = _decays(ac)
        D = _intra(A)
        B = _momentum_weights(momentum, n, u)
        W = D @ B                                                        # weight of token j in M_t
        carry = D @ B[:, :1] * momentum                                  # sum_i D[t, i] beta^i (i from 1)
        decaying = M if anchor is None else M - anchor                  # the part retention shrinks
        if q is not None:
            y = A.exp()[..., None] * linear_memory_read(decaying, qc) + ((qc @ kc.transpose(-1, -2)) * W) @ u
            if anchor is not None:
                y = y + linear_memory_read(anchor, qc)
            ys.append(y + carry * linear_memory_read(S, qc))
        M_next = A[..., -1].exp()[..., None, None] * decaying + (u * W[..., -1, :, None]).transpose(-1, -2) @ kc
        if anchor is not None:
            M_next = M_next + anchor
        M = M_next + carry[..., -1, :, None] * S
        S = momentum ** n * S + (u * B[-1, :, None]).transpose(-1, -2) @ kc
    y = torch.cat(ys, dim=-2) if q is not None else None
    return y, M, S


def _linear_chunkwise_write(M, k, v, eta, alpha, q, c, self_values, anchor):
    """:func:`linear_memory_write` without momentum, all chunks at once. With ``w_j = eta_j
    prod_{j<u<=c} alpha_u`` and ``keep = prod alpha`` a chunk's write is affine in its start state,

        M_next = M_s P + b + (1 - keep) anchor,
        P = keep I + (w (v - k))^T k, b = 0          (self values: eta_j M_s (v_j - k_j) is the step)
        P = keep I - (w k)^T k,       b = (w v)^T k  (given values),

    so the maps of all chunks are batched matmuls and the state passes from chunk to chunk with
    one small matmul each. Every read factors through the start state too: with
    ``S[t, j] = (q_t . k_j) D[t, j] eta_j`` and ``decay_t = prod_{u<=t} alpha_u``,

        y_t = M_s r_t + (1 - decay_t) anchor q_t (+ sum_j S[t, j] v_j for given values),
        r_t = decay_t q_t + sum_j S[t, j] (v_j - k_j)   (self values; -k_j for given values),

    one matmul with the start states instead of one per read term. The sequence is padded to
    whole chunks with tokens that neither write (eta = 0) nor decay (alpha = 1)."""
    T, dk = k.shape[-2], k.shape[-1]
    if T == 0:
        return (None if q is None else q.new_empty(*q.shape[:-1], M.shape[-2])), M
    c = min(c, T)           # a sequence shorter than a chunk is one chunk: no padding
    N = -(-T // c)
    pad = N * c - T
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        eta, alpha = F.pad(eta, (0, pad)), F.pad(alpha, (0, pad), value=1.0)
        q = F.pad(q, (0, 0, 0, pad)) if q is not None else None
    lead = k.shape[:-2]
    kc, vc = k.reshape(*lead, N, c, dk), v.reshape(*lead, N, c, v.shape[-1])
    ec, A = eta.reshape(*lead, N, c), _decays(alpha.reshape(*lead, N, c))
    keep = A[..., -1].exp()[..., None, None]                            # (.., N, 1, 1)
    w = ((A[..., -1:] - A).exp() * ec)[..., None]                       # (.., N, c, 1)
    # the direction each token's step takes through M_s: d_j with u_j = eta_j M_s d_j (+ eta_j v_j)
    d = vc - kc if self_values else -kc
    P = (w * d).transpose(-1, -2) @ kc + keep * torch.eye(dk, dtype=k.dtype, device=k.device)
    b = None if self_values else ((w * vc).transpose(-1, -2) @ kc).unbind(-3)
    starts = []
    for n, (keep_n, P_n) in enumerate(zip(keep.unbind(-3), P.unbind(-3))):
        starts.append(M)
        M_next = M @ P_n if b is None else M @ P_n + b[n]
        M = M_next if anchor is None else torch.addcmul(M_next, 1 - keep_n, anchor)
    if q is None:
        return None, M
    qc = q.reshape(*lead, N, c, dk)
    decay = A.exp()[..., None]                                          # (.., N, c, 1)
    S = (qc @ kc.transpose(-1, -2)) * _intra(A) * ec[..., None, :]      # token j's step in y_t
    r = decay * qc + S @ d
    y = r @ torch.stack(starts, dim=-3).transpose(-1, -2)
    if not self_values:
        y = y + S @ vc
    y = y.reshape(*lead, N * c, y.shape[-1])
    if anchor is not None:      # per head, outside the chunks: one matmul over the whole sequence
        y = y + ((1 - decay).reshape(*lead, N * c, 1) * qc.reshape(*lead, N * c, dk)) @ anchor.transpose(-1, -2)
    return (y[..., :T, :] if pad else y), M


def linear_memory_reference(M, k, v, eta, alpha, q=None, *, chunk_size=None, objective="dot",
                            self_values=False, momentum=0.0, S=None, anchor=None):
    """Token-by-token loop with the chunk-start semantics of :func:`linear_memory_write`."""
    T = k.shape[-2]
    c = _check(objective, T, chunk_size)
    ys = []
    for t in range(T):
        if t % c == 0:
            Ms = M
        kt, vt = k[..., t, :, None], v[..., t, :, None]
        vhat = Ms @ vt if self_values else vt
        step = eta[..., t, None, None] * (vhat - Ms @ kt) @ kt.transpose(-1, -2)
        if S is not None:
            S = momentum * S + step
            step = S
        at = alpha[..., t, None, None]
        M = at * M + step if anchor is None else at * M + (1 - at) * anchor + step
        if q is not None:
            ys.append((M @ q[..., t, :, None])[..., 0])
    y = torch.stack(ys, dim=-2) if q is not None else None
    return (y, M) if S is None else (y, M, S)


# --------------------------------------------------------------------------- MLP memory
def silu_grad(z):
    """``silu'(z) = s(z) (1 + z (1 - s(z)))`` with ``s`` the sigmoid (the one home of this formula)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp_memory_read(mlp_in, mlp_out, x):
    """Residual MLP memory ``x + mlp_out silu(mlp_in x)``: mlp_in (..., h, d), mlp_out (..., d, h), x (..., T, d)."""
    return x + F.silu(x @ mlp_in.transpose(-1, -2)) @ mlp_out.transpose(-1, -2)


def mlp_memory_write(mlp_in, mlp_out, k, v, eta, alpha, q=None, *, chunk_size=None, objective="dot",
                     self_values=False):
    """Chunk-wise write of the residual 2-layer MLP memory; returns ``(y, mlp_in_end, mlp_out_end)``.

    Shapes as :func:`linear_memory_write` with d = dk = dv; mlp_in (..., h, d), mlp_out (..., d, h).
    """
    T = k.shape[-2]
    c = _check(objective, T, chunk_size)
    ys = []
    for kc, vc, ec, ac, qc in _chunks(c, k, v, eta, alpha, q):
        z = kc @ mlp_in.transpose(-1, -2)                               # (.., c, h)
        a = F.silu(z)
        vhat = mlp_memory_read(mlp_in, mlp_out, vc) if self_values else vc
        e = -vhat if objective == "dot" else kc + a @ mlp_out.transpose(-1, -2) - vhat
        u1 = ec[..., None] * e                                          # mlp_out grad = e a^T
        u2 = (e @ mlp_out) * silu_grad(z)                               # mlp_in grad = u2 k^T
        if objective == "dot":
            u2 = u2 + z                                                 # DGD decay mlp_in k k^T
        u2 = ec[..., None] * u2
        A = _decays(ac)
        if q is not None:
            D, dec = _intra(A), A.exp()[..., None]
            zq = dec * (qc @ mlp_in.transpose(-1, -2)) - ((qc @ kc.transpose(-1, -2)) * D) @ u2
            aq = F.silu(zq)
            ys.append(qc + dec * (aq @ mlp_out.transpose(-1, -2)) - ((aq @ a.transpose(-1, -2)) * D) @ u1)
        w_end = (A[..., -1:] - A).exp()[..., None]
        keep = A[..., -1].exp()[..., None, None]
        mlp_out = keep * mlp_out - (u1 * w_end).transpose(-1, -2) @ a
        mlp_in = keep * mlp_in - (u2 * w_end).transpose(-1, -2) @ kc
    y = torch.cat(ys, dim=-2) if q is not None else None
    return y, mlp_in, mlp_out


def mlp_memory_reference(mlp_in, mlp_out, k, v, eta, alpha, q=None, *, chunk_size=None, objective="dot",
                         self_values=False):
    """Token-by-token loop, inner gradients by autograd (torch.func), chunk-start semantics."""
    T = k.shape[-2]
    c = _check(objective, T, chunk_size)

    def inner_loss(mlp_in, mlp_out, kt, vhat):
        out = mlp_memory_read(mlp_in, mlp_out, kt[None])[0]
        if objective == "dot":
            return -(out * vhat).sum() + 0.5 * ((kt @ mlp_in.T) ** 2).sum()   # DGD decay on mlp_in
        return 0.5 * ((out - vhat) ** 2).sum()

    grad = torch.func.grad(inner_loss, argnums=(0, 1))
    batch = mlp_in.shape[:-2]
    for _ in batch:
        grad = torch.func.vmap(grad)
    ys = []
    for t in range(T):
        if t % c == 0:
            mlp_in_s, mlp_out_s = mlp_in, mlp_out
        kt, vt = k[..., t, :], v[..., t, :]
        vhat = mlp_memory_read(mlp_in_s, mlp_out_s, vt[..., None, :])[..., 0, :] if self_values else vt
        g_in, g_out = grad(mlp_in_s, mlp_out_s, kt, vhat)
        at, et = alpha[..., t, None, None], eta[..., t, None, None]
        mlp_in, mlp_out = at * mlp_in - et * g_in, at * mlp_out - et * g_out
        if q is not None:
            ys.append(mlp_memory_read(mlp_in, mlp_out, q[..., t, None, :])[..., 0, :])
    y = torch.stack(ys, dim=-2) if q is not None else None
    return y, mlp_in, mlp_out
