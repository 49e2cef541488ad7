"""Fused (Triton multi-tensor) paths == the for-loop reference, at float rounding.

On a CPU-only machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` is set
here for these tests only); launches stay <= 64 programs (the interpreter costs ~2 ms per program
instance). On a GPU the same tests run unchanged on CUDA tensors (the interpreter-only checks skip).

Tolerances (stated once): fp32 params ``rtol=1e-5, atol=1e-6`` after several steps (the kernels
compute in fp32 like torch, but may contract ``a*b + c`` into an FMA and sum the delta-rule rms in
another order); bf16 params: 2 bf16 ulps (``rtol=atol=2**-6``); rules with a bf16 Newton-Schulz
read-out (DeepMomentum ``output="newton_schulz"``, M3): a 1-ulp difference in NS's input moves its
bf16 output by up to ~1e-3, so ``rtol=atol=2e-3``.
"""

import math
import os

import pytest
import torch

import deepopt
from deepopt import _triton

CUDA = torch.cuda.is_available()
if not CUDA:
    # triton.language's own jit functions (tl.sum, ...) pick interpreter or compiler when triton is
    # imported: import it under the interpreter, then restore the environment for the other tests
    import sys
    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton.language", reason="the fused paths need triton>=3.6")
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
else:
    pytest.importorskip("triton.language", reason="the fused paths need triton>=3.6")

DEVICE = "cuda" if CUDA else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2 ** -6, atol=2 ** -6)
NS = dict(rtol=2e-3, atol=2e-3)

# odd sizes, a 0-dim and an empty tensor; the biggest is two interpreter chunks
VECTORS = [(3,), (), (0,), (300,), (7,)]
MATRICES = [(17, 5), (6, 9), (2, 3, 4)]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def _run(make, shapes, *, steps=4, dtype=torch.float32, groups=None, grad_hook=None, lr_tensor=False):
    """Step a for-loop optimizer and a fused one on identical params and fresh random grads."""
    base = _params(shapes, dtype)
    ref = [p.detach().clone().requires_grad_() for p in base]
    fus = [p.detach().clone().requires_grad_() for p in base]
    opt_ref = make(groups(ref) if groups else ref, foreach=False, fused=False)
    opt_fus = make(groups(fus) if groups else fus, fused=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ref, fus):
            g = torch.randn(a.shape, generator=gen).to(device=DEVICE, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_fus.step()
    return ref, fus, opt_ref, opt_fus


def _close(ref, fus, opt_ref=None, opt_fus=None, tol=FP32):
    for i, (a, b) in enumerate(zip(ref, fus)):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")
    if opt_ref is not None:
        for a, b in zip(ref, fus):
            sa, sb = opt_ref.state[a], opt_fus.state[b]
            assert set(sa) == set(sb)
            for k in sa:
                if isinstance(sa[k], torch.Tensor):
                    torch.testing.assert_close(sb[k].to(sa[k].device), sa[k], **tol,
                                               msg=lambda m: f"state {k} of {tuple(a.shape)}: {m}")


# ----------------------------------------------------------------------------- AssociativeMomentum
SGD_CASES = [
    dict(momentum=0.9),
    dict(momentum=0.0, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.1, decoupled_weight_decay=True),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_map(kw):
    _close(*_run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.1, **kw, **f), VECTORS + MATRICES))


ADAM_CASES = [
    dict(),
    dict(weight_decay=0.1, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=True, momentum=0.5, beta2=0.99),
]


@pytest.mark.parametrize("kw", ADAM_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_adam_map(kw):
    _close(*_run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.01, preconditioner="adam", **kw, **f),
                 VECTORS + MATRICES, steps=5))


@pytest.mark.parametrize("pre", [None, "adam"])
def test_tensor_lr(pre):
    lr = torch.tensor(0.05, device=DEVICE)
    _close(*_run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=lr, preconditioner=pre, weight_decay=0.1,
                                                             decoupled_weight_decay=True, **f),
                 [(5,), (4, 3)]))


@pytest.mark.parametrize("pre", [None, "adam"])
def test_bf16_params_fp32_state(pre):
    ref, fus, oa, ob = _run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.05, preconditioner=pre, **f),
                            [(9,), (33, 7)], dtype=torch.bfloat16)
    _close(ref, fus, tol=BF16)
    key = "exp_avg" if pre else "momentum_buffer"
    assert ob.state[fus[0]][key].dtype == torch.float32
    _close(ref, fus, oa, ob, tol=BF16)


def test_table_split_over_capacity(monkeypatch):
    monkeypatch.setattr(_triton, "TABLE_CAPACITY", 3)
    shapes = [(n,) for n in (1, 5, 2, 9, 4, 3, 8, 6)] + [(0,), ()]
    _close(*_run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.1, momentum=0.9, **f), shapes))
    _close(*_run(lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.01, preconditioner="adam", **f), shapes))
    _close(*_run(lambda ps, **f: deepopt.DeltaMomentum(ps, lr=0.1, delta=0.5, keys="elementwise", **f), shapes))


