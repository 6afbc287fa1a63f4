"""Crossbar tiles: a weight matrix on differential-pair conductance tiles and its analog MVM.

Layout: a layer's weight ``W [n_in, n_out]`` (Flax kernel layout, ``y = x @ W``) sits on a grid
of R × C tiles, rows (word lines) driven by the inputs, columns (bit lines) summing currents into
outputs; row i of the weight is row i % R of row tile i // R. Column tiles need no special
treatment (every column has its own ADC); row tiles produce partial sums that are digitized
separately and added digitally.

One MVM (DESIGN.md §5): DAC quantization of the inputs → cell read (drift and read noise of the
device at time ``t``; one read-noise draw per MVM call) → per-tile column sums → output noise and
ADC quantization per tile → digital sum of the partial sums over row tiles → global drift
compensation (one digital scale per layer). Each MVM also counts, per row, the inputs for which
that row was driven (non-zero input) — the activation that drives read disturb.

Normalized units (as in aihwkit's periphery): a layer's input scale ``s_x`` is max|x| of each
input vector (``dac_range='absmax'``) or ``dac_bound``; its weight scale is ``w_max`` =
(g_max − g_min)/κ, the weight of a full-scale pair. ADC bounds and output noise are given in units
of ``s_x·w_max``.

This module imports ``devices``, ``encoding``, ``irdrop``, ``layers`` (``window_slices``),
``_checks``, ``_ops`` and ``_struct``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import devices as dev_mod
from . import encoding
from . import irdrop
from ._checks import UserError, check_real, check_time, is_concrete
from ._ops import round_ste
from ._struct import register_physics
from .layers import window_slices

__all__ = ["TileConfig", "PHYSICS_FIELDS", "Tiles", "tile", "program_tiles", "mvm", "conv_mvm",
           "conv_supported", "read_weights",
           "num_row_tiles", "quantize_symmetric", "cell_voltages", "input_scale",
           "predistort_ir", "reference_sum", "tile_grid", "untile_grid", "ir_transfer_tiles",
           "ir_transfer", "bound_management_passes", "BM_MAX_FACTOR", "BM_MAX_RES",
           "CONV_BLOCK_OUTPUTS"]

Array = jax.Array


#: TileConfig fields that are physics numbers: pytree leaves (traced under ``jit``, sweepable with
#: ``vmap``, differentiable). Every other field is static structure (part of the treedef).
PHYSICS_FIELDS = ("dac_bound", "adc_bound", "adc_percentile", "out_noise", "v_read", "r_wire",
                  "ir_omega")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Options of a crossbar tile and its periphery: a pytree of physics numbers with static
    structure.

    The physics numbers (:data:`PHYSICS_FIELDS`: ``v_read``, ``r_wire``, ``out_noise``,
    ``adc_bound``, ``dac_bound``, ``adc_percentile``, ``ir_omega``) are the pytree's leaves: passed
    as an argument of a jitted function they are traced, so a sweep over their values compiles
    once, and ``jax.vmap``/``jax.grad`` work over them (``config.replace(r_wire=r)`` inside the
    function, or a stacked config). Everything else (tile shape, bit widths, modes, iteration
    counts) is static structure: a new value means a new compilation. Whether output noise is
    simulated at all is structure too (:attr:`output_noise`: ``out_noise`` given as the literal
    0 switches it off; any other value, traced values included, switches it on).

    Attributes:
        rows, cols: tile size R × C (default 256 × 256).
        dac_bits: input DAC bits (signed, 2^(b−1) − 1 steps per polarity); None = ideal.
        dac_range: 'absmax' (per input vector, aihwkit's noise management) or 'fixed'.
        dac_bound: fixed input range when dac_range='fixed' (input units).
        adc_bits: output ADC bits per tile column; None = ideal.
        adc_range: 'fixed' (``adc_bound`` in normalized units), 'max' (per column, max |y| over
            the calibration inputs, or over the current batch if none were given) or
            'percentile' (per column, ``adc_percentile`` of |y|, likewise).
        adc_bound: ADC range for 'fixed', in units of s_x·w_max (aihwkit default 12).
        adc_percentile: percentile (0–100] for 'percentile' calibration.
        out_noise: σ of additive Gaussian output noise per tile column, units of s_x·w_max.
        read_noise: apply the device's read noise / drift on every MVM (False reads programmed g).
        drift_compensation: global drift compensation α = Σ|y_ref(0)|/Σ|y_ref(t)|; x_ref is
            ones or the one-hot vectors, as the device's ``drift_reference`` says
            (:func:`reference_sum`).
        per_column_scale: κ per column instead of per layer.
        v_read: read voltage, V (word-line drive = x·v_read).
        ir_drop: 'none' (cell voltage = x·v_read), 'first_order' or 'solver' (per-cell voltages
            from :mod:`nvjax.irdrop`, per tile and input vector; the column currents of the
            G⁺ and G⁻ tiles are subtracted and scaled back to weight units). 'first_order' is a
            model of the IR drop only for a small coupling (about 1 % error of the cell voltages
            at ρ ≈ 0.1, :func:`nvjax.irdrop.first_order_error`; at 256 × 256 and 1 Ω it is off
            by tens of percent); 'solver' converges or says so: a solve that fails raises when
            called eagerly and gives NaN outputs under ``jit``.
        r_wire: wire resistance per segment, Ω (default 1 Ω).
        ir_max_iter: iteration cap of the IR-drop solver (static); it needs about
            √(1 + ρ̄)·8 iterations, ρ̄ = :func:`nvjax.irdrop.coupling` (≈ 40 at 512 × 512, 5 Ω,
            25 µS).
        ir_omega: initial relaxation factor of the IR-drop solver, (0, 1]: it scales the
            solver's automatic (Chebyshev) step sizes and backs off by 0.98 on a growing
            residual; 1 is optimal.
        ir_predistort: fixed-point iterations of IR-drop pre-distortion of the target
            conductances (:func:`predistort_ir`, applied by :func:`tile` when ``ir_drop`` is not
            'none'); 0 = off.
        bound_management: 'none' (an output beyond the ADC's range is clipped) or 'iterative'
            (aihwkit's default, ``BoundManagementType.ITERATIVE``): an input vector whose output
            saturates a tile's ADC (any column of the row × column tile, either sign) is read
            again on that tile with the DAC's full scale doubled (inputs halved, so output
            noise and ADC step double in input units), with fresh output noise, until no output
            saturates or the pass limit (:func:`bound_management_passes`: the scale factor
            exceeds 1000 or 0.25 × the DAC's steps per polarity, aihwkit's ``max_bm_factor``
            and ``max_bm_res``; 5 passes with a 7-bit DAC). Needs ``adc_range='fixed'``. Each
            pass reads every vector (the slowest vector sets the cost). Not
            reverse-differentiable (``lax.while_loop``; :func:`nvjax.training.train` refuses
            it), unlike aihwkit's torch tile, whose gradient flows through the last read.

    Example:
        >>> cfg = TileConfig(rows=64, cols=64, ir_drop="first_order")
        >>> leaves, treedef = jax.tree_util.tree_flatten(cfg)
        >>> len(leaves) == len(PHYSICS_FIELDS)
        True
        >>> jax.jit(lambda c: c.r_wire * 2)(cfg.replace(r_wire=2.5))   # traced, no recompile
        Array(5., dtype=float32, weak_type=True)
    """
    rows: int = 256
    cols: int = 256
    dac_bits: Optional[int] = None
    dac_range: Literal["absmax", "fixed"] = "absmax"
    dac_bound: float = 1.0
    adc_bits: Optional[int] = None
    adc_range: Literal["fixed", "max", "percentile"] = "fixed"
    adc_bound: float = 12.0
    adc_percentile: float = 99.9
    out_noise: float = 0.0
    read_noise: bool = True
    drift_compensation: bool = True
    per_column_scale: bool = False
    v_read: float = 0.2
    ir_drop: Literal["none", "first_order", "solver"] = "none"
    r_wire: float = 1.0
    ir_max_iter: int = 200
    ir_omega: float = 1.0
    ir_predistort: int = 0
    bound_management: Literal["none", "iterative"] = "none"

    def __post_init__(self):
        if self.bound_management not in ("none", "iterative"):
            raise UserError("TileConfig.bound_management must be 'none' or 'iterative', got "
                            f"{self.bound_management!r}")
        if self.bound_management == "iterative" and (self.adc_bits is None
                                                     or self.adc_range != "fixed"):
            raise UserError("TileConfig.bound_management='iterative' needs an ADC with a fixed "
                            f"range (adc_bits set, adc_range='fixed'); got adc_bits="
                            f"{self.adc_bits!r}, adc_range={self.adc_range!r}")
        if self.ir_drop not in ("none", "first_order", "solver"):
            raise UserError("TileConfig.ir_drop must be 'none', 'first_order' or 'solver', got "
                            f"{self.ir_drop!r}")
        if isinstance(self.ir_max_iter, bool) or not isinstance(self.ir_max_iter, int) \
                or self.ir_max_iter < 1:
            raise UserError(f"TileConfig.ir_max_iter must be a positive int, got {self.ir_max_iter!r}")
        if isinstance(self.ir_predistort, bool) or not isinstance(self.ir_predistort, int) \
                or self.ir_predistort < 0:
            raise UserError(f"TileConfig.ir_predistort must be an int >= 0, got {self.ir_predistort!r}")
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"TileConfig.{name} must be a positive int, got {v!r}")
        for name in ("dac_bits", "adc_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 24):
                raise UserError(f"TileConfig.{name} must be None or an int in 2..24, got {v!r}")
        if self.dac_range not in ("absmax", "fixed"):
            raise UserError(f"TileConfig.dac_range must be 'absmax' or 'fixed', got {self.dac_range!r}")
        if self.adc_range not in ("fixed", "max", "percentile"):
            raise UserError("TileConfig.adc_range must be 'fixed', 'max' or 'percentile', got "
                            f"{self.adc_range!r}")
        for name in ("read_noise", "drift_compensation", "per_column_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TileConfig.{name} must be a bool, got {getattr(self, name)!r}")
        # physics numbers: checked where concrete (a traced value is checked by nobody)
        _check_physics("r_wire", self.r_wire, minimum=0.0)
        _check_physics("ir_omega", self.ir_omega, minimum=0.0, strict=True, maximum=1.0)
        _check_physics("adc_percentile", self.adc_percentile, minimum=0.0, strict=True,
                       maximum=100.0)
        for name in ("dac_bound", "adc_bound", "v_read"):
            _check_physics(name, getattr(self, name), minimum=0.0, strict=True)
        _check_physics("out_noise", self.out_noise, minimum=0.0)
        object.__setattr__(self, "_output_noise", not _is_literal_zero(self.out_noise))

    @property
    def output_noise(self) -> bool:
        """Static: whether output noise is simulated (``out_noise`` is not the literal 0)."""
        return self._output_noise

    @property
    def ideal_periphery(self) -> bool:
        """Static: no DAC, no ADC, no output noise."""
        return self.dac_bits is None and self.adc_bits is None and not self.output_noise

    def replace(self, **changes) -> "TileConfig":
        """A copy with ``changes`` (validated; traced physics values are accepted)."""
        return dataclasses.replace(self, **changes)


def _is_literal_zero(v) -> bool:
    if not is_concrete(v):
        return False
    try:
        return bool(np.all(np.asarray(v) == 0))
    except (TypeError, ValueError):
        return False


def _check_physics(name, v, *, minimum=None, strict=False, maximum=None):
    """A concrete physics number of :class:`TileConfig` (:func:`nvjax._checks.check_real`: a real
    number, finite, within bounds; TypeError or UserError naming ``TileConfig.<name>``)."""
    check_real(f"TileConfig.{name}", v, minimum=minimum, strict_min=strict, maximum=maximum)


register_physics(TileConfig, PHYSICS_FIELDS)


@struct.dataclass
class Tiles:
    """One layer programmed on crossbar tiles (a pytree; ``n_in``, ``n_out`` are static).

    Conductances are stored as the full logical matrix [n_in, n_out]; the split into R × C tiles
    is applied where it matters physically (partial sums per row tile before the ADC). Padding
    cells of partly filled tiles hold no weight and are not simulated.

    Attributes:
        pos, neg: :class:`nvjax.devices.CellState` of the G⁺ and G⁻ devices, arrays [n_in, n_out].
        kappa: µS per weight unit, scalar or [n_out] (per column).
        ref0: Σ|x_ref·W(t=0)| of the programmed weights (drift-compensation reference,
            :func:`reference_sum` with the device's reference inputs).
        adc_scale: calibrated ADC range per tile column [Ti, n_out] (weight units), or None.
        reads: int32 [n_in], per-row read counters (inputs for which the row was driven).
        built: static record of what the tiles were built with (device kind and the
            :class:`TileConfig` fields that shape the stored arrays, see :func:`mvm`), checked by
            :func:`mvm` and :func:`read_weights`; None (tiles made by hand): not checked.
    """
    pos: Any
    neg: Any
    kappa: Array
    ref0: Array
    adc_scale: Optional[Array]
    reads: Array
    built: Any = struct.field(pytree_node=False, default=None)

    @property
    def n_in(self) -> int:
        return self.pos.g.shape[-2]

    @property
    def n_out(self) -> int:
        return self.pos.g.shape[-1]


def num_row_tiles(n_in: int, config: TileConfig) -> int:
    """Ti, the number of row tiles a layer with ``n_in`` inputs occupies."""
    return -(-n_in // config.rows)


def tile(w: Array, device, *, config: TileConfig = TileConfig()):
    """Target conductances of a weight matrix on differential pairs: (G⁺, G⁻, κ), [n_in, n_out].

    With ``config.ir_predistort > 0`` (and IR drop on) the targets are pre-distorted against
    first-order IR drop (:func:`predistort_ir`) and κ is lowered by the largest boost needed, so
    every boosted cell stays within [g_min, g_max]. Whether the first-order form is a valid model
    of the pre-distorted tiles is checked once, on the final conductances (where concrete; a
    ``RuntimeWarning`` beyond 5 %, :func:`nvjax.irdrop.check_first_order`).
    """
    w = _check_weight("tile", w)
    g_min, g_max = dev_mod.g_range(device)
    kappa = encoding.pair_scale(w, g_min, g_max, per="column" if config.per_column_scale else "layer")
    gp, gm = encoding.to_pair(w, kappa, g_min, g_max)
    if config.ir_predistort > 0 and config.ir_drop != "none":
        # Headroom: boosted cells must stay programmable, so first find the largest boost an
        # unclipped pre-distortion needs and lower κ by it (weights are read back in units of κ,
        # so the function is unchanged), then pre-distort the rescaled targets. G⁺ and G⁻ tiles
        # are independent: both sides go through one fixed point, stacked along the row tiles.
        n, ti = config.ir_predistort, num_row_tiles(w.shape[0], config)

        def both(gp, gm):
            return jnp.concatenate([tile_grid(gp, config), tile_grid(gm, config)])
        span = g_max - g_min
        need = (jnp.max(_predistort_grid(both(gp, gm), config, g_min, None, n)) - g_min) / span
        kappa = kappa / jnp.maximum(jax.lax.stop_gradient(need), 1.0)
        gp, gm = encoding.to_pair(w, kappa, g_min, g_max)
        grid = _predistort_grid(both(gp, gm), config, g_min, g_max, n)
        irdrop.check_first_order(grid, config.r_wire, where="tile (IR pre-distortion)")
        gp, gm = untile_grid(grid[:ti], *w.shape), untile_grid(grid[ti:], *w.shape)
    return gp, gm, kappa


def predistort_ir(g_target: Array, config: TileConfig, *, g_min=0.0, g_max=None,
                  num_iter: Optional[int] = None) -> Array:
    """Pre-distort target conductances against first-order IR drop (a fixed point per tile).

    Under first-order IR drop a cell contributes M(G) = G ⊙ (1 − r·G·A − r·B·G) µS to its column
    current per volt of row drive (:func:`nvjax.irdrop.first_order_transfer`), less than its G.
    The pre-distorted targets G' solve M(G') = G_T cell by cell, by the fixed point
    G' ← clip(G_T ⊙ G'/M(G'), g_min, g_max) started at G' = G_T, tile by tile (the transfer
    depends on the whole tile). Cells whose compensated value would exceed ``g_max`` saturate
    there (their column keeps a residual error; :func:`tile` avoids this by lowering κ so the
    largest boost fits under ``g_max``). The first-order form is used for every
    ``ir_drop`` mode (it is the pre-distortion model, not the simulation); where it is not a
    valid model of the pre-distorted tiles (estimated error of the cell voltages above 5 %,
    :func:`nvjax.irdrop.first_order_error`, checked once on the returned conductances when they
    and ``r_wire`` are concrete) a ``RuntimeWarning`` gives the numbers.

    Args:
        g_target: target conductances of one side of the pairs, µS, [n_in, n_out].
        config: tile options (rows, cols, r_wire; ``num_iter`` defaults to ``ir_predistort``).
        g_min, g_max: programmable range, µS (``g_max`` None: no upper clip).
        num_iter: fixed-point iterations.

    Returns:
        Pre-distorted targets, µS, [n_in, n_out].

    References:
        Han et al., Sci. China Inf. Sci. (mapping correction with IR-drop pre-distortion);
        the fixed point on the first-order transfer is *our model*.
    """
    g_target = _check_weight("predistort_ir", g_target)
    n = config.ir_predistort if num_iter is None else num_iter
    grid = _predistort_grid(tile_grid(g_target, config), config, g_min, g_max, n)
    irdrop.check_first_order(grid, config.r_wire, where="predistort_ir")
    return untile_grid(grid, *g_target.shape)


def _predistort_grid(t, config: TileConfig, g_min, g_max, num_iter: int):
    """The fixed point of :func:`predistort_ir` on a grid of tiles [T, Tj, R, C] (unchecked)."""
    hi = jnp.inf if g_max is None else g_max

    def body(_, g):
        m = _grid_transfer(g, config)
        ratio = jnp.where(m > 0, t / jnp.where(m > 0, m, 1.0), 1.0)
        return jnp.where(t > 0, jnp.clip(g * ratio, g_min, hi), t)
    return jax.lax.fori_loop(0, num_iter, body, t)


def _check_ir_solves(fn, converged, residual, num_iter, grids, config: TileConfig):
    """Raise when an IR-drop solve did not converge (called eagerly; under ``jit`` the failed
    solves' NaN outputs carry the failure). ``converged``, ``residual`` and ``num_iter`` have one
    entry per tile solve; the message says whether the failed solves ran into the iteration cap
    (``num_iter == ir_max_iter``: raising it helps) or stopped before it because the residual
    stopped shrinking or was not finite (raising it does not)."""
    if not is_concrete(converged):
        return
    conv = np.asarray(converged)
    if conv.all():
        return
    failed = ~conv
    its = np.asarray(num_iter)[failed]
    res = np.asarray(residual, np.float64)[failed]
    capped = its >= config.ir_max_iter
    g = np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in grids])
    finite = np.isfinite(g)
    rho = max(float(np.max(np.asarray(irdrop.coupling(
        np.nan_to_num(np.asarray(t, np.float64), nan=0.0, posinf=0.0, neginf=0.0),
        config.r_wire)))) for t in grids)
    gf = g[finite] if finite.any() else np.zeros(1)

    def worst(r):
        return f"{np.max(r):.2g}" if np.isfinite(r).all() else "not finite"
    parts = []
    if capped.any():
        parts.append(
            f"{int(capped.sum())} ran into the iteration cap ir_max_iter = {config.ir_max_iter} "
            f"(relative residual up to {worst(res[capped])}); about "
            f"{8 * np.sqrt(1 + rho):.0f} iterations are needed at this coupling: raise "
            "TileConfig.ir_max_iter, or use smaller tiles or a lower r_wire")
    early = ~capped
    if early.any():
        if np.isfinite(res[early]).all():
            why = (f"the residual stopped shrinking at {worst(res[early])}, above the tolerance "
                   "(float32 rounding on a strongly coupled tile)")
            fix = "use smaller tiles or a lower r_wire"
        else:
            why = "the residual was not finite"
            fix = (f"{int((~finite).sum())} conductance(s) are NaN or infinite"
                   if not finite.all() else "use smaller tiles or a lower r_wire")
        parts.append(
            f"{int(early.sum())} stopped after {int(its[early].max())} of at most "
            f"{config.ir_max_iter} iterations because {why}: raising ir_max_iter does not help; "
            + fix)
    if (gf < 0).any():
        parts.append(f"{int((gf < 0).sum())} conductance(s) are negative (convergence is "
                     "guaranteed only for G >= 0)")
    raise UserError(
        f"{fn}: the IR-drop solver did not converge in {int(failed.sum())} of {conv.size} tile "
        f"solves ({config.rows}×{config.cols} tiles, r_wire = {float(config.r_wire):g} Ω, "
        f"conductances up to {float(np.max(gf)):.3g} µS, mean {float(np.mean(gf)):.3g} µS, "
        f"coupling ρ̄ = {rho:.3g}, tolerance 1e-4): " + "; ".join(parts))


