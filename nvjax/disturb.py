"""D7 read disturb (*our model*, DESIGN.md §3 — the source paper's exact law was not available).

A read at cell voltage V stresses a cell of conductance G. Reads to failure:

    N_D(V, G) = N_ref · exp(−(V − V_ref)/V_0) · (G/G_ref)^κ · exp(σ_ln·z),   z ~ N(0, 1) per cell,

(the last factor is the device-to-device spread, ln N_D ~ N(ln N̄_D, σ_ln²), drawn once per cell).
Reads accumulate as a damage fraction ``s = Σ_k n_k / N_D(V_k, G0)`` (so batches of reads at
different voltages add up, and the state carries ``s``, not only G); after damage ``s`` a cell
programmed at G0 reads

    G = G0 + (G_∞ − G0) · min(1, ε_f · s^β),

moving toward G_∞ (by default g_max, the state read stress pushes to; cells at g_min move too).
All functions are pure, vmappable and differentiable in V and G (s^β is guarded at s = 0).

Defaults are placeholders to calibrate: V_ref = 0.2 V, N_ref = 1e8, V_0 = 0.05 V, κ = 0,
β = 0.5, ε_f = 0.1, σ_ln = 0.5. Calibration anchor: Yao et al., Nature 577, 641 (2020), Ext.
Data Fig. 7 — memristor weights still usable after 10⁶ read pulses at 0.2 V.

Units: conductance µS, voltage V. This module imports only jax and flax.struct.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["DisturbParams", "pcm_disturb", "reram_disturb", "draw_spread", "reads_to_failure",
           "accumulate", "accumulate_batch", "disturbed_conductance"]


@struct.dataclass
class DisturbParams:
    """D7 parameters (pytree leaves: sweepable and differentiable)."""
    n_ref: Any = 1e8       # reads to failure at V_ref (and G_ref)
    v_ref: Any = 0.2       # V
    v0: Any = 0.05         # V, voltage acceleration scale
    kappa: Any = 0.0       # conductance exponent
    g_ref: Any = 25.0      # µS
    beta: Any = 0.5
    eps_f: Any = 0.1       # fractional move at s = 1
    sigma_ln: Any = 0.5    # device-to-device spread of ln N_D
    g_inf: Any = 25.0      # µS, state read stress pushes cells toward


def pcm_disturb(**overrides) -> DisturbParams:
    """Placeholder D7 constants for D1 PCM (g_max = 25 µS, G_∞ = g_max)."""
    return DisturbParams(**{"g_ref": 25.0, "g_inf": 25.0, **overrides})


def reram_disturb(**overrides) -> DisturbParams:
    """Placeholder D7 constants for D2 ReRAM (g_max = 40 µS, G_∞ = g_max)."""
    return DisturbParams(**{"g_ref": 40.0, "g_inf": 40.0, **overrides})


def draw_spread(key, shape, dtype=jnp.float32) -> jax.Array:
    """Per-cell standard normals z of the ln N_D spread (drawn once, at programming)."""
    return jax.random.normal(key, shape, dtype)


def reads_to_failure(params: DisturbParams, v, g, spread) -> jax.Array:
    """N_D(V, G) for cell voltages ``v`` (V), conductances ``g`` (µS) and spreads ``spread`` (z)."""
    g_rel = jnp.maximum(jnp.asarray(g) / params.g_ref, 1e-6)
    log_n = (jnp.log(params.n_ref) - (jnp.asarray(v) - params.v_ref) / params.v0
             + params.kappa * jnp.log(g_rel) + params.sigma_ln * spread)
    return jnp.exp(log_n)


def accumulate(params: DisturbParams, damage, num_reads, v, g0, spread) -> jax.Array:
    """Damage after ``num_reads`` more reads at voltage ``v``: s + n/N_D(|v|, G0).

    Args:
        damage: accumulated damage fraction s (≥ 0), any shape.
        num_reads: reads in this batch (per cell or broadcastable, e.g. per row).
        v: cell voltage of these reads, V (its magnitude stresses the cell).
        g0: programmed conductance, µS.
        spread: per-cell z of :func:`draw_spread`.
    """
    return damage + jnp.asarray(num_reads, jnp.float32) / reads_to_failure(params, jnp.abs(v), g0, spread)


def accumulate_batch(params: DisturbParams, damage, num_reads, v, g0, spread) -> jax.Array:
    """Damage after reads at several voltages: s + Σ_b n_b/N_D(|v_b|, G0), summed over axis 0.

    Equal to applying :func:`accumulate` for every b in turn, computed in the factorized form
    1/N_D(V, G) = exp((|V| − V_ref)/V_0)/N_D(V_ref, G) (one exponential per read and one
    N_D(V_ref, G0) per cell).

    Args:
        damage: accumulated damage s, shape S (e.g. [n_in, n_out]).
        num_reads: reads at each voltage, [B, ...] broadcastable to [B, *S] (e.g. [B, n_in, 1]).
        v: cell voltages, V, [B, ...] broadcastable to [B, *S].
        g0, spread: programmed conductance (µS) and spread z, shape S.
    """
    rate = jnp.sum(jnp.asarray(num_reads, jnp.float32)
                   * jnp.exp((jnp.abs(jnp.asarray(v)) - params.v_ref) / params.v0), axis=0)
    return damage + rate / reads_to_failure(params, params.v_ref, g0, spread)


def disturbed_conductance(params: DisturbParams, g0, damage) -> jax.Array:
    """G = G0 + (G_∞ − G0)·min(1, ε_f·s^β); finite gradients at s = 0."""
    pos = damage > 0
    s_beta = jnp.where(pos, jnp.where(pos, damage, 1.0) ** params.beta, 0.0)
    return g0 + (params.g_inf - g0) * jnp.minimum(1.0, params.eps_f * s_beta)
