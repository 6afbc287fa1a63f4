"""Read-disturb-aware placement of a network's weights on its tiles (DESIGN.md §7.3).

Cost models that connect :mod:`nvjax.sensitivity` (criticality), the data (reads), the crossbar's
IR drop (voltage at each physical cell) and D7 (:mod:`nvjax.disturb`) to the solvers of
:mod:`nvjax.mapping`, and produce ``placement`` dicts for :func:`nvjax.chip.deploy` /
:func:`nvjax.lifetime.lifetime` (layer → (row_perm, col_perm), logical → physical; permutations
longer than the layer place it among spare rows and columns of its tile grid).

**The pipeline to use** (issue 15):

* :func:`identity_placement` / :func:`random_placement` with a ``tile_config``: placements over
  the layer's whole tile grid (:func:`physical_shape`), spare rows and columns included.
* :func:`fisher_costs`: weight factors C = ½·F·e·a^(2β) — the Fisher (Gauss-Newton) diagonal F
  (the criticality of an additive, weight-independent conductance error, which is what disturb
  leaves after drift compensation), the pair's expected squared disturb error e
  (:func:`disturb_error_factor`) and the voltage-weighted reads a of the real drives.
* :func:`drive_position_factors`: position factors D (and MVM attenuation A) of a *given layout*
  from the converged IR-drop solver on real drives; :func:`alternating_placement` solves the
  crossbar assignment of Σ C·D^(2β) exactly and recomputes D for each candidate layout.
* :func:`horizon_objective`: the simulator's own Monte Carlo expected loss over the horizon,
  with soft position factors (the weights stay in place, so every one-hot point is a real
  placement); :func:`horizon_placement` (Sinkhorn search from a start) and
  :func:`swap_local_search` (swaps on the same hard objective) minimize it.

**Earlier cost models** (kept for comparison; issue 15 found both wanting): :func:`linear_costs`
(criticality saliency/magnitude/Hessian × reads, position factor for a full-scale drive of every
row in the identity layout) and :func:`relaxed_objective` / :func:`relaxed_placement`, which
evaluate soft-placed conductances Pᵀ·G·P: between permutations the weights themselves are
blurred, so its gradient mostly rewards becoming a permutation.

Every stochastic function takes a PRNG ``key`` first (:func:`linear_costs` for the Hessian
probes, :func:`random_placement`, :func:`relaxed_placement`, :func:`horizon_placement`,
:func:`swap_local_search`; :func:`horizon_objective`'s objective).

This module imports ``crossbar``, ``devices``, ``disturb``, ``irdrop``, ``layers``, ``mapping``,
``sensitivity``, ``_checks`` and flax.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import crossbar as xb
from . import devices as dev_mod
from . import disturb as dist_mod
from . import irdrop
from . import layers
from . import mapping
from . import sensitivity
from ._checks import check_key

__all__ = ["layer_reads", "position_factor", "linear_costs", "exact_placement",
           "random_placement", "identity_placement", "placement_cost", "relaxed_objective",
           "relaxed_placement", "physical_shape", "complete_permutation", "disturb_error_factor",
           "drive_position_factors", "fisher_costs", "alternating_placement",
           "self_consistent_cost", "horizon_objective", "hard_matrices", "horizon_placement",
           "swap_local_search"]

Placement = Dict[str, Tuple[np.ndarray, np.ndarray]]


def layer_reads(model, params, x, tile_config: xb.TileConfig, disturb: dist_mod.DisturbParams):
    """Voltage-weighted reads per inference of every crossbar row, layer → a [n_in].

    a_i = (1/N)·Σ_rows [x_i ≠ 0]·exp((|x_i|/s_x·v_read − V_ref)/V_0), N the number of model
    inputs (conv layers: summed over patches), so Σ_i a_i/N_D(V_ref) is a disturb rate per
    inference.
    """
    n = jnp.asarray(x).shape[0]
    out = {}
    for name, rows in layers.layer_inputs(model, params, x).items():
        u = jnp.abs(rows) / xb.input_scale(rows, config=tile_config)
        w = (rows != 0) * jnp.exp((u * tile_config.v_read - disturb.v_ref) / disturb.v0)
        out[name] = jnp.sum(w, axis=0) / n
    return out


def position_factor(g_pos, g_neg, tile_config: xb.TileConfig, disturb: dist_mod.DisturbParams):
    """D[p, q] = exp(v_read·(η_pq − 1)/V_0), η the IR-drop attenuation of each cell for a
    full-scale drive of all rows (mean of the G⁺ and G⁻ arrays); all ones without IR drop.

    η comes from the converged solver (:func:`nvjax.irdrop.voltages`, one solve per tile and
    side) whatever ``tile_config.ir_drop`` says: the first-order form is off by tens of percent
    at the default 256 × 256 tile and 1 Ω (:func:`nvjax.irdrop.first_order_error`). A solve
    that does not converge raises (eagerly) or gives NaN factors (under ``jit``).
    """
    if tile_config.ir_drop == "none":
        return jnp.ones_like(g_pos)
    cfg = xb.TileConfig(rows=tile_config.rows, cols=tile_config.cols, ir_drop="solver",
                        r_wire=tile_config.r_wire, ir_max_iter=max(tile_config.ir_max_iter, 1000))
    v = jnp.full((1, g_pos.shape[0]), tile_config.v_read, g_pos.dtype)
    eta = 0.5 * (xb.cell_voltages(g_pos, v, config=cfg)[0] + xb.cell_voltages(g_neg, v, config=cfg)[0])
    eta = eta / tile_config.v_read
    return jnp.exp(tile_config.v_read * (eta - 1.0) / disturb.v0)


def linear_costs(key, model, params, x, y, device, tile_config: xb.TileConfig,
                 disturb: dist_mod.DisturbParams, *, criticality: str = "saliency",
                 num_probes: int = 64) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per layer (C [n_in, n_out], D [n_in, n_out]) of the linear placement cost Σ C·D.

    ``C[i, j] = c_ij·a_i`` with c the criticality of :func:`nvjax.sensitivity.importance` in the
    crossbar layout and a the voltage-weighted reads of :func:`layer_reads`; D is
    :func:`position_factor` of the layer's tiles.

    Args:
        key: PRNG key of the Hutchinson probes (criticality 'hessian'; required always).
        model, params, x, y: the Flax classifier, its parameters and the inputs/labels that
            define the loss and the read statistics.
        device: the device model of the tiles (:func:`nvjax.crossbar.tile`).
        tile_config: :class:`nvjax.crossbar.TileConfig` (tile shape, IR drop, v_read).
        disturb: :class:`nvjax.disturb.DisturbParams` (V_ref, V_0).
        criticality: a method of :func:`nvjax.sensitivity.importance`: 'saliency' (|w·∂L/∂w|),
            'hessian' (½·|H_ii|·w², Hutchinson with ``num_probes`` probes) or 'magnitude' (|w|).
        num_probes: Hutchinson probes of 'hessian'.

    Returns:
        dict layer name → (C, D), float64 NumPy arrays [n_in, n_out].
    """
    if criticality not in ("saliency", "magnitude", "hessian"):
        raise ValueError(f"linear_costs: criticality must be 'saliency', 'magnitude' or 'hessian', "
                         f"got {criticality!r}")
    imp = sensitivity.importance(key, model, params, x, y, method=criticality,
                                 num_probes=num_probes)
    crit = {name: layers.kernel_matrix(c) for name, c in imp.items()}
    reads = layer_reads(model, params, x, tile_config, disturb)
    kernels = layers.kernels(params)
    out = {}
    for name, c in crit.items():
        gp, gm, _ = xb.tile(kernels[name], device, config=tile_config)
        out[name] = (np.asarray(c * reads[name][:, None], np.float64),
                     np.asarray(position_factor(gp, gm, tile_config, disturb), np.float64))
    return out