def _check_weight(fn, w):
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{fn}: expected a 2-D weight [n_in, n_out], got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.float32)
    return w


def program_tiles(key: Array, device, w: Array, *, config: TileConfig = TileConfig(),
                  calibration: Optional[Array] = None) -> Tiles:
    """Program a weight matrix onto differential-pair tiles (one-shot programming).

    Args:
        key: PRNG key.
        device: device model from :mod:`nvjax.devices`.
        w: weights [n_in, n_out].
        config: tile options.
        calibration: optional inputs [N, n_in] used to fix per-column ADC ranges
            ('max'/'percentile'), computed with the target (noise-free) weights.

    Returns:
        :class:`Tiles`.
    """
    w = _check_weight("program_tiles", w)
    tp, tm, kappa = tile(w, device, config=config)
    pos, neg = _pair_map(lambda k, g: dev_mod.program(k, device, g), key, tp, tm)
    ref0 = reference_sum(pos.g - neg.g, kappa, device=device)
    adc_scale = None
    if calibration is not None and config.adc_range in ("max", "percentile"):
        adc_scale = _calibrate_adc(w, calibration, config)
    return Tiles(pos=pos, neg=neg, kappa=kappa, ref0=ref0, adc_scale=adc_scale,
                 reads=jnp.zeros((w.shape[0],), jnp.int32),
                 built=_build_record(device, config, adc_scale is not None))


