"""Programming weights onto NVM cells: one shot, write-verify, row-parallel pulses, SWIM.

DESIGN.md §6. Four ways of putting target conductances (or weights) onto a chip, each a pure
function of an explicit PRNG ``key`` written for one chip instance (``jax.vmap`` over keys gives
an ensemble of chips):

* :func:`one_shot` — the device model's programming noise, once (:func:`nvjax.devices.program`);
* :func:`write_verify` — closed loop: redraw every cell that is not yet within ``tol`` of its
  target, all cells in parallel in one ``lax.while_loop`` over cycles, until all converged or the
  cycle cap; the final error is the truncated one-shot distribution and the cycle count of a cell
  is geometric with ``p = P(|σξ| ≤ tol)``;
* :func:`row_program` — row-parallel pulse programming of F-weighted MSP/LSP pairs with the D4
  PCM pulse response of :mod:`nvjax.devices` (:func:`nvjax.devices.pulse_pcm`,
  :func:`nvjax.devices.set_pulse`, :func:`nvjax.devices.reset`), reporting the
  failure probability Pfail, pulses per weight and programming time per row; :func:`pareto_sweep`
  and :func:`pareto_front` trace the Pfail–speed trade-off over pulse budgets;
* :func:`selective_write_verify` — SWIM: write-verify only the cells of a mask (the top fraction
  p of a ranking, :func:`swim_mask`, ranked by the SWIM sensitivity ½·H_ii·σ_i² of
  :func:`nvjax.sensitivity.swim_sensitivity`, or by the baselines :func:`magnitude_scores` and
  :func:`random_scores`), one shot elsewhere; :func:`normalized_cycles` compares its cost with
  full write-verify.

Key usage (documented because tests rely on it): ``k_fault, k_cycles = jax.random.split(key)``;
stuck-at faults (D6, when the device has ``faults``) are drawn once from ``k_fault`` and kept by
every redraw; programming cycle c = 0, 1, … calls :func:`nvjax.devices.program` (faults off) with
``jax.random.fold_in(k_cycles, c)``. One shot, write-verify and selective write-verify share this
scheme (one implementation), so with the same key selective write-verify with an all-True mask
*is* :func:`write_verify` and with an all-False mask *is* :func:`one_shot`, bit for bit.

Units: conductance and weights in µS (µS-equivalent for weights, see :func:`row_program`), pulse
counts int32, time in pulses × ``RowProgramConfig.t_pulse``. This module imports jax, numpy,
``devices`` and ``_checks`` only (it sits below ``chip`` and ``sensitivity`` in the dependency
order: the SWIM sensitivity is computed by ``nvjax.sensitivity``, which has the Hessian, and is
passed in as scores).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import devices as dev_mod
# The D4 pulse model lives in nvjax.devices; these plain imports keep ``programming.pulse_pcm``
# etc. working for old callers (they are not part of this module's ``__all__``).
from .devices import (DeviceVariation, PulsePCM, draw_devices, pulse_pcm,  # noqa: F401
                      reset, set_pulse)
from ._checks import check_float_array as _check_float_array
from ._checks import check_int as _check_int
from ._checks import check_real as _check_real
from ._checks import is_concrete as _is_concrete

__all__ = [
    # one shot and write-verify
    "WriteVerifyResult", "one_shot", "write_verify",
    # row-parallel pulse programming
    "RowProgramConfig", "RowProgramResult", "ParetoSweep", "weight_scale", "row_program",
    "pareto_sweep", "pareto_front",
    # selective write-verify (SWIM)
    "swim_mask", "magnitude_scores", "random_scores", "selective_write_verify",
    "normalized_cycles",
]

Array = jax.Array


# --------------------------------------------------------------------------------------------
# One shot and (selective) write-verify
# --------------------------------------------------------------------------------------------
class WriteVerifyResult(NamedTuple):
    """Outcome of (selective) write-verify, all arrays of the target's shape.

    Attributes:
        g: final programmed conductances, µS.
        cycles: int32 programming cycles used per cell (≥ 1; one-shot cells count 1).
        converged: bool, ``|g − g_target| ≤ tol`` at the end.
        state: the full :class:`nvjax.devices.CellState` of the accepted draws (drift exponents,
            relaxation normals, stuck-at codes), ready for :func:`nvjax.devices.read`.
    """
    g: Array
    cycles: Array
    converged: Array
    state: dev_mod.CellState


def _check_device(device) -> None:
    if not isinstance(device, dev_mod.DEVICE_TYPES):
        raise TypeError(f"device must be a device from nvjax.devices (pcm(), reram(), levels(), "
                        f"flash(), ideal()), got {type(device).__name__}")


def _check_target(g_target, device) -> Array:
    g_target = _check_float_array("g_target", g_target)
    dev_mod.check_conductances("g_target", g_target, device)
    return g_target


def one_shot(key: Array, device: dev_mod.Device, g_target: Array) -> dev_mod.CellState:
    """One-shot programming: one draw of the device's programming noise.

    The same law as :func:`nvjax.devices.program`, and bit for bit the draw of cycle 1 of
    :func:`write_verify` (and of :func:`selective_write_verify`) with the same key; see the module
    docstring for the key usage.

    Args:
        key: PRNG key.
        device: a device from :mod:`nvjax.devices`.
        g_target: target conductances, µS, any shape, in [0, g_max].

    Returns:
        :class:`nvjax.devices.CellState` (``.g``: programmed conductances, µS).

    Example:
        >>> st = one_shot(jax.random.key(0), devices.pcm(), jnp.full((8,), 10.0))
    """
    _check_device(device)
    g_target = _check_target(g_target, device)
    mask = jnp.zeros(g_target.shape, bool)
    return _write_verify(key, device, g_target, mask, jnp.zeros((), g_target.dtype),
                         jnp.int32(1)).state


def _stuck_values(device, stuck, g):
    return jnp.where(stuck == 1, jnp.asarray(device.g_min, g.dtype),
                     jnp.where(stuck == 2, jnp.asarray(device.g_max, g.dtype), g))


@jax.jit
def _write_verify(key, device, g_target, mask, tol, max_cycles):
    """Cycle c (0-based) programs with ``fold_in(k_cycles, c)``; cycle 0 programs every cell."""
    k_fault, k_cycles = jax.random.split(key)
    shape = g_target.shape
    # D6 stuck-at faults belong to the chip: drawn once, kept by every redraw.
    stuck = None
    if device.faults is not None:
        u = jax.random.uniform(k_fault, shape)
        p0, p1 = device.faults.p_min, device.faults.p_max
        stuck = jnp.where(u < p0, 1, jnp.where(u < p0 + p1, 2, 0)).astype(jnp.int8)
    device_nf = device.replace(faults=None)
    template = jax.eval_shape(lambda k: dev_mod.program(k, device_nf, g_target), k_cycles)
    st0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), template)

    def cond(carry):
        c, _, active, _ = carry
        return (c < max_cycles) & jnp.any(active)

    def body(carry):
        c, st, active, cycles = carry
        new = dev_mod.program(jax.random.fold_in(k_cycles, c), device_nf, g_target)
        g_new = new.g if stuck is None else _stuck_values(device, stuck, new.g)
        g = jnp.where(active, g_new, st.g)
        nu = relax = None
        if st.nu is not None:
            nu_new = new.nu if stuck is None else jnp.where(stuck > 0, 0.0, new.nu)
            nu = jnp.where(active, nu_new, st.nu)
        if st.relax is not None:
            relax = jnp.where(active, new.relax, st.relax)
        cycles = cycles + active.astype(jnp.int32)
        active = active & mask & (jnp.abs(g - g_target) > tol)
        return c + 1, dev_mod.CellState(g=g, nu=nu, relax=relax, stuck=None), active, cycles

    carry0 = (jnp.int32(0), st0, jnp.ones(shape, bool), jnp.zeros(shape, jnp.int32))
    _, st, _, cycles = jax.lax.while_loop(cond, body, carry0)
    st = st._replace(stuck=stuck)
    return WriteVerifyResult(g=st.g, cycles=cycles, converged=jnp.abs(st.g - g_target) <= tol,
                             state=st)


def _check_wv_args(device, g_target, tol, max_cycles):
    _check_device(device)
    g_target = _check_target(g_target, device)
    _check_real("tol", tol, minimum=0.0)
    try:
        np.broadcast_shapes(np.shape(tol), g_target.shape)
    except ValueError:
        raise ValueError(f"tol of shape {np.shape(tol)} does not broadcast to g_target of shape "
                         f"{g_target.shape}") from None
    max_cycles = _check_int("max_cycles", max_cycles, 1)
    return g_target, max_cycles


def write_verify(key: Array, device: dev_mod.Device, g_target: Array, *, tol,
                 max_cycles: int = 20) -> WriteVerifyResult:
    """Closed-loop write-verify: redraw every cell until ``|G − G_T| ≤ tol`` or ``max_cycles``.

    Each cycle reprograms (a fresh draw of :func:`nvjax.devices.program`) all cells not yet within
    tolerance, in parallel; the loop stops when all cells converged or after ``max_cycles``
    cycles. For a cell of one-shot error σ·ξ (no clamping) the final error of a converged cell is
    σξ truncated to [−tol, tol] and the cycle count is geometric, ``P(n) = (1 − p)^(n−1)·p`` with
    ``p = 2Φ(tol/σ) − 1`` (truncated at ``max_cycles``). Stuck-at faults are drawn at cycle 1 and
    kept; a stuck cell converges only if its stuck value is within ``tol``.

    Args:
        key: PRNG key.
        device: a device from :mod:`nvjax.devices`.
        g_target: target conductances G_T, µS, any shape, in [0, g_max].
        tol: verify tolerance, µS, ≥ 0, scalar or broadcastable to ``g_target``.
        max_cycles: cap on programming cycles per cell (≥ 1; 1 is one shot).

    Returns:
        :class:`WriteVerifyResult` (g µS, cycles int32, converged bool, state).

    References:
        DESIGN.md §6; Z. Yan, X. S. Hu, Y. Shi, "SWIM: Selective write-verify for
        computing-in-memory neural accelerators", DAC 2022 (write-verify as the baseline).

    Example:
        >>> res = write_verify(jax.random.key(0), devices.pcm(), jnp.full((8,), 10.0), tol=0.5)
        >>> bool(jnp.all(jnp.abs(res.g - 10.0)[res.converged] <= 0.5))
        True
    """
    g_target, max_cycles = _check_wv_args(device, g_target, tol, max_cycles)
    mask = jnp.ones(g_target.shape, bool)
    return _write_verify(key, device, g_target, mask, jnp.asarray(tol, g_target.dtype),
                         jnp.int32(max_cycles))


def selective_write_verify(key: Array, device: dev_mod.Device, g_target: Array, mask: Array, *,
                           tol, max_cycles: int = 20) -> WriteVerifyResult:
    """SWIM: write-verify the cells where ``mask`` is True, one shot elsewhere.

    Cells outside the mask keep the cycle-1 draw (cycles = 1). With the same key, an all-True
    mask gives exactly :func:`write_verify` and an all-False mask exactly the conductances (and
    state) of :func:`one_shot`.

    Args:
        key: PRNG key.
        device: a device from :mod:`nvjax.devices`.
        g_target: target conductances, µS, any shape.
        mask: boolean of the shape of ``g_target`` (e.g. from :func:`swim_mask`).
        tol: verify tolerance, µS (≥ 0).
        max_cycles: cycle cap of the verified cells (≥ 1).

    Returns:
        :class:`WriteVerifyResult`; ``converged`` is ``|g − g_target| ≤ tol`` for every cell
        (verified or not).

    References:
        Z. Yan, X. S. Hu, Y. Shi, "SWIM: Selective write-verify for computing-in-memory neural
        accelerators", DAC 2022.
    """
    g_target, max_cycles = _check_wv_args(device, g_target, tol, max_cycles)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != g_target.shape:
        raise ValueError(f"mask must have the shape of g_target {g_target.shape}, got {mask.shape}")
    return _write_verify(key, device, g_target, mask, jnp.asarray(tol, g_target.dtype),
                         jnp.int32(max_cycles))


# --------------------------------------------------------------------------------------------
# SWIM rankings
# --------------------------------------------------------------------------------------------
def swim_mask(scores, p):
    """Boolean mask of the top fraction ``p`` of ``scores`` (global ranking over all entries).

    Exactly ``k = floor(p·N + 1/2)`` entries are selected (N = total number of entries), those
    with the highest scores; ties are broken deterministically in favour of the lower flat index
    (leaves in ``jax.tree`` order, then row-major). ``p = 0`` selects none, ``p = 1`` all.

    Args:
        scores: real array of any shape, or a pytree of arrays (e.g. from
            :func:`nvjax.sensitivity.swim_sensitivity`).
        p: fraction in [0, 1] (may be traced).

    Returns:
        Boolean array(s) of the structure and shapes of ``scores``.

    Example:
        >>> swim_mask(jnp.array([0.1, 3.0, 2.0, 3.0]), 0.5)
        Array([False,  True, False,  True], dtype=bool)
    """
    _check_real("p", p, minimum=0.0, maximum=1.0)
    leaves, treedef = jax.tree.flatten(scores)
    if not leaves:
        raise ValueError("scores must hold at least one array")
    flat = []
    for leaf in leaves:
        a = jnp.asarray(leaf)
        if a.dtype == jnp.bool_ or not (jnp.issubdtype(a.dtype, jnp.floating)
                                        or jnp.issubdtype(a.dtype, jnp.integer)):
            raise TypeError(f"scores must be real (float or int) arrays, got dtype {a.dtype}")
        flat.append(a.astype(jnp.float32).ravel() if jnp.issubdtype(a.dtype, jnp.integer)
                    else a.ravel())
    s = jnp.concatenate(flat) if len(flat) > 1 else flat[0]
    if all(_is_concrete(a) for a in flat) and not all(np.all(np.isfinite(np.asarray(a)))
                                                      for a in flat):
        raise ValueError("scores must be finite (a NaN or inf cannot be ranked)")
    n = s.shape[0]
    if _is_concrete(p):
        k = int(math.floor(float(p) * n + 0.5))    # exact in double precision
    else:
        k = jnp.floor(p * n + 0.5).astype(jnp.int32)
    order = jnp.argsort(-s, stable=True)           # descending; equal scores keep index order
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    sel = rank < k
    out, start = [], 0
    for leaf in leaves:
        size = int(np.size(leaf))
        out.append(sel[start:start + size].reshape(np.shape(leaf)))
        start += size
    return jax.tree.unflatten(treedef, out)


def magnitude_scores(w):
    """Magnitude ranking baseline: ``|w|`` (array or pytree)."""
    return jax.tree.map(lambda x: jnp.abs(jnp.asarray(x)), w)


def random_scores(key: Array, shape) -> Array:
    """Random ranking baseline: i.i.d. uniform scores in [0, 1) of ``shape``."""
    return jax.random.uniform(key, tuple(shape))


def normalized_cycles(cycles_selective, cycles_full) -> Array:
    """Write cycles of selective write-verify relative to full write-verify: Σ selective / Σ full.

    Args:
        cycles_selective: int cycles per cell (e.g. :attr:`WriteVerifyResult.cycles`).
        cycles_full: cycles per cell of full write-verify (same number of cells).

    Returns:
        float32 scalar (1 for p = 1; the one-shot cost N/Σ full for p = 0).
    """
    a, b = jnp.asarray(cycles_selective), jnp.asarray(cycles_full)
    if a.size != b.size:
        raise ValueError(f"cycles_selective ({a.size} cells) and cycles_full ({b.size} cells) "
                         "must count the same cells")
    if _is_concrete(b) and np.sum(np.asarray(b)) <= 0:
        raise ValueError("cycles_full must sum to > 0")
    return jnp.sum(a).astype(jnp.float32) / jnp.sum(b).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Row-parallel pulse programming (Mackin et al. 2019; phases are our reconstruction)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowProgramConfig:
    """Options of row-parallel pulse programming (a frozen, validated, hashable dataclass).

    The defaults are derived from the default :class:`nvjax.devices.PulsePCM` (D4: mean SET step
    ``a·G + b``, step spread ``c·G + d``), not tuned to a success rate (E-rowprog,
    ``configs/e_rowprog.yaml``, states each derivation): ε = 0.442 µS-equivalent is half the mean
    LSP step from RESET, the finest move of the scheme (2.2 % of the full scale max|W*| = 20
    µS-equivalent, :func:`weight_scale`); each phase's budget is twice the pulses the mean device
    needs for it (coarse 32, overshoot correction 4, fine 14). With them 99.45–99.88 % of the
    weights of Gaussian, uniform and Laplacian targets land within ε (10 seeds; Mackin et al.
    2019 report 98–99 %). Larger budgets or a looser ε trade time for Pfail
    (:func:`pareto_sweep`). The numbers are passed to the kernel as traced arrays, so one
    compilation serves every configuration.

    Attributes:
        factor: F, significance of the MSP pair (W = F·(G⁺ − G⁻) + (g⁺ − g⁻)).
        msp_share: θ in (0, 1], the share of |W*| the MSP coarse phase aims for.
        eps: ε, µS-equivalent weight tolerance: a weight succeeds if ``|W − W*| ≤ ε``.
        step_scale: multiplies the mean SET step (coarser, faster pulses for > 1).
        n_coarse: pulse budget of the MSP coarse phase, per weight.
        n_correct: pulse budget of the MSP overshoot correction, per weight.
        n_fine: pulse budget of the LSP fine phase, per weight.
        t_pulse: duration of one pulse (1.0: time in pulse units; or seconds).
    """
    factor: float = 2.0
    msp_share: float = 0.8
    eps: float = 0.442
    step_scale: float = 1.0
    n_coarse: int = 32
    n_correct: int = 4
    n_fine: int = 14
    t_pulse: float = 1.0

    def __post_init__(self):
        for name in ("n_coarse", "n_correct", "n_fine"):
            _check_int(f"RowProgramConfig.{name}", getattr(self, name), 0)
        for name in ("factor", "eps", "step_scale", "t_pulse"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"RowProgramConfig.{name} must be a real number, got {v!r}")
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"RowProgramConfig.{name} must be finite and > 0, got {v!r}")
        v = self.msp_share
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"RowProgramConfig.msp_share must be a real number, got {v!r}")
        if not (0.0 < v <= 1.0):
            raise ValueError(f"RowProgramConfig.msp_share must be in (0, 1], got {v!r}")


class RowProgramResult(NamedTuple):
    """Outcome of :func:`row_program` for targets W* of shape [rows, cols].

    Attributes:
        w: programmed weights F·(G⁺ − G⁻) + (g⁺ − g⁻), µS-equivalent, [rows, cols].
        g: the four conductance arrays (G⁺_MSP, G⁻_MSP, g⁺_LSP, g⁻_LSP), µS, each [rows, cols].
        pulses: int32 SET pulses per weight (all phases; the initial RESET is not counted).
        row_time: programming time per row = max pulses over the row's weights × t_pulse, [rows].
        failed: bool, ``|w − W*| > ε``, [rows, cols].
        pfail: fraction of failed weights (float32 scalar).
    """
    w: Array
    g: Tuple[Array, Array, Array, Array]
    pulses: Array
    row_time: Array
    failed: Array
    pfail: Array


def weight_scale(w: Array, *, w_max_uS: float = 20.0) -> Array:
    """κ (µS-equivalent per weight unit) mapping max|w| to ``w_max_uS``: targets W* = κ·w.

    With the D4 defaults a device settles around −b/a ≈ 10.6 µS under repeated SETs, so a pair
    reaches about ±10 µS comfortably: with F = 2, ``w_max_uS = 20`` asks the MSP pair for at most
    θ·20/2 = 8 µS (θ = 0.8) and leaves the rest to the LSP pair.
    """
    _check_real("w_max_uS", w_max_uS, minimum=0.0, strict_min=True)
    m = jnp.max(jnp.abs(jnp.asarray(w)))
    return w_max_uS / jnp.where(m > 0, m, 1.0)


def _weight(g, factor):
    return factor * (g[0] - g[1]) + (g[2] - g[3])


_DONE = 3  # phase codes: 0 MSP coarse, 1 MSP correction, 2 LSP fine, 3 done


@jax.jit
def _row_program(key, device, w_target, var, num):
    """One ``lax.while_loop`` over pulse slots; each weight runs its own phase machine.

    ``num`` holds the numeric options of :class:`RowProgramConfig` as arrays (traced: one
    compilation serves every configuration of a sweep).
    """
    F, theta, eps, step_scale, t_pulse, budgets = num
    k_init, k_pulse = jax.random.split(key)
    shape = w_target.shape
    # One normal draw for the device variation (as draw_devices) and the RESET (as reset).
    z = jax.random.normal(k_init, (3, 4) + shape, w_target.dtype)
    if var is None:
        var = dev_mod.variation_from_normals(device, z[:2])
    g0 = dev_mod.reset_from_normals(device, z[2])
    pos = w_target >= 0                                    # W* = 0 counts as positive
    sgn = jnp.where(pos, 1.0, -1.0).astype(w_target.dtype)
    mag = jnp.abs(w_target)
    dev_idx = jnp.arange(4).reshape((4,) + (1,) * len(shape))

    def wants(g):
        """Per phase: does the weight still need a pulse of that phase (budget aside)?"""
        w = _weight(g, F)
        coarse = sgn * F * (g[0] - g[1]) < theta * mag - eps   # MSP below its share θ|W*| (± ε)
        correct = sgn * (w - w_target) > eps                   # overshoot beyond W* ± ε
        fine = jnp.abs(w - w_target) > eps                     # not yet within ε
        return coarse, correct, fine, w

    def advance(g, phase, counts):
        """Move each weight past the phases it no longer needs or has no budget left for."""
        need = wants(g)[:3]
        for p in range(3):
            go_on = need[p] & (counts[p] < budgets[p])
            phase = jnp.where((phase == p) & ~go_on, p + 1, phase)
        return phase

    def cond(carry):
        _, _, phase, _ = carry
        return jnp.any(phase < _DONE)

    def body(carry):
        i, g, phase, counts = carry
        w = _weight(g, F)
        target = jnp.where(phase == 0, jnp.where(pos, 0, 1),          # MSP of the weight's sign
                 jnp.where(phase == 1, jnp.where(pos, 1, 0),          # opposite MSP
                           jnp.where(w < w_target, 2, 3)))            # LSP by the error's sign
        active = phase < _DONE
        g = dev_mod.set_pulse(jax.random.fold_in(k_pulse, i), device, var, g,
                      (dev_idx == target[None]) & active[None], step_scale=step_scale)
        counts = counts + ((jnp.arange(3).reshape((3,) + (1,) * len(shape)) == phase[None])
                           & active[None]).astype(jnp.int32)
        return i + 1, g, advance(g, phase, counts), counts

    counts0 = jnp.zeros((3,) + shape, jnp.int32)
    phase0 = advance(g0, jnp.zeros(shape, jnp.int32), counts0)
    _, g, _, counts = jax.lax.while_loop(cond, body, (jnp.int32(0), g0, phase0, counts0))
    w = _weight(g, F)
    failed = jnp.abs(w - w_target) > eps
    pulses = jnp.sum(counts, axis=0)
    row_time = jnp.max(pulses, axis=-1).astype(w_target.dtype) * t_pulse
    return RowProgramResult(w=w, g=(g[0], g[1], g[2], g[3]), pulses=pulses, row_time=row_time,
                            failed=failed, pfail=jnp.mean(failed.astype(jnp.float32)))


def _config_numbers(config: RowProgramConfig, dtype):
    f = lambda v: jnp.asarray(v, dtype)
    return (f(config.factor), f(config.msp_share), f(config.eps), f(config.step_scale),
            f(config.t_pulse),
            jnp.asarray([config.n_coarse, config.n_correct, config.n_fine], jnp.int32))


def row_program(key: Array, device: dev_mod.PulsePCM, w_target: Array,
                *, config: RowProgramConfig = RowProgramConfig(),
                variation: Optional[dev_mod.DeviceVariation] = None) -> RowProgramResult:
    """Row-parallel pulse programming of F-weighted MSP/LSP pairs with D4 pulses.

    Each weight is stored on four devices, ``W = F·(G⁺ − G⁻) + (g⁺ − g⁻)`` in µS-equivalent
    (targets W* are given in those units, e.g. ``W* = weight_scale(w)·w``). All weights of a row
    are programmed at once, each weight through the phases *(our reconstruction of Mackin et al.;
    DESIGN.md §6)*:

    1. RESET all four devices (not counted as a pulse);
    2. MSP coarse: SET the MSP device of sign(W*) (W* = 0 counts as positive) while
       ``sign(W*)·F·(G⁺ − G⁻) < θ·|W*| − ε``, up to ``n_coarse`` pulses;
    3. MSP correction: while the weight overshoots, ``sign(W*)·(W − W*) > ε``, SET the opposite
       MSP device, up to ``n_correct`` pulses;
    4. LSP fine: while ``|W − W*| > ε``, SET g⁺ if W < W* else g⁻ (a weight may alternate), up
       to ``n_fine`` pulses.

    A weight fails if ``|W − W*| > ε`` at the end; Pfail = failed/total. Pulses are counted per
    weight; since the weights of a row are independent, the row is done when its slowest weight
    is, so its time is ``max`` over the row of pulses × ``t_pulse`` (each weight moves through
    its phases on its own: one pulse slot may SET different devices of different weights). Rows
    are simulated in parallel (on the chip they are programmed one after another: total time =
    Σ row_time). The whole scheme is one ``lax.while_loop`` over pulse slots with a per-weight
    phase code and per-phase pulse counters (masks, no Python loops); it is jittable and
    vmappable over keys (chips). A weight's pulse sequence does not depend on the budgets of
    later phases, so with a fixed key the failed set can only shrink as ``n_fine`` grows.

    Args:
        key: PRNG key (RESET, the three phases and, if ``variation`` is None, the devices).
        device: :class:`nvjax.devices.PulsePCM`.
        w_target: W*, µS-equivalent, [rows, cols].
        config: :class:`RowProgramConfig` (its numbers are traced: no recompilation per config).
        variation: per-device :class:`nvjax.devices.DeviceVariation` of shape [4, rows, cols]
            (device order G⁺, G⁻, g⁺, g⁻), or None to draw it from ``key``.

    Returns:
        :class:`RowProgramResult`.

    References:
        C. Mackin et al., "Weight programming in DNN analog hardware accelerators in the presence
        of NVM variability", Adv. Electron. Mater. (2019); pulse model: Nandakumar et al.,
        J. Appl. Phys. 124, 152135 (2018).

    Example:
        >>> dev = devices.pulse_pcm()
        >>> w = jax.random.normal(jax.random.key(1), (8, 32))
        >>> res = row_program(jax.random.key(0), dev, w * weight_scale(w))
        >>> res.row_time.shape
        (8,)
    """
    dev_mod.check_pulse_device(device)
    if not isinstance(config, RowProgramConfig):
        raise TypeError(f"config must be a RowProgramConfig, got {type(config).__name__}")
    w_target = _check_float_array("w_target", w_target, ndim=2)
    if variation is not None:
        if not isinstance(variation, dev_mod.DeviceVariation):
            raise TypeError(f"variation must be a DeviceVariation, got {type(variation).__name__}")
        for name, a in zip(("gain", "g_ceiling"), variation):
            try:
                np.broadcast_shapes(np.shape(a), (4,) + w_target.shape)
            except ValueError:
                raise ValueError(f"variation.{name} of shape {np.shape(a)} does not broadcast to "
                                 f"[4, rows, cols] = {(4,) + w_target.shape}") from None
    return _row_program(key, device, w_target, variation,
                        _config_numbers(config, w_target.dtype))


class ParetoSweep(NamedTuple):
    """Pfail and speed of each configuration of :func:`pareto_sweep` (numpy arrays [K]).

    Attributes:
        pfail: fraction of failed weights.
        mean_row_time: mean over rows of the row time (pulses × t_pulse).
        max_row_time: slowest row.
        mean_pulses: mean SET pulses per weight.
    """
    pfail: np.ndarray
    mean_row_time: np.ndarray
    max_row_time: np.ndarray
    mean_pulses: np.ndarray


def pareto_sweep(key: Array, device: dev_mod.PulsePCM, w_target: Array,
                 configs: Sequence[RowProgramConfig], *,
                 variation: Optional[dev_mod.DeviceVariation] = None) -> ParetoSweep:
    """Run :func:`row_program` for each configuration with the same key (common random numbers).

    A Python loop over configurations (not a hot path; each configuration compiles once).

    Args:
        key: PRNG key, shared by every configuration (same devices, same pulse noise stream).
        device: :class:`nvjax.devices.PulsePCM`.
        w_target: W*, µS-equivalent, [rows, cols].
        configs: non-empty sequence of :class:`RowProgramConfig`.
        variation: optional fixed :class:`nvjax.devices.DeviceVariation` (else drawn from ``key``).

    Returns:
        :class:`ParetoSweep`; pass it to :func:`pareto_front`.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("configs must be a non-empty sequence of RowProgramConfig")
    for i, c in enumerate(configs):
        if not isinstance(c, RowProgramConfig):
            raise TypeError(f"configs[{i}] must be a RowProgramConfig, got {type(c).__name__}")
    out = {f: [] for f in ParetoSweep._fields}
    for c in configs:
        r = row_program(key, device, w_target, config=c, variation=variation)
        out["pfail"].append(float(r.pfail))
        out["mean_row_time"].append(float(jnp.mean(r.row_time)))
        out["max_row_time"].append(float(jnp.max(r.row_time)))
        out["mean_pulses"].append(float(jnp.mean(r.pulses)))
    return ParetoSweep(**{k: np.asarray(v) for k, v in out.items()})


def pareto_front(points, *, return_index: bool = False):
    """Non-dominated (Pfail, time) points, both to be minimized, sorted by increasing time.

    A point is dominated if another is no worse in both coordinates and better in one. Exact
    duplicates are reported once (the first occurrence).

    Args:
        points: array [K, 2] of (pfail, time), or a :class:`ParetoSweep` (its pfail and
            mean_row_time are used).
        return_index: also return the indices of the front points into ``points``.

    Returns:
        Array [M, 2] of the front (and the int indices [M] if ``return_index``).
    """
    if isinstance(points, ParetoSweep):
        pts = np.stack([points.pfail, points.mean_row_time], axis=1)
    else:
        pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points must be a non-empty array [K, 2] of (pfail, time), got shape "
                         f"{pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points must be finite")
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts <= p, axis=1) & np.any(pts < p, axis=1))
        duplicate = any(np.array_equal(pts[j], p) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    idx = np.asarray(sorted(keep, key=lambda i: (pts[i, 1], pts[i, 0])), dtype=np.int64)
    front = pts[idx]
    return (front, idx) if return_index else front
