"""Device models: the conductance physics of one population of NVM cells.

Every device is a frozen pytree dataclass whose numeric fields are array leaves (they can be swept
with ``jax.vmap`` and differentiated) and a few pure functions that take a PRNG ``key`` first:

* :func:`program` — one-shot programming of target conductances -> :class:`CellState`;
* :func:`read` — the conductances read ``t`` seconds after programming (drift, relaxation and read
  noise applied; the state itself is not changed);
* :func:`drift`, :func:`programming_sigma` and a few physics helpers used by other modules.

Models (DESIGN.md §3): D1 :func:`pcm`, D2 :func:`reram`, D3 :func:`levels`, D5 :func:`flash`,
D6 stuck-at faults (:class:`StuckAt`, the ``faults`` field of every device) and :func:`ideal`.
D4, the PCM pulse response used by row-parallel pulse programming, is :func:`pulse_pcm`
(:class:`PulsePCM`) with :func:`draw_devices`, :func:`set_pulse` and :func:`reset`; D7 (read
disturb) is in ``disturb``.

Units: conductance µS, time s, voltage V. This module imports ``_checks``, ``_ops``, jax, numpy and flax.struct.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ._checks import UserError, check_real, check_time, is_concrete
from ._ops import round_ste

__all__ = [
    "StuckAt", "PCM", "ReRAM", "Levels", "Flash", "Ideal", "Device", "CellState",
    "pcm", "reram", "levels", "flash", "ideal", "program", "read", "drift",
    "programming_sigma", "g_range", "check_conductances", "check_device", "apply_faults",
    "DEVICE_TYPES",
    # D4 pulse response
    "PulsePCM", "DeviceVariation", "pulse_pcm", "check_pulse_device", "draw_devices",
    "variation_from_normals", "reset_from_normals", "set_pulse", "reset",
]

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Parameter pytrees
# --------------------------------------------------------------------------------------------
@struct.dataclass
class StuckAt:
    """D6 stuck-at faults: drawn once per chip instance at programming; programming cannot move them.

    Attributes:
        p_min: probability that a cell is stuck at ``g_min`` (stuck-OFF).
        p_max: probability that a cell is stuck at ``g_max`` (stuck-ON).
    """
    p_min: Any = 0.0
    p_max: Any = 0.0


@struct.dataclass
class PCM:
    """D1 — IBM statistical PCM model (programming noise, drift, 1/f read noise).

    Three conventions on which published implementations differ are static fields (structure,
    not physics numbers: a new value means a new compilation). :func:`pcm` sets all three at
    once with ``convention='physical'`` (the default) or ``convention='aihwkit'`` (aihwkit 1.2's
    ``PCMLikeNoiseModel`` + ``GlobalDriftCompensation``, cross-validated against a fixture of
    aihwkit's own statistics); each can also be overridden alone.

    * ``drift_reference`` — the reference readout of global drift compensation
      (α = Σ|y_ref(0)|/Σ|y_ref(t)|, one digital scale per layer, :mod:`nvjax.crossbar`):
      ``'ones'`` drives every row at once (α from the column sums Σ_j|Σ_i W_ij|, one MVM; signs
      cancel within a column, so α is noisier); ``'onehot'`` drives one row at a time (the
      identity matrix as inputs), so Σ_ij|W_ij| — aihwkit 1.2's
      ``GlobalDriftCompensation.get_readout_tensor`` (``eye(in_size)``).
    * ``noise_time`` — the time t' in the 1/f read-noise factor sqrt(ln((t' + t_r)/(2 t_r))):
      ``'t'`` (t since the end of programming; the factor is 3.81 at 1 s, 4.76 at 1 h. The
      1/f band is empty for t ≤ t_r, so a read at t < t_r = 250 ns carries no read noise,
      exactly: the model describes reads made after programming has ended, t ≫ t_r) or
      ``'t+t0'`` (the clock of the drift law, whose power law runs in t + t0; 4.18 at t = 0,
      never 0: aihwkit 1.2's ``PCMLikeNoiseModel.apply_drift_noise_to_conductance``).
    * ``pair_remap`` — False: both devices of a differential pair drift and carry read noise
      (a physical two-device cell, the device at g_min included). True: the programmed pair is
      first re-mapped onto one pair with the net weight on one device and the other at g_min
      (the layer's largest programmed |G⁺ − G⁻| at g_max), then drift and read noise act on
      that pair — aihwkit 1.2's ``BaseNoiseModel.apply_drift_noise`` (its conductance
      converter applied to the programmed, noisy weights). Done by
      :func:`nvjax.crossbar.read_weights`/``mvm`` (it needs the pair and the layer scale);
      :func:`read` on one array ignores it.

    References:
        Nandakumar et al., "Phase-change memory models for deep learning training and inference",
        ICECS 2019; Joshi et al., Nat. Commun. 11, 2473 (2020). The equations are those of the
        published statistical model (also used by aihwkit's ``PCMLikeNoiseModel``); the
        conventions above follow aihwkit 1.2's code (DESIGN.md §3 D1).
    """
    g_max: Any = 25.0                      # µS, conductance that maps to ĝ = 1
    prog_coeff: Any = (-1.1731, 1.9650, 0.26348)  # σ_p(ĝ) = (c2 ĝ² + c1 ĝ + c0)·g_max/25 µS
    nu_mu: Any = (-0.0155, 0.0244, 0.049, 0.1)    # μ_ν = clip(a ln ĝ + b, lo, hi)
    nu_sigma: Any = (-0.0125, -0.0059, 0.008, 0.045)  # σ_ν = clip(a ln ĝ + b, lo, hi)
    t0: Any = 20.0                         # s, drift reference time
    read_q: Any = 0.0088                   # 1/f read-noise amplitude
    read_q_exp: Any = 0.65
    read_q_max: Any = 0.2
    t_read: Any = 250e-9                   # s, read pulse duration
    g_min: Any = 0.0
    faults: Optional[StuckAt] = None
    drift_reference: str = struct.field(pytree_node=False, default="ones")  # 'ones' | 'onehot'
    noise_time: str = struct.field(pytree_node=False, default="t")         # 't' | 't+t0'
    pair_remap: bool = struct.field(pytree_node=False, default=False)

    name = "pcm"

    @property
    def convention(self) -> str:
        """'physical' or 'aihwkit' when the three convention fields match one of
        :data:`PCM_CONVENTIONS`, else 'custom'."""
        opts = {k: getattr(self, k) for k in _PCM_CONVENTION_FIELDS}
        for name, conv in PCM_CONVENTIONS.items():
            if conv == opts:
                return name
        return "custom"


@struct.dataclass
class ReRAM:
    """D2 — ReRAM programming error fitted on Wan et al., Nature 608, 504 (2022).

    σ(ĝ) = Σ_i c_i ĝ^i µS (ĝ = g_T/g_max) one second after programming (``coeff_1s``) and one day
    after (``coeff_1d``). *Our model* of the time dependence (relaxation): each cell draws one
    normal ξ_r at programming and, read at time t, has moved by
    ``sqrt(σ_1d² − σ_1s²) · sqrt(clip(ln(t/1 s)/ln(86400), 0, ∞)) · ξ_r``, so that the total error
    variance grows linearly in ln t from σ_1s² at 1 s to σ_1d² at 1 day. Both σ are evaluated at
    the target ĝ (the fit is per target state), so the error at 1 day is Gaussian with σ_1d(ĝ)
    exactly (before the clamp at 0).
    """
    g_max: Any = 40.0
    coeff_1s: Any = (0.348, 16.030, -43.853, 45.393, -16.815)
    coeff_1d: Any = (0.701, 22.086, -50.773, 47.095, -16.458)
    g_min: Any = 0.0
    faults: Optional[StuckAt] = None

    name = "reram"


@struct.dataclass
class Levels:
    """D3 — per-level Gaussian multi-level cell.

    A cell at level ℓ of L = len(sigma) evenly spaced levels in [g_min, g_max] lands at
    ``G_ℓ + σ_ℓ·(g_max − g_min)·ξ`` (no clamping, as in the closed-form analyses of Yan et al.).
    """
    sigma: Any = (0.1, 0.1, 0.1, 0.1)      # σ_ℓ, relative to (g_max − g_min), one per level
    g_min: Any = 0.0
    g_max: Any = 1.0
    faults: Optional[StuckAt] = None

    name = "levels"

    @property
    def num_levels(self) -> int:
        return int(np.shape(self.sigma)[-1])


@struct.dataclass
class Flash:
    """D5 — NOR-flash cell in sub-threshold: I = I0·exp((V_GS − V_th)/(n·V_T)).

    A threshold-voltage spread σ_Vth makes the conductance log-normal around its target with
    σ_ln = σ_Vth/(n·V_T). Default σ_Vth and n are placeholders to calibrate.

    ``center`` (static) says which statistic of the programmed conductance sits at the target:
    'mean' (default; g = g_T·exp(σ_ln ξ − σ_ln²/2), so E[g] = g_T — the programming target's
    V_th is offset by σ_ln²/2·n·V_T, as a calibrated write scheme would do, and the weights are
    unbiased) or 'median' (g = g_T·exp(σ_ln ξ): the V_th target itself, E[g] = g_T·e^{σ_ln²/2},
    3.4 % high at the default σ_ln = 0.258).
    """
    g_max: Any = 10.0
    sigma_vth: Any = 0.01                  # V
    n_slope: Any = 1.5                     # sub-threshold slope factor
    v_thermal: Any = 0.02585               # V, kT/q at 300 K
    i0: Any = 1.0                          # µA at V_GS = V_th
    g_min: Any = 0.0
    faults: Optional[StuckAt] = None
    center: str = struct.field(pytree_node=False, default="mean")   # 'mean' | 'median'

    name = "flash"


@struct.dataclass
class Ideal:
    """A perfect cell: programs exactly, never drifts, no read noise."""
    g_max: Any = 25.0
    g_min: Any = 0.0
    faults: Optional[StuckAt] = None

    name = "ideal"


#: The PCM conventions :func:`pcm` accepts (see :class:`PCM`): the values of its three
#: convention fields. 'physical' (the default) is a two-device cell read as DESIGN.md §3 D1
#: writes the equations; 'aihwkit' reproduces aihwkit 1.2.
PCM_CONVENTIONS = {
    "physical": {"drift_reference": "ones", "noise_time": "t", "pair_remap": False},
    "aihwkit": {"drift_reference": "onehot", "noise_time": "t+t0", "pair_remap": True},
}
_PCM_CONVENTION_FIELDS = ("drift_reference", "noise_time", "pair_remap")
_PCM_OPTION_VALUES = {"drift_reference": ("ones", "onehot"), "noise_time": ("t", "t+t0"),
                      "pair_remap": (False, True)}


def _pcm_convention(convention, overrides):
    """``overrides`` completed with the convention fields of ``convention`` (explicit overrides
    of single fields win); ValueError/TypeError naming the argument for a bad value."""
    if not isinstance(convention, str) or convention not in PCM_CONVENTIONS:
        raise ValueError(f"pcm(convention): expected one of {sorted(PCM_CONVENTIONS)}, "
                         f"got {convention!r}")
    out = {**PCM_CONVENTIONS[convention], **overrides}
    for name, allowed in _PCM_OPTION_VALUES.items():
        v = out[name]
        if (isinstance(v, bool) != (name == "pair_remap")) or v not in allowed:
            raise ValueError(f"pcm({name}): expected one of {list(allowed)}, got {v!r}")
    return out


Device = Union[PCM, ReRAM, Levels, Flash, Ideal]
#: The device pytree classes of this module (what :func:`check_device` accepts).
DEVICE_TYPES = (PCM, ReRAM, Levels, Flash, Ideal)


class CellState(NamedTuple):
    """Per-cell state after programming (all arrays of the target's shape, or None if unused).

    Attributes:
        g: programmed conductance, µS (at t = 0, before drift and read noise).
        nu: PCM drift exponent per cell (None for devices that do not drift).
        relax: ReRAM per-cell relaxation displacement reached at 1 day, µS:
            ``sqrt(σ_1d² − σ_1s²)·ξ_r`` with σ evaluated at the *target* conductance (None for
            other devices).
        stuck: int8 fault code per cell, 0 healthy, 1 stuck at g_min, 2 stuck at g_max
            (None when the device has no ``faults``).
    """
    g: Array
    nu: Optional[Array] = None
    relax: Optional[Array] = None
    stuck: Optional[Array] = None


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------
def _faults(p_stuck_min, p_stuck_max):
    if p_stuck_min is None and p_stuck_max is None:
        return None
    return StuckAt(p_min=0.0 if p_stuck_min is None else p_stuck_min,
                   p_max=0.0 if p_stuck_max is None else p_stuck_max)


def _check_known(kind, overrides, cls):
    names = {f for f in cls.__dataclass_fields__ if f != "faults"}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"{kind}(): unknown parameter(s) {bad}; valid: {sorted(names)} "
                        "and p_stuck_min, p_stuck_max")


def pcm(*, convention: str = "physical", p_stuck_min=None, p_stuck_max=None,
        **overrides) -> PCM:
    """D1 PCM device (defaults of DESIGN.md §3). Keyword overrides replace any field.

    Args:
        convention: 'physical' (default) or 'aihwkit' — sets the three convention fields of
            :class:`PCM` (``drift_reference``, ``noise_time``, ``pair_remap``; see there and
            :data:`PCM_CONVENTIONS`). ``pcm(convention='aihwkit')`` deployed with
            :func:`nvjax.chip.deploy` and a default :class:`nvjax.crossbar.TileConfig`
            reproduces aihwkit 1.2's ``PCMLikeNoiseModel`` + ``GlobalDriftCompensation`` with
            an ideal periphery (held to a fixture of aihwkit's statistics by
            ``tests/test_aihwkit_fixture.py``). A field given explicitly overrides the
            convention's value.
        p_stuck_min, p_stuck_max: D6 stuck-at fault probabilities.
        **overrides: any other field of :class:`PCM`.

    Why 'physical' is the default: it models the cells a chip has — both devices of a pair
    (the one at g_min too) are programmed with noise, drift and are read with noise, and the
    1/f noise uses the time since programming as the equations of DESIGN.md §3 D1 and the
    papers write it — and it keeps every earlier nvjax result unchanged. aihwkit's re-mapping
    of the programmed weight onto one pair is a property of its simulator, not of a device; its
    t + t0 clock and one-hot reference are choices, offered here by name. The network errors of
    both conventions measured against aihwkit are in the README (section "Device models").

    Example:
        >>> dev = pcm(g_max=25.0)
        >>> st = program(jax.random.key(0), dev, jnp.full((4,), 10.0))
        >>> pcm(convention="aihwkit").drift_reference
        'onehot'
    """
    _check_known("pcm", overrides, PCM)
    overrides = _pcm_convention(convention, overrides)
    return _checked(PCM(faults=_faults(p_stuck_min, p_stuck_max), **overrides))


def reram(*, p_stuck_min=None, p_stuck_max=None, **overrides) -> ReRAM:
    """D2 ReRAM device (Wan et al. 2022 fit, g_max = 40 µS)."""
    _check_known("reram", overrides, ReRAM)
    return _checked(ReRAM(faults=_faults(p_stuck_min, p_stuck_max), **overrides))


def levels(*, bits: int = 2, sigma=0.1, nonuniform: float = 1.0, g_min=0.0, g_max=1.0,
           p_stuck_min=None, p_stuck_max=None) -> Levels:
    """D3 per-level Gaussian cell with ``2**bits`` levels.

    Args:
        bits: K, bits per cell (static).
        sigma: σ, either a scalar (uniform table) or a table of ``2**bits`` values, relative to
            (g_max − g_min).
        nonuniform: factor s multiplying σ of the mid-range levels (all but the lowest and the
            highest), e.g. 1, 2, 4, 6 (the "non-uniform" variants of Yan et al.).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"levels(): bits must be an int in 1..8, got {bits!r}")
    check_real("levels(sigma)", sigma, minimum=0.0)
    check_real("levels(nonuniform)", nonuniform, minimum=0.0)
    n = 2 ** bits
    table = np.broadcast_to(np.asarray(sigma, np.float32), (n,)).copy() if np.ndim(sigma) == 0 \
        else np.asarray(sigma, np.float32)
    if table.shape != (n,):
        raise UserError(f"levels(): sigma table must have 2**bits = {n} entries, got shape "
                         f"{table.shape}")
    if np.any(table < 0):
        raise ValueError(f"levels(): sigma must be >= 0, got {table}")
    if nonuniform != 1.0 and n > 2:
        table[1:-1] *= nonuniform
    return _checked(Levels(sigma=jnp.asarray(table), g_min=g_min, g_max=g_max,
                           faults=_faults(p_stuck_min, p_stuck_max)))


def flash(*, p_stuck_min=None, p_stuck_max=None, **overrides) -> Flash:
    """D5 NOR-flash device (log-normal conductance from V_th variation; ``center='mean'`` (default)
    or ``'median'`` at the target, see :class:`Flash`)."""
    _check_known("flash", overrides, Flash)
    _flash_log_shift(Flash(center=overrides.get("center", "mean")), 0.0)  # checks ``center``
    return _checked(Flash(faults=_faults(p_stuck_min, p_stuck_max), **overrides))


def ideal(*, g_max=25.0, g_min=0.0, p_stuck_min=None, p_stuck_max=None) -> Ideal:
    """An ideal device (optionally with stuck-at faults only)."""
    return _checked(Ideal(g_max=g_max, g_min=g_min, faults=_faults(p_stuck_min, p_stuck_max)))


# --------------------------------------------------------------------------------------------
# Physics helpers
# --------------------------------------------------------------------------------------------
def g_range(device: Device):
    """(g_min, g_max) of a device, µS."""
    return device.g_min, device.g_max


def _poly(coeff, x):
    """Σ_i coeff[i]·x^i by Horner's rule (coeff in increasing order)."""
    acc = jnp.zeros_like(x) + coeff[-1]
    for c in reversed(tuple(coeff)[:-1]):
        acc = acc * x + c
    return acc


def programming_sigma(device: Device, g_target: Array, *, t: float = 1.0) -> Array:
    """Standard deviation (µS) of one-shot programming at ``g_target``.

    For D1 PCM σ_p(ĝ) = (−1.1731ĝ² + 1.9650ĝ + 0.26348)·g_max/25; for D2 ReRAM the fitted
    polynomial at time ``t`` (1 s or ≥ 1 day; see :class:`ReRAM`); for D3 the level table
    (nearest level); for flash the log-normal's standard deviation; 0 for the ideal device.
    """
    g_target = jnp.asarray(g_target)
    if isinstance(device, PCM):
        gh = g_target / device.g_max
        c2, c1, c0 = device.prog_coeff
        return (c0 + gh * (c1 + gh * c2)) * (device.g_max / 25.0)
    if isinstance(device, ReRAM):
        gh = g_target / device.g_max
        s1 = _poly(device.coeff_1s, gh)
        s2 = _poly(device.coeff_1d, gh)
        f = _relax_fraction(t)
        return _safe_sqrt(s1 ** 2 + jnp.maximum(s2 ** 2 - s1 ** 2, 0.0) * f)
    if isinstance(device, Levels):
        idx = _level_index(device, g_target)
        return jnp.asarray(device.sigma)[idx] * (device.g_max - device.g_min)
    if isinstance(device, Flash):
        s = _flash_sigma_ln(device)
        # std of g_T·exp(sξ − shift): g_T·sqrt(e^{s²} − 1)·e^{s²/2 − shift}
        return g_target * jnp.sqrt(jnp.expm1(s ** 2)) * jnp.exp(s ** 2 / 2
                                                                 - _flash_log_shift(device, s))
    if isinstance(device, Ideal):
        return jnp.zeros_like(g_target)
    check_device(device, "programming_sigma: device")
    raise AssertionError("unreachable")


def _pcm_nu_params(device: PCM, g_target):
    """Mean and spread of the PCM drift exponent at the target (ĝ floored at 1e-7)."""
    lg = jnp.log(jnp.maximum(g_target / device.g_max, 1e-7))
    a, b, lo, hi = device.nu_mu
    mu = jnp.clip(a * lg + b, lo, hi)
    a, b, lo, hi = device.nu_sigma
    sd = jnp.clip(a * lg + b, lo, hi)
    return mu, sd


def _safe_sqrt(x):
    """sqrt with a finite (zero) gradient at 0 (the "double where" trick)."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _relax_fraction(t):
    """ReRAM relaxation: fraction of the 1 s → 1 day variance growth reached at time t (our model)."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.maximum(jnp.log(jnp.maximum(t, 1.0)) / math.log(86400.0), 0.0)


def _flash_sigma_ln(device: Flash):
    return device.sigma_vth / (device.n_slope * device.v_thermal)


def _flash_log_shift(device: Flash, s_ln):
    """ln(median/target) of the flash conductance: −σ_ln²/2 for ``center='mean'`` (E[g] = g_T,
    since E[exp(σξ)] = exp(σ²/2)), 0 for ``center='median'``."""
    if device.center == "mean":
        return s_ln ** 2 / 2
    if device.center == "median":
        return jnp.zeros_like(s_ln)
    raise ValueError(f"flash(center): expected 'mean' or 'median', got {device.center!r}")


def _reram_relax_amplitude(device: ReRAM, g_target):
    """sqrt(max(σ_1d² − σ_1s², 0)) at the target conductance, µS (ReRAM relaxation, our model)."""
    gh = g_target / device.g_max
    s1 = _poly(device.coeff_1s, gh)
    s2 = _poly(device.coeff_1d, gh)
    return _safe_sqrt(jnp.maximum(s2 ** 2 - s1 ** 2, 0.0))


def _level_index(device: Levels, g):
    n = device.num_levels
    step = (device.g_max - device.g_min) / (n - 1)
    return jnp.clip(jnp.round((g - device.g_min) / step), 0, n - 1).astype(jnp.int32)


def drift(device: Device, g_prog: Array, nu: Optional[Array], t) -> Array:
    """Deterministic conductance drift g(t) = g_prog·((t + t0)/t0)^(−ν) (PCM); identity otherwise.

    Args:
        g_prog: programmed conductance, µS, any shape.
        nu: drift exponents, same shape (PCM), or None.
        t: time since programming, s (scalar or broadcastable).
    """
    if isinstance(device, PCM):
        t = jnp.asarray(t, g_prog.dtype)
        return g_prog * jnp.exp(-nu * jnp.log((t + device.t0) / device.t0))
    return g_prog


def _pcm_read_noise_scale(device: PCM, g_prog, t):
    """|g|-relative σ of the PCM 1/f read noise: Q_s·sqrt(ln((t' + t_r)/(2 t_r))), t' = t or
    t + t0 (``device.noise_time``); 0 where the logarithm is negative (t' < t_r)."""
    # max(ĝ^e, 1e-3) written as max(ĝ, 1e-3^(1/e))^e: the same value, finite gradients at ĝ = 0.
    # ĝ^(−e) as exp(−e·ln ĝ) (ĝ > 0 after the floor): XLA:CPU's elementwise pow is ~10x slower.
    e = device.read_q_exp
    gh = jnp.maximum(g_prog / device.g_max, 1e-3 ** (1.0 / e))
    q = jnp.minimum(device.read_q * jnp.exp(-e * jnp.log(gh)), device.read_q_max)
    t = jnp.asarray(t, g_prog.dtype)
    if device.noise_time == "t+t0":   # aihwkit 1.2: t' = t_inference + t_0
        t = t + device.t0
    arg = jnp.maximum(jnp.log((t + device.t_read) / (2.0 * device.t_read)), 0.0)
    return q * jnp.sqrt(arg)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
#: Per device kind, the physics numbers that must be finite, with their lower bound (µS, s, V;
#: ``True``: strictly above it); every conductance range also needs g_min < g_max.
_BOUNDS = {
    "pcm": {"g_max": (0.0, True), "g_min": (0.0, False), "t0": (0.0, True),
            "read_q": (0.0, False), "read_q_exp": (0.0, True), "read_q_max": (0.0, False),
            "t_read": (0.0, True)},
    "reram": {"g_max": (0.0, True), "g_min": (0.0, False)},
    "levels": {"g_max": (0.0, True), "g_min": (0.0, False), "sigma": (0.0, False)},
    "flash": {"g_max": (0.0, True), "g_min": (0.0, False), "sigma_vth": (0.0, False),
              "n_slope": (0.0, True), "v_thermal": (0.0, True), "i0": (0.0, True)},
    "ideal": {"g_max": (0.0, True), "g_min": (0.0, False)},
}
#: Per device kind, coefficient tables: finite, with this many entries on the last axis (None:
#: at least one).
_TABLES = {"pcm": {"prog_coeff": 3, "nu_mu": 4, "nu_sigma": 4},
           "reram": {"coeff_1s": None, "coeff_1d": None}}


def _checked(device):
    """``device`` after checking its concrete physics numbers (the policy of ``_checks``: finite,
    conductances >= 0 with g_min < g_max, time constants and slopes > 0, noise amplitudes >= 0,
    coefficient tables of the right length, stuck-at probabilities in [0, 1] summing to at most
    1); traced values pass. Raises UserError (a ValueError) or TypeError naming the argument."""
    kind = device.name
    for name, (lo, strict) in _BOUNDS[kind].items():
        check_real(f"{kind}({name})", getattr(device, name), minimum=lo, strict_min=strict)
    for name, size in _TABLES.get(kind, {}).items():
        v = getattr(device, name)
        if not is_concrete(v):
            continue
        check_real(f"{kind}({name})", v)
        n = np.shape(v)[-1] if np.ndim(v) else 0
        if (size is None and n < 1) or (size is not None and n != size):
            want = "at least 1" if size is None else str(size)
            raise UserError(f"{kind}({name}) must be a table of {want} coefficients, got "
                            f"{np.asarray(v).tolist()!r}")
    g_min, g_max = device.g_min, device.g_max
    if is_concrete(g_min) and is_concrete(g_max) and np.any(np.asarray(g_min) >= np.asarray(g_max)):
        raise UserError(f"{kind}(g_min) must be < g_max = {np.asarray(g_max).tolist()} µS, got "
                        f"{np.asarray(g_min).tolist()}")
    f = device.faults
    if f is not None:
        check_real(f"{kind}(p_stuck_min)", f.p_min, minimum=0.0, maximum=1.0)
        check_real(f"{kind}(p_stuck_max)", f.p_max, minimum=0.0, maximum=1.0)
        if is_concrete(f.p_min) and is_concrete(f.p_max) and \
                np.any(np.asarray(f.p_min) + np.asarray(f.p_max) > 1.0 + 1e-9):
            raise UserError(f"{kind}(p_stuck_min + p_stuck_max) must be <= 1 (a cell is stuck at "
                            f"g_min, at g_max, or free), got {np.asarray(f.p_min).tolist()} + "
                            f"{np.asarray(f.p_max).tolist()}")
    return device


def _state_kind(state) -> Optional[str]:
    """The device kind a :class:`CellState` was programmed with, as far as its fields tell: 'pcm'
    (drift exponents), 'reram' (relaxation normals), None (levels, flash or ideal)."""
    if state.nu is not None:
        return "pcm"
    if state.relax is not None:
        return "reram"
    return None


def check_device(device, where: str = "device", *, state=None) -> None:
    """Raise TypeError unless ``device`` is one of this module's device pytrees (``DEVICE_TYPES``)
    and, with ``state``, unless that :class:`CellState` was programmed with a device of the
    same kind (PCM states carry drift exponents, ReRAM states relaxation normals, the others
    neither).

    Args:
        device: the value to check.
        where: the caller and argument, for the message (e.g. ``'deploy: device'``).
        state: a :class:`CellState` to read with ``device`` (optional).
    """
    if not isinstance(device, DEVICE_TYPES):
        raise TypeError(f"{where}: expected a device from nvjax.devices "
                        f"({', '.join(t.__name__ for t in DEVICE_TYPES)}), "
                        f"got {type(device).__name__}")
    if state is None:
        return
    if not isinstance(state, CellState):
        raise TypeError(f"{where}: expected a CellState from program(), got {type(state).__name__}")
    want = device.name if device.name in ("pcm", "reram") else None
    got = _state_kind(state)
    if got != want:
        what = {"pcm": "a pcm device (the state has drift exponents)",
                "reram": "a reram device (the state has relaxation normals)",
                None: "a levels, flash or ideal device (the state has neither drift exponents "
                      "nor relaxation normals)"}[got]
        raise TypeError(f"{where}: the cell state was programmed with {what}, but the device "
                        f"passed is {device.name}; read with the device it was programmed with")


def check_conductances(name: str, g, device: Optional[Device] = None) -> None:
    """Raise ValueError if concrete conductances are negative, non-finite or above g_max.

    Traced values (inside ``jit``) cannot be checked and are accepted as they are.
    """
    if not is_concrete(g):
        return
    a = np.asarray(g)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point conductance array (µS), got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: conductances must be finite; found {np.sum(~np.isfinite(a))} "
                         "non-finite value(s)")
    if np.any(a < 0):
        raise ValueError(f"{name}: conductances must be >= 0 µS; found min {a.min():.4g} µS "
                         f"({np.sum(a < 0)} negative value(s))")
    if device is not None and is_concrete(device.g_max):
        gmax = np.max(np.asarray(device.g_max))
        if np.any(a > gmax * (1 + 1e-5)):
            raise ValueError(f"{name}: conductances must be <= g_max = {gmax:g} µS of the "
                             f"{device.name} device; found max {a.max():.4g} µS")


# --------------------------------------------------------------------------------------------
# program / read
# --------------------------------------------------------------------------------------------
def _draw_faults(key, device, shape):
    u = jax.random.uniform(key, shape)
    p0, p1 = device.faults.p_min, device.faults.p_max
    return jnp.where(u < p0, 1, jnp.where(u < p0 + p1, 2, 0)).astype(jnp.int8)


def apply_faults(device, g, stuck):
    """Conductances ``g`` (µS) with the stuck cells of ``stuck`` (0 free, 1 at g_min, 2 at g_max)
    set to their stuck value; ``stuck`` None: ``g`` unchanged."""
    if stuck is None:
        return g
    return jnp.where(stuck == 1, jnp.asarray(device.g_min, g.dtype),
                     jnp.where(stuck == 2, jnp.asarray(device.g_max, g.dtype), g))


def program(key: Array, device: Device, g_target: Array) -> CellState:
    """One-shot programming of target conductances (one draw of the programming noise).

    Args:
        key: PRNG key.
        device: a device from this module.
        g_target: target conductances, µS, any shape, within [0, g_max].

    Returns:
        :class:`CellState` whose ``g`` holds the programmed conductances (µS, shape of
        ``g_target``), plus the per-cell drift exponents (PCM), relaxation displacements
        (ReRAM) and stuck-at codes (when the device has ``faults``).

    References:
        DESIGN.md §3 (D1, D2, D3, D5, D6).
    """
    check_device(device, "program: device")
    check_conductances("program(g_target)", g_target, device)
    g_target = jnp.asarray(g_target)
    if not jnp.issubdtype(g_target.dtype, jnp.floating):
        g_target = g_target.astype(jnp.float32)
    shape, dtype = g_target.shape, g_target.dtype
    k_prog, k_aux, k_fault = jax.random.split(key, 3)
    nu = relax = stuck = None
    if isinstance(device, PCM):
        sig = programming_sigma(device, g_target)
        g = jnp.maximum(g_target + sig * jax.random.normal(k_prog, shape, dtype), 0.0)
        mu, sd = _pcm_nu_params(device, g_target)
        nu = jnp.abs(mu + sd * jax.random.normal(k_aux, shape, dtype))
    elif isinstance(device, ReRAM):
        sig = programming_sigma(device, g_target, t=1.0)
        g = jnp.maximum(g_target + sig * jax.random.normal(k_prog, shape, dtype), 0.0)
        relax = _reram_relax_amplitude(device, g_target) * jax.random.normal(k_aux, shape, dtype)
    elif isinstance(device, Levels):
        idx = _level_index(device, g_target)
        step = (device.g_max - device.g_min) / (device.num_levels - 1)
        # the level's value, with a straight-through gradient w.r.t. the target (same values)
        u = round_ste(jnp.clip((g_target - device.g_min) / step, 0, device.num_levels - 1))
        g_lvl = device.g_min + u * step
        sig = jnp.asarray(device.sigma, dtype)[idx] * (device.g_max - device.g_min)
        g = g_lvl + sig * jax.random.normal(k_prog, shape, dtype)
    elif isinstance(device, Flash):
        s_ln = _flash_sigma_ln(device)
        g = g_target * jnp.exp(s_ln * jax.random.normal(k_prog, shape, dtype)
                               - _flash_log_shift(device, s_ln))
    else:  # Ideal
        g = g_target
    if device.faults is not None:
        stuck = _draw_faults(k_fault, device, shape)
        g = apply_faults(device, g, stuck)
        if nu is not None:
            nu = jnp.where(stuck > 0, 0.0, nu)
    return CellState(g=g, nu=nu, relax=relax, stuck=stuck)


def read(key: Array, device: Device, state: CellState, t) -> Array:
    """Conductances read ``t`` seconds after programming.

    PCM: drift ``g_prog·((t + t0)/t0)^(−ν)`` then 1/f read noise
    ``g + |g|·Q_s·sqrt(ln((t' + t_r)/(2 t_r)))·ξ`` with Q_s from the programmed conductance,
    clamped at 0; t' = t (no read noise for t < t_r) or t + t0 (``device.noise_time``, see
    :class:`PCM`). ReRAM: relaxation (see :class:`ReRAM`). Other devices: no change. Stuck cells
    read their stuck value. The state is not modified.

    Args:
        key: PRNG key for the read noise.
        device: the device the state was programmed with.
        state: :class:`CellState` from :func:`program`.
        t: time since programming, s (scalar, >= 0).

    Returns:
        Conductances, µS, shape of ``state.g``.
    """
    check_device(device, "read: device", state=state)
    check_time("read(t) (time since programming, s)", t)
    g0 = state.g
    if isinstance(device, PCM):
        g = drift(device, g0, state.nu, t)
        scale = _pcm_read_noise_scale(device, g0, t)
        g = jnp.maximum(g + jnp.abs(g) * scale * jax.random.normal(key, g.shape, g.dtype), 0.0)
    elif isinstance(device, ReRAM):
        # state.relax is the 1-day displacement, drawn at the target (see program)
        g = jnp.maximum(g0 + _safe_sqrt(_relax_fraction(t)) * state.relax, 0.0)
    else:
        g = g0
    return apply_faults(device, g, state.stuck)


# --------------------------------------------------------------------------------------------
# D4 — PCM pulse response (used by row-parallel pulse programming, nvjax.programming)
# --------------------------------------------------------------------------------------------
@struct.dataclass
class PulsePCM:
    """D4 — PCM conductance response to SET and RESET pulses (a simplified statistical model).

    Each SET pulse adds ``ΔG ~ N(m_d·s·(a·G + b), (c·G + d)²)`` µS to a device at conductance G,
    then G is clipped to ``[g_lo, G_max,d]``; ``s`` is the step scale of the programming scheme
    (1 for nominal pulses). A RESET returns G to ``g_reset·(1 + reset_sigma·ξ)`` µS.
    Device-to-device variability *(our model, DESIGN.md §3 D4)*: each device draws once a gain
    ``m_d ~ N(1, sigma_gain²)`` on its mean step and a ceiling ``G_max,d ~ N(g_hi, sigma_gmax²)``
    µS (:func:`draw_devices`). Note that the mean step vanishes at ``G = −b/a ≈ 10.6`` µS and is
    negative above: repeated SETs do not accumulate beyond that on average, while the step noise
    (std ≥ 0.575 µS) keeps the conductance moving.

    Attributes:
        a: slope of the mean step, 1 (µS per µS).
        b: mean step at G = 0, µS.
        c: slope of the step standard deviation, 1.
        d: step standard deviation at G = 0, µS.
        g_lo: floor of a SET, µS.
        g_hi: nominal ceiling of a SET (mean of ``G_max,d``), µS.
        g_reset: conductance after RESET, µS.
        reset_sigma: relative spread of the RESET conductance.
        sigma_gain: device-to-device std of the mean-step gain m_d *(our model; placeholder)*.
        sigma_gmax: device-to-device std of the ceiling G_max,d, µS *(our model; placeholder)*.

    References:
        S. R. Nandakumar et al., "A phase-change memory model for neuromorphic computing",
        J. Appl. Phys. 124, 152135 (2018) (simplified to a linear mean and std of the step).
    """
    a: Any = -0.084
    b: Any = 0.892
    c: Any = 0.09
    d: Any = 0.575
    g_lo: Any = 0.1
    g_hi: Any = 20.0
    g_reset: Any = 0.1
    reset_sigma: Any = 0.1
    sigma_gain: Any = 0.1
    sigma_gmax: Any = 1.0

    name = "pulse_pcm"


class DeviceVariation(NamedTuple):
    """Per-device pulse-response parameters, drawn once per chip (:func:`draw_devices`).

    Attributes:
        gain: m_d, multiplies the mean SET step, shape ``shape``.
        g_ceiling: G_max,d, µS, the upper clip of a SET, shape ``shape``.
    """
    gain: Array
    g_ceiling: Array


def pulse_pcm(**overrides) -> PulsePCM:
    """D4 pulse-response device (DESIGN.md §3 defaults); keyword overrides replace any field.

    Raises:
        TypeError: an unknown parameter name.
        ValueError: a negative spread, a non-positive ``g_hi − g_lo``.

    Example:
        >>> dev = pulse_pcm(sigma_gain=0.0, sigma_gmax=0.0)
        >>> var = draw_devices(jax.random.key(0), dev, (4,))
    """
    names = set(PulsePCM.__dataclass_fields__)
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"pulse_pcm(): unknown parameter(s) {bad}; valid: {sorted(names)}")
    for name in ("reset_sigma", "sigma_gain", "sigma_gmax", "g_reset"):
        if name in overrides:
            check_real(f"pulse_pcm({name})", overrides[name], minimum=0.0)
    for name in ("a", "b", "c", "d", "g_lo", "g_hi"):
        if name in overrides:
            check_real(f"pulse_pcm({name})", overrides[name])
    dev = PulsePCM(**overrides)
    if is_concrete(dev.g_lo) and is_concrete(dev.g_hi) and \
            np.any(np.asarray(dev.g_hi) <= np.asarray(dev.g_lo)):
        raise ValueError(f"pulse_pcm(g_hi): must exceed g_lo = {dev.g_lo}, got {dev.g_hi}")
    return dev


