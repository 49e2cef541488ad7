"""deepopt.functional: each rule's math checked against an independent formulation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepopt
from deepopt import functional as Fn

dims = st.integers(1, 8)


@given(rows=dims, cols=dims, hidden=st.integers(1, 6), objective=st.sampled_from(["dot", "l2"]),
       lr=st.sampled_from([0.3, 2.0, 32.0, 1e3]), decay=st.sampled_from([0.0, 0.01, 0.2]), seed=st.integers(0, 10**6))
def test_mlp_memory_step_is_a_proximal_step_on_the_inner_objective(rows, cols, hidden, objective, lr, decay, seed):
    """B's step zeroes the gradient of the proximal objective L + lam/2 ||B||^2 + ||B - B0||^2/(2 eta)
    (A held at A0: checked by autograd, not by the formula); A's step is the proximal step with
    the curvature taken as tr(H^T H)/r + lam."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    a = torch.randn(hidden, cols, generator=gen, dtype=torch.float64)
    b = torch.randn(cols, hidden, generator=gen, dtype=torch.float64)
    keys = Fn.row_keys(g)

    def inner_loss(a_, b_):
        memory = Fn.mlp_memory(keys, a_, b_)
        if objective == "dot":
            return -(memory * g).sum() / rows
        return 0.5 * (memory - g).square().sum() / rows

    new_a, new_b = Fn.mlp_memory_step(a, b, keys, g, objective=objective, memory_lr=lr, memory_decay=decay)
    b_new = new_b.clone().requires_grad_()
    proximal = inner_loss(a, b_new) + decay / 2 * b_new.square().sum() + (b_new - b).square().sum() / (2 * lr)
    (grad_at_new_b,) = torch.autograd.grad(proximal, b_new)
    assert grad_at_new_b.abs().max() <= 1e-9 * (1 + b.abs().max() / lr + g.abs().max())

    a_ref = a.clone().requires_grad_()
    (grad_a,) = torch.autograd.grad(inner_loss(a_ref, b), a_ref)
    h = torch.nn.functional.silu(keys @ a.T)
    trace = sum(h[i] @ h[i] for i in range(rows)) / rows
    expect_a = a - lr / (1 + lr * (trace + decay)) * (grad_a + decay * a)
    torch.testing.assert_close(new_a, expect_a, rtol=1e-10, atol=1e-12)

    a_inplace, b_inplace = a.clone(), b.clone()
    Fn.mlp_memory_step_(a_inplace, b_inplace, keys, g, objective=objective, memory_lr=lr, memory_decay=decay)
    assert torch.equal(a_inplace, new_a) and torch.equal(b_inplace, new_b)


@given(hidden=st.integers(1, 64), init=st.floats(0.1, 10.0), lr=st.floats(0.0, 1e4), seed=st.integers(0, 10**6))
def test_proximal_l2_step_on_the_read_out_layer_never_grows_the_residual(hidden, init, lr, seed):
    """The proximal step's promise: at any memory_lr the l2 step on B never grows the residual,
    whatever the width and the scale of A."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    keys = Fn.row_keys(g)
    a = torch.randn(hidden, 5, generator=gen, dtype=torch.float64) * init
    b = torch.randn(5, hidden, generator=gen, dtype=torch.float64)
    before = (Fn.mlp_memory(keys, a, b) - g).norm()
    _, new_b = Fn.mlp_memory_step(a, b, keys, g, objective="l2", memory_lr=lr)
    assert (Fn.mlp_memory(keys, a, new_b) - g).norm() <= before * (1 + 1e-9)


def test_mlp_memory_step_in_bfloat16_state_solves_in_float32():
    """A bf16 MLP state (state_dtype) still gets B's proximal step (linalg has no bf16 solve)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(6, 5, generator=gen)
    a, b = torch.randn(4, 5, generator=gen), torch.zeros(5, 4)
    keys = Fn.row_keys(g)
    ref_a, ref_b = Fn.mlp_memory_step(a, b, keys, g)
    low_a, low_b = Fn.mlp_memory_step(a.bfloat16(), b.bfloat16(), keys.bfloat16(), g.bfloat16())
    assert low_b.dtype == torch.bfloat16 and low_a.dtype == torch.bfloat16
    torch.testing.assert_close(low_b.float(), ref_b, rtol=0.05, atol=0.02)


