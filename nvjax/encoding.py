"""Encodings between weights and conductances (DESIGN.md §4).

* differential pairs ``W = (G⁺ − G⁻)/κ`` (per layer or per column scale κ);
* MSP/LSP pairs of significance F: ``W = (F·(G⁺ − G⁻) + (g⁺ − g⁻))/κ``;
* bit slicing of M-bit magnitudes into K-bit cells (sign by a pair of slice stacks, or two's
  complement), decoded by shift-and-add;
* level quantization and favorable-state codebooks.

Every encoding round-trips exactly when no noise is applied. Conductances are in µS. This module
imports only jax and numpy.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "pair_scale", "to_pair", "from_pair",
    "msp_lsp_scale", "to_msp_lsp", "from_msp_lsp",
    "quantize_weights", "to_slices", "from_slices", "Sliced",
    "level_values", "quantize_levels", "favorable_codebook", "project_to_codebook",
]

Array = jax.Array


def _absmax(w, per: str):
    w = jnp.asarray(w)
    if per == "layer":
        return jnp.max(jnp.abs(w))
    if per == "column":
        if w.ndim != 2:
            raise ValueError(f"per='column' needs a 2-D weight [in, out], got shape {w.shape}")
        return jnp.max(jnp.abs(w), axis=0)
    raise ValueError(f"per must be 'layer' or 'column', got {per!r}")


def pair_scale(w: Array, g_min, g_max, *, per: str = "layer") -> Array:
    """κ = (g_max − g_min)/max|W| (µS per weight unit), per layer (scalar) or per column ([out]).

    A column (or layer) of zeros gets κ = (g_max − g_min) (any finite value round-trips zeros).
    """
    m = _absmax(w, per)
    m = jnp.where(m > 0, m, 1.0)
    return (g_max - g_min) / m


def to_pair(w: Array, kappa, g_min, g_max):
    """Differential pair G± = clip(±κW, 0, g_max − g_min) + g_min.

    Args:
        w: weights [in, out] (or any shape broadcastable with ``kappa``).
        kappa: µS per weight unit, scalar or [out].

    Returns:
        (G⁺, G⁻), µS, each the shape of ``w``.
    """
    gw = jnp.asarray(w) * kappa
    span = g_max - g_min
    return jnp.clip(gw, 0.0, span) + g_min, jnp.clip(-gw, 0.0, span) + g_min


def from_pair(g_pos: Array, g_neg: Array, kappa) -> Array:
    """W = (G⁺ − G⁻)/κ."""
    return (g_pos - g_neg) / kappa


def msp_lsp_scale(w: Array, g_min, g_max, *, factor: float = 2.0, per: str = "layer") -> Array:
    """κ for MSP/LSP pairs: max|W| maps to the full range (F + 1)·(g_max − g_min)."""
    m = _absmax(w, per)
    m = jnp.where(m > 0, m, 1.0)
    return (factor + 1.0) * (g_max - g_min) / m


def to_msp_lsp(w: Array, kappa, g_min, g_max, *, factor: float = 2.0):
    """Two pairs of significance F and 1: F·(G⁺ − G⁻) + (g⁺ − g⁻) = κW.

    Both pairs are given the same differential target κW/(F + 1) (the usual starting point; the
    LSP pair is what later fine-tuning corrects, see ``programming``).

    Returns:
        (G⁺, G⁻, g⁺, g⁻), µS.
    """
    share = jnp.asarray(w) / (factor + 1.0)
    gp, gm = to_pair(share, kappa, g_min, g_max)
    return gp, gm, gp, gm


def from_msp_lsp(Gp, Gm, gp, gm, kappa, *, factor: float = 2.0) -> Array:
    """W = (F·(G⁺ − G⁻) + (g⁺ − g⁻))/κ."""
    return (factor * (Gp - Gm) + (gp - gm)) / kappa


# --------------------------------------------------------------------------------------------
# Bit slicing
# --------------------------------------------------------------------------------------------
def quantize_weights(w: Array, *, bits: int = 8, w_max=None, signed: str = "pair") -> Array:
    """Integer codes of M-bit weights.

    ``signed='pair'``: sign-magnitude, q = sign(w)·round(|w|/w_max·(2^M − 1)) in [−(2^M − 1),
    2^M − 1]. ``signed='twos'``: two's complement, q = round(w/w_max·(2^(M−1) − 1)) in
    [−2^(M−1), 2^(M−1) − 1].

    Returns int32 codes of the shape of ``w``.
    """
    w = jnp.asarray(w)
    if w_max is None:
        w_max = jnp.max(jnp.abs(w))
    w_max = jnp.where(w_max > 0, w_max, 1.0)
    if signed == "pair":
        n = 2 ** bits - 1
    elif signed == "twos":
        n = 2 ** (bits - 1) - 1
    else:
        raise ValueError(f"signed must be 'pair' or 'twos', got {signed!r}")
    return jnp.clip(jnp.round(w / w_max * n), -n, n).astype(jnp.int32)


class Sliced(NamedTuple):
    """Bit-sliced weights: conductances per slice (LSB first) and what decodes them.

    Attributes:
        g_pos: [S, ...] conductances µS of the positive stack (the only stack for 'twos').
        g_neg: [S, ...] conductances of the negative stack (zeros-level for 'twos', unused).
        w_step: weight value of one LSB of the integer code.
    """
    g_pos: Array
    g_neg: Array
    w_step: Array


def _check_slicing(bits, slice_bits):
    if not (isinstance(bits, int) and isinstance(slice_bits, int)) or bits < 1 or slice_bits < 1:
        raise ValueError(f"bits and slice_bits must be positive ints, got {bits!r}, {slice_bits!r}")
    if bits % slice_bits:
        raise ValueError(f"bits ({bits}) must be a multiple of slice_bits ({slice_bits})")
    return bits // slice_bits


def to_slices(w: Array, *, bits: int = 8, slice_bits: int = 2, w_max=None, g_min=0.0,
              g_max=1.0, signed: str = "pair") -> Sliced:
    """Slice M-bit weights onto K-bit cells (levels ``g_min + s·(g_max − g_min)/(2^K − 1)``).

    'pair': |q| is split into M/K K-bit slices, positive weights on the positive stack, negative
    weights on the negative stack. 'twos': the M-bit two's complement code (q mod 2^M) is sliced
    on one stack; the top bit weighs −2^(M−1) at decoding.
    """
    n_slices = _check_slicing(bits, slice_bits)
    w = jnp.asarray(w)
    if w_max is None:
        w_max = jnp.max(jnp.abs(w))
    w_max = jnp.where(w_max > 0, w_max, 1.0)
    q = quantize_weights(w, bits=bits, w_max=w_max, signed=signed)
    mask = 2 ** slice_bits - 1
    shifts = jnp.arange(n_slices, dtype=jnp.int32) * slice_bits
    shifts = shifts.reshape((n_slices,) + (1,) * w.ndim)
    lvl = (g_max - g_min) / mask
    if signed == "pair":
        mag = jnp.abs(q)
        s = (mag[None] >> shifts) & mask
        pos = jnp.where(q[None] > 0, s, 0)
        neg = jnp.where(q[None] < 0, s, 0)
        w_step = w_max / (2 ** bits - 1)
    else:
        u = jnp.where(q < 0, q + 2 ** bits, q)
        pos = (u[None] >> shifts) & mask
        neg = jnp.zeros_like(pos)
        w_step = w_max / (2 ** (bits - 1) - 1)
    return Sliced(g_min + pos * lvl, g_min + neg * lvl, jnp.asarray(w_step))


def from_slices(sliced: Sliced, *, bits: int = 8, slice_bits: int = 2, g_min=0.0, g_max=1.0,
                signed: str = "pair") -> Array:
    """Shift-and-add decoding of :func:`to_slices` (slice values read as analog levels).

    For 'pair' this is linear in the conductances: Σ_i 2^(iK)·(G⁺_i − G⁻_i)/Δ_level·w_step. For
    'twos' the level of each slice is rounded to an integer first (a digital decode).
    """
    n_slices = _check_slicing(bits, slice_bits)
    mask = 2 ** slice_bits - 1
    lvl = (g_max - g_min) / mask
    weights = (2.0 ** (slice_bits * np.arange(n_slices))).reshape((n_slices,) + (1,) * (sliced.g_pos.ndim - 1))
    if signed == "pair":
        val = jnp.sum(weights * (sliced.g_pos - sliced.g_neg), axis=0) / lvl
        return val * sliced.w_step
    if signed == "twos":
        s = jnp.round((sliced.g_pos - g_min) / lvl).astype(jnp.int32)
        u = jnp.sum(s << (slice_bits * jnp.arange(n_slices, dtype=jnp.int32)).reshape(weights.shape), axis=0)
        q = jnp.where(u >= 2 ** (bits - 1), u - 2 ** bits, u)
        return q.astype(sliced.w_step.dtype) * sliced.w_step
    raise ValueError(f"signed must be 'pair' or 'twos', got {signed!r}")


# --------------------------------------------------------------------------------------------
# Levels and codebooks
# --------------------------------------------------------------------------------------------
def level_values(g_min, g_max, num_levels: int) -> Array:
    """The ``num_levels`` evenly spaced conductance levels in [g_min, g_max], µS."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    return jnp.linspace(g_min, g_max, num_levels)


