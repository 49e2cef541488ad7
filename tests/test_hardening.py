"""Hardening: extreme magnitudes, empty and 0-dim params, mixed dtypes, long runs without memory
growth, run-to-run determinism, hypothesis-driven finiteness."""

import gc
import tracemalloc

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deepopt
from _util import clone_params
from test_contract import ALL, CONFIGS, shapes_for
from optim_db import BY_NAME, OPTIMIZER_NAMES


def matrices_only(name):
    return all(len(s) >= 2 for s in BY_NAME[name].shapes)


def _finite(params):
    return all(torch.isfinite(p).all() for p in params)


@given(name=st.sampled_from(ALL), log_scale=st.sampled_from([-30, -12, 0, 12, 18]), seed=st.integers(0, 1000),
       foreach=st.booleans())
def test_extreme_gradient_magnitudes_stay_finite(name, log_scale, seed, foreach):
    """Gradients from 1e-30 to 1e18 (fp32; beyond ~1e19 the squared gradient of Adam-like second
    moments overflows, in torch's Adam too) never produce inf/NaN parameters or state."""
    gen = torch.Generator().manual_seed(seed)
    params = clone_params([torch.randn(s, generator=gen) for s in shapes_for(name)])
    opt = CONFIGS[name](params, foreach=foreach)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** log_scale
        opt.step()
    assert _finite(params), name
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v)), name


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("foreach", [False, True])
def test_empty_and_zero_dim_params(name, foreach):
    if matrices_only(name):
        params = clone_params([torch.randn(0, 3), torch.randn(4, 0), torch.randn(3, 4)])
    else:
        params = clone_params([torch.randn(()), torch.randn(0), torch.randn(0, 3), torch.randn(3, 4)])
    start = [p.detach().clone() for p in params]
    opt = CONFIGS[name](params, foreach=foreach)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert _finite(params)
    # the non-empty params took their steps (an empty neighbour must not stop them)
    for p, p0 in zip(params, start):
        if p.numel():
            assert (p - p0).abs().max() > 1e-4, (name, tuple(p.shape))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)   # (a wrapper's entry has two groups)
def test_mixed_dtypes_in_one_group(name):
    """fp32, fp64, bf16 and fp16 params in one group: each equals the rule run on it alone."""
    shapes = [(4, 3), (3, 5), (2, 3, 2, 2), (6, 2)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    together = clone_params(base)
    alone = [clone_params([b]) for b in base]
    opt = CONFIGS[name](together)
    opts = [CONFIGS[name](a) for a in alone]
    if name.startswith("deep"):   # the MLP init is seeded by the param's index in its optimizer
        for i, o in enumerate(opts):
            o._index_of = {id(alone[i][0]): i}
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, a, g in zip(together, alone, grads):
            p.grad = g.to(p.dtype)
            a[0].grad = g.to(p.dtype)
        opt.step()
        for o in opts:
            o.step()
    for p, a in zip(together, alone):
        assert torch.equal(p, a[0]), p.dtype


@pytest.mark.filterwarnings("ignore::FutureWarning")   # gc.get_objects() touches deprecated torch aliases
@pytest.mark.parametrize("name", ALL)
def test_a_thousand_steps_without_memory_growth(name):
    params = clone_params([torch.randn(8, 8), torch.randn(4, 8)])
    opt = CONFIGS[name](params)
    gen = torch.Generator().manual_seed(0)

    def run(steps):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 0.01
            opt.step()

    run(50)   # state allocated
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    tensors_before = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    run(1000)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    tensors_after = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert tensors_after <= tensors_before + 2, f"{tensors_after - tensors_before} tensors leaked"
    assert growth < 256 * 1024, f"python heap grew by {growth} bytes over 1000 steps"


@pytest.mark.parametrize("name", ALL)
def test_runs_are_deterministic(name):
    def once():
        gen = torch.Generator().manual_seed(5)
        params = clone_params([torch.randn(6, 4, generator=gen), torch.randn(3, 6, generator=gen)])
        opt = CONFIGS[name](params)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_nonfinite_propagate_updates_every_param_alike():
    """Default policy: no check, as torch; a NaN gradient reaches its own param only (no partial
    update of the others is skipped)."""
    params = clone_params([torch.randn(3, 3), torch.randn(3, 3)])
    before = [p.detach().clone() for p in params]
    opt = deepopt.DeltaMomentum(params, lr=0.1)
    params[0].grad = torch.full((3, 3), float("nan"))
    params[1].grad = torch.ones(3, 3)
    opt.step()
    assert torch.isnan(params[0]).all()
    assert torch.isfinite(params[1]).all() and not torch.equal(params[1], before[1])


@pytest.mark.parametrize("fused", [None, True])
def test_optimizers_in_threads_match_sequential_runs(fused):
    """Several optimizers stepping concurrently in threads (shared kernel and table caches) give
    the results of sequential runs."""
    import threading
    if fused:
        pytest.importorskip("triton.language")

    def run(name, seed, out):
        # OpenMP's thread count is per native thread: a new thread would reduce in another order
        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(seed)
        params = clone_params([torch.randn(33, 7, generator=gen), torch.randn(5, 33, generator=gen)])
        opt = CONFIGS[name](params, fused=fused)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out[(name, seed)] = params

    jobs = [(name, seed) for name in ("associative", "delta_elementwise", "deep") for seed in (0, 1)]
    sequential, threaded = {}, {}
    for name, seed in jobs:
        run(name, seed, sequential)
    threads = [threading.Thread(target=run, args=(name, seed, threaded)) for name, seed in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in jobs:
        for a, b in zip(sequential[key], threaded[key]):
            assert torch.equal(a, b), key
