"""deepopt: Nested Learning's deep optimizers for PyTorch.

An optimizer's state is an associative memory that compresses the gradient stream with its own
inner objective at its own update frequency. See README.md and ``deepopt.functional``.
"""

from . import functional
from .associative_momentum import AssociativeMomentum

__all__ = ["AssociativeMomentum", "functional"]
__version__ = "0.1.0"