def check_pulse_device(device) -> None:
    """Raise TypeError unless ``device`` is a D4 :class:`PulsePCM` (from :func:`pulse_pcm`)."""
    if not isinstance(device, PulsePCM):
        raise TypeError(f"device must be a PulsePCM (from pulse_pcm()), got "
                        f"{type(device).__name__}")


def draw_devices(key: Array, device: PulsePCM, shape) -> DeviceVariation:
    """Draw the device-to-device variability of ``shape`` devices (once per chip instance).

    Args:
        key: PRNG key.
        device: :class:`PulsePCM`.
        shape: tuple of ints, e.g. ``(4, rows, cols)`` for the four devices of each weight.

    Returns:
        :class:`DeviceVariation` with ``gain ~ N(1, sigma_gain²)`` and ``g_ceiling ~ N(g_hi,
        sigma_gmax²)`` µS, both float32 of ``shape``. A drawn ceiling below ``g_lo`` is raised
        to ``g_lo`` (a device that cannot be SET above its floor).
    """
    check_pulse_device(device)
    shape = tuple(shape)
    return variation_from_normals(device, jax.random.normal(key, (2,) + shape))


def variation_from_normals(device: PulsePCM, z: Array) -> DeviceVariation:
    """The deterministic half of :func:`draw_devices`: a :class:`DeviceVariation` from normals.

    For callers that draw all their standard normals in one batch (as
    :func:`nvjax.programming.row_program` does).

    Args:
        device: :class:`PulsePCM`.
        z: standard normals ``[2, *shape]``: ``z[0]`` for the gain, ``z[1]`` for the ceiling.

    Returns:
        :class:`DeviceVariation` with ``gain = 1 + sigma_gain·z[0]`` and ``g_ceiling =
        max(g_hi + sigma_gmax·z[1], g_lo)`` µS.
    """
    ceil = device.g_hi + device.sigma_gmax * z[1]
    return DeviceVariation(gain=1.0 + device.sigma_gain * z[0],
                           g_ceiling=jnp.maximum(ceil, device.g_lo))


