"""nvjax: Monte Carlo simulation of NVM crossbar accelerators for neural-network inference, in JAX.

Modules (dependencies point one way): ``devices`` → ``encoding`` → ``crossbar`` (+ ``irdrop``)
→ ``disturb`` → ``chip`` → ``lifetime`` → ``sweep``; ``models``/``data`` hold the Flax models and bundled data sets; ``config``/``cli`` the
command line; ``bench`` the throughput benchmark. See DESIGN.md for the specification.
"""
from . import (chip, config, crossbar, data, devices, disturb, encoding, irdrop, lifetime, models,
               sweep)

__version__ = "0.1.0"

__all__ = ["chip", "config", "crossbar", "data", "devices", "disturb", "encoding", "irdrop",
           "lifetime", "models", "sweep", "__version__"]
