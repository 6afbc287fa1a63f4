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

The presets (:func:`pcm_disturb`, :func:`reram_disturb`) check their concrete numbers: finite,
n_ref, v0, g_ref, beta, eps_f > 0 and v_ref, sigma_ln, g_inf >= 0 (NaN never passes).
:class:`DisturbParams` built directly or changed with ``replace`` is checked the same way by
:func:`check_params`, which :func:`accumulate`, :func:`accumulate_batch` (called eagerly) and
:func:`nvjax.lifetime.lifetime` run.

Units: conductance µS, voltage V. This module imports ``_checks``, jax and flax.struct.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ._checks import check_real

__all__ = ["DisturbParams", "pcm_disturb", "reram_disturb", "draw_spread", "reads_to_failure",
           "accumulate", "accumulate_batch", "disturbed_conductance", "check_params"]


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


#: Lower bound of every D7 number (``True``: strictly above it); all must be finite.
_BOUNDS = {"n_ref": (0.0, True), "v_ref": (0.0, False), "v0": (0.0, True), "kappa": (None, False),
           "g_ref": (0.0, True), "beta": (0.0, True), "eps_f": (0.0, True),
           "sigma_ln": (0.0, False), "g_inf": (0.0, False)}


def check_params(params: DisturbParams, where: str = "disturb") -> DisturbParams:
    """Check the concrete numbers of ``params`` (the bounds of the module docstring).

    Traced fields pass unchecked (inside ``jit``/``vmap``/``grad`` nobody can inspect them).

    Args:
        params: :class:`DisturbParams` (scalars or stacked arrays).
        where: the caller's name, for the message (``"{where}: disturb.v_ref must be ..."``).

    Returns:
        ``params``, unchanged.

    Raises:
        TypeError: ``params`` is not a :class:`DisturbParams`, or a field is not a real number.
        ValueError: (:class:`nvjax._checks.UserError`) a field is NaN, infinite or out of range;
            the message names the field.

    Example:
        >>> check_params(pcm_disturb()).v_ref
        0.2
    """
    if not isinstance(params, DisturbParams):
        raise TypeError(f"{where}: disturb parameters must be a DisturbParams, got "
                        f"{type(params).__name__}")
    for field, (lo, strict) in _BOUNDS.items():
        check_real(f"{where}: disturb.{field}", getattr(params, field), minimum=lo,
                   strict_min=strict)
    return params


def _checked(name: str, overrides) -> DisturbParams:
    """:class:`DisturbParams` from ``overrides`` after the checks of the module docstring (traced
    values pass); TypeError for an unknown field, UserError (a ValueError) naming the field."""
    bad = sorted(set(overrides) - set(_BOUNDS))
    if bad:
        raise TypeError(f"{name}(): unknown parameter(s) {bad}; valid: {sorted(_BOUNDS)}")
    params = DisturbParams(**overrides)
    for field, (lo, strict) in _BOUNDS.items():
        check_real(f"{name}({field})", getattr(params, field), minimum=lo, strict_min=strict)
    return params


def pcm_disturb(**overrides) -> DisturbParams:
    """Placeholder D7 constants for D1 PCM (g_max = 25 µS, G_∞ = g_max); overrides checked."""
    return _checked("pcm_disturb", {"g_ref": 25.0, "g_inf": 25.0, **overrides})


def reram_disturb(**overrides) -> DisturbParams:
    """Placeholder D7 constants for D2 ReRAM (g_max = 40 µS, G_∞ = g_max); overrides checked."""
    return _checked("reram_disturb", {"g_ref": 40.0, "g_inf": 40.0, **overrides})


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

    Raises:
        ValueError: (called eagerly) a number of ``params`` is out of range (:func:`check_params`).
    """
    check_params(params, "accumulate")
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

    Raises:
        ValueError: (called eagerly) a number of ``params`` is out of range (:func:`check_params`).
    """
    check_params(params, "accumulate_batch")
    rate = jnp.sum(jnp.asarray(num_reads, jnp.float32)
                   * jnp.exp((jnp.abs(jnp.asarray(v)) - params.v_ref) / params.v0), axis=0)
    return damage + rate / reads_to_failure(params, params.v_ref, g0, spread)


def disturbed_conductance(params: DisturbParams, g0, damage) -> jax.Array:
    """G = G0 + (G_∞ − G0)·min(1, ε_f·s^β); finite gradients at s = 0."""
    pos = damage > 0
    s_beta = jnp.where(pos, jnp.where(pos, damage, 1.0) ** params.beta, 0.0)
    return g0 + (params.g_inf - g0) * jnp.minimum(1.0, params.eps_f * s_beta)