def _shapes(params, tile_config):
    out = {}
    for n, k in layers.kernels(params).items():
        n_in, n_out = layers.kernel_matrix(k).shape
        out[n] = (n_in, n_out) if tile_config is None else physical_shape(n_in, n_out, tile_config)
    return out


def identity_placement(params, tile_config: Optional[xb.TileConfig] = None) -> Placement:
    """Logical row i on physical row i, column j on column j, for every layer. With a
    ``tile_config`` the permutations cover the layer's whole tile grid (:func:`physical_shape`:
    the logical block sits in the top-left corner, the rest is empty)."""
    return {n: (np.arange(p), np.arange(q)) for n, (p, q) in _shapes(params, tile_config).items()}


def random_placement(key, params, tile_config: Optional[xb.TileConfig] = None) -> Placement:
    """Uniformly random row and column permutations of every layer's crossbar matrix (with a
    ``tile_config``: of its whole tile grid, so logical rows land anywhere, spares included).

    Args:
        key: PRNG key; layer k (in :func:`nvjax.layers.kernels` order) draws its row and column
            permutations from ``split(fold_in(key, k))``.
        params: the model parameters.
        tile_config: optional; see :func:`identity_placement`.

    Returns:
        dict layer name → (row_perm, col_perm), NumPy int arrays.
    """
    check_key("key", key)
    out = {}
    for k, (n, (p, q)) in enumerate(_shapes(params, tile_config).items()):
        k_row, k_col = jax.random.split(jax.random.fold_in(key, k))
        out[n] = (np.asarray(jax.random.permutation(k_row, p)),
                  np.asarray(jax.random.permutation(k_col, q)))
    return out


def exact_placement(costs) -> Placement:
    """Alternating exact row/column assignments of the linear cost, per layer
    (:func:`nvjax.mapping.crossbar_assign`, best of the sorted and identity starts)."""
    out = {}
    for name, (c, d) in costs.items():
        rp, cp, _ = mapping.crossbar_assign(c, d)
        out[name] = (np.asarray(rp), np.asarray(cp))
    return out


