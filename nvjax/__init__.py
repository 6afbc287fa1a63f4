"""nvjax: Monte Carlo simulation of NVM crossbar accelerators for neural-network inference, in JAX.

Modules (dependencies point one way): ``devices`` → ``encoding`` → ``crossbar`` (+ ``irdrop``)
→ ``disturb`` → ``chip`` → ``lifetime`` → ``sweep``; ``sensitivity`` (saliency, Hessian diagonal,
activation statistics) and ``mapping`` (exact and relaxed placement solvers), ``placement`` (their cost models and objective); ``programming`` (write-verify,
row-parallel pulse programming, selective write-verify); ``training`` (hardware-aware and
biased training, post-programming correction); ``prng`` (the Philox4x32-10 generator);
``models``/``data`` hold the Flax models and bundled data sets; ``config``/``cli`` the
command line; ``bench`` the throughput benchmark. See DESIGN.md for the specification.
"""
from . import (chip, config, crossbar, data, devices, disturb, encoding, irdrop, lifetime, mapping,
               models, placement, prng, programming, sensitivity, sweep, training)

__version__ = "0.1.0"

__all__ = ["chip", "config", "crossbar", "data", "devices", "disturb", "encoding", "irdrop",
           "lifetime", "mapping", "models", "placement", "prng", "programming", "sensitivity",
           "sweep", "training",
           "__version__"]
