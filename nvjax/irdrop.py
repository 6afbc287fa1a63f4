"""IR drop in one crossbar tile: the per-cell voltage map for given conductances and inputs.

Circuit (DESIGN.md §5): word line i is driven at its column-0 end with ``v_in[i]`` and is open at
the far end; bit line j is held at 0 V (virtual ground of the sense amplifier) below its last
row. Every wire segment between neighbouring cells — and between the driver / the sense amplifier
and the first cell — has resistance ``r_wire`` (Ω). Cell (i, j) of conductance G_ij (µS) carries
I_ij = G_ij·(V^row_ij − V^col_ij); the cell voltage is V^row − V^col.

Given the cell currents, each wire is a resistor ladder with closed-form node voltages (cumulative
sums of currents), so the network is solved as a fixed point over the cell currents (the approach
of Sandia CrossSim's parasitic solver, written here from the circuit equations):

    I ← I + ω·(G·(V^row(I) − V^col(I)) − I)

* :func:`voltages_first_order` — one step from the ideal currents G·v_in (first-order form);
  :func:`first_order_transfer` — its column currents as a linear map of the drives;
* :func:`voltages` — the iteration under ``lax.while_loop`` with a cap and a converged flag, or a
  fixed number of steps under ``lax.fori_loop`` (``num_iter``), which reverse-mode ``jax.grad``
  can differentiate.

Units: conductance µS, voltage V, resistance Ω, current µA. This module imports only jax.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

__all__ = ["IRDropResult", "wire_voltages", "voltages_first_order", "first_order_transfer",
           "voltages"]


class IRDropResult(NamedTuple):
    """Solver output.

    Attributes:
        v_cell: voltage across each cell, V, [R, C].
        converged: whether the relative change of the currents fell below ``tol``.
        num_iter: iterations used.
    """
    v_cell: jax.Array
    converged: jax.Array
    num_iter: jax.Array


def _ladders(rows: int, cols: int, dtype):
    """Resistor-ladder matrices: A[k, j] = min(k, j) + 1 (word-line segments between the driver and
    node j that carry cell k's current), B[i, k] = R − max(i, k) (bit-line segments between node i
    and the sense amplifier that carry cell k's current)."""
    kc = jnp.arange(cols)
    a = (jnp.minimum(kc[:, None], kc[None, :]) + 1).astype(dtype)
    kr = jnp.arange(rows)
    b = (rows - jnp.maximum(kr[:, None], kr[None, :])).astype(dtype)
    return a, b


_HI = jax.lax.Precision.HIGHEST


def wire_voltages(i_cell: jax.Array, v_in: jax.Array, r_wire):
    """Word-line and bit-line node voltages (V) for given cell currents (µA).

    The ladders are summed as matrix products with :func:`_ladders` (on CPU, XLA's cumulative sums
    are quadratic reduce-windows; the products are as cheap and run at matmul speed).

    Args:
        i_cell: cell currents, µA, [R, C].
        v_in: word-line drive voltages, V, [R].
        r_wire: resistance per wire segment, Ω.

    Returns:
        (v_row, v_col), V, each [R, C].
    """
    r = r_wire * 1e-6  # Ω·µA = µV → V
    a, b = _ladders(i_cell.shape[0], i_cell.shape[1], i_cell.dtype)
    # Word line: node j drops by the currents of segments 0..j, segment s carrying cells s..C-1.
    v_row = v_in[:, None] - r * jnp.matmul(i_cell, a, precision=_HI)
    # Bit line: node i sits above segments i..R-1, segment s carrying cells 0..s.
    v_col = r * jnp.matmul(b, i_cell, precision=_HI)
    return v_row, v_col


def voltages_first_order(g: jax.Array, v_in: jax.Array, r_wire) -> jax.Array:
    """First-order cell voltages: wire drops computed from the ideal currents G·v_in.

    Args:
        g: conductances, µS, [R, C].
        v_in: word-line drive voltages, V, [R] or a batch [B, R].
        r_wire: Ω per segment.

    Returns:
        Cell voltages, V, [R, C] (or [B, R, C]).
    """
    g = jnp.asarray(g)
    v_in = jnp.asarray(v_in, g.dtype)
    r = r_wire * 1e-6
    a, b = _ladders(g.shape[0], g.shape[1], g.dtype)
    # Row drops scale with the row's own drive: (diag(v)·G)·A = diag(v)·(G·A).
    row = v_in[..., :, None] * (1.0 - r * jnp.matmul(g, a, precision=_HI))
    col = r * jnp.matmul(b * v_in[..., None, :], g, precision=_HI)
    return row - col


def first_order_transfer(g: jax.Array, r_wire) -> jax.Array:
    """Column currents per volt of row drive under first-order IR drop, [R, C] (µA/V = µS).

    The first-order network is linear in the drives: the column currents are ``v_in @ M`` with
    M = G ⊙ (1 − r·G·A − r·B·G) (:func:`_ladders`), so a batch of inputs costs one matmul.
    """
    g = jnp.asarray(g)
    r = r_wire * 1e-6
    a, b = _ladders(g.shape[0], g.shape[1], g.dtype)
    return g * (1.0 - r * jnp.matmul(g, a, precision=_HI) - r * jnp.matmul(b, g, precision=_HI))


def voltages(g: jax.Array, v_in: jax.Array, r_wire, *, omega: float = 1.0, tol: float = 1e-6,
             max_iter: int = 1000, num_iter: Optional[int] = None) -> IRDropResult:
    """Cell voltages with IR drop by fixed-point iteration over the cell currents.

    Args:
        g: conductances, µS, [R, C].
        v_in: word-line drive voltages, V, [R].
        r_wire: resistance per wire segment, Ω.
        omega: relaxation factor (< 1 under-relaxes; lower it when r·G·max(R, C)² is not small).
        tol: convergence when max|ΔI| <= tol·max|I|.
        max_iter: iteration cap of the ``while_loop``.
        num_iter: if given, run exactly this many iterations under ``fori_loop`` instead
            (reverse-mode differentiable); ``converged`` then reports the last step's change.

    Returns:
        :class:`IRDropResult`.
    """
    g = jnp.asarray(g)
    v_in = jnp.asarray(v_in, g.dtype)
    if g.ndim != 2 or v_in.shape != g.shape[:1]:
        raise ValueError(f"irdrop.voltages: expected g [R, C] and v_in [R], got {g.shape} and "
                         f"{v_in.shape}")

    def step(i_cell):
        v_row, v_col = wire_voltages(i_cell, v_in, r_wire)
        i_new = g * (v_row - v_col)
        i_next = i_cell + omega * (i_new - i_cell)
        delta = jnp.max(jnp.abs(i_next - i_cell))
        return i_next, delta <= tol * jnp.maximum(jnp.max(jnp.abs(i_next)), 1e-30)

    i0 = g * v_in[:, None]
    if num_iter is not None:
        def body(_, carry):
            return step(carry[0])
        i_fin, conv = jax.lax.fori_loop(0, num_iter, body, (i0, jnp.array(False)))
        n = jnp.asarray(num_iter)
    else:
        def cond(c):
            return (~c[1]) & (c[2] < max_iter)

        def body(c):
            i_next, conv = step(c[0])
            return i_next, conv, c[2] + 1
        i_fin, conv, n = jax.lax.while_loop(cond, body, (i0, jnp.array(False), jnp.array(0)))
    v_row, v_col = wire_voltages(i_fin, v_in, r_wire)
    return IRDropResult(v_row - v_col, conv, n)
