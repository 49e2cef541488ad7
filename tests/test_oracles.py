"""Independent oracles for the terms only deepopt has, written from the math (not from the code).

The exact reductions to torch switch the new parts off, so they prove nothing about them. Here
each novel term has a plain reference: autograd for the MLP memory's inner gradient,
hand-written loops for the rest, all in fp64 and over >= 10 steps. Every implementation a rule
has (for-loop, foreach, and the Triton kernels under the CPU interpreter) is compared with it:

* DeepMomentum, ``objective="dot"`` and ``"l2"``: the MLP's inner step at its normalised rate and
  its decay, its read-out, row and tensor keys, the linear bypass (or none), Nesterov, coupled
  weight decay, Newton-Schulz output, and the defaults on a conv kernel;
* DeltaMomentum with delta > 0 and ``keys="matrix"``, ``"spectral"``, ``"elementwise"``;
* M3: the slow memory across >= 2 chunk boundaries, the scale-free preconditioner, and the
  rescale of the update to Muon's RMS;
* MultiFrequency at periods 1-4 around a deepopt inner optimizer, ``reduce="sum"`` and ``"mean"``.

Tolerances: fp64 paths 1e-9 relative; the Triton kernels compute in fp32 (fp32 params), 1e-4;
rules with a Newton-Schulz read-out run it in fp32 (compared at 1e-4) or in bf16 (at 2e-3;
``ns_dtype="auto"`` is one of the two, by the CPU) (the oracle runs the same quintic
iteration, written out here; a last-bit difference in its bf16 input moves its output ~1e-3).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import deepopt

F64 = dict(rtol=1e-9, atol=1e-12)
FUSED = dict(rtol=1e-4, atol=1e-6)
NS_TOL = dict(rtol=2e-3, atol=2e-3)       # bf16 Newton-Schulz
NS32_TOL = dict(rtol=1e-4, atol=1e-6)     # fp32 Newton-Schulz
STEPS = 10
SHAPES = [(6, 5), (4, 7), (5,)]          # two matrices (rows < and > cols) and a vector
SHAPES_WITH_CONV = [(6, 5), (3, 2, 2, 2), (5,)]   # ... and a conv kernel, seen as a (3, 8) matrix


def _fused_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


IMPLEMENTATIONS = ["forloop", "foreach", pytest.param("fused", marks=pytest.mark.skipif(
    not _fused_available(), reason="the fused paths need triton (and CUDA or TRITON_INTERPRET=1)"))]
FLAGS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def _data(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(STEPS)]
    return [p.to(dtype) for p in params], [[g.to(dtype) for g in gs] for gs in grads]


def _run_optimizer(make, shapes, implementation):
    dtype = torch.float32 if implementation == "fused" else torch.float64
    params, grads = _data(shapes, dtype)
    params = [p.clone().requires_grad_() for p in params]
    opt = make(params, **FLAGS[implementation])
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().double() for p in params]


def _close(ours, reference, tol):
    for i, (a, b) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")


def _moved(reference, shapes):
    """The oracle's run must move the params (a test of nothing otherwise)."""
    start, _ = _data(shapes)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(reference, start))


# ----------------------------------------------------------------------------- shared pieces
def ns_dtype_on_cpu(ns_dtype):
    """The documented meaning of ``ns_dtype`` for CPU tensors: "auto" is bf16 on a CPU with
    native bf16 matmuls (a hardware query), fp32 on others."""
    if ns_dtype == "auto":
        return torch.bfloat16 if deepopt.functional.cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns_dtype]


def ns_tol(ns_dtype):
    return NS_TOL if ns_dtype_on_cpu(ns_dtype) == torch.bfloat16 else NS32_TOL


