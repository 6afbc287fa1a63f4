"""Post-programming correction (DESIGN.md §7.2; Han et al., Sci. China Inf. Sci.).

:func:`reprogram` reads every cell back and re-programs those outside a tolerance (rounds of
read-verify); :func:`calibrate` fits a per-column digital gain and offset of every layer on
calibration inputs (:func:`fit_gain_offset`, least squares against the ideal layer output on
the same inputs); IR-drop pre-distortion is ``TileConfig(ir_predistort=n)``
(:func:`nvjax.crossbar.predistort_ir`). :func:`correct` chains them. :func:`recovered_fraction`
is the metric R = (acc_mitigated − acc_nonideal)/(acc_ideal − acc_nonideal).

This module imports ``devices``, ``encoding``, ``crossbar``, ``layers`` and ``chip``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from . import chip as chip_mod
from . import crossbar as xb
from . import devices as dev_mod
from . import encoding
from . import layers

__all__ = ["reprogram", "fit_gain_offset", "calibrate", "correct", "recovered_fraction"]

Array = jax.Array


def _layer_matrix(params, name: str):
    """A layer's kernel as its crossbar matrix [n_in, n_out] (logical order)."""
    return layers.kernel_matrix(flatten_dict(params)[tuple(name.split("/")) + ("kernel",)])


def _perms(chip: chip_mod.Chip, name: str):
    """The layer's (row_perm, col_perm), or None (identity placement)."""
    return chip.placement.get(name) if chip.placement is not None else None


def _to_physical(chip: chip_mod.Chip, name: str, w):
    """A logical matrix [n_in, n_out] of layer ``name`` in the chip's physical layout [P, Q]
    (zeros on empty rows/columns); unchanged without a placement."""
    perms = _perms(chip, name)
    return w if perms is None else layers.to_physical(w, *perms)


def _occupied(chip: chip_mod.Chip, name: str):
    """Boolean [P, Q], True on the cells holding a weight; None when every cell does."""
    perms = _perms(chip, name)
    n_in, n_out = _layer_matrix(chip.params, name).shape
    if perms is None or (perms[0].shape[0], perms[1].shape[0]) == (n_in, n_out):
        return None
    return layers.to_physical(jnp.ones((n_in, n_out), bool), *perms)


def _layer_targets(chip: chip_mod.Chip, name: str):
    """Target conductances (G⁺, G⁻) of a deployed layer in its physical layout [P, Q] (empty
    cells of a placement with spares: 0 µS, as :func:`nvjax.chip.deploy` leaves them), and κ."""
    w = _to_physical(chip, name, _layer_matrix(chip.params, name))
    gp, gm, kappa = xb.tile(w, chip.device, config=chip.config)
    keep = _occupied(chip, name)
    if keep is not None:
        gp, gm = jnp.where(keep, gp, 0.0), jnp.where(keep, gm, 0.0)
    return gp, gm, kappa


def _target_weights(chip: chip_mod.Chip, name: str):
    """The weights (physical layout) that the layer's target conductances encode before any IR
    pre-distortion: W itself, or for per-level cells the level-quantized (G⁺_T − G⁻_T)/κ."""
    dev = chip.device
    plain = chip.replace(config=dataclasses.replace(chip.config, ir_predistort=0))
    tp, tm, kappa = _layer_targets(plain, name)   # not pre-distorted: the intended weights
    if not isinstance(dev, dev_mod.Levels):
        return (tp - tm) / kappa
    g_min, g_max = dev_mod.g_range(dev)
    tp, tm = (encoding.quantize_levels(t, g_min, g_max, dev.num_levels) for t in (tp, tm))
    w = (tp - tm) / kappa
    keep = _occupied(plain, name)
    return w if keep is None else jnp.where(keep, w, 0.0)


def _reprogram_side(key, device, state: dev_mod.CellState, g_target, *, tol, max_rounds,
                    t_verify, read_noise, keep=None):
    """Rounds of read-verify: re-program (new draw) every non-stuck cell read outside tol (only
    cells where ``keep`` is True when given: empty cells of a placement are left alone)."""
    free = device.replace(faults=None) if device.faults is not None else device
    g_min, g_max = dev_mod.g_range(device)
    band = tol * (g_max - g_min)
    if isinstance(device, dev_mod.Levels):   # the cell is written to the nearest level
        g_target = encoding.quantize_levels(g_target, g_min, g_max, device.num_levels)
    movable = jnp.ones(g_target.shape, bool) if state.stuck is None else state.stuck == 0
    if keep is not None:
        movable = movable & keep

    def body(r, carry):
        st, pulses = carry
        k_read, k_prog = jax.random.split(jax.random.fold_in(key, r))
        g_rb = dev_mod.read(k_read, device, st, t_verify) if read_noise else st.g
        bad = (jnp.abs(g_rb - g_target) > band) & movable
        new = dev_mod.program(k_prog, free, g_target)
        pick = lambda a, b: None if a is None else jnp.where(bad, b, a)  # noqa: E731
        st = st._replace(g=jnp.where(bad, new.g, st.g), nu=pick(st.nu, new.nu),
                         relax=pick(st.relax, new.relax))
        return st, pulses + jnp.sum(bad, dtype=jnp.int32)
    return jax.lax.fori_loop(0, max_rounds, body, (state, jnp.zeros((), jnp.int32)))