def _static_float(v):
    """A concrete scalar as a Python float (for the static build record); None when traced."""
    if not is_concrete(v) or np.ndim(v) != 0:
        return None
    return float(v)


def _build_record(device, config: TileConfig, calibrated: bool):
    """What a layer's tiles were built with, as a hashable tuple of (name, value) pairs: the
    device kind (and PCM's drift-compensation reference, which fixes ``ref0``) and the config
    fields that shape the stored arrays — tile size, per-column κ, IR pre-distortion (whether
    applied and its iterations, with r_wire) and ADC calibration (range, percentile). None:
    unknown (traced). The ``ir_drop`` mode is not recorded: pre-distortion uses the first-order
    form whatever the mode (:func:`predistort_ir`), so 'first_order' and 'solver' store the same
    arrays; the mode only decides whether it is applied (not for 'none')."""
    predistort = config.ir_predistort > 0 and config.ir_drop != "none"
    rec = {"device": getattr(device, "name", type(device).__name__),
           "drift_reference": getattr(device, "drift_reference", None),
           "rows": config.rows, "cols": config.cols,
           "per_column_scale": config.per_column_scale,
           "ir_predistort (applied when ir_drop != 'none')":
               config.ir_predistort if predistort else 0,
           "r_wire": _static_float(config.r_wire) if predistort else None,
           "adc_range": config.adc_range if calibrated else None,
           "adc_percentile": (_static_float(config.adc_percentile)
                              if calibrated and config.adc_range == "percentile" else None)}
    return tuple(rec.items())