def reset_from_normals(device: PulsePCM, z: Array) -> Array:
    """The deterministic half of :func:`reset`: ``g_reset·(1 + reset_sigma·z)`` µS, dtype of ``z``.

    Args:
        device: :class:`PulsePCM`.
        z: standard normals, any shape (one per device).
    """
    return (device.g_reset * (1.0 + device.reset_sigma * z)).astype(z.dtype)


def set_pulse(key: Array, device: PulsePCM, var: Optional[DeviceVariation], g: Array,
              mask: Optional[Array] = None, *, step_scale=1.0) -> Array:
    """Apply one SET pulse to the devices where ``mask`` is True.

    ``G ← clip(G + ΔG, g_lo, G_max,d)`` with ``ΔG ~ N(m_d·step_scale·(a·G + b), (c·G + d)²)``.

    Args:
        key: PRNG key (one draw for every device of ``g``, used only where ``mask``).
        device: :class:`PulsePCM`.
        var: :class:`DeviceVariation` broadcastable to ``g``, or None for nominal devices
            (m_d = 1, G_max,d = g_hi).
        g: conductances, µS, any shape.
        mask: boolean, broadcastable to ``g`` (None: pulse every device).
        step_scale: multiplies the mean step (coarser, faster pulses for > 1); the step noise is
            not scaled.

    Returns:
        New conductances, µS, shape and dtype of ``g`` (unchanged where ``mask`` is False).

    References:
        Nandakumar et al., J. Appl. Phys. 124, 152135 (2018), simplified (DESIGN.md §3 D4).
    """
    check_pulse_device(device)
    g = jnp.asarray(g)
    if var is None:
        gain, ceil = 1.0, device.g_hi
    else:
        gain, ceil = var.gain, var.g_ceiling
    mean = gain * step_scale * (device.a * g + device.b)
    std = device.c * g + device.d
    xi = jax.random.normal(key, g.shape, g.dtype)
    g_new = jnp.clip(g + mean + std * xi, device.g_lo, ceil).astype(g.dtype)
    return g_new if mask is None else jnp.where(mask, g_new, g)


def reset(key: Array, device: PulsePCM, g, mask: Optional[Array] = None) -> Array:
    """RESET: G ← g_reset·(1 + reset_sigma·ξ) µS (0.1·(1 + 0.1ξ) by default) where ``mask``.

    Args:
        key: PRNG key.
        device: :class:`PulsePCM`.
        g: current conductances, µS (any shape), or a shape tuple (then every device is reset
            and ``mask`` must be None).
        mask: boolean broadcastable to ``g`` (None: reset all).

    Returns:
        Conductances, µS (float32 when ``g`` is a shape).

    References:
        Nandakumar et al., J. Appl. Phys. 124, 152135 (2018), simplified (DESIGN.md §3 D4).
    """
    check_pulse_device(device)
    if isinstance(g, (tuple, list)) and all(isinstance(s, numbers.Integral) for s in g):
        if mask is not None:
            raise ValueError("reset(mask): a mask needs the current conductances g, not a shape")
        shape, dtype, g = tuple(g), jnp.float32, None
    else:
        g = jnp.asarray(g)
        shape, dtype = g.shape, g.dtype
    g_new = reset_from_normals(device, jax.random.normal(key, shape, dtype))
    if mask is None or g is None:
        return g_new
    return jnp.where(mask, g_new, g)