def quantize_levels(g: Array, g_min, g_max, num_levels: int) -> Array:
    """Round conductances to the nearest of ``num_levels`` evenly spaced levels (clipped)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    step = (g_max - g_min) / (num_levels - 1)
    idx = jnp.clip(jnp.round((jnp.asarray(g) - g_min) / step), 0, num_levels - 1)
    return g_min + idx * step


def favorable_codebook(*, bits: int = 8, slice_bits: int = 2, allowed: Sequence[int] = (0, 3)) -> np.ndarray:
    """Integer magnitudes (0 .. 2^M − 1) whose every K-bit slice lies in ``allowed`` levels.

    Example: M = 8, K = 2, allowed = {0, 3} gives 2^4 = 16 of the 256 magnitudes.
    """
    n_slices = _check_slicing(bits, slice_bits)
    allowed = sorted(set(int(a) for a in allowed))
    if not allowed or min(allowed) < 0 or max(allowed) >= 2 ** slice_bits:
        raise ValueError(f"allowed levels must be in 0..{2 ** slice_bits - 1}, got {allowed}")
    mags = np.arange(2 ** bits)
    ok = np.ones_like(mags, dtype=bool)
    for i in range(n_slices):
        ok &= np.isin((mags >> (i * slice_bits)) & (2 ** slice_bits - 1), allowed)
    return mags[ok]


def project_to_codebook(q: Array, codebook) -> Array:
    """Signed integer codes → nearest signed codebook magnitude (sign kept; ties to the lower)."""
    cb = jnp.asarray(np.sort(np.asarray(codebook)))
    mag = jnp.abs(q)
    idx = jnp.clip(jnp.searchsorted(cb, mag), 1, cb.shape[0] - 1)
    lo, hi = cb[idx - 1], cb[idx]
    best = jnp.where(mag - lo <= hi - mag, lo, hi)
    best = jnp.where(mag <= cb[0], cb[0], best)
    return jnp.where(q < 0, -best, best)  # q = 0 maps to the smallest magnitude, as a code