def _check_use(fn: str, device, tiles: Tiles, t, config: TileConfig) -> None:
    """Refuse a read of ``tiles`` with another device kind or a config that disagrees with the
    one they were built with (:func:`_build_record`), or at a non-finite or negative time."""
    dev_mod.check_device(device, f"{fn}: device")
    check_time(f"{fn}(t) (time since programming, s)", t)
    if not isinstance(tiles, Tiles):
        raise TypeError(f"{fn}: tiles must be Tiles from program_tiles, got {type(tiles).__name__}")
    if tiles.built is None:
        return
    built = dict(tiles.built)
    now = dict(_build_record(device, config, tiles.adc_scale is not None))
    if built["device"] != now["device"]:
        raise TypeError(f"{fn}: the tiles were programmed with a {built['device']} device, but the "
                        f"device passed is {now['device']}; read with the device they were "
                        "programmed with")
    diffs = [f"{k} = {built[k]!r} at programming, {now[k]!r} now" for k in built
             if k != "device" and built[k] is not None and now.get(k) is not None
             and built[k] != now[k]]
    if diffs:
        raise UserError(f"{fn}: config differs from the one the tiles were built with: "
                        f"{'; '.join(diffs)}. Pass the TileConfig given to program_tiles (read-out "
                        "options such as bits, noise, drift compensation and the IR-drop mode, "
                        "'first_order' or 'solver', may differ)")


def reference_sum(g_diff, kappa, *, device=None):
    """The drift-compensation readout Σ|y_ref| of a layer, in weight units.

    Global drift compensation scales a layer's outputs by α = Σ|y_ref(0)|/Σ|y_ref(t)| for a
    fixed reference input set x_ref, read once at programming and once at time t. The device's
    ``drift_reference`` (:class:`nvjax.devices.PCM`; 'ones' for every other device) chooses it:

    * 'ones' — one input vector of ones: Σ_j |Σ_i g_diff[i, j]|/κ_j (the column sums; positive
      and negative weights of a column cancel);
    * 'onehot' — the n_in one-hot vectors (the identity matrix, aihwkit 1.2's
      ``GlobalDriftCompensation``): Σ_ij |g_diff[i, j]|/κ_j.

    Args:
        g_diff: G⁺ − G⁻, µS, [n_in, n_out].
        kappa: µS per weight unit, scalar or [n_out].
        device: the device the layer is programmed with (None: 'ones').

    Returns:
        A scalar in weight units.

    References:
        Joshi et al., Nat. Commun. 11, 2473 (2020) (global drift compensation); aihwkit 1.2,
        ``aihwkit.inference.compensation.drift.GlobalDriftCompensation`` (one-hot readout).
    """
    if getattr(device, "drift_reference", "ones") == "onehot":
        return jnp.sum(jnp.abs(g_diff / kappa))
    return jnp.sum(jnp.abs(jnp.sum(g_diff, axis=-2) / kappa))


def _row_tile_partials(x, w, config: TileConfig):
    """Partial sums of each row tile, [B, Ti, n_out]: x[:, tile rows] @ w[tile rows].

    One batched matmul over the row tiles, the last tile's missing rows padded with zeros (which
    add nothing), not one matmul per tile stacked: XLA:CPU fused the stack (a concatenate) into
    the consumer's elementwise loop, which then ran unvectorized, and with the philox generator
    the output-noise draws fused there with it (MLP pcm-default-io chip forward, 784-row layer
    on 512-row tiles: 47 → 11 ms; threefry's bits are drawn in a loop of their own)."""
    n, rows = w.shape[0], config.rows
    n_tiles = num_row_tiles(n, config)
    if n_tiles == 1:
        return (x @ w)[:, None]
    pad = n_tiles * rows - n
    xp = jnp.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], n_tiles, rows)
    wp = jnp.pad(w, ((0, pad), (0, 0))).reshape(n_tiles, rows, w.shape[1])
    return jnp.einsum("btr,tro->bto", xp, wp)


def _calibrate_adc(w, x, config: TileConfig):
    x = jnp.asarray(x)
    part = jnp.abs(_row_tile_partials(x, w, config))
    if config.adc_range == "max":
        s = jnp.max(part, axis=0)
    else:
        s = jnp.percentile(part, config.adc_percentile, axis=0)
    return jnp.maximum(s, 1e-12)


def quantize_symmetric(x: Array, scale, bits: int) -> Array:
    """Round to 2^(bits−1) − 1 steps per polarity over [−scale, scale] (clipped).

    The rounding is straight-through for gradients (identity inside the range, zero where
    clipped), so hardware-aware training can differentiate through DAC and ADC.
    """
    n = 2 ** (bits - 1) - 1
    step = scale / n
    return round_ste(jnp.clip(x / step, -n, n)) * step


def read_weights(key: Array, device, tiles: Tiles, t, *, config: TileConfig = TileConfig()):
    """Effective weights read at time t: (W_eff [n_in, n_out], α).

    W_eff = (G⁺(t) − G⁻(t))/κ in weight units (not yet drift-compensated) and α the global drift
    compensation factor Σ|y_ref(0)|/Σ|y_ref(t)| (1 when disabled).
    """
    _check_use("read_weights", device, tiles, t, config)
    gp, gm, alpha = _read_pair(key, device, tiles, t, config)
    return (gp - gm) / tiles.kappa, alpha


def _pair_map(fn, key, pos, neg):
    """``(fn(k_pos, pos), fn(k_neg, neg))`` with ``(k_pos, k_neg) = split(key)``: the two sides
    of a differential pair, programmed or read with their own keys.

    Two separate calls on purpose. One call ``vmap``-ed over the stacked pair (same values,
    one random call site instead of two) compiled the lifetime job about 3 s faster (34.4 vs
    37.2 s in all) and the quickstart's chunks no faster (2.3 s both), but ran every sweep 2-3×
    slower: ``nvjax bench`` pcm-ideal-io 38 -> 125 instances/s (Philox; threefry 57 -> 101),
    pcm-default-io 31 -> 77 (2-core machine, 2026-12-07), from stacking and unstacking every
    state array of the pair.
    """
    k_pos, k_neg = jax.random.split(key)
    return fn(k_pos, pos), fn(k_neg, neg)


def _read_pair(key, device, tiles: Tiles, t, config: TileConfig):
    """(G⁺(t), G⁻(t), α): read conductances (µS) and the drift-compensation factor."""
    if config.read_noise:
        pos, neg, back = tiles.pos, tiles.neg, None
        if getattr(device, "pair_remap", False):
            pos, neg, back = _remap_pair(device, tiles)
        gp, gm = _pair_map(lambda k, st: dev_mod.read(k, device, st, t), key, pos, neg)
        if back is not None:
            gp, gm = gp * back, gm * back
    else:
        gp, gm = tiles.pos.g, tiles.neg.g
    if config.drift_compensation:
        ref = reference_sum(gp - gm, tiles.kappa, device=device)
        alpha = tiles.ref0 / jnp.maximum(ref, 1e-30)
    else:
        alpha = jnp.ones((), gp.dtype)
    return gp, gm, alpha


