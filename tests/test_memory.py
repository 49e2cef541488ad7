"""deepopt.memory: chunk-wise in-context memory rules vs token-by-token loops."""
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

# load the module file directly: the optimizers in deepopt/__init__ may be mid-development
_spec = importlib.util.spec_from_file_location(
    "deepopt_memory_under_test", pathlib.Path(__file__).parents[1] / "deepopt" / "memory.py")
mem = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mem)

DT = torch.float64


def _inputs(B=2, H=3, T=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)
    k = F.normalize(r(B, H, T, d), dim=-1)
    q = F.normalize(r(B, H, T, d), dim=-1)
    v = r(B, H, T, d)
    eta = torch.rand(B, H, T, generator=g, dtype=DT) * 0.8
    alpha = 0.7 + 0.3 * torch.rand(B, H, T, generator=g, dtype=DT)
    return q, k, v, eta, alpha, r


def _naive_recurrence(M, q, k, v, eta, alpha, self_values):
    """Plain token-by-token delta rule M <- alpha M + eta (v_hat - M k) k^T, read y = M q."""
    ys = []
    for t in range(k.shape[-2]):
        kt, qt = k[..., t, :, None], q[..., t, :, None]
        vt = M @ v[..., t, :, None] if self_values else v[..., t, :, None]
        M = alpha[..., t, None, None] * M + eta[..., t, None, None] * (vt - M @ kt) @ kt.transpose(-1, -2)
        ys.append((M @ qt)[..., 0])
    return torch.stack(ys, -2), M


@pytest.mark.parametrize("self_values", [False, True])
def test_linear_chunk1_is_full_recurrence(self_values):
    q, k, v, eta, alpha, r = _inputs()
    M0 = 0.3 * r(2, 3, 8, 8)
    y, M = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=1, self_values=self_values)
    y2, M2 = _naive_recurrence(M0, q, k, v, eta, alpha, self_values)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M, M2, rtol=1e-10, atol=1e-10)


def _naive_momentum_recurrence(M, S, q, k, v, eta, alpha, beta):
    """Token by token with inner momentum: S <- beta S + eta (v - M k) k^T, M <- alpha M + S."""
    ys = []
    for t in range(k.shape[-2]):
        kt, qt, vt = k[..., t, :, None], q[..., t, :, None], v[..., t, :, None]
        S = beta * S + eta[..., t, None, None] * (vt - M @ kt) @ kt.transpose(-1, -2)
        M = alpha[..., t, None, None] * M + S
        ys.append((M @ qt)[..., 0])
    return torch.stack(ys, -2), M, S


@pytest.mark.parametrize("beta", [0.5, 0.9])
@pytest.mark.parametrize("c", [1, 5, 16, 32])
def test_linear_momentum_chunked_equals_its_loops(beta, c):
    """The chunk-parallel momentum write (weights D B, the carried S) equals the token loop with
    chunk-start gradients, and at chunk size 1 the plain momentum recurrence; the state carries
    across calls (two halves = one call)."""
    q, k, v, eta, alpha, r = _inputs()
    M0, S0 = 0.3 * r(2, 3, 8, 8), 0.1 * r(2, 3, 8, 8)
    y, M, S = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, momentum=beta, S=S0)
    y2, M2, S2 = mem.linear_memory_reference(M0, k, v, eta, alpha, q, chunk_size=c, momentum=beta, S=S0)
    for a_, b_ in ((y, y2), (M, M2), (S, S2)):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-10)
    if c == 1:
        y3, M3, S3 = _naive_momentum_recurrence(M0, S0, q, k, v, eta, alpha, beta)
        for a_, b_ in ((y, y3), (M, M3), (S, S3)):
            torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-10)
    if c == 16:
        h = 16
        ya, Ma, Sa = mem.linear_memory_write(M0, k[..., :h, :], v[..., :h, :], eta[..., :h], alpha[..., :h],
                                             q[..., :h, :], chunk_size=c, momentum=beta, S=S0)
        yb, Mb, Sb = mem.linear_memory_write(Ma, k[..., h:, :], v[..., h:, :], eta[..., h:], alpha[..., h:],
                                             q[..., h:, :], chunk_size=c, momentum=beta, S=Sa)
        torch.testing.assert_close(torch.cat([ya, yb], -2), y, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Mb, M, rtol=1e-10, atol=1e-10)
    # the momentum term matters: the plain write differs
    y0, _ = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c)
    assert (y - y0).abs().max() > 1e-3


