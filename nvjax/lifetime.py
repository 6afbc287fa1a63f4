"""The lifetime loop: a deployed chip over its working life (DESIGN.md §8).

A chip is programmed once, then serves inferences. One **step** stands for
``inferences_per_step`` inferences and simulates a batch of ``batch_size`` real inputs (cycling
through the evaluation set) on the chip as it is now:

1. crossbar MVMs of the batch (drift and read noise at the current time since programming,
   conductances moved by read disturb so far); every layer's inputs are recorded;
2. read disturb (D7, :mod:`nvjax.disturb`): a row is read by an inference when its input is
   non-zero; its word line is driven at ``v_read·x/s_x`` (the DAC's full scale s_x maps to
   ``v_read``), and every cell sees that voltage (``ir_drop='none'``) or its IR-drop voltage
   (:func:`nvjax.crossbar.cell_voltages`, from the current conductances). Each simulated input
   stands for ``inferences_per_step / batch_size`` inferences, so the damage of a cell grows by
   ``Σ_b n_b/N_D(V_b, G0)`` with ``n_b = [x_b ≠ 0]·inferences_per_step/batch_size``;
3. time advances by ``inferences_per_step / inference_rate_hz`` seconds (drift).

With ``ir_drop='solver'`` an IR-drop solve that does not converge raises when the functions are
called eagerly; under ``jit`` its voltages, the damage they drive and the accuracy are NaN and the
record's ``ir_converged`` is False (never a finite guess).

Every ``eval_every`` steps the chip's accuracy is evaluated on the whole evaluation set and the
**reprogramming policy** is applied: ``'accuracy'`` reprograms when the accuracy falls more than
``accuracy_drop`` below the chip's *fresh* accuracy (measured right after each programming: t = 0,
no reads); ``'conductance_error'`` when the largest disturb displacement of any cell,
max|G − G0|/(g_max − g_min), exceeds ``g_error_max``; ``'none'`` never. With ``patience`` p the
condition must hold at p consecutive evaluations (a measured accuracy is itself noisy). Reprogramming is a new
programming draw (programming r of a chip uses ``fold_in(k_program, r)``) that resets damage,
read counters and time; the chip's device-to-device properties stay: the ln N_D spread and the
stuck-at mask are drawn once per chip. Decisions are taken at evaluation points, so intervals are
resolved to ``eval_every·inferences_per_step`` inferences.

Everything runs as one jitted function of the chip key: ``lax.scan`` over evaluation points with
an inner ``lax.scan`` over steps, ``vmap`` over chips (:func:`run`).

This module imports ``chip``, ``crossbar``, ``devices``, ``disturb``, ``layers``, ``sweep``, ``_checks``,
``_ops`` and ``_struct``.
The ``nvjax lifetime`` job (config, files, figures) is :func:`nvjax.jobs.run_lifetime`.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Dict, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import chip as chip_mod
from . import crossbar as xb
from . import devices as dev_mod
from . import disturb as dist_mod
from . import layers
from . import sweep
from ._checks import UserError, check_real, is_concrete
from ._ops import fold_in_range
from ._struct import register_physics

__all__ = ["LifetimeConfig", "LifetimeState", "LifetimeRecord", "Lifetime", "lifetime", "run",
           "eval_inferences", "reprogram_events", "summarize"]

Array = jax.Array

# Sub-key tags of a chip key (fold_in(chip_key, tag)).
_K_PROGRAM, _K_SPREAD, _K_STEP, _K_EVAL, _K_FRESH = range(5)


#: LifetimeConfig fields that are numbers (pytree leaves; the rest is static structure).
PHYSICS_FIELDS = ("inferences_per_step", "inference_rate_hz", "accuracy_drop", "g_error_max")


@dataclasses.dataclass(frozen=True)
class LifetimeConfig:
    """Options of the lifetime loop: a pytree of numbers (:data:`PHYSICS_FIELDS`, traced when
    :func:`lifetime` is built inside a jitted function, so sweeps over them compile once) with
    static structure (step counts, batch size, policy, patience, row cap).

    Attributes:
        num_steps: scan steps (multiple of ``eval_every``).
        inferences_per_step: inferences one step stands for.
        eval_every: steps between accuracy evaluations / policy decisions.
        batch_size: real inputs simulated per step (cycling through the evaluation set).
        inference_rate_hz: inferences per second (sets the drift time of a step).
        policy: 'accuracy', 'conductance_error' or 'none'.
        accuracy_drop: 'accuracy' policy: reprogram below fresh accuracy − this (fraction, 0.01 = 1 %).
        patience: consecutive evaluations past the threshold before the policy reprograms (1 =
            at the first; more filters out the evaluation's own sampling and read noise).
        max_disturb_rows: at most this many of a layer's input row vectors per step (an evenly
            spaced subset, each standing for proportionally more reads) enter the per-cell
            disturb voltages; None = all (conv layers have one row vector per patch).
        g_error_max: 'conductance_error' policy: threshold of max|G − G0|/(g_max − g_min).
    """
    num_steps: int = 100
    inferences_per_step: float = 1e6
    eval_every: int = 1
    batch_size: int = 32
    inference_rate_hz: float = 1e3
    policy: Literal["accuracy", "conductance_error", "none"] = "accuracy"
    accuracy_drop: float = 0.01
    g_error_max: float = 0.05
    patience: int = 1
    max_disturb_rows: Optional[int] = None

    def __post_init__(self):
        for name in ("num_steps", "eval_every", "batch_size", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"LifetimeConfig.{name} must be a positive int, got {v!r}")
        if self.num_steps % self.eval_every:
            raise UserError(f"LifetimeConfig.num_steps ({self.num_steps}) must be a multiple of "
                            f"eval_every ({self.eval_every})")
        for name in ("inferences_per_step", "inference_rate_hz", "g_error_max"):
            check_real(f"LifetimeConfig.{name}", getattr(self, name), minimum=0.0,
                       strict_min=True)
        if self.policy not in ("accuracy", "conductance_error", "none"):
            raise UserError("LifetimeConfig.policy must be 'accuracy', 'conductance_error' or "
                            f"'none', got {self.policy!r}")
        check_real("LifetimeConfig.accuracy_drop", self.accuracy_drop, minimum=0.0, maximum=1.0)
        if self.max_disturb_rows is not None and (isinstance(self.max_disturb_rows, bool)
                                                  or not isinstance(self.max_disturb_rows, int)
                                                  or self.max_disturb_rows < 1):
            raise UserError("LifetimeConfig.max_disturb_rows must be None or a positive int, got "
                            f"{self.max_disturb_rows!r}")

    @property
    def num_evals(self) -> int:
        return self.num_steps // self.eval_every

    @property
    def dt_s(self) -> float:
        """Seconds per step."""
        return self.inferences_per_step / self.inference_rate_hz

    def replace(self, **changes) -> "LifetimeConfig":
        """A copy with ``changes`` (validated; traced numbers are accepted)."""
        return dataclasses.replace(self, **changes)


register_physics(LifetimeConfig, PHYSICS_FIELDS)


@struct.dataclass
class LifetimeState:
    """One chip's state (pytree).

    Attributes:
        key: the chip's root key (every draw derives from it and a counter).
        chip: the programmed chip (``g`` of its cell states = programmed, undisturbed conductances).
        damage: layer → (damage of the G⁺ cells, of the G⁻ cells), each [n_in, n_out].
        spread: layer → (z of the G⁺ cells, of the G⁻ cells): ln N_D spread, fixed per chip.
        reads: layer → reads of every row since programming, float32 [n_in].
        t: time since programming, s.
        inferences: inferences since programming.
        num_programs: programmings so far (1 after :meth:`Lifetime.init`), int32.
        fresh_accuracy: accuracy right after the latest programming.
        below: consecutive evaluations past the policy's threshold, int32.
        step: steps taken, int32.
        ir_converged: every IR-drop solve (``ir_drop='solver'``) of the steps since the last
            evaluation point converged, bool (a failed solve leaves NaN voltages and damage).
    """
    key: Array
    chip: chip_mod.Chip
    damage: Dict[str, Any]
    spread: Dict[str, Any]
    reads: Dict[str, Array]
    t: Array
    inferences: Array
    num_programs: Array
    fresh_accuracy: Array
    below: Array
    step: Array
    ir_converged: Array


class LifetimeRecord(NamedTuple):
    """What is recorded at each evaluation point (before the policy acts)."""
    accuracy: Array          # accuracy on the evaluation set
    fresh_accuracy: Array    # fresh accuracy of the programming in effect
    g_error: Array           # max|G − G0|/(g_max − g_min) over all cells
    reprogrammed: Array      # the policy reprogrammed the chip here
    t_s: Array               # time since programming, s
    inferences_since: Array  # inferences since programming
    max_row_reads: Array     # most reads of any row since programming
    # every IR-drop solve (ir_drop='solver') of the steps since the previous point and of this
    # evaluation converged; False: the accuracy (and what follows) is NaN, never a finite guess.
    # None: not recorded.
    ir_converged: Optional[Array] = None


class Lifetime(NamedTuple):
    """The pure functions of one lifetime simulation (made by :func:`lifetime`).

    ``init(key, placement=None) -> state``; ``batch(s) -> inputs of step s``;
    ``step(state, x) -> state``; ``evaluate(state, e) -> accuracy``;
    ``check(state, accuracy) -> (state, record)``;
    ``simulate(key, placement=None) -> (state, record with a leading [num_evals] axis)``.
    ``placement`` (layer name → (row_perm, col_perm) of :func:`nvjax.chip.deploy`: where each
    weight sits in its tile grid, what read-disturb-aware placement optimizes) is an argument,
    not part of the build, so simulating several placements compiles once; reprogramming keeps
    the chip's placement.
    """
    init: Callable
    batch: Callable
    step: Callable
    evaluate: Callable
    check: Callable
    simulate: Callable
    config: LifetimeConfig


def _select(pred, a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


def lifetime(model, params, device, tile_config: xb.TileConfig, disturb: dist_mod.DisturbParams,
             x, y, *, config: LifetimeConfig = LifetimeConfig()) -> Lifetime:
    """Build the lifetime simulation of a network deployed on crossbars.

    Args:
        model, params: the Flax model and its trained parameters (deployed with
            :func:`nvjax.chip.deploy`).
        device: device model from :mod:`nvjax.devices`.
        tile_config: crossbar options (``v_read``, ``ir_drop``, periphery, ...).
        disturb: D7 parameters (:func:`nvjax.disturb.pcm_disturb` / ``reram_disturb``).
        x, y: evaluation inputs [N, ...] and integer labels [N]; steps cycle through ``x``.
        config: :class:`LifetimeConfig`.

    Returns:
        :class:`Lifetime`, whose ``simulate(key, placement)`` runs one chip.

    Everything closed over here (model, parameters, device, tile physics, disturb constants,
    the numbers of ``config``) becomes a compile-time constant of the functions returned; to
    sweep such a number without recompiling, build the lifetime inside the jitted function with
    the traced value (``TileConfig``, ``LifetimeConfig``, devices and ``DisturbParams`` are all
    pytrees of numbers).

    Example:
        >>> import jax, nvjax
        >>> # fns = nvjax.lifetime.lifetime(model, params, nvjax.devices.pcm(),
        >>> #                               nvjax.crossbar.TileConfig(), nvjax.disturb.pcm_disturb(),
        >>> #                               x_test, y_test)
        >>> # state, record = jax.jit(fns.simulate)(jax.random.key(0))
    """
    dev_mod.check_device(device, "lifetime: device")
    if not isinstance(disturb, dist_mod.DisturbParams):
        raise TypeError(f"lifetime: disturb must be a DisturbParams, got {type(disturb).__name__}")
    dist_mod.check_params(disturb, "lifetime")   # its concrete numbers (a NaN would switch it off)
    g_min, g_max = dev_mod.g_range(device)
    if is_concrete(disturb.g_inf) and is_concrete(g_max):
        if not float(g_min) <= float(disturb.g_inf) <= float(g_max):
            raise ValueError(f"lifetime: disturb.g_inf = {float(disturb.g_inf)} µS lies outside the "
                             f"device's range [{float(g_min)}, {float(g_max)}] µS")
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise ValueError(f"lifetime: expected x [N, ...] and labels y [N], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if config.batch_size > x.shape[0]:
        raise ValueError(f"lifetime: batch_size {config.batch_size} exceeds the {x.shape[0]} "
                         "evaluation inputs")
    n_data = x.shape[0]
    g_span = g_max - g_min
    reads_per_input = config.inferences_per_step / config.batch_size

    def program(key, r, placement, stuck_from=None):
        chip = chip_mod.deploy(jax.random.fold_in(jax.random.fold_in(key, _K_PROGRAM), r),
                               model, params, device, config=tile_config, placement=placement)
        if stuck_from is None:
            return chip
        tiles = {}
        for name, t in chip.tiles.items():  # the chip's faults do not change on reprogramming
            old = stuck_from.tiles[name]
            tiles[name] = t.replace(pos=_keep_faults(device, t.pos, old.pos),
                                    neg=_keep_faults(device, t.neg, old.neg))
        return chip.replace(tiles=tiles)

    def occupied(chip, name):
        """Cells holding a weight ([P, Q] bool), or None when the placement leaves none empty:
        empty cells (spare rows/columns) are not programmed and are not disturbed."""
        perms = None if chip.placement is None else chip.placement.get(name)
        if perms is None:
            return None
        n_in, n_out = layers.kernels(chip.params)[name].shape
        if perms[0].shape[0] == n_in and perms[1].shape[0] == n_out:
            return None
        return layers.to_physical(jnp.ones((n_in, n_out), bool), *perms)

    def disturbed_chip(state):
        tiles = {}
        for name, t in state.chip.tiles.items():
            dp, dm = state.damage[name]
            keep = occupied(state.chip, name)
            if keep is not None:
                dp, dm = jnp.where(keep, dp, 0.0), jnp.where(keep, dm, 0.0)
            tiles[name] = t.replace(pos=_disturbed_cells(disturb, t.pos, dp),
                                    neg=_disturbed_cells(disturb, t.neg, dm))
        return state.chip.replace(tiles=tiles)

    def accuracy(key, chip, t):
        logits = chip_mod.apply(key, chip, x, t)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        # NaN logits (a failed IR-drop solve under jit) give a NaN accuracy, not argmax's guess
        return jnp.where(jnp.all(jnp.isfinite(logits)), acc, jnp.nan)

    def fresh(state):
        key = jax.random.fold_in(jax.random.fold_in(state.key, _K_FRESH), state.num_programs - 1)
        return accuracy(key, state.chip, jnp.zeros((), jnp.float32))

    def zeros_like_cells(chip):
        return {n: (jnp.zeros_like(t.pos.g), jnp.zeros_like(t.neg.g)) for n, t in chip.tiles.items()}

    def zero_reads(chip):
        return {n: jnp.zeros((t.n_in,), jnp.float32) for n, t in chip.tiles.items()}

    def init(key, placement=None):
        chip = program(key, 0, placement)
        k_spread = jax.random.fold_in(key, _K_SPREAD)
        spread = {}
        # side s of tile i draws with fold_in(k_spread, 2 i + s); both sides in one vmapped call
        side_keys = fold_in_range(k_spread, 2 * len(chip.tiles))
        for i, (n, t) in enumerate(chip.tiles.items()):
            z = jax.vmap(lambda k, shape=t.pos.g.shape: dist_mod.draw_spread(k, shape))(
                side_keys[2 * i:2 * i + 2])
            spread[n] = (z[0], z[1])
        state = LifetimeState(key=key, chip=chip, damage=zeros_like_cells(chip), spread=spread,
                              reads=zero_reads(chip), t=jnp.zeros((), jnp.float32),
                              inferences=jnp.zeros((), jnp.float32),
                              num_programs=jnp.ones((), jnp.int32),
                              fresh_accuracy=jnp.zeros((), jnp.float32),
                              below=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32),
                              ir_converged=jnp.ones((), bool))
        return state.replace(fresh_accuracy=fresh(state))

    def batch(s):
        idx = (s * config.batch_size + jnp.arange(config.batch_size)) % n_data
        return x[idx]

    def step(state, xb_):
        key = jax.random.fold_in(jax.random.fold_in(state.key, _K_STEP), state.step)
        chip = disturbed_chip(state)
        inputs = chip_mod.apply_traced(key, chip, xb_, state.t).inputs
        damage, reads = {}, {}
        ir_ok = state.ir_converged
        for name, rows in inputs.items():
            t_now, t_prog = chip.tiles[name], state.chip.tiles[name]
            scale = reads_per_input
            cap = config.max_disturb_rows
            if cap is not None and rows.shape[0] > cap:
                scale = reads_per_input * rows.shape[0] / cap
                rows = rows[np.linspace(0, rows.shape[0] - 1, cap).astype(int)]
            n_b = (rows != 0).astype(jnp.float32) * scale                   # [Nr, n_in]
            v_rows = tile_config.v_read * rows / xb.input_scale(rows, config=tile_config)
            new = []
            for side in ("pos", "neg"):
                g0 = getattr(t_prog, side).g
                dmg = state.damage[name][0 if side == "pos" else 1]
                z = state.spread[name][0 if side == "pos" else 1]
                if tile_config.ir_drop == "none":
                    v = v_rows[:, :, None]
                else:
                    v = xb.cell_voltages(getattr(t_now, side).g, v_rows, config=tile_config)
                    ir_ok = ir_ok & jnp.all(jnp.isfinite(v))   # a failed solve is NaN
                new.append(dist_mod.accumulate_batch(disturb, dmg, n_b[:, :, None], v, g0, z))
            damage[name] = tuple(new)
            reads[name] = state.reads[name] + jnp.sum(n_b, axis=0)
        return state.replace(damage=damage, reads=reads, t=state.t + config.dt_s,
                             inferences=state.inferences + config.inferences_per_step,
                             step=state.step + 1, ir_converged=ir_ok)

    def evaluate(state, e):
        key = jax.random.fold_in(jax.random.fold_in(state.key, _K_EVAL), e)
        return accuracy(key, disturbed_chip(state), state.t)

    def g_error(state):
        errs = []
        for name, t in state.chip.tiles.items():
            keep = occupied(state.chip, name)
            for cells, dmg in zip((t.pos, t.neg), state.damage[name]):
                if keep is not None:
                    dmg = jnp.where(keep, dmg, 0.0)
                errs.append(jnp.max(jnp.abs(_disturbed_cells(disturb, cells, dmg).g - cells.g)))
        return jnp.max(jnp.stack(errs)) / g_span

    def check(state, acc):
        err = g_error(state)
        if config.policy == "accuracy":
            past = acc < state.fresh_accuracy - config.accuracy_drop
        elif config.policy == "conductance_error":
            past = err > config.g_error_max
        else:
            past = jnp.zeros((), bool)
        below = jnp.where(past, state.below + 1, 0)
        trigger = below >= config.patience
        ir_ok = state.ir_converged
        if tile_config.ir_drop == "solver":  # the evaluation's MVMs: NaN logits if a solve failed
            ir_ok = ir_ok & jnp.isfinite(acc)
        state = state.replace(below=below, ir_converged=jnp.ones((), bool))
        rec = LifetimeRecord(
            accuracy=acc, fresh_accuracy=state.fresh_accuracy, g_error=err, reprogrammed=trigger,
            t_s=state.t, inferences_since=state.inferences,
            max_row_reads=jnp.max(jnp.stack([jnp.max(r) for r in state.reads.values()])),
            ir_converged=ir_ok)
        if config.policy == "none":
            return state, rec
        new = state.replace(chip=program(state.key, state.num_programs, state.chip.placement,
                                         state.chip),
                            damage=zeros_like_cells(state.chip), reads=zero_reads(state.chip),
                            t=jnp.zeros_like(state.t), inferences=jnp.zeros_like(state.inferences),
                            num_programs=state.num_programs + 1, below=jnp.zeros_like(below))
        new = new.replace(fresh_accuracy=fresh(new))
        state = state.replace(
            chip=state.chip.replace(tiles=_select(trigger, new.chip.tiles, state.chip.tiles)),
            **{f: _select(trigger, getattr(new, f), getattr(state, f))
               for f in ("damage", "reads", "t", "inferences", "num_programs", "fresh_accuracy",
                         "below")})
        return state, rec

    def simulate(key, placement=None):
        state = init(key, placement)

        def inner(st, s):
            return step(st, batch(s)), None

        def outer(st, e):
            st, _ = jax.lax.scan(inner, st, e * config.eval_every + jnp.arange(config.eval_every))
            return check(st, evaluate(st, e))
        return jax.lax.scan(outer, state, jnp.arange(config.num_evals))

    return Lifetime(init=init, batch=batch, step=step, evaluate=evaluate, check=check,
                    simulate=simulate, config=config)


def _disturbed_cells(params, cells: dev_mod.CellState, damage) -> dev_mod.CellState:
    """Cell state whose ``g`` is moved by read disturb (stuck cells do not move)."""
    g = dist_mod.disturbed_conductance(params, cells.g, damage)
    if cells.stuck is not None:
        g = jnp.where(cells.stuck > 0, cells.g, g)
    return cells._replace(g=g)


def _keep_faults(device, new: dev_mod.CellState, old: dev_mod.CellState) -> dev_mod.CellState:
    if old.stuck is None:
        return new
    g = dev_mod.apply_faults(device, new.g, old.stuck)
    nu = None if new.nu is None else jnp.where(old.stuck > 0, 0.0, new.nu)
    return new._replace(g=g, nu=nu, stuck=old.stuck)


def run(fns: Lifetime, key, num_chips: int, *, placement: Optional[Dict[str, Any]] = None,
        chunk_size: int = 32, progress: bool = False, start: int = 0) -> LifetimeRecord:
    """Simulate ``num_chips`` chips (chip i uses ``fold_in(key, i)``), chunked through one jit.

    Args:
        fns: from :func:`lifetime`.
        key: the sweep's key.
        num_chips: chips to simulate.
        placement: the placement every chip is deployed with (None: identity). Runs of the same
            ``fns`` with other placements of the same shapes reuse the compiled chunk.
        chunk_size, progress, start: as in :func:`nvjax.sweep.run_instances`.

    Returns:
        :class:`LifetimeRecord` of NumPy arrays [num_chips, num_evals].
    """
    if placement is not None:
        placement = {n: tuple(jnp.asarray(p, jnp.int32) for p in rc) for n, rc in placement.items()}
    rec = sweep.run_instances(_recorder(fns.simulate), key, num_chips, placement,
                              chunk_size=chunk_size, progress=progress, desc="chips", start=start)
    return LifetimeRecord(*rec)


_RECORDERS: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def _recorder(simulate: Callable) -> Callable:
    """``(key, placement) -> record`` of ``simulate``, one function object per ``simulate`` (so
    the sweep engine's compiled chunk is found again); holds ``simulate`` weakly."""
    if simulate not in _RECORDERS:
        ref = weakref.ref(simulate)

        def record(key, placement):
            return ref()(key, placement)[1]
        _RECORDERS[simulate] = record
    return _RECORDERS[simulate]


def eval_inferences(config: LifetimeConfig) -> np.ndarray:
    """Total inferences served at each evaluation point, [num_evals]."""
    return (np.arange(1, config.num_evals + 1) * config.eval_every
            * float(config.inferences_per_step))


def reprogram_events(record: LifetimeRecord, config: LifetimeConfig):
    """Reprogramming events as rows (chip, event, inferences (total), inferences since the previous
    programming, time since it (s), most reads of a row since it)."""
    flags = np.asarray(record.reprogrammed)
    total = eval_inferences(config)
    rows = []
    for c in range(flags.shape[0]):
        for k, e in enumerate(np.flatnonzero(flags[c])):
            rows.append((c, k, float(total[e]), float(record.inferences_since[c, e]),
                         float(record.t_s[c, e]), float(record.max_row_reads[c, e])))
    return rows


def summarize(record: LifetimeRecord, config: LifetimeConfig) -> Dict[str, Any]:
    """Per-run statistics: reprogram counts, intervals (inferences between programmings; chips
    that never reprogrammed are right-censored at the horizon), accuracy quantiles per point."""
    flags = np.asarray(record.reprogrammed)
    counts = flags.sum(axis=1)
    horizon = float(eval_inferences(config)[-1])
    first = np.where(flags.any(axis=1),
                     np.asarray(record.inferences_since)[np.arange(flags.shape[0]),
                                                        np.argmax(flags, axis=1)], np.inf)
    intervals = np.asarray(record.inferences_since)[flags]
    acc = np.asarray(record.accuracy)
    fin = first[np.isfinite(first)]

    def q(a, p):
        return float(np.percentile(a, p)) if a.size else None
    return {
        "num_chips": int(flags.shape[0]),
        "horizon_inferences": horizon,
        "reprograms_mean": float(counts.mean()), "reprograms_std": float(counts.std()),
        "reprograms_min": int(counts.min()), "reprograms_max": int(counts.max()),
        "chips_reprogrammed": int((counts > 0).sum()),
        "first_interval_median": (float(np.median(first)) if np.isfinite(np.median(first))
                                  else None),
        "first_interval_p5": q(fin, 5) if fin.size == first.size else None,
        "first_interval_p95": q(fin, 95) if fin.size == first.size else None,
        "interval_mean": float(intervals.mean()) if intervals.size else None,
        "interval_std": float(intervals.std()) if intervals.size else None,
        "fresh_accuracy_mean": float(np.asarray(record.fresh_accuracy)[:, 0].mean()),
        "accuracy_p50": np.percentile(acc, 50, axis=0).tolist(),
        "accuracy_p5": np.percentile(acc, 5, axis=0).tolist(),
        "accuracy_p1": np.percentile(acc, 1, axis=0).tolist(),
        "accuracy_mean": acc.mean(axis=0).tolist(),
        # evaluation points (over all chips) with a failed IR-drop solve (their accuracy is NaN)
        "ir_unconverged_points": (0 if record.ir_converged is None
                                  else int((~np.asarray(record.ir_converged, bool)).sum())),
    }
