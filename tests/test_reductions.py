"""The exact reductions to torch (docs/correctness.md), checked bit for bit against torch.

Each test draws shapes, dtype and hyperparameters with hypothesis, steps both optimizers 20
times on the same fresh random gradients with an LR scheduler, on the for-loop and the
foreach implementation, and asserts ``torch.equal``.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepopt
from _util import assert_equal_params, run_side_by_side

HAS_MUON = hasattr(torch.optim, "Muon")
needs_muon = pytest.mark.skipif(not HAS_MUON, reason=f"torch {torch.__version__} has no torch.optim.Muon (2.9+)")

dims = st.integers(1, 9)
shape_2d = st.tuples(dims, dims)
any_shape = st.one_of(st.tuples(dims), shape_2d, st.tuples(dims, dims, st.integers(1, 3), st.integers(1, 3)))
shapes = st.lists(any_shape, min_size=1, max_size=3)
matrix_shapes = st.lists(shape_2d, min_size=1, max_size=3)
# same-shape and transposed matrices: Newton-Schulz runs them as one batch
batched_shapes = st.lists(st.sampled_from([(5, 3), (3, 5), (8, 8), (24, 40), (40, 24), (1, 4), (4, 1)]),
                          min_size=2, max_size=6)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
rates = st.floats(1e-4, 0.3)
moms = st.floats(0.0, 0.99)
wds = st.sampled_from([0.0, 1e-3, 0.1])
foreach = st.booleans()


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)


def state_kw(dtype):
    # torch keeps state in the param dtype; the low-precision reductions compare against that
    return {"state_dtype": "param"} if dtype != torch.float32 else {}


@given(shapes=shapes, dtype=dtypes, lr=rates, momentum=moms, damp=st.floats(0.0, 0.9), wd=wds,
       nesterov=st.booleans(), maximize=st.booleans(), fe=foreach)
def test_associative_momentum_is_sgd(shapes, dtype, lr, momentum, damp, wd, nesterov, maximize, fe):
    damp = 0.0 if nesterov else damp
    momentum = max(momentum, 0.1) if nesterov else momentum
    kw = dict(lr=lr, momentum=momentum, dampening=damp, weight_decay=wd, nesterov=nesterov,
              maximize=maximize, foreach=fe)
    a, b, *_ = run_side_by_side(lambda p: deepopt.AssociativeMomentum(p, **kw, **state_kw(dtype)),
                                lambda p: torch.optim.SGD(p, **kw), shapes, dtype=dtype, scheduler=step_lr)
    assert_equal_params(a, b)


@given(shapes=shapes, dtype=dtypes, lr=rates, b1=moms, b2=st.floats(0.5, 0.999), wd=wds,
       decoupled=st.booleans(), maximize=st.booleans(), fe=foreach, eps=st.sampled_from([1e-8, 1e-3]))
def test_associative_momentum_adam_is_adam_or_adamw(shapes, dtype, lr, b1, b2, wd, decoupled, maximize, fe, eps):
    ours = dict(lr=lr, momentum=b1, beta2=b2, weight_decay=wd, maximize=maximize, foreach=fe, eps=eps,
                decoupled_weight_decay=decoupled, preconditioner="adam")
    oracle = torch.optim.AdamW if decoupled else torch.optim.Adam
    # the rule: deepopt's foreach path equals torch's foreach path, the for-loop torch's for-loop
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.AssociativeMomentum(p, **ours, **state_kw(dtype)),
        lambda p: oracle(p, lr=lr, betas=(b1, b2), weight_decay=wd, maximize=maximize, foreach=fe, eps=eps),
        shapes, dtype=dtype, scheduler=step_lr)
    assert_equal_params(a, b)


@given(shapes=shapes, dtype=dtypes, lr=rates, momentum=moms, damp=st.floats(0.0, 0.9), wd=wds,
       nesterov=st.booleans(), keys=st.sampled_from(["matrix", "spectral", "elementwise"]), fe=foreach,
       decoupled=st.booleans())
def test_delta_momentum_with_zero_delta_is_associative_momentum(shapes, dtype, lr, momentum, damp, wd, nesterov,
                                                               keys, fe, decoupled):
    damp = 0.0 if nesterov else damp
    momentum = max(momentum, 0.1) if nesterov else momentum
    kw = dict(lr=lr, momentum=momentum, dampening=damp, weight_decay=wd, nesterov=nesterov, foreach=fe,
              decoupled_weight_decay=decoupled, **state_kw(dtype))
    a, b, *_ = run_side_by_side(lambda p: deepopt.DeltaMomentum(p, delta=0.0, keys=keys, **kw),
                                lambda p: deepopt.AssociativeMomentum(p, **kw), shapes, dtype=dtype,
                                scheduler=step_lr)
    assert_equal_params(a, b)


@given(shapes=shapes, dtype=dtypes, lr=rates, momentum=moms, wd=wds, nesterov=st.booleans(),
       maximize=st.booleans(), fe=foreach, hidden=st.integers(1, 8), objective=st.sampled_from(["l2", "dot"]))
def test_deep_momentum_frozen_identity_is_sgd(shapes, dtype, lr, momentum, wd, nesterov, maximize, fe, hidden,
                                              objective):
    momentum = max(momentum, 0.1) if nesterov else momentum
    kw = dict(lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov, maximize=maximize, foreach=fe)
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.DeepMomentum(p, dampening=0.0, memory_lr=0.0, objective=objective, output="identity",
                                       hidden=hidden, **kw, **state_kw(dtype)),
        lambda p: torch.optim.SGD(p, **kw), shapes, dtype=dtype, scheduler=step_lr)
    assert_equal_params(a, b)


@needs_muon
@given(shapes=st.one_of(matrix_shapes, batched_shapes), lr=st.floats(1e-3, 0.1), momentum=st.floats(0.5, 0.99),
       wd=wds, nesterov=st.booleans(), fe=foreach)
def test_deep_momentum_frozen_newton_schulz_is_muon(shapes, lr, momentum, wd, nesterov, fe):
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.DeepMomentum(p, lr=lr, momentum=momentum, dampening=momentum, weight_decay=wd,
                                       nesterov=nesterov, memory_lr=0.0, output="newton_schulz",
                                       decoupled_weight_decay=True, adjust_lr="original", ns_dtype="bfloat16",
                                       foreach=fe),
        lambda p: torch.optim.Muon(p, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov),
        shapes, scheduler=step_lr)
    assert_equal_params(a, b)


@needs_muon
@given(shapes=st.one_of(matrix_shapes, batched_shapes), lr=st.floats(1e-3, 0.1), momentum=st.floats(0.5, 0.99),
       wd=wds, fe=foreach, chunk=st.integers(1, 5), beta2=st.floats(0.5, 0.999))
def test_m3_without_slow_memory_and_preconditioner_is_muon(shapes, lr, momentum, wd, fe, chunk, beta2):
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.M3(p, lr=lr, momentum=momentum, weight_decay=wd, nesterov=True, slow_weight=0.0,
                             precondition=False, chunk=chunk, beta2=beta2, ns_dtype="bfloat16", foreach=fe),
        lambda p: torch.optim.Muon(p, lr=lr, momentum=momentum, weight_decay=wd, nesterov=True),
        shapes, scheduler=step_lr)
    assert_equal_params(a, b)


@given(shapes=shapes, lr=rates, b1=moms, b2=st.floats(0.5, 0.999), wd=wds, fe=foreach)
def test_m3_adamw_group_is_adamw(shapes, lr, b1, b2, wd, fe):
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.M3([{"params": p, "algorithm": "adamw"}], lr=lr, momentum=b1, beta2=b2,
                             weight_decay=wd, foreach=fe),
        lambda p: torch.optim.AdamW(p, lr=lr, betas=(b1, b2), weight_decay=wd, foreach=fe),
        shapes, scheduler=step_lr)
    assert_equal_params(a, b)


@pytest.mark.parametrize("oracle_foreach", [False, True])
def test_tensor_lr_matches_torch(oracle_foreach):
    """A 1-element tensor lr (driven by a scheduler) gives torch's results on every path."""
    for ours_fe in (False, True):
        a, b, *_ = run_side_by_side(
            lambda p: deepopt.AssociativeMomentum(p, lr=torch.tensor([0.05]), momentum=0.9, foreach=ours_fe),
            lambda p: torch.optim.SGD(p, lr=torch.tensor([0.05]), momentum=0.9, foreach=oracle_foreach),
            [(4, 3), (5,)], scheduler=step_lr)
        assert_equal_params(a, b)
    a, b, *_ = run_side_by_side(
        lambda p: deepopt.AssociativeMomentum(p, lr=torch.tensor(0.01), preconditioner="adam", foreach=False),
        lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01), betas=(0.9, 0.999), foreach=False),
        [(4, 3), (5,)], scheduler=step_lr)
    assert_equal_params(a, b)
