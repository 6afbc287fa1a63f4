"""nvjax: Monte Carlo simulation of NVM crossbar accelerators for neural-network inference, in JAX.

Layers (every module imports only modules of the layers below it; no circles):

1. ``_checks``, ``_io``, ``_ops``, ``_version``, ``_strict``, ``_runtime``, ``_train_loop``,
   ``prng``, ``stats`` — validators, files, straight-through ops, process set-up, the Philox
   generator, paired statistics (NumPy/SciPy only);
2. ``devices`` (D1–D6 cell physics), ``disturb`` (D7), ``encoding``, ``irdrop``, ``layers``
   (Flax introspection), ``data``, ``mapping`` (assignment solvers);
3. ``crossbar`` (tiles and the analog MVM), ``programming``, ``models``, ``sweep`` (the Monte
   Carlo engine: keys, chunks, sharding, chunk files);
4. ``chip`` (a network on crossbars), ``sensitivity``;
5. ``lifetime``, ``correction``, ``training``, ``placement``;
6. ``config`` (run schemas), ``jobs`` (the ``nvjax run`` / ``nvjax lifetime`` jobs), ``bench``,
   ``cli``.

Submodules load on first use (``nvjax.chip`` imports JAX; ``import nvjax`` alone does not), so
``nvjax --help`` and ``nvjax --version`` start fast.
"""
import importlib as _importlib

from ._version import __version__

__all__ = ["bench", "chip", "config", "correction", "crossbar", "data", "devices", "disturb",
           "encoding", "irdrop", "jobs", "layers", "lifetime", "mapping", "models", "placement",
           "prng", "programming", "sensitivity", "stats", "sweep", "training", "__version__"]

_SUBMODULES = frozenset(__all__) - {"__version__"}


def __getattr__(name):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES)