def test_linear_momentum_zero_is_the_plain_write_and_bad_input_is_refused():
    q, k, v, eta, alpha, r = _inputs()
    M0 = 0.3 * r(2, 3, 8, 8)
    y, M = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=4)
    y1, M1, _ = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=4, S=torch.zeros_like(M0))
    # (the plain write takes the chunkwise form, the momentum write the chunk loop: rounding differs)
    torch.testing.assert_close(y, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M, M1, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="momentum must lie in"):
        mem.linear_memory_write(M0, k, v, eta, alpha, q, momentum=1.0, S=torch.zeros_like(M0))
    with pytest.raises(ValueError, match="needs its state S"):
        mem.linear_memory_write(M0, k, v, eta, alpha, q, momentum=0.5)


@pytest.mark.parametrize("c", [1, 4, 16, 5])
@pytest.mark.parametrize("self_values", [False, True])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_linear_chunked_equals_chunk_start_loop(c, self_values, objective):
    q, k, v, eta, alpha, r = _inputs()
    M0 = 0.3 * r(2, 3, 8, 8)
    y, M = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, self_values=self_values,
                                   objective=objective)
    y2, M2 = mem.linear_memory_reference(M0, k, v, eta, alpha, q, chunk_size=c, self_values=self_values)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(M, M2, rtol=1e-10, atol=1e-10)
    # the closed form of M_end for a single chunk (deepopt/memory.py)
    if c == 16:
        kc, vc, ec, ac = k[..., :16, :], v[..., :16, :], eta[..., :16], alpha[..., :16]
        _, Mc = mem.linear_memory_write(M0, kc, vc, ec, ac, chunk_size=16, self_values=self_values)
        vh = vc @ M0.transpose(-1, -2) if self_values else vc
        later = torch.stack([ac[..., t + 1:].prod(-1) for t in range(16)], -1)
        U = (later * ec)[..., None] * (vh - kc @ M0.transpose(-1, -2))
        expect = ac.prod(-1)[..., None, None] * M0 + U.transpose(-1, -2) @ kc
        torch.testing.assert_close(Mc, expect, rtol=1e-10, atol=1e-10)


def test_linear_rectangular_and_no_query():
    q, k, v, eta, alpha, r = _inputs()
    M0 = r(2, 3, 5, 8)                                  # dv=5, dk=8
    v5 = r(2, 3, 32, 5)
    y, M = mem.linear_memory_write(M0, k, v5, eta, alpha, None, chunk_size=4)
    assert y is None and M.shape == M0.shape
    _, M2 = mem.linear_memory_reference(M0, k, v5, eta, alpha, None, chunk_size=4)
    torch.testing.assert_close(M, M2)


@pytest.mark.parametrize("c", [1, 4, 16])
@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("self_values", [False, True])
def test_mlp_chunked_equals_autograd_loop(c, objective, self_values):
    q, k, v, eta, alpha, r = _inputs(T=16)
    mlp_out, mlp_in = 0.3 * r(2, 3, 8, 6), 0.3 * r(2, 3, 6, 8)
    got = mem.mlp_memory_write(mlp_in, mlp_out, k, v, eta, alpha, q, chunk_size=c, objective=objective,
                               self_values=self_values)
    ref = mem.mlp_memory_reference(mlp_in, mlp_out, k, v, eta, alpha, q, chunk_size=c, objective=objective,
                                   self_values=self_values)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradients_reach_initial_states_and_inputs():
    q, k, v, eta, alpha, r = _inputs(T=12)
    M0 = (0.3 * r(2, 3, 8, 8)).requires_grad_()
    mlp_out, mlp_in = (0.3 * r(2, 3, 8, 6)).requires_grad_(), (0.3 * r(2, 3, 6, 8)).requires_grad_()
    eta, alpha, v = eta.requires_grad_(), alpha.requires_grad_(), v.requires_grad_()
    y, M = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=4, self_values=True)
    y2, A, B = mem.mlp_memory_write(mlp_in, mlp_out, k, v, eta, alpha, q, chunk_size=4)
    (y.square().sum() + M.sum() + y2.square().sum() + A.sum() + B.sum()).backward()
    for t in (M0, mlp_in, mlp_out, eta, alpha, v):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # autograd-safe: gradcheck through a small write
    args = [x.detach()[:1, :1, :6].clone().requires_grad_() for x in (k, v, q)]
    M1 = M0.detach()[:1, :1].clone().requires_grad_()
    e, a = eta.detach()[:1, :1, :6], alpha.detach()[:1, :1, :6]
    assert torch.autograd.gradcheck(
        lambda M, k_, v_, q_: mem.linear_memory_write(M, k_, v_, e, a, q_, chunk_size=4)[0], (M1, *args))


def test_inputs_are_not_modified_and_bad_args():
    q, k, v, eta, alpha, r = _inputs(T=8)
    M0 = r(2, 3, 8, 8)
    before = [t.clone() for t in (M0, q, k, v, eta, alpha)]
    mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=3)
    for a, b in zip(before, (M0, q, k, v, eta, alpha)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        mem.linear_memory_write(M0, k, v, eta, alpha, q, objective="cosine")
    with pytest.raises(ValueError):
        mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=0)