def newton_schulz_ref(u, dtype, steps=5):
    """Muon's quintic iteration in ``dtype``, (a, b, c) = (3.4445, -4.7750, 2.0315), from
    X = u / ||u||_F, transposed when rows > cols, in Muon's published op sequence (addmm), so that
    only the inputs' rounding separates it from the optimizers' (bit-exact to torch.optim.Muon in bf16)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).double()


def momentum_write(m, g, a, d):
    return a * m + (1 - d) * g


# ----------------------------------------------------------------------------- DeepMomentum
def deep_momentum_oracle(shapes, *, lr, momentum, dampening, hidden, memory_lr, memory_decay, memory_init,
                         objective, linear_memory=True, nesterov=False, weight_decay=0.0, output="identity",
                         eps=1e-8, seed=0, ns_dtype="auto", key_norm="row"):
    params, grads = _data(shapes)
    states = []
    for i, p in enumerate(params):
        state = dict(m=torch.zeros_like(p))
        if p.ndim >= 2:   # the documented init: N(0, memory_init^2) from a generator seeded by (seed, index)
            cols = math.prod(p.shape[1:])             # (a conv kernel is the matrix (out, in * kh * kw))
            generator = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + i) % 2 ** 63)
            a0 = torch.randn(hidden, cols, generator=generator, dtype=torch.float32) * memory_init
            state.update(A=a0.double(), B=torch.zeros(cols, hidden, dtype=torch.float64))
        states.append(state)
    for gs in grads:
        for p, grad, state in zip(params, gs, states):
            g = grad + weight_decay * p
            state["m"] = momentum_write(state["m"], g, momentum, dampening)
            m = state["m"]
            readout = g + momentum * m if nesterov else m
            if p.ndim < 2:
                p -= lr * readout
                continue
            g, readout = g.reshape(g.shape[0], -1), readout.reshape(g.shape[0], -1)
            rows = g.shape[0]
            rho = g.square().sum(-1).mean().sqrt()
            norms = g.norm(dim=-1, keepdim=True) if key_norm == "row" else g.norm()
            keys = g / (norms + eps * rho)
            A, B = state["A"].clone().requires_grad_(), state["B"].clone().requires_grad_()
            f = F.silu(keys @ A.T) @ B.T
            if objective == "dot":
                loss = -(f * (g / rho)).sum() / rows
            else:
                loss = 0.5 * (f - g / rho).square().sum() / rows
            grad_a, _ = torch.autograd.grad(loss, (A, B))
            # the proximal step: B' = argmin_B L(B) + lam/2 ||B||^2 + ||B - B0||^2 / (2 eta), from the
            # normal equations B' ((1 + eta lam) I + eta C) = B0 + eta T^T H / r (C = 0 for dot);
            # A: the same step with the curvature taken as the scalar tr C + lam
            h = F.silu(keys @ state["A"].T)
            curvature = h.T @ h / rows if objective == "l2" else torch.zeros(hidden, hidden, dtype=h.dtype)
            pull = (g / rho).T @ h / rows
            system = (1 + memory_lr * memory_decay) * torch.eye(hidden, dtype=h.dtype) + memory_lr * curvature
            new_b = torch.linalg.solve(system.T, (state["B"] + memory_lr * pull).T).T
            trace = float((h * h).sum()) / rows
            rate = memory_lr / (1 + memory_lr * (trace + memory_decay))
            state["A"] = state["A"] - rate * (grad_a + memory_decay * state["A"])
            state["B"] = new_b
            deep = rho * (F.silu(keys @ state["A"].T) @ state["B"].T)
            u = readout + deep if linear_memory else deep
            if output == "newton_schulz":
                u = newton_schulz_ref(u, ns_dtype_on_cpu(ns_dtype))
            p -= lr * u.reshape(p.shape)
    return params


DEEP_CASES = {
    "defaults": dict(lr=0.05, momentum=0.9, dampening=0.0, hidden=16, memory_lr=32.0, memory_decay=0.01,
                     memory_init=1.0, objective="l2"),
    "tensor-keys": dict(lr=0.05, momentum=0.9, dampening=0.0, hidden=8, memory_lr=1.0, memory_decay=0.1,
                        memory_init=1.0, objective="l2", key_norm="tensor"),
    "dot": dict(lr=0.05, momentum=0.9, dampening=0.0, hidden=8, memory_lr=0.5, memory_decay=0.2,
                memory_init=1.0, objective="dot"),
    "dot-nesterov-wd": dict(lr=0.05, momentum=0.8, dampening=0.0, hidden=8, memory_lr=0.5, memory_decay=0.2,
                            memory_init=0.5, objective="dot", nesterov=True, weight_decay=0.1),
    "l2": dict(lr=0.05, momentum=0.9, dampening=0.5, hidden=8, memory_lr=0.5, memory_decay=0.2,
               memory_init=1.0, objective="l2"),
    "no-linear-memory": dict(lr=0.05, momentum=0.9, dampening=0.0, hidden=8, memory_lr=0.5, memory_decay=0.2,
                             memory_init=1.0, objective="dot", linear_memory=False),
    "l2-no-linear-memory": dict(lr=0.05, momentum=0.9, dampening=0.0, hidden=8, memory_lr=0.5, memory_decay=0.2,
                                memory_init=1.0, objective="l2", linear_memory=False),
    "newton-schulz": dict(lr=0.02, momentum=0.9, dampening=0.9, hidden=8, memory_lr=0.5, memory_decay=0.2,
                          memory_init=1.0, objective="dot", output="newton_schulz", ns_dtype="float32"),
    "newton-schulz-bf16": dict(lr=0.02, momentum=0.9, dampening=0.9, hidden=8, memory_lr=0.5, memory_decay=0.2,
                               memory_init=1.0, objective="dot", output="newton_schulz", ns_dtype="bfloat16"),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(DEEP_CASES))
def test_deep_momentum_matches_its_oracle(case, implementation):
    kw = DEEP_CASES[case]
    shapes = SHAPES_WITH_CONV if case == "defaults" else SHAPES
    reference = deep_momentum_oracle(shapes, **kw)
    _moved(reference, shapes)
    ours = _run_optimizer(lambda ps, **f: deepopt.DeepMomentum(ps, **kw, **f), shapes, implementation)
    if kw.get("output") == "newton_schulz":
        tol = ns_tol(kw.get("ns_dtype", "auto"))
    else:
        tol = FUSED if implementation == "fused" else F64
    _close(ours, reference, tol)


def test_deep_momentum_mlp_memory_moves_the_update():
    """The oracle with the MLP switched off (memory_lr=0) is far from the one with it on: the
    comparisons above see the MLP's terms, not only momentum's."""
    kw = dict(DEEP_CASES["dot"])
    on = deep_momentum_oracle(SHAPES, **kw)
    off = deep_momentum_oracle(SHAPES, **{**kw, "memory_lr": 0.0})
    assert max((a - b).abs().max().item() for a, b in zip(on[:2], off[:2])) > 1e-2


@pytest.mark.parametrize("scale", [1e-12, 1e6])
def test_deep_momentum_is_the_same_rule_at_any_gradient_scale(scale):
    """Scale-free: gradients times ``scale`` give the same MLP memory and (lr times 1/scale) the
    same parameters, to float rounding (eps is relative to the gradient's scale)."""
    shapes = [(6, 5)]
    runs = []
    for factor in (1.0, scale):
        params, grads = _data(shapes, torch.float32)
        p = params[0].clone().requires_grad_()
        opt = deepopt.DeepMomentum([p], lr=0.05 / factor, memory_lr=0.5, memory_init=1.0)
        for gs in grads:
            p.grad = gs[0] * factor
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["mlp_in"].clone(), opt.state[p]["mlp_out"].clone()))
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- DeltaMomentum
def power_iteration_sigma(g, iterations=3):
    """sigma_1 by power iteration on G^T G started from the squared column norms."""
    v = g.square().sum(0)
    for _ in range(iterations):
        v = g.T @ (g @ v)
        v = v / v.norm()
    return (g @ v).norm()