def placement_cost(costs, placement: Placement) -> float:
    """Σ over layers of the linear cost Σ C[i, j]·D[row_perm[i], col_perm[j]]."""
    return float(sum(mapping.crossbar_cost(c, d, *placement[n]) for n, (c, d) in costs.items()))


def relaxed_objective(model, params, x, y, device, tile_config: xb.TileConfig,
                      disturb: dist_mod.DisturbParams, num_inferences: float, *,
                      max_rows: int = 512, ir_mvm: bool = True):
    """The non-linear placement objective and the layer order of its matrices.

    Returns:
        (objective, names): ``objective(mats)`` with mats = (P_row, P_col) per layer of ``names``
        (P[i, p] = weight of logical i on physical p, doubly stochastic) → cross-entropy of the
        network on (x, y) after ``num_inferences`` inferences of read disturb with the inputs'
        read statistics (median device, z = 0; programming noise left out). Layers with more
        than ``max_rows`` input row vectors (conv patches) use an evenly spaced subset of them
        for the cell voltages, each standing for proportionally more reads. With ``ir_mvm``
        (and IR drop in ``tile_config``) the forward pass also carries the IR-drop distortion
        of the MVM of the placed, disturbed arrays (first-order transfer of every tile).
    """
    params = layers.strip_params(params)
    kernels = layers.kernels(params)
    names = list(kernels)
    inputs = layers.layer_inputs(model, params, x)
    n_model = jnp.asarray(x).shape[0]
    targets = {n: xb.tile(kernels[n], device, config=tile_config) for n in names}
    flat = flatten_dict(params)
    cfg = tile_config if tile_config.ir_drop != "solver" else xb.TileConfig(
        rows=tile_config.rows, cols=tile_config.cols, ir_drop="first_order",
        r_wire=tile_config.r_wire, v_read=tile_config.v_read)
    if cfg.ir_drop != "none":   # the objective's IR drop is first-order: is it a valid model?
        for n in names:
            for g in targets[n][:2]:
                irdrop.check_first_order(xb.tile_grid(g, cfg), cfg.r_wire,
                                         where=f"relaxed_objective (layer {n!r})")
    x = jnp.asarray(x)
    y = jnp.asarray(y)

    def disturbed_kernel(name, pr, pc):
        gp, gm, kappa = targets[name]
        rows = inputs[name]
        n_rows = rows.shape[0]
        if n_rows > max_rows:
            rows = rows[np.linspace(0, n_rows - 1, max_rows).astype(int)]
        u = rows / xb.input_scale(rows, config=cfg)
        driven = (rows != 0).astype(u.dtype) @ pr            # soft physical rows [Nr, n_in]
        v_rows = cfg.v_read * (u @ pr)
        reads = driven * (num_inferences / n_model * n_rows / rows.shape[0])
        g_new, g_plain = [], []
        for g in (gp, gm):
            g_phys = pr.T @ g @ pc
            if cfg.ir_drop == "none":
                v = v_rows[:, :, None]
            else:
                v = xb.cell_voltages(g_phys, v_rows, config=cfg)
            dmg = dist_mod.accumulate_batch(disturb, jnp.zeros_like(g_phys), reads[:, :, None], v,
                                            g_phys, jnp.zeros_like(g_phys))
            g_d = dist_mod.disturbed_conductance(disturb, g_phys, dmg)
            g_plain.append(g_d)
            if ir_mvm and cfg.ir_drop != "none":
                g_d = xb.ir_transfer(g_d, cfg)   # column current per volt of row drive, µS
            g_new.append(pr @ g_d @ pc.T)
        w_d = (g_new[0] - g_new[1]) / kappa
        # global drift compensation as in the crossbar: from the read conductances (no IR drop)
        ref0 = xb.reference_sum(gp - gm, kappa, device=device)
        ref = xb.reference_sum(g_plain[0] - g_plain[1], kappa, device=device)
        return w_d * (ref0 / jnp.maximum(ref, 1e-30))

    def objective(mats):
        new = dict(flat)
        for k, name in enumerate(names):
            w = disturbed_kernel(name, mats[2 * k], mats[2 * k + 1])
            path = tuple(name.split("/")) + ("kernel",)
            kern = flat[path]
            new[path] = layers.matrix_to_kernel(w, kern.shape)
        logits = model.apply({"params": unflatten_dict(new)}, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
    return objective, names


def relaxed_placement(key, model, params, x, y, device, tile_config: xb.TileConfig,
                      disturb: dist_mod.DisturbParams, num_inferences: float, *,
                      start: Optional[Placement] = None, start_sharpness: float = 3.0,
                      ir_mvm: bool = True, **opts) -> Tuple[Placement, Any]:
    """Placement minimizing :func:`relaxed_objective` by the Sinkhorn search of
    :func:`nvjax.mapping.relaxed_permutations` (``opts``: steps, learning_rate, tau_start, ...).

    Args:
        start: optional placement to start from (logits = ``start_sharpness`` on its entries),
            e.g. the exact linear-cost solution, so the search refines it.

    Returns:
        (placement, info of the search).
    """
    objective, names = relaxed_objective(model, params, x, y, device, tile_config, disturb,
                                         num_inferences, ir_mvm=ir_mvm)
    kernels = layers.kernels(params)
    sizes = []
    for n in names:
        sizes += [kernels[n].shape[0], kernels[n].shape[1]]
    init = None
    if start is not None:
        init = []
        for n in names:
            for perm, size in zip(start[n], kernels[n].shape):
                init.append(start_sharpness * jax.nn.one_hot(jnp.asarray(perm), size))
        init = tuple(init)
    perms, info = mapping.relaxed_permutations(key, objective, sizes, init_logits=init, **opts)
    return {n: (np.asarray(perms[2 * k]), np.asarray(perms[2 * k + 1]))
            for k, n in enumerate(names)}, info


# ---------------------------------------------------------------------------------------------
# Placement with spare rows and columns, costs from real drives (DESIGN.md §7.3, issue 15)
# ---------------------------------------------------------------------------------------------

def physical_shape(n_in: int, n_out: int, tile_config: xb.TileConfig, *, spare_tiles=(0, 0)):
    """(P, Q): physical rows and columns a layer [n_in, n_out] may use -- its whole tile grid
    (so a layer of 200 rows on 256-row tiles has 56 spare rows), plus ``spare_tiles`` = (extra
    row tiles, extra column tiles)."""
    ti = xb.num_row_tiles(n_in, tile_config) + int(spare_tiles[0])
    tj = -(-n_out // tile_config.cols) + int(spare_tiles[1])
    return ti * tile_config.rows, tj * tile_config.cols


def complete_permutation(injection, size: int) -> np.ndarray:
    """A permutation of 0..size-1 whose first n entries are ``injection`` (distinct physical
    indices of the n logical items) followed by the unused indices in increasing order: the form
    :func:`nvjax.chip.deploy` takes (entries past n are the empty positions)."""
    inj = np.asarray(injection, np.int64)
    if inj.ndim != 1 or len(np.unique(inj)) != inj.size or (inj.size and (inj.min() < 0 or
                                                                          inj.max() >= size)):
        raise ValueError(f"complete_permutation: expected distinct indices in [0, {size}), got "
                         f"{inj.tolist() if inj.size < 20 else inj.shape}")
    rest = np.setdiff1d(np.arange(size), inj)
    return np.concatenate([inj, rest])


def disturb_error_factor(g_pos, g_neg, kappa, disturb: dist_mod.DisturbParams):
    """Variance of the weight error of read disturb per unit of (median damage)^(2β), [n_in, n_out].

    A pair (G⁺, G⁻) with median damage s̄ (both cells read alike) moves by
    ΔG± = (G_∞ − G±)·ε_f·(s̄·e^(−σ_ln·z±))^β (small-damage branch of D7, z± independent normals).
    Its mean, ε_f·s̄^β·e^(β²σ²/2)·(d⁺ − d⁻) with d± = G_∞ − G±, is −(G⁺ − G⁻)·const: a shrink
    of the weight that global drift compensation cancels (exactly where the damage is uniform);
    what remains is the variance
    Var[ΔG⁺ − ΔG⁻]/κ² = ε_f²·s̄^(2β)/κ²·(d⁺² + d⁻²)·(e^(2β²σ²) − e^(β²σ²)).
    It does not vanish for a zero weight (d⁺ = d⁻ = G_∞ − g_min): the spread of the two cells'
    damage, not the weight, makes the error (what |w·∂L/∂w| misses). Weight units² per s̄^(2β).
    """
    b, sig = disturb.beta, disturb.sigma_ln
    dp, dm = disturb.g_inf - g_pos, disturb.g_inf - g_neg
    e2, e1 = jnp.exp(2.0 * b * b * sig * sig), jnp.exp(b * b * sig * sig)
    return disturb.eps_f ** 2 / kappa ** 2 * (dp * dp + dm * dm) * (e2 - e1)


def _node_losses(g_phys, v_rows, cfg: xb.TileConfig):
    """Word-line drop v_in − V_row and bit-line voltage V_col at every cell, V, [B, P, Q] each
    (from the cell voltages of :func:`nvjax.crossbar.cell_voltages`: the currents I = G·V_cell
    fix every node voltage of each tile)."""
    v_cell = xb.cell_voltages(g_phys, v_rows, config=cfg)           # [B, P, Q]
    i_cell = g_phys[None] * v_cell
    grid = jax.vmap(lambda i: xb.tile_grid(i, cfg))(i_cell)          # [B, Ti, Tj, R, C]
    vt = jnp.pad(v_rows, ((0, 0), (0, grid.shape[1] * cfg.rows - v_rows.shape[1])))
    vt = vt.reshape(v_rows.shape[0], grid.shape[1], cfg.rows)        # [B, Ti, R]

    def one(i_t, v_t):
        v_row, v_col = irdrop.wire_voltages(i_t, v_t, cfg.r_wire)
        return v_t[:, None] - v_row, v_col
    f = jax.vmap(jax.vmap(jax.vmap(one, (0, None)), (0, 0)), (0, 0))
    wl, bl = f(grid, vt)                                             # [B, Ti, Tj, R, C]
    back = jax.vmap(lambda t: xb.untile_grid(t, *g_phys.shape))
    return back(wl), back(bl)


def drive_position_factors(model, params, x, device, tile_config: xb.TileConfig,
                           disturb: dist_mod.DisturbParams, placement: Placement, *,
                           max_rows: int = 256, with_attenuation: bool = False):
    """Position factors of read disturb for a candidate layout, from real drives.

    For each layer, with the target conductances placed as ``placement`` says (full permutations
    of the physical rows and columns, :func:`complete_permutation`; empty cells at zero
    conductance), the IR drop of every input row vector of ``x`` (at most ``max_rows`` of them,
    evenly spaced) is solved (the converged solver, whatever ``tile_config.ir_drop`` says, unless
    it is 'none'). A read at physical cell (p, q) then sees the drive minus two losses: the
    word-line drop, which moves with the logical row (it depends on the row's own current), and
    the bit-line voltage, which belongs to the position. Averaging each over reads weighted by
    their disturb intensity exp(v/V_0):

        WL(q) = Σ_b,p w_bp·(v_bp − V_row,bpq)/Σ w_bp,    BL(p, q) = Σ_b w_b·V_col,bpq/Σ w_b,
        D[p, q] = exp(−(WL(q) + BL(p, q))/V_0),

    so a logical row with reads a_i placed at (p, q) is disturbed at about a_i·D[p, q] (1 without
    IR drop). Both sides (G⁺, G⁻) are averaged. The factors depend on the layout itself; see
    :func:`alternating_placement`.

    With ``with_attenuation`` also the MVM attenuation of a weight at (p, q), the least-squares
    ratio of its cell current to the ideal one over the inputs,
    A[p, q] = 1 − WL_rel(q) − BL_rel(p, q), WL_rel(q) = Σ_b,p v_bp·(v_bp − V_row,bpq)/Σ v_bp²,
    BL_rel(p, q) = Σ_b v̄_b·V_col,bpq/Σ_b v̄_b² (v̄_b the mean drive of the driven rows of input b).

    Returns:
        dict layer → D [P, Q] (NumPy float64), P, Q the lengths of the layer's permutations;
        with ``with_attenuation``, layer → (D, A).
    """
    kernels = layers.kernels(params)
    inputs = layers.layer_inputs(model, params, x)
    out = {}
    if tile_config.ir_drop == "none":
        ones = {n: np.ones((len(placement[n][0]), len(placement[n][1]))) for n in kernels}
        return {n: (o, o) for n, o in ones.items()} if with_attenuation else ones
    cfg = xb.TileConfig(rows=tile_config.rows, cols=tile_config.cols, ir_drop="solver",
                        r_wire=tile_config.r_wire, ir_max_iter=max(tile_config.ir_max_iter, 1000))
    for name, kern in kernels.items():
        rp, cp = (jnp.asarray(a, jnp.int32) for a in placement[name])
        shape = (rp.shape[0], cp.shape[0])
        gp, gm, _ = xb.tile(kern, device, config=tile_config)
        rows = inputs[name]
        if rows.shape[0] > max_rows:
            rows = rows[np.linspace(0, rows.shape[0] - 1, max_rows).astype(int)]
        u = rows / xb.input_scale(rows, config=tile_config)           # signed drives
        v = jnp.zeros((rows.shape[0], shape[0]), u.dtype).at[:, rp[:rows.shape[1]]].set(
            tile_config.v_read * u)
        d, a = _layer_factors(gp, gm, v, rp, cp, cfg, disturb.v0)
        d = np.asarray(d, np.float64)
        if not (np.all(np.isfinite(d)) and np.all(np.isfinite(np.asarray(a)))):
            # a solve that did not converge gives NaN under jit
            raise ValueError(f"drive_position_factors: the IR-drop solve of layer {name!r} did "
                             f"not converge (tile {cfg.rows}×{cfg.cols}, r_wire {cfg.r_wire} Ω)")
        out[name] = (d, np.asarray(a, np.float64)) if with_attenuation else d
    return out


@jax.jit   # one compilation per layer shape: layouts (rp, cp) and drives are arguments
def _layer_factors(gp, gm, v, rp, cp, cfg, v0):
    """(D, A) [P, Q] of :func:`drive_position_factors` for one layer."""
    av = jnp.abs(v)
    # read weights exp(|v|/V_0), relative to the largest (only ratios enter the means)
    w_bp = (v != 0) * jnp.exp((av - jnp.max(av)) / v0)               # [B, P]
    w_b = jnp.sum(w_bp, axis=1)
    v_bar = jnp.sum(av, axis=1) / jnp.maximum(jnp.sum(v != 0, axis=1), 1)
    d_sum, a_sum = 0.0, 0.0
    for g in (gp, gm):
        wl, bl = _node_losses(layers.to_physical(g, rp, cp), v, cfg)
        # the word-line loss has the sign of the row's own drive and lowers |V|; the bit-line
        # term is that of non-negative drives (images, ReLU outputs), an approximation for
        # signed ones
        wl_q = jnp.einsum("bp,bpq->q", w_bp, jnp.sign(v)[:, :, None] * wl) / jnp.maximum(
            jnp.sum(w_bp), 1e-30)
        bl_pq = jnp.einsum("b,bpq->pq", w_b, bl) / jnp.maximum(jnp.sum(w_b), 1e-30)
        d_sum = d_sum + jnp.exp(-(wl_q[None, :] + bl_pq) / v0)
        wl_rel = jnp.einsum("bp,bpq->q", v, wl) / jnp.maximum(jnp.sum(v * v), 1e-30)
        bl_rel = jnp.einsum("b,bpq->pq", v_bar, bl) / jnp.maximum(jnp.sum(v_bar ** 2), 1e-30)
        a_sum = a_sum + 1.0 - wl_rel[None, :] - bl_rel
    return 0.5 * d_sum, 0.5 * a_sum


def fisher_costs(model, params, x, device, tile_config: xb.TileConfig,
                 disturb: dist_mod.DisturbParams) -> Dict[str, np.ndarray]:
    """Weight factors C [n_in, n_out] of the read-disturb placement cost Σ C·D^(2β).

    ``C_ij = ½·F_ij·e_ij·a_i^(2β)``: the Fisher (Gauss-Newton) diagonal F of
    :func:`nvjax.sensitivity.fisher_diag` in the crossbar layout (loss per weight²), the
    variance of the pair's disturb error per unit damage e of :func:`disturb_error_factor`,
    and the voltage-weighted reads per inference a of :func:`layer_reads` (real drives). With D
    the position factors of :func:`drive_position_factors`, the damage of cell (i, j) at (p, q)
    is ∝ a_i·D[p, q] and the expected loss increase ∝ Σ C_ij·D[p, q]^(2β) (small-damage branch).
    """
    fisher = layers.kernels(sensitivity.fisher_diag(model, layers.strip_params(params), x))
    reads = layer_reads(model, params, x, tile_config, disturb)
    kernels = layers.kernels(params)
    out = {}
    for name, f in fisher.items():
        gp, gm, kappa = xb.tile(kernels[name], device, config=tile_config)
        e = disturb_error_factor(gp, gm, kappa, disturb)
        c = 0.5 * f * e * reads[name][:, None] ** (2.0 * disturb.beta)
        out[name] = np.asarray(c, np.float64)
    return out


def self_consistent_cost(costs, factors, placement: Placement, beta: float) -> float:
    """Σ over layers of Σ_ij C_ij·D[row_perm[i], col_perm[j]]^(2β), with D computed for this very
    placement (:func:`drive_position_factors`)."""
    total = 0.0
    for name, c in costs.items():
        rp, cp = placement[name]
        total += mapping.crossbar_cost(c, factors[name] ** (2.0 * beta),
                                       np.asarray(rp)[:c.shape[0]], np.asarray(cp)[:c.shape[1]])
    return float(total)


def alternating_placement(model, params, x, device, tile_config: xb.TileConfig,
                          disturb: dist_mod.DisturbParams, costs: Dict[str, np.ndarray], *,
                          start: Placement, rounds: int = 4, max_rows: int = 256, log=None):
    """Exact placement with position factors recomputed for the candidate layout.

    From ``start`` (full permutations, e.g. :func:`identity_placement` with a ``tile_config``):
    compute D for the current layout (:func:`drive_position_factors`), solve the crossbar
    assignment of Σ C·D^(2β) exactly in rows and columns
    (:func:`nvjax.mapping.crossbar_assign`, started from the current layout, sorted and
    identity), recompute D for the new layout, and repeat until the layout repeats or
    ``rounds`` rounds. Every candidate is scored by :func:`self_consistent_cost` (its own D);
    the best is returned.

    Returns:
        (placement, info) with info = {'history': self-consistent costs of the layouts visited}.
    """
    current = {n: (np.asarray(r), np.asarray(c)) for n, (r, c) in start.items()}
    beta = float(disturb.beta)
    best, best_cost, history = None, np.inf, []
    for k in range(rounds + 1):
        d = drive_position_factors(model, params, x, device, tile_config, disturb, current,
                                   max_rows=max_rows)
        cost = self_consistent_cost(costs, d, current, beta)
        history.append(cost)
        if log is not None:
            log(f"alternating placement, round {k}: self-consistent cost {cost:.6g}")
        if cost < best_cost:
            best, best_cost = current, cost
        if k == rounds:
            break
        new = {}
        for name, c in costs.items():
            rp, cp = current[name]
            r, q, _ = mapping.crossbar_assign(
                c, d[name] ** (2.0 * beta),
                starts=((rp[:c.shape[0]], cp[:c.shape[1]]), "sorted", "identity"))
            new[name] = (complete_permutation(r, len(rp)), complete_permutation(q, len(cp)))
        if all(np.array_equal(new[n][0], current[n][0]) and np.array_equal(new[n][1], current[n][1])
               for n in costs):
            break
        current = new
    return best, {"history": history}


def _factor_maps(factors, name):
    f = factors[name]
    if isinstance(f, tuple):
        return jnp.asarray(f[0], jnp.float32), jnp.asarray(f[1], jnp.float32)
    return jnp.asarray(f, jnp.float32), None


def horizon_objective(model, params, x, y, device, tile_config: xb.TileConfig,
                      disturb: dist_mod.DisturbParams, factors, *, horizon: float,
                      num_points: int = 4, num_chips: int = 4,
                      inference_rate_hz: float = 1e3):
    """The simulator's own Monte Carlo expected loss over the horizon, as a function of soft
    placements that never blur the weights.

    The weights stay where they are (logical layout); what a placement changes is the *position
    factors* of each weight: its read-disturb rate a_i·D[p, q] and (optionally) its IR-drop MVM
    attenuation A[p, q] (``factors[name] = D`` or ``(D, A)``, [P, Q], e.g. from
    :func:`drive_position_factors` of the current layout). For soft assignments P_r [n_in, P]
    (rows sum to 1) and P_c [n_out, Q], cell (i, j) gets D_soft = P_r·D·P_cᵀ and A_soft =
    P_r·A·P_cᵀ: for one-hot P every step evaluates a real placement's weights, and in between
    the factors, not the weights, are mixed.

    One Monte Carlo chip: programming noise (:func:`nvjax.devices.program` of the targets), a
    ln N_D spread z per cell, and at each of ``num_points`` horizon points n = horizon·k/num_points
    the D7 damage s = n·a_i·D_soft/N_D(V_ref, G0, z), the disturbed conductance, drift and read
    noise at t = n/inference_rate_hz (:func:`nvjax.devices.read`), global drift compensation
    (:func:`nvjax.crossbar.reference_sum`), the IR attenuation, and the cross-entropy on (x, y).
    The objective is the mean over points and ``num_chips`` chips (keys from its ``key``).

    Returns:
        (objective, names): ``objective(key, mats, factors=None)`` with mats = (P_row, P_col) per
        layer of ``names``; pass ``stochastic_objective=True`` to
        :func:`nvjax.mapping.relaxed_permutations`. ``factors`` (same form as the argument
        here) replaces the factors given here, so one compiled objective serves several
        layouts' factors (pass them as an argument of ``jit``).
    """
    params = layers.strip_params(params)
    kernels = layers.kernels(params)
    names = list(kernels)
    targets = {n: xb.tile(kernels[n], device, config=tile_config) for n in names}
    reads = {n: jnp.asarray(r) for n, r in layer_reads(model, params, x, tile_config,
                                                        disturb).items()}
    maps = {n: _factor_maps(factors, n) for n in names}
    flat = flatten_dict(params)
    points = float(horizon) * jnp.arange(1, num_points + 1, dtype=jnp.float32) / num_points
    x = jnp.asarray(x)
    y = jnp.asarray(y)

    def chip_loss(key, mats, maps):
        states, spreads = {}, {}
        for k, name in enumerate(names):
            gp, gm, _ = targets[name]
            kl = jax.random.fold_in(key, k)
            states[name] = tuple(dev_mod.program(jax.random.fold_in(kl, s), device, g)
                                 for s, g in enumerate((gp, gm)))
            spreads[name] = tuple(dist_mod.draw_spread(jax.random.fold_in(kl, 2 + s), gp.shape)
                                  for s in range(2))

        def at(n_inf, k_point):
            new = dict(flat)
            for k, name in enumerate(names):
                gp, gm, kappa = targets[name]
                pr, pc = mats[2 * k], mats[2 * k + 1]
                d_map, a_map = maps[name]
                rate = reads[name][:, None] * (pr @ d_map @ pc.T)
                g_read = []
                for s, st in enumerate(states[name]):
                    dmg = n_inf * rate / dist_mod.reads_to_failure(disturb, disturb.v_ref, st.g,
                                                                   spreads[name][s])
                    g_d = dist_mod.disturbed_conductance(disturb, st.g, dmg)
                    g_read.append(dev_mod.read(jax.random.fold_in(jax.random.fold_in(k_point, k), s),
                                               device, st._replace(g=g_d),
                                               n_inf / inference_rate_hz))
                diff = g_read[0] - g_read[1]
                # the chip's reference: its programmed conductances (crossbar.program_tiles)
                ref0 = xb.reference_sum(states[name][0].g - states[name][1].g, kappa,
                                        device=device)
                alpha = ref0 / jnp.maximum(xb.reference_sum(diff, kappa, device=device), 1e-30)
                w = diff / kappa * alpha
                if a_map is not None:
                    w = w * (pr @ a_map @ pc.T)
                path = tuple(name.split("/")) + ("kernel",)
                new[path] = layers.matrix_to_kernel(w, flat[path].shape)
            logits = model.apply({"params": unflatten_dict(new)}, x)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        keys = jax.random.split(jax.random.fold_in(key, len(names)), num_points)
        return jnp.mean(jax.vmap(at)(points, keys))

    def objective(key, mats, factors=None):
        m = maps if factors is None else {n: _factor_maps(factors, n) for n in names}
        return jnp.mean(jax.vmap(lambda c: chip_loss(jax.random.fold_in(key, c), mats, m))(
            jnp.arange(num_chips)))
    return objective, names


def hard_matrices(placement: Placement, names, shapes):
    """One-hot (P_row [n_in, P], P_col [n_out, Q]) per layer of ``names`` for a placement of full
    permutations (``shapes``: layer → (n_in, n_out))."""
    mats = []
    for n in names:
        for perm, size in zip(placement[n], shapes[n]):
            perm = np.asarray(perm)
            mats.append(jax.nn.one_hot(perm[:size], len(perm), dtype=jnp.float32))
    return tuple(mats)


def horizon_placement(key, objective, names, shapes, start: Placement, *, steps: int = 200,
                      learning_rate: float = 0.1, tau_start: float = 0.3, tau_end: float = 0.03,
                      start_sharpness: float = 3.0, sinkhorn_iters: int = 30, eval_key=None):
    """Relaxed search on :func:`horizon_objective` started from ``start`` (logits
    ``start_sharpness`` on its one-hot matrices), by :func:`nvjax.mapping.relaxed_permutations`
    with a fresh Monte Carlo key every step; the result is projected to the nearest injective
    maps and completed to full permutations (:func:`complete_permutation`).

    With ``eval_key`` the projected result and the start are scored on the hard objective
    ``objective(eval_key, one-hot mats)`` and the better one is returned (a search never ends
    worse than its start on that objective).

    Returns:
        (placement, info) with info = {'search': the search's :class:`nvjax.mapping.RelaxedInfo`,
        'hard_start', 'hard_result' (None without ``eval_key``), 'kept': 'result' or 'start'}.
    """
    init = tuple(start_sharpness * m for m in hard_matrices(start, names, shapes))
    sizes = [tuple(m.shape) for m in init]
    perms, info = mapping.relaxed_permutations(
        key, objective, sizes, init_logits=init, stochastic_objective=True, steps=steps,
        learning_rate=learning_rate, tau_start=tau_start, tau_end=tau_end,
        sinkhorn_iters=sinkhorn_iters)
    out = {}
    for k, n in enumerate(names):
        out[n] = (complete_permutation(perms[2 * k], sizes[2 * k][1]),
                  complete_permutation(perms[2 * k + 1], sizes[2 * k + 1][1]))
    result = {"search": info, "hard_start": None, "hard_result": None, "kept": "result"}
    if eval_key is not None:
        hard = jax.jit(lambda mats: objective(eval_key, mats))
        result["hard_start"] = float(hard(hard_matrices(start, names, shapes)))
        result["hard_result"] = float(hard(hard_matrices(out, names, shapes)))
        if result["hard_start"] <= result["hard_result"]:
            out, result["kept"] = start, "start"
    return out, result


def swap_local_search(key, objective, names, shapes, start: Placement, *, eval_key,
                      time_budget_s: float, batch: int = 16, max_evals: Optional[int] = None):
    """Swap local search on the hard objective ``objective(eval_key, one-hot mats)``.

    Each round proposes ``batch`` random swaps (a layer, rows or columns, a logical position and
    any physical position of that layer: another logical one or an empty one), evaluates them at
    once (``vmap``) and keeps the best if it lowers the objective; it stops after
    ``time_budget_s`` seconds (wall clock; both compilations happen before the clock starts) or
    ``max_evals`` evaluations.

    Returns:
        (placement, info) with info = {'history': objective after each round, 'evals': int,
        'seconds': float}.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1].item())
    current = {n: (np.asarray(r).copy(), np.asarray(c).copy()) for n, (r, c) in start.items()}
    f = jax.jit(jax.vmap(lambda mats: objective(eval_key, mats)))

    def stack(cands):
        mats = [hard_matrices(c, names, shapes) for c in cands]
        return tuple(jnp.stack([m[i] for m in mats]) for i in range(len(mats[0])))
    best = float(f(stack([current]))[0])
    f(stack([current] * batch)).block_until_ready()     # compile the batch before timing
    history, evals = [best], 1
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < time_budget_s and (max_evals is None or evals < max_evals):
        cands = []
        for _ in range(batch):
            cand = {n: (r.copy(), c.copy()) for n, (r, c) in current.items()}
            n = names[rng.integers(len(names))]
            axis = int(rng.integers(2))
            perm = cand[n][axis]
            a = int(rng.integers(shapes[n][axis]))
            b = int(rng.integers(len(perm)))
            perm[a], perm[b] = perm[b], perm[a]
            cands.append(cand)
        vals = np.asarray(f(stack(cands)))
        evals += batch
        k = int(np.argmin(vals))
        if vals[k] < best:
            best, current = float(vals[k]), cands[k]
        history.append(best)
    return current, {"history": history, "evals": evals, "seconds": time.perf_counter() - t0}