@given(rows=dims, cols=dims, momentum=st.floats(0.0, 0.99), frac=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_delta_forget_is_right_multiplication_by_a_contraction(rows, cols, momentum, frac, seed):
    delta = momentum * frac
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    gh = g / (torch.linalg.matrix_norm(g) + 1e-8)
    factor = momentum * torch.eye(cols, dtype=torch.float64) - delta * gh.T @ gh
    expect = m @ factor
    got = Fn.delta_forget_(m.clone(), g, momentum, delta, keys="matrix")
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    # ||Gh||_2 <= 1 and 0 <= delta <= a: the factor's spectrum lies in [0, a]
    eig = torch.linalg.eigvalsh(factor)
    assert eig.min() >= -1e-12 and eig.max() <= momentum + 1e-12


def test_delta_forget_erases_the_gradient_direction():
    """A memory that holds exactly the current gradient direction loses (a - delta) of it with a
    rank-one gradient, unlike momentum which keeps a of it."""
    u, v = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    g = torch.outer(u, v)
    m = g.clone()
    Fn.delta_forget_(m, g, 0.9, 0.8, keys="matrix", eps=0.0)
    torch.testing.assert_close(m, (0.9 - 0.8) * g)


def test_delta_elementwise_keys():
    g = torch.tensor([3.0, -1.0, 0.0, 2.0])
    m = torch.ones(4)
    k = g / (g.square().mean().sqrt() + 1e-8)
    expect = (0.9 - 0.5 * k.square()).clamp(min=0)
    torch.testing.assert_close(Fn.delta_forget_(m, g, 0.9, 0.5, keys="elementwise"), expect)


def test_out_of_place_rules_leave_inputs_alone_and_carry_gradients():
    buf = torch.randn(2, 3, 5, 4, requires_grad=True)   # batch and head dims
    g = torch.randn(2, 3, 5, 4, requires_grad=True)
    buf_before = buf.detach().clone()
    out = Fn.delta_momentum_write(buf, g, 0.9, 0.0, 0.5)
    out2 = Fn.momentum_write(buf, g, 0.9, 0.1)
    (out.square().sum() + out2.sum()).backward()
    assert torch.equal(buf.detach(), buf_before)
    assert buf.grad is not None and g.grad is not None and torch.isfinite(buf.grad).all()
    # batched matrix rule equals the per-matrix rule
    single = Fn.delta_momentum_write(buf[1, 2].detach(), g[1, 2].detach(), 0.9, 0.0, 0.5)
    torch.testing.assert_close(out[1, 2].detach(), single, rtol=1e-5, atol=1e-6)


def test_newton_schulz_orthogonalises_and_batches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=gen)
    single = torch.stack([Fn.newton_schulz(m) for m in x])
    batched = Fn.newton_schulz(x)
    torch.testing.assert_close(batched.float(), single.float(), rtol=0.05, atol=0.05)
    s = torch.linalg.svdvals(single[0].float())
    assert s.min() > 0.5 and s.max() < 1.5   # the quintic's known band around 1


@pytest.mark.parametrize("mode, expect", [(None, 0.1), ("original", 0.1 * 2.0), ("match_rms_adamw", 0.1 * 0.2 * 4.0)])
def test_adjust_lr(mode, expect):
    assert Fn.adjust_lr(0.1, mode, (16, 4)) == pytest.approx(expect)


def test_every_public_name_is_exported():
    assert set(deepopt.__all__) >= {"AssociativeMomentum", "DeltaMomentum", "DeepMomentum", "M3",
                                    "MultiFrequency", "functional"}
    for name in Fn.__all__:
        assert callable(getattr(Fn, name)) or name in ("NS_COEFFICIENTS", "NS_DTYPES")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_leaves_its_input_alone_in_its_own_dtype(dtype):
    """A read-out passed in may be the memory itself: the iteration must work on a copy, also when
    the input already has the iteration's dtype."""
    u = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = u.clone()
    out = Fn.newton_schulz(u, dtype=dtype)
    assert out.dtype == dtype and torch.equal(u, before)