def test_exports():
    assert set(mem.__all__) >= {"linear_memory_write", "mlp_memory_write", "linear_memory_read",
                                "mlp_memory_read"}


def _naive_anchored_recurrence(M, anchor, q, k, v, eta, alpha):
    """Token by token, retention toward the anchor: M <- alpha M + (1 - alpha) anchor + eta (v - M k) k^T."""
    ys = []
    for t in range(k.shape[-2]):
        kt, qt, vt = k[..., t, :, None], q[..., t, :, None], v[..., t, :, None]
        a = alpha[..., t, None, None]
        M = a * M + (1 - a) * anchor + eta[..., t, None, None] * (vt - M @ kt) @ kt.transpose(-1, -2)
        ys.append((M @ qt)[..., 0])
    return torch.stack(ys, -2), M


@pytest.mark.parametrize("c", [1, 5, 16])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_linear_anchor_chunked_equals_its_loops(c, beta):
    """Retention toward an anchor: the chunk-parallel write equals the chunk-start token loop (with
    and without inner momentum), at chunk size 1 the plain anchored recurrence, in float32 too;
    an anchor of zeros is the plain write bit for bit, and the anchor changes the result."""
    q, k, v, eta, alpha, r = _inputs()
    M0, anchor = 0.3 * r(2, 3, 8, 8), r(3, 8, 8)
    kw = dict(momentum=beta, S=0.1 * r(2, 3, 8, 8)) if beta else {}
    got = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, anchor=anchor, **kw)
    ref = mem.linear_memory_reference(M0, k, v, eta, alpha, q, chunk_size=c, anchor=anchor, **kw)
    for a_, b_ in zip(got, ref):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-10)
    if c == 1 and not beta:
        y3, M3 = _naive_anchored_recurrence(M0, anchor, q, k, v, eta, alpha)
        torch.testing.assert_close(got[0], y3, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], M3, rtol=1e-10, atol=1e-10)
        f32 = [t.float() for t in (M0, k, v, eta, alpha, q)]
        y32, M32 = mem.linear_memory_write(*f32, chunk_size=1, anchor=anchor.float())
        torch.testing.assert_close(y32, y3.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(M32, M3.float(), rtol=1e-4, atol=1e-5)
    plain = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, **kw)
    zero = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=c, anchor=torch.zeros_like(anchor), **kw)
    for a_, b_ in zip(plain, zero):
        torch.testing.assert_close(a_, b_, rtol=1e-14, atol=1e-14)
    assert (got[0] - plain[0]).abs().max() > 1e-2


@pytest.mark.parametrize("self_values", [False, True])
def test_linear_chunkwise_gradients_equal_the_token_loop(self_values):
    """The chunkwise write (the chunks' affine maps batched, the state passed on) backpropagates the
    same gradients as the token loop into the start state, keys, values, rates and anchor."""
    q, k, v, eta, alpha, r = _inputs(T=40)
    M0, anchor = 0.3 * r(2, 3, 8, 8), r(3, 8, 8)
    weights = r(2, 3, 40, 8)
    grads = []
    for write in (mem.linear_memory_write, mem.linear_memory_reference):
        leaves = [t.clone().requires_grad_() for t in (M0, k, v, eta, alpha, anchor)]
        y, M = write(*leaves[:5], q, chunk_size=6, self_values=self_values, anchor=leaves[5])
        ((y * weights).sum() + M.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for a_, b_ in zip(*grads):
        torch.testing.assert_close(a_, b_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("self_values", [False, True])
def test_linear_sequence_shorter_than_a_chunk_and_empty(self_values):
    """A sequence shorter than its chunk is one chunk (the token loop's result, no padding), and
    an empty one reads nothing and leaves the memory as it was."""
    q, k, v, eta, alpha, r = _inputs(T=5)
    M0, anchor = 0.3 * r(2, 3, 8, 8), r(3, 8, 8)
    got = mem.linear_memory_write(M0, k, v, eta, alpha, q, chunk_size=16, self_values=self_values, anchor=anchor)
    ref = mem.linear_memory_reference(M0, k, v, eta, alpha, q, chunk_size=16, self_values=self_values, anchor=anchor)
    for a_, b_ in zip(got, ref):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-10)
    y, M = mem.linear_memory_write(M0, k[..., :0, :], v[..., :0, :], eta[..., :0], alpha[..., :0], q[..., :0, :],
                                   chunk_size=16, self_values=self_values)
    assert y.shape == (2, 3, 0, 8) and torch.equal(M, M0)