def delta_momentum_oracle(shapes, *, lr, momentum, dampening, delta, keys, nesterov=False, weight_decay=0.0,
                          eps=1e-8):
    params, grads = _data(shapes)
    memories = [None] * len(params)
    for gs in grads:
        for i, (p, grad) in enumerate(zip(params, gs)):
            g = grad + weight_decay * p
            m = memories[i]
            if m is None:
                m = g.clone()                         # the SGD convention's first write
            elif keys == "elementwise" or p.ndim < 2:
                k = g / (g.square().mean().sqrt() + eps)
                m = torch.clamp(momentum - delta * k * k, min=0) * m + (1 - dampening) * g
            else:
                norm = g.norm() if keys == "matrix" else power_iteration_sigma(g)
                gh = g / (norm + eps)
                cols = g.shape[1]
                m = m @ (momentum * torch.eye(cols, dtype=g.dtype) - delta * gh.T @ gh) + (1 - dampening) * g
            memories[i] = m
            p -= lr * (g + momentum * m if nesterov else m)
    return params


DELTA_CASES = {
    "matrix": dict(lr=0.05, momentum=0.9, dampening=0.0, delta=0.6, keys="matrix"),
    "spectral": dict(lr=0.05, momentum=0.9, dampening=0.2, delta=0.5, keys="spectral"),
    "elementwise": dict(lr=0.05, momentum=0.9, dampening=0.0, delta=0.7, keys="elementwise"),
    "matrix-nesterov-wd": dict(lr=0.05, momentum=0.9, dampening=0.0, delta=0.6, keys="matrix", nesterov=True,
                               weight_decay=0.1),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(DELTA_CASES))