@pytest.mark.parametrize("native", [True, False])
def test_ns_dtype_auto_is_bf16_where_matmuls_are_native(native, monkeypatch):
    monkeypatch.setattr(deepopt.newton_schulz, "cpu_has_native_bf16", lambda: native)
    assert Fn.resolve_ns_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert Fn.resolve_ns_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert Fn.resolve_ns_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert Fn.resolve_ns_dtype("float32", torch.device("cuda", 0)) == torch.float32


@pytest.mark.parametrize("make", [
    lambda ps, **kw: deepopt.DeepMomentum(ps, lr=0.02, output="newton_schulz", **kw),
    lambda ps, **kw: deepopt.M3(ps, lr=0.02, chunk=2, **kw)], ids=["deep-ns", "m3"])
def test_ns_dtype_selects_the_newton_schulz_precision(make):
    """The default follows the hardware ("auto": the trajectory of "bfloat16" on a CPU with native
    bf16 matmuls, of "float32" on others); the two precisions differ; a bad value names the
    option and its choices."""
    def run(**kw):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(6, 5, generator=gen).requires_grad_()]
        opt = make(ps, **kw)
        for _ in range(3):
            ps[0].grad = torch.randn(6, 5, generator=gen)
            opt.step()
        return ps[0].detach()
    auto, fp32, bf16 = run(), run(ns_dtype="float32"), run(ns_dtype="bfloat16")
    assert torch.equal(auto, bf16 if Fn.cpu_has_native_bf16() else fp32)
    assert not torch.equal(fp32, bf16)
    with pytest.raises(ValueError, match="ns_dtype.*'auto', 'bfloat16', 'float32'"):
        make([torch.zeros(2, 2, requires_grad=True)], ns_dtype="float16")


def test_spectral_keys_decay_the_top_direction_by_delta():
    """keys="spectral": Gh = G / sigma_1, so a memory holding the top singular direction of a
    full-rank gradient loses delta of it (Frobenius keys would lose delta s_1^2 / sum s_j^2)."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.5, 1.0, 0.5, 0.25], dtype=torch.float64)
    g = u[:, :6] @ torch.diag(s) @ v.T
    torch.testing.assert_close(Fn.spectral_norm_estimate(g).squeeze(), s[0], rtol=2e-2, atol=0)
    top = torch.outer(u[:, 0], v[:, 0])
    for keys, expect in [("spectral", 0.9 - 0.6), ("matrix", 0.9 - 0.6 * 16 / s.square().sum().item())]:
        m = Fn.delta_forget_(top.clone(), g, 0.9, 0.6, keys=keys, eps=0.0)
        kept = (m * top).sum().item()
        assert abs(kept - expect) < 0.02, (keys, kept, expect)


@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_row_shard_sums_give_the_whole_matrix_mlp_step_and_rms(objective):
    """FSDP2 runs the MLP memory and the RMS values on each rank's rows and all-reduces their row
    sums: emulated here with two shards in one process (the "all-reduce" adds the other shard's
    partial sums), which must give the whole matrix's results."""
    gen = torch.Generator().manual_seed(0)
    keys, target = torch.randn(10, 6, generator=gen), torch.randn(10, 6, generator=gen)
    keys = Fn.row_keys(keys)
    mlp_in, mlp_out = torch.randn(4, 6, generator=gen), torch.randn(6, 4, generator=gen) * 0.1

    def sharded(fn, first, second):
        partial = []
        fn(second, lambda t: partial.append(t.clone()) or t)   # the other shard's partial sums
        others = iter(partial)
        return fn(first, lambda t: t + next(others))

    top, bottom = slice(0, 7), slice(7, 10)   # uneven shards, as torch.chunk gives
    whole = Fn._mlp_memory_grads(mlp_in, mlp_out, keys, target, objective)
    split = sharded(lambda rows, sums: Fn._mlp_memory_grads(mlp_in, mlp_out, keys[rows], target[rows], objective,
                                                            sums, rows=10), top, bottom)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    u = torch.randn(10, 6, generator=gen)
    split = sharded(lambda rows, sums: Fn.rms(u[rows], sums), top, bottom)
    torch.testing.assert_close(split, Fn.rms(u), rtol=1e-6, atol=0)