def test_late_params_get_their_first_write():
    """A param whose first grad arrives at step 3 gets M = G then (per-tensor first-write mode)."""
    ps = _params([(4,), (6,)])
    ref = [p.detach().clone().requires_grad_() for p in ps]
    fus = [p.detach().clone().requires_grad_() for p in ps]
    oa = deepopt.AssociativeMomentum(ref, lr=0.1, momentum=0.9, foreach=False, fused=False)
    ob = deepopt.AssociativeMomentum(fus, lr=0.1, momentum=0.9, fused=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ref, fus)):
            g = torch.randn(a.shape, generator=gen).to(DEVICE) if (i == 0 or step >= 2) else None
            a.grad, b.grad = g, (g.clone() if g is not None else None)
        oa.step()
        ob.step()
    _close(ref, fus, oa, ob)


# ----------------------------------------------------------------------------- DeltaMomentum
@pytest.mark.parametrize("keys", ["elementwise", "matrix"])
@pytest.mark.parametrize("kw", [dict(), dict(nesterov=True, weight_decay=0.1, maximize=True)],
                         ids=["plain", "nesterov-wd-max"])
def test_delta_momentum(keys, kw):
    _close(*_run(lambda ps, **f: deepopt.DeltaMomentum(ps, lr=0.1, momentum=0.9, delta=0.6, keys=keys, **kw, **f),
                 VECTORS + MATRICES, steps=4))


# ----------------------------------------------------------------------------- DeepMomentum
@pytest.mark.parametrize("kw,tol", [
    (dict(), FP32),
    (dict(dampening=0.9, nesterov=True, objective="l2", weight_decay=0.1, decoupled_weight_decay=True,
          adjust_lr="original"), FP32),
    (dict(output="newton_schulz", dampening=0.9, maximize=True, weight_decay=0.05), NS),
], ids=["identity", "l2-nesterov-decoupled", "newton-schulz"])
def test_deep_momentum(kw, tol):
    _close(*_run(lambda ps, **f: deepopt.DeepMomentum(ps, lr=0.05, momentum=0.9, memory_lr=0.1, **kw, **f),
                 VECTORS + MATRICES, steps=4), tol=tol)


def test_deep_momentum_vectors_only_single_launch():
    _close(*_run(lambda ps, **f: deepopt.DeepMomentum(ps, lr=0.05, momentum=0.9, dampening=0.9, nesterov=True, **f),
                 VECTORS, steps=3))


# ----------------------------------------------------------------------------- M3
def _m3_groups(ps):
    return [{"params": [p for p in ps if p.ndim >= 2]},
            {"params": [p for p in ps if p.ndim < 2], "algorithm": "adamw", "lr": 0.01, "weight_decay": 0.1}]


@pytest.mark.parametrize("kw", [dict(), dict(precondition=False, nesterov=True, weight_decay=0.1, maximize=True)],
                         ids=["precondition", "plain-nesterov"])
def test_m3(kw):
    shapes = [(3,), (), (300,)] + MATRICES
    _close(*_run(lambda ps, **f: deepopt.M3(ps, lr=0.02, chunk=2, **kw, **f), shapes, steps=5, groups=_m3_groups),
           tol=NS)


# ----------------------------------------------------------------------------- GradScaler
def _scaler_run(make, shapes, inf_at):
    """Reference: unscaled grads, no step where a grad is inf; fused: GradScaler with scaled grads."""
    base = _params(shapes)
    ref = [p.detach().clone().requires_grad_() for p in base]
    fus = [p.detach().clone().requires_grad_() for p in base]
    oa, ob = make(ref, foreach=False, fused=False), make(fus, fused=True)
    assert ob._step_supports_amp_scaling and not oa._step_supports_amp_scaling
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10, growth_interval=1000)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        scaler.scale(torch.ones((), device=DEVICE))   # initialises the scale
        scale = scaler.get_scale()
        for a, b in zip(ref, fus):
            g = torch.randn(a.shape, generator=gen).to(DEVICE)
            a.grad, b.grad = g.clone(), g * scale
        if step == inf_at:
            fus[-1].grad.view(-1)[0] = math.inf
            before = [p.detach().clone() for p in fus], {k: v.clone() for k, v in ob.state[fus[0]].items()}
        else:
            oa.step()
        scaler.step(ob)
        scaler.update()
        if step == inf_at:
            for x, y in zip(before[0], fus):
                assert torch.equal(x, y), "an inf step changed a parameter"
            for k, v in before[1].items():
                assert torch.equal(v, ob.state[fus[0]][k].to(v.device)), f"an inf step changed state {k}"
    return ref, fus, oa, ob


