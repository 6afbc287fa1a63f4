"""nvjax: Monte Carlo simulation of NVM crossbar accelerators for neural-network inference, in JAX.

Modules (dependencies point one way): ``devices`` → ``encoding`` → ``crossbar`` → ``chip`` →
``sweep``; ``models``/``data`` hold the Flax models and bundled data sets; ``config``/``cli`` the
command line. See DESIGN.md for the specification.
"""
from . import devices, encoding, crossbar

__version__ = "0.1.0"

__all__ = ["devices", "encoding", "crossbar", "__version__"]