def test_delta_momentum_matches_its_oracle(case, implementation):
    kw = DELTA_CASES[case]
    reference = delta_momentum_oracle(SHAPES, **kw)
    _moved(reference, SHAPES)
    ours = _run_optimizer(lambda ps, **f: deepopt.DeltaMomentum(ps, **kw, **f), SHAPES, implementation)
    _close(ours, reference, FUSED if implementation == "fused" else F64)


@pytest.mark.parametrize("keys", ["matrix", "spectral", "elementwise"])
def test_delta_forgetting_changes_the_trajectory(keys):
    kw = dict(DELTA_CASES[keys])
    with_delta = delta_momentum_oracle(SHAPES, **kw)
    without = delta_momentum_oracle(SHAPES, **{**kw, "delta": 0.0})
    assert max((a - b).abs().max().item() for a, b in zip(with_delta, without)) > 1e-2


# ----------------------------------------------------------------------------- M3
def m3_oracle(shapes, *, lr, momentum, slow_momentum, beta2, slow_weight, chunk, eps, precondition,
              weight_decay=0.0, nesterov=False, ns_dtype="auto"):
    ns = ns_dtype_on_cpu(ns_dtype)
    params, grads = _data(shapes)
    z = [torch.zeros_like(p) for p in params]
    m1, s, acc, m2, o2 = [t.clone() for t in z], [t.clone() for t in z], [t.clone() for t in z], \
        [t.clone() for t in z], [t.clone() for t in z]
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(params, gs)):
            p *= 1 - lr * weight_decay
            m1[i] = momentum * m1[i] + (1 - momentum) * g
            s[i] = beta2 * s[i] + (1 - beta2) * g * g
            acc[i] = acc[i] + g
            if t % chunk == 0:                        # the slow memory: the chunk's mean gradient
                m2[i] = slow_momentum * m2[i] + (1 - slow_momentum) * acc[i] / chunk
                o2[i] = newton_schulz_ref(m2[i], ns)
                acc[i] = torch.zeros_like(p)
            readout = momentum * m1[i] + (1 - momentum) * g if nesterov else m1[i]
            fast = newton_schulz_ref(readout, ns)
            u = fast + slow_weight * o2[i]
            if precondition:
                d = s[i].sqrt()
                d = d / d.square().mean().sqrt()
                u = u / (d + eps)
            if precondition or slow_weight:           # the update keeps NS(M1)'s RMS: Muon's step size
                u = u * (fast.square().mean().sqrt() / u.square().mean().sqrt())
            rows, cols = p.shape
            p -= lr * math.sqrt(max(1, rows / cols)) * u
    return params


