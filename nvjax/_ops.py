"""Small differentiable building blocks shared by several modules (no nvjax imports).

``round_ste`` rounds in the forward pass and passes gradients straight through (identity) in the
backward pass — the straight-through estimator (Bengio, Léonard, Courville, arXiv 1308.3432) used
for DAC/ADC and level quantization in hardware-aware training. ``straight_through(w, wq)`` returns
``wq`` exactly with the tangent of ``w`` (for projections that are not a plain rounding).
``fold_in_range(key, n)`` is ``[fold_in(key, i) for i in range(n)]`` as one batched call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["round_ste", "straight_through", "fold_in_range"]


@jax.custom_jvp
def round_ste(x):
    """``jnp.round(x)`` (exactly, half to even) with the identity as its derivative."""
    return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.round(x), dx


@jax.custom_jvp
def straight_through(w, wq):
    """``wq`` exactly in the forward pass; derivative d/dw = identity, d/dwq = 0."""
    return wq


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    (w, wq), (dw, _) = primals, tangents
    return wq, jnp.broadcast_to(dw, jnp.shape(wq)).astype(jnp.result_type(wq))


def fold_in_range(key, n: int):
    """Keys ``fold_in(key, i)`` for ``i`` in ``range(n)``, stacked [n], made by one vmapped call.

    The same keys as ``n`` separate calls, but one random call site in the compiled program
    instead of ``n``: each costs XLA:CPU about 0.1 s of compilation (a rolled threefry loop).
    """
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