def reprogram(key, chip: chip_mod.Chip, *, tol: float, max_rounds: int = 10,
              t_verify: float = 0.0):
    """Read every cell back and re-program those outside tolerance, for ``max_rounds`` rounds.

    Round r reads all cells at ``t_verify`` s after programming (drift and read noise of the
    device; the programmed value when the chip's config has ``read_noise=False``); a movable cell
    whose read-back differs from its target (for per-level cells: the target's level) by more
    than ``tol·(g_max − g_min)`` gets a fresh
    programming draw (its drift exponent / relaxation too). Stuck cells are left alone. The
    drift-compensation reference is recomputed. Empty cells of a placement with spare rows or
    columns (zero conductance, see :func:`nvjax.chip.deploy`) are not re-programmed.

    Args:
        key: PRNG key; layer k uses ``fold_in(key, k)``, its G⁻ side ``fold_in(·, 1)``.
        chip: from :func:`nvjax.chip.deploy`.
        tol: tolerance, fraction of the conductance range (> 0).
        max_rounds: read-verify rounds (≥ 1).
        t_verify: time of the verify read after programming, s.

    Returns:
        ``(chip, pulses)``: the corrected chip and a dict layer name → extra programming pulses.
    """
    if not tol > 0:
        raise ValueError(f"reprogram: tol must be > 0 (fraction of the conductance range), got {tol}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"reprogram: max_rounds must be an int >= 1, got {max_rounds!r}")
    tiles, pulses = dict(chip.tiles), {}
    for i, name in enumerate(chip.tiles):
        tl = tiles[name]
        tp, tm, _ = _layer_targets(chip, name)
        k = jax.random.fold_in(key, i)
        kw = dict(tol=tol, max_rounds=max_rounds, t_verify=t_verify,
                  read_noise=chip.config.read_noise, keep=_occupied(chip, name))
        pos, n_p = _reprogram_side(jax.random.fold_in(k, 0), chip.device, tl.pos, tp, **kw)
        neg, n_m = _reprogram_side(jax.random.fold_in(k, 1), chip.device, tl.neg, tm, **kw)
        tiles[name] = tl.replace(pos=pos, neg=neg, ref0=xb.reference_sum(pos.g - neg.g, tl.kappa,
                                                                      device=chip.device))
        pulses[name] = n_p + n_m
    return chip.replace(tiles=tiles), pulses


#: Below this correlation between measured and ideal outputs a column is not rescaled.
_MIN_CORRELATION = 0.1


def fit_gain_offset(y_hw, y_ref):
    """Per-column gain and offset with ``y_ref ≈ gain·y_hw + offset``, by inverse regression.

    The measured outputs are modelled as ``y_hw = g·y_ref + o + noise`` (read noise, ADC
    quantization, output noise): ``g, o`` are fitted by least squares of ``y_hw`` on the exact
    ``y_ref`` (unbiased, the noise is in ``y_hw`` only) and inverted, ``gain = 1/g``,
    ``offset = mean(y_ref) − gain·mean(y_hw)``. Regressing ``y_ref`` on the noisy ``y_hw``
    instead would shrink the gain by ``var(g·y_ref)/(var(g·y_ref) + var(noise))``
    (errors-in-variables attenuation): with a 4-bit ADC it pulled every column toward its mean
    and cost accuracy. Both agree on noise-free data.

    Args:
        y_hw: measured outputs [N, C]; y_ref: ideal outputs [N, C].

    Returns:
        ``(gain [C], offset [C])``; a column whose measured outputs barely follow ``y_ref``
        (correlation ≤ 0.1, or ``y_ref`` constant: inverting its ``g`` would amplify noise)
        gets gain 1 and the mean difference as offset.
    """
    y_hw, y_ref = jnp.asarray(y_hw), jnp.asarray(y_ref)
    if y_hw.ndim != 2 or y_hw.shape != y_ref.shape:
        raise ValueError(f"fit_gain_offset: expected two arrays [N, C] of the same shape, got "
                         f"{tuple(y_hw.shape)} and {tuple(y_ref.shape)}")
    mh, mr = jnp.mean(y_hw, 0), jnp.mean(y_ref, 0)
    dh, dr = y_hw - mh, y_ref - mr
    var_ref = jnp.sum(dr * dr, 0)
    cov = jnp.sum(dh * dr, 0)
    scale = jnp.maximum(jnp.sqrt(var_ref * jnp.sum(dh * dh, 0)), 1e-30)
    ok = cov > _MIN_CORRELATION * scale        # the column follows y_ref: invert its g
    gain = jnp.where(ok, var_ref / jnp.where(ok, cov, 1.0), 1.0)     # 1/g
    return gain, mr - gain * mh


def calibrate(key, chip: chip_mod.Chip, x, t, *, reference_params=None) -> chip_mod.Chip:
    """Fit a per-column digital gain/offset of every layer on calibration inputs ``x``.

    Layers are calibrated in order: for layer k the model runs on the chip (read at ``t``, key
    ``key``, with the corrections of layers < k already applied), the layer's crossbar inputs
    X are recorded, its crossbar outputs on X are taken with the same read key as
    :func:`nvjax.chip.apply` uses, and ``gain, offset`` are fitted so that
    gain·y_hw + offset ≈ X @ W_ideal (per column, :func:`fit_gain_offset`: the measured outputs
    regressed on the ideal ones and inverted, so read and ADC noise do not shrink the gain).
    A layer called several times per forward pass (recurrent) is fitted on all its calls' inputs
    with one read.

    Args:
        key: PRNG key of the calibration reads.
        chip: from :func:`nvjax.chip.deploy`.
        x: calibration model inputs [N, ...].
        t: read time since programming, s.
        reference_params: the ideal weights to calibrate toward. Default: the weights the
            chip's target conductances encode — the chip's parameters, level-quantized for
            per-level cells — so the calibration corrects deviations from the intended
            programming (noise, stuck cells, IR drop, drift, ADC) and not a quantization the
            model was trained for.

    Returns:
        The chip with ``gain`` and ``offset`` set for every layer.
    """
    ref = None if reference_params is None else layers.strip_params(reference_params)
    names = list(chip.tiles)
    gain, offset = {}, {}
    cur = chip.replace(gain=None, offset=None)
    for i, name in enumerate(names):
        inputs = chip_mod.apply_traced(key, cur, x, t).inputs
        rows = inputs[name]                                  # [N, P], physical row order
        y_hw, _ = xb.mvm(jax.random.fold_in(key, i), chip.device, chip.tiles[name], rows, t,
                         config=chip.config)
        if ref is None:   # the weights the targets encode, physical layout
            y_ref = rows @ _target_weights(chip, name)
        else:
            y_ref = rows @ _to_physical(chip, name, _layer_matrix(ref, name))
        perms = _perms(chip, name)
        if perms is not None:                                # [N, Q] → logical columns
            cols = perms[1][:_layer_matrix(chip.params, name).shape[1]]
            y_hw, y_ref = y_hw[:, cols], y_ref[:, cols]
        a, b = fit_gain_offset(y_hw, y_ref)
        gain[name], offset[name] = a, b
        cur = cur.replace(gain=dict(gain), offset=dict(offset))
    return cur


def correct(key, chip: chip_mod.Chip, x_cal, t, *, tol: Optional[float] = 0.05,
            max_rounds: int = 5, t_verify: float = 0.0, calibration: bool = True):
    """The post-programming correction pipeline: :func:`reprogram` (when ``tol`` is not None)
    then :func:`calibrate` on ``x_cal`` at read time ``t`` (when ``calibration``). IR-drop
    pre-distortion happens at programming (``TileConfig.ir_predistort``).

    Returns:
        ``(chip, pulses)`` (``pulses`` = {} when no re-programming).
    """
    k_rp, k_cal = jax.random.split(key)
    pulses = {}
    if tol is not None:
        chip, pulses = reprogram(k_rp, chip, tol=tol, max_rounds=max_rounds, t_verify=t_verify)
    if calibration:
        chip = calibrate(k_cal, chip, x_cal, t)
    return chip, pulses


def recovered_fraction(acc_ideal, acc_nonideal, acc_mitigated):
    """R = (acc_mitigated − acc_nonideal)/(acc_ideal − acc_nonideal) (DESIGN.md §7.2); NaN when
    the non-ideality costs nothing (acc_ideal == acc_nonideal)."""
    a_i, a_n, a_m = (np.asarray(v, np.float64) for v in (acc_ideal, acc_nonideal, acc_mitigated))
    gap = a_i - a_n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (a_m - a_n) / np.where(gap != 0, gap, 1.0), np.nan)
