"""Every implementation of every registry entry (tests/optim_db.py) against its references.

* foreach == for-loop, bit for bit (tests/test_contract.py also checks bf16);
* fused (Triton; the CPU interpreter off-GPU) == for-loop at float rounding: fp32 ``rtol=1e-5``,
  and ``2e-3`` for rules with a bf16 Newton-Schulz read-out (a 1-ulp difference in its input moves
  its output by up to ~1e-3);
* where torch has a twin, every implementation == the torch optimizer: bit for bit for the
  for-loop and foreach paths, at the fused tolerance for the fused path.
"""

import os

import pytest
import torch

from _util import assert_equal_params
from optim_db import BY_NAME, ENTRIES, make_params

FP32 = dict(rtol=1e-5, atol=1e-6)
NS = dict(rtol=2e-3, atol=2e-3)
STEPS = 8


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _skip_unless_runnable(implementation):
    if implementation != "fused":
        return
    if not _has_triton():
        pytest.skip("the fused paths need triton>=3.6 (pip install -e '.[test]')")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")


def _trajectory(make, shapes, steps=STEPS):
    params = make_params(shapes)
    opt = make(params)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _tolerance(entry):
    return NS if "newton_schulz" in entry.tags else FP32


CASES = [(e.name, impl) for e in ENTRIES for impl in e.implementations if impl != "forloop"]


@pytest.mark.parametrize("name, implementation", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_implementation_matches_forloop(name, implementation):
    entry = BY_NAME[name]
    _skip_unless_runnable(implementation)
    ref, _ = _trajectory(lambda p: entry.build(p, "forloop"), entry.shapes)
    out, _ = _trajectory(lambda p: entry.build(p, implementation), entry.shapes)
    if implementation == "foreach":
        assert_equal_params(ref, out)
    else:
        for i, (a, b) in enumerate(zip(ref, out)):
            torch.testing.assert_close(b, a, **_tolerance(entry), msg=lambda m: f"param {i}: {m}")


ORACLE_CASES = [(e.name, impl) for e in ENTRIES if e.oracle is not None or e.oracle_skip for impl in e.implementations]


@pytest.mark.parametrize("name, implementation", ORACLE_CASES, ids=[f"{n}-{i}" for n, i in ORACLE_CASES])
def test_implementation_matches_its_torch_twin(name, implementation):
    entry = BY_NAME[name]
    if entry.oracle is None:
        pytest.skip(entry.oracle_skip)
    _skip_unless_runnable(implementation)
    # torch's twin on CPU runs its for-loop (torch's default there); fp32, where its paths agree
    theirs, _ = _trajectory(entry.oracle, entry.shapes)
    ours, _ = _trajectory(lambda p: entry.build(p, implementation), entry.shapes)
    if implementation == "fused":
        for i, (a, b) in enumerate(zip(theirs, ours)):
            torch.testing.assert_close(b, a, **_tolerance(entry), msg=lambda m: f"param {i}: {m}")
    else:
        assert_equal_params(theirs, ours)