M3_CASES = {
    "preconditioned": dict(lr=0.02, momentum=0.9, slow_momentum=0.5, beta2=0.9, slow_weight=1.0, chunk=3, eps=0.01,
                           precondition=True, ns_dtype="float32"),
    "preconditioner-only": dict(lr=0.02, momentum=0.9, slow_momentum=0.5, beta2=0.9, slow_weight=0.0, chunk=3,
                                eps=0.01, precondition=True, ns_dtype="float32"),
    "slow-memory-only": dict(lr=0.02, momentum=0.9, slow_momentum=0.5, beta2=0.9, slow_weight=2.0, chunk=3,
                             eps=0.01, precondition=False, weight_decay=0.1, nesterov=True),
    "preconditioned-bf16": dict(lr=0.02, momentum=0.9, slow_momentum=0.5, beta2=0.9, slow_weight=1.0, chunk=3,
                                eps=0.01, precondition=True, ns_dtype="bfloat16"),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(M3_CASES))
def test_m3_matches_its_oracle(case, implementation):
    shapes = SHAPES[:2]
    kw = M3_CASES[case]
    reference = m3_oracle(shapes, **kw)
    _moved(reference, shapes)
    ours = _run_optimizer(lambda ps, **f: deepopt.M3(ps, **kw, **f), shapes, implementation)
    _close(ours, reference, ns_tol(kw.get("ns_dtype", "auto")))


@pytest.mark.parametrize("term", ["slow_weight", "precondition"])
def test_m3_terms_change_the_trajectory(term):
    kw = dict(M3_CASES["preconditioned"])
    off = {**kw, term: 0.0 if term == "slow_weight" else False}
    a, b = m3_oracle(SHAPES[:2], **kw), m3_oracle(SHAPES[:2], **off)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-2


# ----------------------------------------------------------------------------- MultiFrequency
def multifrequency_oracle(shapes, periods, *, lr, momentum, reduce):
    """Each param's group steps at t = C, 2C, ... on the sum (or mean) of its last C gradients,
    with SGD-convention momentum (first write M = G) at those steps only."""
    params, grads = _data(shapes)
    sums = [torch.zeros_like(p) for p in params]
    memories = [None] * len(params)
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(params, gs)):
            sums[i] = sums[i] + g
            if t % periods[i]:
                continue
            g_chunk = sums[i] / periods[i] if reduce == "mean" else sums[i]
            sums[i] = torch.zeros_like(p)
            memories[i] = g_chunk.clone() if memories[i] is None else momentum * memories[i] + g_chunk
            p -= lr * memories[i]
    return params


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_multifrequency_matches_its_oracle_at_periods_one_to_four(reduce, implementation):
    shapes = [(3, 4), (5,), (2, 3), (4,)]
    periods = [1, 2, 3, 4]
    reference = multifrequency_oracle(shapes, periods, lr=0.1, momentum=0.9, reduce=reduce)
    _moved(reference, shapes)

    def make(ps, **flags):
        groups = [{"params": [p], "update_every": c} for p, c in zip(ps, periods)]
        return deepopt.MultiFrequency(deepopt.AssociativeMomentum(groups, lr=0.1, momentum=0.9, **flags),
                                      reduce=reduce)

    ours = _run_optimizer(make, shapes, implementation)
    _close(ours, reference, FUSED if implementation == "fused" else F64)