@pytest.mark.parametrize("name", ["sgd", "adam", "delta-elementwise", "deep-vectors", "delta-matrix", "m3"])
def test_grad_scaler(name):
    make = {
        "sgd": lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.1, momentum=0.9, **f),
        "adam": lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.01, preconditioner="adam", **f),
        "delta-elementwise": lambda ps, **f: deepopt.DeltaMomentum(ps, lr=0.1, delta=0.5, keys="elementwise", **f),
        "deep-vectors": lambda ps, **f: deepopt.DeepMomentum(ps, lr=0.1, **f),
        "delta-matrix": lambda ps, **f: deepopt.DeltaMomentum(ps, lr=0.1, delta=0.5, **f),
        "m3": lambda ps, **f: deepopt.M3(ps, lr=0.02, chunk=2, **f),
    }[name]
    shapes = [(5, 4), (3, 6)] if name in ("delta-matrix", "m3") else [(5,), (3, 6)]
    _close(*_scaler_run(make, shapes, inf_at=2), tol=NS if name == "m3" else FP32)


def test_grad_scaler_inf_on_first_step_leaves_no_state():
    make = lambda ps, **f: deepopt.AssociativeMomentum(ps, lr=0.1, momentum=0.9, **f)  # noqa: E731
    _close(*_scaler_run(make, [(5,), (4, 3)], inf_at=0))


# ----------------------------------------------------------------------------- dispatch
def test_fused_true_and_foreach_true_raise():
    with pytest.raises(RuntimeError, match="fused"):
        deepopt.AssociativeMomentum(_params([(2,)]), fused=True, foreach=True)


@pytest.mark.skipif(CUDA, reason="interpreter-only: CPU tensors are refused without TRITON_INTERPRET=1")
def test_fused_true_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fused=True.*CUDA"):
        deepopt.AssociativeMomentum(_params([(2,)]), fused=True)
    opt = deepopt.AssociativeMomentum(_params([(2,)]))   # fused=None on CPU: foreach, no Triton
    group = opt.param_groups[0]
    assert opt._implementation(group, group["params"]) != "fused" and not opt._step_supports_amp_scaling


@pytest.mark.skipif(not CUDA, reason="auto-dispatch picks Triton only for CUDA tensors")
def test_fused_none_picks_triton_on_cuda(monkeypatch):
    opt = deepopt.AssociativeMomentum(_params([(2,)]))
    group = opt.param_groups[0]
    assert opt._implementation(group, group["params"]) != "fused"    # off until verified on a GPU
    monkeypatch.setattr(_triton, "AUTO_FUSED", True)
    assert opt._implementation(group, group["params"]) == "fused" and opt._step_supports_amp_scaling


def test_state_dict_round_trip_continues():
    ps = _params([(5,), (4, 3)])
    mk = lambda q: deepopt.AssociativeMomentum(q, lr=0.01, preconditioner="adam", fused=True)  # noqa: E731
    a = [p.detach().clone().requires_grad_() for p in ps]
    b = [p.detach().clone().requires_grad_() for p in ps]
    oa, ob = mk(a), mk(b)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(DEVICE)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        if step == 1:
            sd = ob.state_dict()
            ob = mk(b)
            ob.load_state_dict(sd)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_import_does_not_import_triton():
    import subprocess
    import sys
    code = "import sys, deepopt; assert 'triton' not in sys.modules, 'triton imported at import deepopt'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


# ----------------------------------------------------------------------------- CUDA C++ extension
def test_cuda_ext_refuses_clearly_without_gpu_or_toolchain():
    from deepopt import _cuda_ext
    reason = _cuda_ext.unavailable_reason([torch.zeros(2)])
    assert reason is not None and "CUDA" in reason
    if not CUDA:
        with pytest.raises(RuntimeError, match="fused_backend='cuda'"):
            deepopt.AssociativeMomentum(_params([(2,)]), fused=True, fused_backend="cuda")
    with pytest.raises(ValueError, match="fused must be True, False or None.*fused_backend='cuda'"):
        deepopt.AssociativeMomentum(_params([(2,)]), fused="cuda")
    with pytest.raises(ValueError, match="fused_backend"):
        deepopt.AssociativeMomentum(_params([(2,)]), fused=True, fused_backend="apex")


@pytest.mark.skipif(not CUDA, reason="the CUDA extension needs a GPU and nvcc (awaiting a GPU session)")
@pytest.mark.parametrize("pre", [None, "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ext_matches_forloop(pre, dtype):
    from deepopt import _cuda_ext
    reason = _cuda_ext.unavailable_reason([torch.zeros(1, device="cuda")])
    if reason is not None:
        pytest.skip(reason)
    shapes = [(3,), (), (0,), (4099,), (17, 5), (1000, 33)]
    ref, fus, oa, ob = _run(lambda ps, fused, **f: deepopt.AssociativeMomentum(
        ps, lr=0.01, momentum=0.9, preconditioner=pre, weight_decay=0.1, decoupled_weight_decay=True,
        fused=fused, fused_backend="cuda", **f), shapes, dtype=dtype)
    _close(ref, fus, tol=FP32 if dtype == torch.float32 else BF16)
