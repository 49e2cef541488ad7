"""deepopt: Nested Learning's deep optimizers for PyTorch.

An optimizer's state is an associative memory that compresses the gradient stream with its own
inner objective at its own update frequency:

* :class:`AssociativeMomentum` - the dot-product memory (SGD-momentum, Adam/AdamW exactly);
* :class:`DeltaMomentum` - the L2-regression (delta-rule) memory: gradient-dependent forgetting;
* :class:`DeepMomentum` - a linear + MLP memory trained by its own objective (DMGD);
* :class:`M3` - fast and slow orthogonalised memories (Multi-scale Momentum Muon);
* :class:`MultiFrequency` - any optimizer's param groups at their own update periods;
* :mod:`deepopt.functional` - the rules as functions on tensors.
"""

from . import functional
from .associative_momentum import AssociativeMomentum
from .deep_momentum import DeepMomentum
from .delta_momentum import DeltaMomentum
from .m3 import M3
from .multi_frequency import MultiFrequency

__all__ = ["AssociativeMomentum", "DeltaMomentum", "DeepMomentum", "M3", "MultiFrequency", "functional"]
__version__ = "0.1.0"
