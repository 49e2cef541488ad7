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


OPTIMIZERS = {
    "associative": lambda m: deepopt.AssociativeMomentum(m.parameters(), lr=0.05, momentum=0.9),
    "associative_adam": lambda m: deepopt.AssociativeMomentum(m.parameters(), lr=3e-3, preconditioner="adam"),
    "delta": lambda m: deepopt.DeltaMomentum(m.parameters(), lr=0.05, momentum=0.9, delta=0.5),
    "delta_elementwise": lambda m: deepopt.DeltaMomentum(m.parameters(), lr=0.05, momentum=0.9, delta=0.5,
                                                         keys="elementwise"),
    "deep": lambda m: deepopt.DeepMomentum(m.parameters(), lr=0.05, momentum=0.9, memory_lr=0.01),
    "deep_l2_ns": lambda m: deepopt.DeepMomentum(m.parameters(), lr=0.02, momentum=0.9, objective="l2",
                                                 output="newton_schulz"),
    "m3": lambda m: deepopt.M3(deepopt.M3.matrix_groups(m, lr=3e-3), lr=0.01, chunk=4, precondition=False),
    "m3_preconditioned": lambda m: deepopt.M3(deepopt.M3.matrix_groups(m, lr=3e-3), lr=1e-3, chunk=4),
    "multi_frequency": lambda m: deepopt.MultiFrequency(deepopt.DeepMomentum(
        [{"params": m[0].parameters(), "update_every": 2}, {"params": list(m[2].parameters())
                                                             + list(m[4].parameters())}], lr=0.05)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_trains(name):
    model, x, y = make_problem()
    opt = OPTIMIZERS[name](model)
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
