"""XLA compile options nvjax uses where compilation, not execution, dominates.

XLA:CPU's default backend optimization level runs LLVM's full optimization pipeline on every
fused kernel; level 1 compiles the quickstart's chunk functions about 3-4× faster (13.4 s ->
3.5 s for the programming stage, 2-core machine) with the same execution time within noise, and
gave bit-identical results there (the quickstart's results.csv, and the trained MLP's parameters:
same SHA-256). Level 0 compiles faster still but runs elementwise code about 4× slower and
changed the trained parameters, so it is not used.

This module imports nothing.
"""
__all__ = ["FAST_COMPILE_OPTIONS"]

#: ``compiler_options`` for ``jax.jit`` of short-running functions (training epochs, small sweeps).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 1}
