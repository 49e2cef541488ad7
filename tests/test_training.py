"""Each optimizer actually trains: a small MLP regression falls well below its starting loss."""

import pytest
import torch

import deepopt


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        y = teacher(x)
    torch.manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                  torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return student, x, y


# name -> create_optimizer arguments (the one way to build an optimizer for a model)
OPTIMIZERS = {
    "sgd": dict(name="sgd", lr=0.05),
    "adamw": dict(name="adamw", lr=3e-3),
    "delta": dict(name="delta", lr=0.05),
    "delta_elementwise": dict(name="delta", lr=0.05, keys="elementwise"),
    "deep": dict(name="deep", lr=0.05),                                   # the defaults: l2 memory
    "deep_dot": dict(name="deep", lr=0.05, objective="dot", memory_lr=0.01),
    "deep_ns": dict(name="deep-ns", lr=0.02, adamw_lr=3e-3),
    "m3": dict(name="m3", lr=0.01, adamw_lr=3e-3, chunk=4, precondition=False),
    "m3_preconditioned": dict(name="m3", adamw_lr=3e-3, chunk=4),   # M3 at its defaults
    "multi_frequency": dict(name="multifreq:deep", lr=0.05, periods={r"^0\.": 2}, reduce="sum"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trains(name):
    model, x, y = make_problem()
    kw = dict(OPTIMIZERS[name])
    opt = deepopt.create_optimizer(model, kw.pop("name"), **kw)
    loss_fn = torch.nn.MSELoss()
    with torch.no_grad():
        start = loss_fn(model(x), y).item()
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn(model(x), y).item()
    assert end < 0.1 * start, f"{name}: loss {start:.3f} -> {end:.3f}"


# the new part of each rule, and the same optimizer with it switched off (its reduction)
WITHOUT_THE_NEW_PART = {
    "deep": dict(memory_lr=0.0),
    "deep_dot": dict(memory_lr=0.0),
    "delta": dict(delta=0.0),
    "delta_elementwise": dict(delta=0.0),
    "m3_preconditioned": dict(slow_weight=0.0, precondition=False),
    "multi_frequency": dict(name="deep", periods=None, reduce=None),   # every level every step
}


def train(kw, steps=100):
    model, x, y = make_problem()
    kw = dict(kw)
    opt = deepopt.create_optimizer(model, kw.pop("name"), **kw)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(WITHOUT_THE_NEW_PART))
def test_the_new_part_changes_training(name):
    """Training tells the rule from its reduction: deleting the MLP memory, the delta forget term,
    M3's slow memory and preconditioner, or the slow levels would make the two runs equal."""
    ours = train(OPTIMIZERS[name])
    reduced = {**OPTIMIZERS[name], **WITHOUT_THE_NEW_PART[name]}
    reduced = train({k: v for k, v in reduced.items() if v is not None})
    start = train(OPTIMIZERS[name], steps=0)
    relative = (ours - reduced).norm() / (ours - start).norm()
    assert relative > 1e-3, f"{name}: trajectories differ by {relative:.2e} of the distance travelled"
