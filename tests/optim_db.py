"""The one registry of optimizer configurations the tests run over (torch's ``optim_db``).

Each :class:`Entry` names a configuration, builds it (``entry.make(params, **flags)``), lists
the implementations it has, and, where torch has a twin, the torch optimizer that must give the
same trajectory bit for bit. The contract tests (tests/test_contract.py), the parity test
(tests/test_parity.py) and the hardening tests all iterate over ``ENTRIES``; a maintainer who
changes a rule finds here which implementations to rerun.

Implementations map to constructor flags as torch's do: ``"forloop"`` is ``foreach=False``,
``"foreach"`` is ``foreach=True``, ``"fused"`` is ``fused=True`` (Triton; under the CPU
interpreter off-GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import deepopt

IMPLEMENTATION_FLAGS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
HAS_MUON = hasattr(torch.optim, "Muon")

VECTOR_AND_MATRICES = ((4, 3), (5,), (2, 3, 2, 2))
MATRICES_ONLY = ((4, 3), (2, 3, 2, 2))


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[..., torch.optim.Optimizer]       # make(params, **flags)
    implementations: tuple[str, ...] = ("forloop", "foreach", "fused")
    oracle: Callable[..., torch.optim.Optimizer] | None = None   # torch twin, same params
    oracle_skip: str | None = None                   # why the oracle cannot run here, if it cannot
    shapes: tuple = VECTOR_AND_MATRICES
    wrapper: bool = False                            # a MultiFrequency around a deepopt optimizer
    decoupled_weight_decay: bool = False             # bf16 foreach rounds the decay factor (as torch)
    tags: frozenset = field(default_factory=frozenset)

    def build(self, params, implementation: str | None = None, **kw):
        flags = dict(IMPLEMENTATION_FLAGS[implementation]) if implementation else {}
        return self.make(params, **flags, **kw)


def _mf(inner_cls, **kw):
    """MultiFrequency over ``inner_cls``: the first param every 2 steps, the rest every step."""
    def make(params, **flags):
        params = list(params)
        return deepopt.MultiFrequency(inner_cls(
            [{"params": params[:1], "update_every": 2}, {"params": params[1:]}], **kw, **flags))
    return make


_muon_skip = None if HAS_MUON else f"torch {torch.__version__} has no torch.optim.Muon (2.9+)"

ENTRIES = [
    Entry("associative",
          lambda p, **kw: deepopt.AssociativeMomentum(p, lr=0.05, momentum=0.9, **kw),
          oracle=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    Entry("associative_nesterov_wd",
          lambda p, **kw: deepopt.AssociativeMomentum(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, **kw),
          oracle=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    Entry("associative_adam",
          lambda p, **kw: deepopt.AssociativeMomentum(p, lr=0.01, preconditioner="adam", weight_decay=0.01, **kw),
          oracle=lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)),
    Entry("associative_adamw",
          lambda p, **kw: deepopt.AssociativeMomentum(p, lr=0.01, preconditioner="adam", weight_decay=0.1,
                                                      decoupled_weight_decay=True, beta2=0.99, **kw),
          oracle=lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, betas=(0.9, 0.99)),
          decoupled_weight_decay=True),
    Entry("delta",
          lambda p, **kw: deepopt.DeltaMomentum(p, lr=0.05, delta=0.5, nesterov=True, **kw)),
    Entry("delta_elementwise",
          lambda p, **kw: deepopt.DeltaMomentum(p, lr=0.05, delta=0.5, keys="elementwise", **kw)),
    Entry("delta_spectral",
          lambda p, **kw: deepopt.DeltaMomentum(p, lr=0.05, delta=0.5, keys="spectral", **kw)),
    Entry("deep",
          lambda p, **kw: deepopt.DeepMomentum(p, lr=0.05, memory_lr=0.1, **kw)),
    Entry("deep_frozen",
          lambda p, **kw: deepopt.DeepMomentum(p, lr=0.05, momentum=0.9, memory_lr=0.0, **kw),
          oracle=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    Entry("deep_ns_l2",
          lambda p, **kw: deepopt.DeepMomentum(p, lr=0.02, memory_lr=0.1, objective="l2", output="newton_schulz",
                                               nesterov=True, dampening=0.9, decoupled_weight_decay=True,
                                               weight_decay=0.1, **kw),
          decoupled_weight_decay=True, tags=frozenset({"newton_schulz"})),
    Entry("deep_frozen_ns",
          lambda p, **kw: deepopt.DeepMomentum(p, lr=0.02, momentum=0.95, dampening=0.95, nesterov=True,
                                               memory_lr=0.0, output="newton_schulz", decoupled_weight_decay=True,
                                               weight_decay=0.1, adjust_lr="original", ns_dtype="bfloat16", **kw),
          oracle=(lambda p: torch.optim.Muon(p, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1))
          if HAS_MUON else None, oracle_skip=_muon_skip,
          shapes=((4, 3), (6, 5)), decoupled_weight_decay=True, tags=frozenset({"newton_schulz"})),
    Entry("m3",
          lambda p, **kw: deepopt.M3(p, lr=0.01, chunk=2, weight_decay=0.01, **kw),
          shapes=MATRICES_ONLY, decoupled_weight_decay=True, tags=frozenset({"newton_schulz"})),
    Entry("m3_muon",
          lambda p, **kw: deepopt.M3(p, lr=0.02, momentum=0.95, nesterov=True, slow_weight=0.0, precondition=False,
                                     weight_decay=0.1, ns_dtype="bfloat16", **kw),
          oracle=(lambda p: torch.optim.Muon(p, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1))
          if HAS_MUON else None, oracle_skip=_muon_skip,
          shapes=((4, 3), (6, 5)), decoupled_weight_decay=True, tags=frozenset({"newton_schulz"})),
    Entry("mf_associative",
          _mf(deepopt.AssociativeMomentum, lr=0.05, momentum=0.9),
          implementations=("forloop", "foreach"), wrapper=True),
    Entry("mf_deep",
          _mf(deepopt.DeepMomentum, lr=0.05, memory_lr=0.1),
          implementations=("forloop", "foreach"), wrapper=True),
]
BY_NAME = {e.name: e for e in ENTRIES}
NAMES = [e.name for e in ENTRIES]
#: the configurations that are a deepopt optimizer itself (not a MultiFrequency wrapper)
OPTIMIZER_NAMES = [e.name for e in ENTRIES if not e.wrapper]
WITH_ORACLE = [e.name for e in ENTRIES if e.oracle is not None or e.oracle_skip]


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float32).to(dtype).requires_grad_() for s in shapes]