def _remap_pair(device, tiles: Tiles):
    """The programmed pairs re-mapped onto one pair per weight (``device.pair_remap``).

    The programmed weights w = (G⁺ − G⁻)/κ are mapped again with the layer's largest |w| at
    the full span: h± = clip(±c·w, 0, g_max − g_min) + g_min, c = (g_max − g_min)/max|w|, so the
    net weight sits on one device and the other is at g_min. The drift exponents stay those
    drawn at programming for each side (G⁺'s for h⁺, G⁻'s for h⁻); stuck cells enter through
    their programmed value (ν = 0) and are not re-applied. Reading h± at time t and scaling by
    κ/c gives conductances whose difference over κ is the weight w(t) = (h⁺(t) − h⁻(t))/c.

    Returns:
        (pos, neg, back): :class:`nvjax.devices.CellState` of h⁺ and h⁻, and the factor κ/c
        that maps read h± back to the layer's conductance scale.

    References:
        aihwkit 1.2, ``BaseNoiseModel.apply_drift_noise`` (the conductance converter of
        ``SinglePairConductanceConverter`` applied to the programmed weights, then
        ``apply_drift_noise_to_conductance`` on each side).
    """
    g_min, g_max = dev_mod.g_range(device)
    w = (tiles.pos.g - tiles.neg.g) / tiles.kappa
    w_max = jnp.max(jnp.abs(w))
    c = (g_max - g_min) / jnp.where(w_max > 0, w_max, 1.0)
    hp = jnp.clip(c * w, 0.0, g_max - g_min) + g_min
    hm = jnp.clip(-c * w, 0.0, g_max - g_min) + g_min
    pos = dev_mod.CellState(g=hp, nu=tiles.pos.nu, relax=tiles.pos.relax, stuck=None)
    neg = dev_mod.CellState(g=hm, nu=tiles.neg.nu, relax=tiles.neg.relax, stuck=None)
    return pos, neg, tiles.kappa / c


