"""deepopt: Nested Learning's deep optimizers for PyTorch.

An optimizer's state is an associative memory that compresses the gradient stream with its own
inner objective at its own update frequency:

* :class:`AssociativeMomentum` - the dot-product memory (SGD-momentum, Adam/AdamW exactly);
* :class:`DeltaMomentum` - the L2-regression (delta-rule) memory: gradient-dependent forgetting;
* :class:`DeepMomentum` - a linear + MLP memory trained by its own objective (DMGD);
* :class:`M3` - fast and slow orthogonalised memories (Multi-scale Momentum Muon);
* :class:`MultiFrequency` - any optimizer's param groups at their own update periods;
* :func:`create_optimizer` - any of them for a model, routed as Muon users do;
* :mod:`deepopt.functional` - the rules as functions on tensors;
* :mod:`deepopt.memory` - the in-context memory rules HOPE runs in its forward pass;
* :mod:`deepopt.newton_schulz` - batched Newton-Schulz (Muon, Polar Express; direct and Gram forms).
"""

from . import functional, memory, newton_schulz
from .associative_momentum import AssociativeMomentum
from .deep_momentum import DeepMomentum
from .delta_momentum import DeltaMomentum
from .m3 import M3
from .multi_frequency import MultiFrequency
from .create import create_optimizer

__all__ = ["AssociativeMomentum", "DeltaMomentum", "DeepMomentum", "M3", "MultiFrequency", "create_optimizer",
           "functional", "memory", "newton_schulz"]
__version__ = "0.1.0"