def tile_grid(g, config: TileConfig):
    """A conductance array [n_in, n_out] as its grid of tiles [Ti, Tj, R, C] (zero-G padding:
    cells outside the weight carry no current); :func:`untile_grid` is its inverse."""
    n_in, n_out = g.shape
    ti, tj = num_row_tiles(n_in, config), -(-n_out // config.cols)
    r, c = config.rows, config.cols
    g = jnp.pad(g, ((0, ti * r - n_in), (0, tj * c - n_out)))
    return g.reshape(ti, r, tj, c).transpose(0, 2, 1, 3)


def untile_grid(grid, n_in: int, n_out: int):
    """A grid of tiles [Ti, Tj, R, C] back to the array [n_in, n_out] (padding dropped)."""
    ti, tj, r, c = grid.shape
    return grid.transpose(0, 2, 1, 3).reshape(ti * r, tj * c)[:n_in, :n_out]


def ir_transfer_tiles(g, config: TileConfig):
    """First-order IR-drop transfer of every tile of an array, [Ti, Tj, R, C] (µS = µA/V).

    Tile (a, b) of the result is :func:`nvjax.irdrop.first_order_transfer` of tile (a, b) of
    ``g`` [n_in, n_out] at ``config.r_wire``: its column currents are ``v_rows @ M`` per tile.
    A model of the IR drop only while the coupling is small: the column currents are off by
    about 1–1.5× :func:`nvjax.irdrop.first_order_error` (1 % at ρ ≈ 0.1; tens of percent at
    256 × 256 and 1 Ω).
    """
    return _grid_transfer(tile_grid(g, config), config)


def _grid_transfer(grid, config: TileConfig):
    """:func:`nvjax.irdrop.first_order_transfer` of every tile of a grid [Ti, Tj, R, C]."""
    return jax.vmap(jax.vmap(lambda t: irdrop.first_order_transfer(t, config.r_wire)))(grid)


def ir_transfer(g, config: TileConfig):
    """First-order IR-drop transfer of a whole array, [n_in, n_out]: tile by tile (row tiles add
    digitally), so ``x @ ir_transfer(G)`` is the column-current map (µA per V of row drive)."""
    return untile_grid(ir_transfer_tiles(g, config), *g.shape)


def _tile_rows(v, config: TileConfig):
    """Row drives [B, n_in] → [B, Ti, R] (zero-padded)."""
    ti = num_row_tiles(v.shape[1], config)
    return jnp.pad(v, ((0, 0), (0, ti * config.rows - v.shape[1]))).reshape(-1, ti, config.rows)


def _tile_cell_voltages(g, v_in, config: TileConfig):
    """(per-cell voltages [R, C], converged, residual, iterations) of one tile for word-line
    drives ``v_in`` [R] (V); a failed solve has NaN voltages."""
    if config.ir_drop == "first_order":
        one = jnp.ones((), g.dtype)
        return (irdrop.voltages_first_order(g, v_in, config.r_wire), one > 0, 0 * one,
                jnp.zeros((), jnp.int32))
    res = irdrop.voltages(g, v_in, config.r_wire, omega=config.ir_omega,
                          max_iter=config.ir_max_iter)
    return res.v_cell, res.converged, res.residual, res.num_iter


def cell_voltages(g: Array, v_rows: Array, *, config: TileConfig = TileConfig()) -> Array:
    """Voltage across every cell of one conductance array, tile by tile.

    Args:
        g: conductances of one array (the G⁺ or the G⁻ side), µS, [n_in, n_out].
        v_rows: word-line drive voltages, V, [B, n_in].
        config: tile options; ``ir_drop='none'`` gives every cell of row i the drive v_rows[:, i],
            otherwise each R × C tile is solved with :mod:`nvjax.irdrop` (zero-G padding).

    Returns:
        Cell voltages, V, [B, n_in, n_out]; under ``jit``, NaN in the tiles and inputs whose
        IR-drop solve did not converge.

    Raises:
        ValueError: (:class:`nvjax._checks.UserError`, called eagerly) an IR-drop solve did not
            converge; the message names the tile size, ``r_wire`` and the conductance scale.
    """
    n_in, n_out = g.shape
    if v_rows.ndim != 2 or v_rows.shape[1] != n_in:
        raise ValueError(f"cell_voltages: expected v_rows [B, {n_in}], got shape {tuple(v_rows.shape)}")
    if config.ir_drop == "none":
        return jnp.broadcast_to(v_rows[:, :, None], (v_rows.shape[0], n_in, n_out)).astype(g.dtype)
    grid = tile_grid(g, config)                                   # [Ti, Tj, R, C]
    vt = _tile_rows(v_rows, config)                                # [B, Ti, R]
    if config.ir_drop == "first_order":  # batched closed form, one tile at a time
        one = lambda gt, v: irdrop.voltages_first_order(gt, v, config.r_wire)  # noqa: E731
        v = jax.vmap(jax.vmap(one, (0, None)), (0, 1))(grid, vt)   # [Ti, Tj, B, R, C]
        v = v.transpose(2, 0, 1, 3, 4)
    else:
        per_tile = jax.vmap(jax.vmap(lambda gt, v: _tile_cell_voltages(gt, v, config), (0, None)),
                            (0, 0))
        v, conv, res, its = jax.vmap(lambda vb: per_tile(grid, vb))(vt)  # [B, Ti, Tj, R, C],
        _check_ir_solves("cell_voltages", conv, res, its, (grid,), config)  # [B, Ti, Tj]
    b, ti, tj, r, c = v.shape
    v = v.transpose(0, 1, 3, 2, 4).reshape(b, ti * r, tj * c)
    return v[:, :n_in, :n_out]


def _ir_partials(gp, gm, kappa, x, config: TileConfig):
    """Per-row-tile partial sums [B, Ti, n_out] in weight units, with IR drop in every tile."""
    n_in, n_out = gp.shape
    ti, tj = num_row_tiles(n_in, config), -(-n_out // config.cols)
    v = _tile_rows(x, config) * config.v_read

    def column_currents(g, v_in):  # µA arriving at the sense amplifiers of one tile, [C]
        v_cell, conv, res, its = _tile_cell_voltages(g, v_in, config)
        return jnp.sum(g * v_cell, axis=0), conv, res, its
    tp, tm = tile_grid(gp, config), tile_grid(gm, config)
    if config.ir_drop == "first_order":  # linear in the drives: one transfer matrix per tile
        m = _grid_transfer(tp, config) - _grid_transfer(tm, config)     # [Ti, Tj, R, C]
        m = m.transpose(0, 2, 1, 3).reshape(ti, config.rows, tj * config.cols)[:, :, :n_out]
        cur = jnp.einsum("bti,tij->btj", v, m)
        return cur / (config.v_read * kappa)
    per_tile = jax.vmap(jax.vmap(column_currents, (0, None)), (0, 0))  # over Tj, then Ti

    def per_batch_one(v_b):  # the G⁺ and G⁻ solves' flags stacked: [2, Ti, Tj]
        cp, conv_p, res_p, its_p = per_tile(tp, v_b)
        cm, conv_m, res_m, its_m = per_tile(tm, v_b)
        return (cp - cm, jnp.stack([conv_p, conv_m]), jnp.stack([res_p, res_m]),
                jnp.stack([its_p, its_m]))
    per_batch = jax.vmap(per_batch_one)
    if v.shape[0] > config.rows:
        # The wire network is linear for fixed conductances, so the column currents are linear in
        # the drives: solve once per unit drive of each row (R solves instead of B) and multiply.
        basis = jnp.broadcast_to(jnp.eye(config.rows, dtype=v.dtype)[:, None, :],
                                 (config.rows, ti, config.rows))
        m, conv, res, its = per_batch(basis)                # [R (unit row), Ti, Tj, C] per volt
        _check_ir_solves("mvm", conv, res, its, (tp, tm), config)
        m = m.reshape(config.rows, ti, tj * config.cols)[:, :, :n_out]
        cur = jnp.einsum("bti,itj->btj", v, m)
    else:
        cur, conv, res, its = per_batch(v)                  # [B, Ti, Tj, C]
        _check_ir_solves("mvm", conv, res, its, (tp, tm), config)
        cur = cur.reshape(cur.shape[0], ti, tj * config.cols)[:, :, :n_out]
    return cur / (config.v_read * kappa)


def mvm(key: Array, device, tiles: Tiles, x: Array, t, *, config: TileConfig = TileConfig()):
    """Analog matrix-vector products ``y ≈ x @ W`` through the tiles, read at time ``t``.

    Args:
        key: PRNG key (read noise of this MVM call, output noise).
        device: device the tiles were programmed with.
        tiles: :class:`Tiles` from :func:`program_tiles`.
        x: inputs [B, n_in] (or [n_in]).
        t: time since programming, s (finite, >= 0).
        config: the :class:`TileConfig` the tiles were built with. It must agree with the one
            given to :func:`program_tiles` on what shaped the stored arrays (``rows``, ``cols``,
            ``per_column_scale``, IR pre-distortion: ``ir_predistort`` (applied when ``ir_drop``
            is not 'none', whatever the mode) and ``r_wire``, and ADC calibration:
            ``adc_range``, ``adc_percentile``), and ``device`` must be of the kind the tiles
            were programmed with; both are checked (where concrete). Read-out options (DAC/ADC
            bits and bounds, output and read noise, drift compensation, ``v_read``, the IR-drop
            simulation mode 'first_order' or 'solver') may differ.

    Returns:
        (y [B, n_out] (or [n_out]), tiles with the per-row read counters advanced). Under
        ``jit``, outputs that depend on an IR-drop solve (``ir_drop='solver'``) that did not
        converge are NaN.

    Raises:
        TypeError: ``device`` is of another kind than the tiles were programmed with.
        ValueError: (:class:`nvjax._checks.UserError`) ``config`` disagrees with the build
            config, ``t`` is not finite or negative, ``x`` has the wrong shape, or (called
            eagerly) an IR-drop solve did not converge (the message names the tile size,
            ``r_wire`` and the conductance scale).
    """
    _check_use("mvm", device, tiles, t, config)
    x = jnp.asarray(x)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != tiles.n_in:
        raise ValueError(f"mvm: expected inputs [B, {tiles.n_in}] (or [{tiles.n_in}]), got shape "
                         f"{tuple(x.shape)}")
    k_read, k_out = jax.random.split(key)
    gp, gm, alpha = _read_pair(k_read, device, tiles, t, config)
    tiles = tiles.replace(reads=tiles.reads + jnp.sum(x != 0, axis=0, dtype=jnp.int32))
    if config.ir_drop == "none":
        w_eff = (gp - gm) / tiles.kappa
        partials = lambda xq: _row_tile_partials(xq, w_eff, config)  # noqa: E731
        ideal = lambda xq: xq @ w_eff  # noqa: E731
    else:
        partials = lambda xq: _ir_partials(gp, gm, tiles.kappa, xq, config)  # noqa: E731
        ideal = None
    y = _periphery_mvm(k_out, device, tiles.kappa, tiles.adc_scale, partials, ideal, x, config)
    y = y * alpha
    return (y[0] if squeeze else y), tiles


def conv_supported(config: TileConfig, window: int, *, placed: bool = False) -> bool:
    """Whether :func:`conv_mvm` can run a conv layer's tiles read with ``config`` (otherwise
    its inputs go through :func:`mvm` as im2col patches): no IR drop and no placement. (Every
    DAC, ADC and output-noise setting is supported; ``window`` = kh·kw is kept for callers.)"""
    del window
    return not placed and config.ir_drop == "none"


#: Outputs (positions × partial-sum columns) per block of images in :func:`conv_mvm`'s per-offset
#: path: about 1 MB of float32, so that a block's slices and sums stay in cache.
CONV_BLOCK_OUTPUTS = 2 ** 18


def conv_mvm(key: Array, device, tiles: Tiles, x: Array, t, *, kernel_shape, strides, padding,
             config: TileConfig = TileConfig()):
    """A convolution through crossbar tiles, without materializing im2col patches.

    Equal to :func:`mvm` on the layer's im2col patches (the rows of
    :func:`nvjax.layers.as_rows`, channel-major) with the same key, to float rounding: the
    conductances are read once (the same draws as :func:`mvm`) and the effective matrix
    ``(G⁺ − G⁻)/κ`` is applied in one of three ways.

    * An ideal periphery after the DAC, with no DAC or a fixed DAC range: one convolution with
      the effective kernel (inputs quantized first where a DAC acts).
    * The same DACs with a per-tile ADC or output noise: one convolution with ``Ti·C_out``
      output channels, the effective kernel masked to each row tile's rows (a column block per
      tile), gives each row tile's partial sums ``[N, Ti, C_out]``; then output noise and the
      ADC as in :func:`mvm`. ``Ti`` times the FLOPs of the layer's convolution, at its speed
      (ResNet-20's 16-channel 3×3 conv, batch 256, on 2 CPU cores: 12 ms, against 61 ms for
      the per-offset matmuls below).
    * A DAC range per input vector (with or without the ADC and noise): one strided slice
      of the padded input per window offset ``o``, the rows ``c·K + o`` of every channel; the
      DAC scales each slice by its patch's max|x| (a max over channels, then over the window:
      ``reduce_window``), so every element is quantized exactly as in its patch; a matmul per
      offset with the offset's rows, masked per row tile, gives each row tile's partial sums
      ``[N, Ti, C_out]`` (tiles may split a channel's window). Output noise then has
      :func:`mvm`'s shape and order, so the draws are the same, and the ADC acts per tile as
      there. The cost is K matmuls on input-sized slices instead of one on K-times larger
      patches, which XLA:CPU builds slowly.

    The per-row read counters advance by the nonzero entries of each patch row, as with
    patches.

    Args:
        key, device, tiles, t, config: as :func:`mvm` (``config`` must pass
            :func:`conv_supported`: no IR drop).
        x: inputs [B, *spatial, C_in] (channels last).
        kernel_shape: the conv kernel's shape ``(*window, C_in, C_out)``.
        strides: one stride per spatial axis.
        padding: one ``(low, high)`` pair per spatial axis.

    Returns:
        (y [B, *out_spatial, C_out], tiles with the per-row read counters advanced).
    """
    _check_use("conv_mvm", device, tiles, t, config)
    kernel_shape = tuple(kernel_shape)
    nd = len(kernel_shape) - 2
    window = int(np.prod(kernel_shape[:nd]))
    c_in, c_out = kernel_shape[-2:]
    if not conv_supported(config, window):
        raise UserError("conv_mvm: this TileConfig needs the im2col path (mvm on patches): "
                        "IR drop is simulated on the tiles' rows")
    if tiles.n_in != c_in * window or tiles.n_out != c_out or x.ndim != nd + 2 \
            or x.shape[-1] != c_in:
        raise ValueError(f"conv_mvm: kernel {kernel_shape} and inputs {tuple(x.shape)} do not "
                         f"match tiles of {tiles.n_in} rows and {tiles.n_out} columns")
    x = jnp.asarray(x)
    strides, padding = tuple(strides), tuple(tuple(int(v) for v in p) for p in padding)
    if any(v < 0 for p in padding for v in p):   # negative padding crops: crop first
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple(
            (min(lo, 0), min(hi, 0), 0) for lo, hi in padding) + ((0, 0, 0),))
        padding = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
    spatial = "HWD"[:nd]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    k_read, k_out = jax.random.split(key)
    gp, gm, alpha = _read_pair(k_read, device, tiles, t, config)

    def slices(a):  # the padded a's strided slice per window offset: [B, *out, C] each
        return window_slices(a, kernel_shape[:nd], strides, padding)

    # read counters: patch row (c, offset) is nonzero wherever the padded input at that
    # offset of a window is, summed over the output positions
    counts = [jnp.sum(sl, axis=tuple(range(nd + 1))) for sl in slices((x != 0).astype(jnp.int32))]
    reads = jnp.stack(counts, axis=1).reshape(-1)                     # channel-major
    tiles = tiles.replace(reads=tiles.reads + reads.astype(tiles.reads.dtype))
    w_eff = (gp - gm) / tiles.kappa                                   # [C_in·window, C_out]
    per_vector = config.dac_bits is not None and config.dac_range == "absmax"
    tail = config.adc_bits is not None or config.output_noise
    n_tiles = num_row_tiles(c_in * window, config)
    cols = n_tiles * c_out if tail else c_out
    if tail:  # a column block per row tile, each masked to its tile's rows: [C_in·window, cols]
        onehot = np.eye(n_tiles, dtype=np.float32)[np.arange(c_in * window) // config.rows]
        w_eff = (w_eff[:, None, :] * onehot[:, :, None]).reshape(c_in * window, cols)

    def fixed_dac(m_):  # 'fixed': one scale for every input (× bound management's factor)
        return quantize_symmetric(x, jnp.asarray(config.dac_bound, x.dtype) * m_,
                                  config.dac_bits)

    if not per_vector:  # every element enters every patch alike: one convolution
        kern = jnp.transpose(w_eff.reshape((c_in,) + kernel_shape[:nd] + (cols,)),
                             tuple(range(1, nd + 1)) + (0, nd + 1))   # [*window, C_in, cols]

        def conv(a):
            return jax.lax.conv_general_dilated(a, kern, window_strides=strides, padding=padding,
                                                dimension_numbers=dn)

        if not tail:
            return conv(x if config.dac_bits is None else fixed_dac(1.0)) * alpha, tiles
    # the DAC's full scale per patch: max|patch|, a max over channels then over the window
    # (from 0, the padding's value: a patch wholly in the padding has scale 0, as in mvm)
    m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    s_x = jax.lax.reduce_window(m, jnp.zeros((), m.dtype), jax.lax.max,
                                (1,) + kernel_shape[:nd] + (1,),
                                (1,) + strides + (1,), ((0, 0),) + padding + ((0, 0),))
    if per_vector:
        s_x = jnp.where(s_x > 0, s_x, 1.0)                            # as input_scale
    elif config.dac_bits is not None:
        s_x = jnp.full_like(s_x, config.dac_bound)
    out_shape = s_x.shape[:-1]
    if not per_vector:  # each row tile's partial sums from the one convolution
        if config.dac_bits is None:
            part_of = conv(x).reshape(-1, n_tiles, c_out)
        else:
            part_of = lambda m_: conv(fixed_dac(m_)).reshape(-1, n_tiles, c_out)  # noqa: E731
        y = _periphery_tail(k_out, device, tiles.kappa, tiles.adc_scale, part_of,
                            s_x.reshape(-1, 1), config)
        return (y * alpha).reshape(out_shape + (c_out,)), tiles
    # per window offset o, the rows c·K + o of every channel: [C_in, cols] each
    w_offsets = [w_eff[o::window] for o in range(window)]

    def offsets_sum(xs):  # a block of images and their patch scales -> [rows, cols]
        xb_, sb = xs
        acc = None
        for sl, w_o in zip(slices(xb_), w_offsets):
            term = quantize_symmetric(sl, sb, config.dac_bits).reshape(-1, c_in) @ w_o
            acc = term if acc is None else acc + term
        return acc

    # images in blocks of about CONV_BLOCK_OUTPUTS outputs, so that each offset's slice, product
    # and running sum stay in cache (lax.map): on 2 CPU cores 2x faster than whole-batch slices
    batch, positions = x.shape[0], int(np.prod(out_shape[1:]))
    block = int(min(batch, max(1, round(CONV_BLOCK_OUTPUTS / (positions * cols)))))
    n_blocks = -(-batch // block)
    block = -(-batch // n_blocks)                                     # the least padding

    def offsets_parts(mult):  # the sums at DAC full scale s_x·mult: [N·positions, cols]
        if n_blocks == 1:
            return offsets_sum((x, s_x * mult))
        extra = n_blocks * block - batch                               # zero images: discarded
        xp = jnp.pad(x, ((0, extra),) + ((0, 0),) * (nd + 1))
        sp = jnp.pad(s_x * mult, ((0, extra),) + ((0, 0),) * (nd + 1), constant_values=1.0)
        acc = jax.lax.map(offsets_sum, (xp.reshape((n_blocks, block) + x.shape[1:]),
                                        sp.reshape((n_blocks, block) + s_x.shape[1:])))
        return acc.reshape(n_blocks * block * positions, cols)[:batch * positions]

    if not tail:
        return (offsets_parts(1.0) * alpha).reshape(out_shape + (c_out,)), tiles
    y = _periphery_tail(k_out, device, tiles.kappa, tiles.adc_scale,
                        lambda m_: offsets_parts(m_).reshape(-1, n_tiles, c_out),
                        s_x.reshape(-1, 1), config)
    return (y * alpha).reshape(out_shape + (c_out,)), tiles


def input_scale(x: Array, *, config: TileConfig = TileConfig()) -> Array:
    """The DAC's full-scale input s_x per input vector, [B, 1]: max|x| ('absmax', 1 for an all-zero
    vector) or ``dac_bound`` ('fixed'). The word line of input x is driven at v_read·x/s_x (V)."""
    x = jnp.asarray(x)
    if config.dac_range == "fixed":
        return jnp.full((x.shape[0], 1), config.dac_bound, x.dtype)
    s_x = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    return jnp.where(s_x > 0, s_x, 1.0)


def _periphery_mvm(key, device, kappa, adc_scale, partials, ideal, x, config: TileConfig):
    """DAC → per-row-tile partial sums → output noise → ADC → digital sum.

    ``partials(x) -> [B, Ti, n_out]`` gives the analog partial sums; ``ideal(x)`` (or None) the
    full product, used when the periphery after the DAC is ideal.
    """
    if config.dac_bits is not None:
        s_x = input_scale(x, config=config)
        dac = lambda m: quantize_symmetric(x, s_x * m, config.dac_bits)  # noqa: E731
    else:
        s_x = jnp.max(jnp.abs(x), axis=1, keepdims=True)
        dac = lambda m: x  # noqa: E731
    if ideal is not None and config.adc_bits is None and not config.output_noise:
        return ideal(dac(1.0))
    # without a DAC the partial sums do not depend on the scale: computed once
    part_of = (lambda m: partials(dac(m))) if config.dac_bits is not None else partials(x)
    return _periphery_tail(key, device, kappa, adc_scale, part_of, s_x, config)


#: aihwkit 1.2's defaults that end iterative bound management (``IOParameters.max_bm_factor``
#: and ``max_bm_res``).
BM_MAX_FACTOR = 1000
BM_MAX_RES = 0.25


def bound_management_passes(config: TileConfig) -> int:
    """The most reads of an input vector per tile under ``config.bound_management`` (1 for
    'none'): DAC full-scale factors 1, 2, 4, ... up to and including the first one above
    :data:`BM_MAX_FACTOR` or above :data:`BM_MAX_RES` × (2^(b−1) − 1) for a b-bit DAC
    (aihwkit's rule: the input resolution of a b-bit DAC is 1/(2^(b−1) − 1) of the full scale).
    A 7-bit DAC: factors 1..16, 5 passes; no DAC: 1..1024, 11 passes."""
    if config.bound_management == "none":
        return 1
    limit = float(BM_MAX_FACTOR)
    if config.dac_bits is not None:
        limit = min(limit, BM_MAX_RES * (2 ** (config.dac_bits - 1) - 1))
    j = 0
    while 2 ** j <= limit:
        j += 1
    return j + 1


def _with_output_noise(key, device, kappa, part, s_x, config: TileConfig):
    """(partial sums ``part`` [B, Ti, n_out] with their output noise, the output unit
    [B, 1, 1 or n_out]: input full scale ``s_x`` [B, 1] × the conductance range in weight
    units)."""
    g_min, g_max = dev_mod.g_range(device)
    unit = s_x[:, :, None] * ((g_max - g_min) / kappa)
    if config.output_noise:
        part = part + config.out_noise * unit * jax.random.normal(key, part.shape, part.dtype)
    return part, unit


def _tail_parts(key, device, kappa, adc_scale, part, s_x, config: TileConfig):
    """Output noise and ADC on per-row-tile partial sums ``part`` [B, Ti, n_out]; ``s_x`` [B, 1]
    is the DAC's full scale of each input vector."""
    part, unit = _with_output_noise(key, device, kappa, part, s_x, config)
    if config.adc_bits is not None:
        if config.adc_range == "fixed":
            bound = config.adc_bound * unit
        elif adc_scale is not None:
            bound = adc_scale[None]
        elif config.adc_range == "max":
            bound = jnp.max(jnp.abs(part), axis=0, keepdims=True)
        else:
            bound = jnp.percentile(jnp.abs(part), config.adc_percentile, axis=0, keepdims=True)
        part = quantize_symmetric(part, jnp.maximum(bound, 1e-12), config.adc_bits)
    return part


def _bm_read(key, device, kappa, part, s_x, config: TileConfig):
    """One bound-management read: output noise, then the fixed-range ADC's rounding *without*
    its clip. Returns (codes [B, Ti, n_out], the ADC bound [B, 1, 1 or n_out] before its floor
    of 1e-12): the integer ADC codes round(y / step), step = max(bound, 1e-12) / (2^(b−1) − 1),
    rounded straight-through (forward-mode derivatives pass the ADC as in :func:`mvm` without
    bound management); a code beyond ±(2^(b−1) − 1) marks an output that saturated by more than
    half a step (the steps count is odd, so round-half-even takes ±(steps + 0.5) outward; the
    test is on the code itself, so it agrees with the ADC's output to the last bit), and
    clipping the codes gives the ADC's output. Keeping the codes unclipped lets the saturation
    test and the output share one array, so that XLA draws the output noise once (two consumers
    of the noisy sums made it recompute the normal's inverse CDF in each)."""
    part, unit = _with_output_noise(key, device, kappa, part, s_x, config)
    bound = config.adc_bound * unit
    steps = 2 ** (config.adc_bits - 1) - 1
    return round_ste(part / (jnp.maximum(bound, 1e-12) / steps)), bound


def _periphery_tail(key, device, kappa, adc_scale, part_of, s_x, config: TileConfig):
    """Per-row-tile partial sums → output noise → ADC (with bound management) → digital sum
    [B, n_out]. ``part_of`` is the partial sums [B, Ti, n_out] at the DAC full scale ``s_x``
    [B, 1], or a function of a scale factor m giving them at full scale ``s_x·m`` (needed for
    bound management with a DAC)."""
    if not callable(part_of):
        fixed_part = part_of
        part_of = lambda m: fixed_part  # noqa: E731
    if config.adc_bits is None and not config.output_noise:
        return jnp.sum(part_of(1.0), axis=1)
    passes = bound_management_passes(config)
    if passes == 1:
        return jnp.sum(_tail_parts(key, device, kappa, adc_scale, part_of(1.0), s_x, config),
                       axis=1)
    # Bound management (fixed-range ADC). The loop carries the unclipped ADC codes of each
    # output and the read (pass) they come from per row × column tile; a tile is read again
    # while its latest read saturated some output, up to ``passes`` reads.
    steps = 2 ** (config.adc_bits - 1) - 1
    codes, bound = _bm_read(key, device, kappa, part_of(1.0), s_x, config)
    n_out, cols = codes.shape[-1], config.cols
    n_col_tiles = -(-n_out // cols)

    def tile_any(flag):  # [B, Ti, n_out] -> [B, Ti, n_col_tiles]
        if n_col_tiles * cols != n_out:
            flag = jnp.pad(flag, ((0, 0), (0, 0), (0, n_col_tiles * cols - n_out)))
        return jnp.any(flag.reshape(flag.shape[:2] + (n_col_tiles, cols)), axis=-1)

    def per_output(a):  # [B, Ti, n_col_tiles] -> [B, Ti, n_out]
        full = jnp.broadcast_to(a[..., None], a.shape + (cols,))
        return full.reshape(a.shape[:2] + (n_col_tiles * cols,))[..., :n_out]

    # tiles whose latest read (pass j − 1) saturated. Recomputed from the carried codes in the
    # loop's condition and body (a cheap compare) rather than carried: a mask computed beside
    # the first read's codes would be their second consumer, the duplication this loop avoids.
    def unfinished(j, codes, last):
        return (tile_any(jnp.abs(codes) > steps) & (last == j - 1)) & (j < passes)

    def more(carry):
        j, codes, last = carry
        return jnp.any(unfinished(j, codes, last))

    def read_again(carry):  # the vectors of unfinished tiles, at twice the previous scale
        j, codes, last = carry
        redo = unfinished(j, codes, last)
        m = jnp.exp2(j.astype(codes.dtype))
        codes_j, _ = _bm_read(jax.random.fold_in(key, j), device, kappa, part_of(m), s_x * m,
                              config)
        return (j + 1, jnp.where(per_output(redo), codes_j, codes),
                jnp.where(redo, j, last))

    last0 = jnp.zeros(codes.shape[:2] + (n_col_tiles,), jnp.int32)
    _, codes, last = jax.lax.while_loop(more, read_again,
                                        (jnp.asarray(1, jnp.int32), codes, last0))
    # the bound of each tile's last read (2^last × the first's, exact), floored as in each read
    scale = jnp.maximum(bound * jnp.exp2(per_output(last).astype(codes.dtype)), 1e-12) / steps
    return jnp.sum(jnp.clip(codes, -steps, steps) * scale, axis=1)
