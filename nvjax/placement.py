"""Read-disturb-aware placement of a network's weights on its tiles (DESIGN.md §7.3).

Cost models that connect :mod:`nvjax.sensitivity` (criticality), the data (reads), the crossbar's
IR drop (voltage at each physical cell) and D7 (:mod:`nvjax.disturb`) to the solvers of
:mod:`nvjax.mapping`, and produce ``placement`` dicts for :func:`nvjax.chip.deploy` /
:func:`nvjax.lifetime.lifetime` (layer → (row_perm, col_perm), logical → physical).

* **Linear cost** (Paul et al., arXiv 2201.11527: Σ c·a/N_D(V)): synapse factor
  ``C[i, j] = c_ij · a_i`` with c the criticality and a_i = E_x[[x_i ≠ 0]·exp((|u_i|·v_read −
  V_ref)/V_0)] the voltage-weighted reads per inference of row i (u = x/s_x, the DAC-normalized
  input), and a position factor ``D[p, q] = exp(v_read·(η_pq − 1)/V_0)`` with η_pq the IR-drop
  attenuation of cell (p, q) for a full-scale drive of every row (the converged solver of
  :mod:`nvjax.irdrop`, identity placement). Σ C·D over a placement is then the
  criticality-weighted disturb rate.
* **Non-linear objective** (:func:`relaxed_objective`): for soft row/column permutations of every
  layer, the network's cross-entropy after ``n`` inferences of disturb computed by the simulator's
  own differentiable pieces — soft-placed conductances, per-input first-order cell voltages of the
  physical array, D7 damage and conductance shift, global drift compensation — which no exact
  solver can optimize (:func:`relaxed_placement`). The first-order form is a model of the IR
  drop only for a small coupling (:func:`nvjax.irdrop.first_order_error`); building the
  objective checks it on the layers' target conductances and warns with the numbers when its
  error exceeds 5 %.

Every stochastic function takes a PRNG ``key`` first (:func:`linear_costs` for the Hessian
probes, :func:`random_placement`, :func:`relaxed_placement`).

This module imports ``crossbar``, ``disturb``, ``irdrop``, ``layers``, ``mapping``,
``sensitivity``, ``_checks`` and flax.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from . import crossbar as xb
from . import disturb as dist_mod
from . import irdrop
from . import layers
from . import mapping
from . import sensitivity
from ._checks import check_key

__all__ = ["layer_reads", "position_factor", "linear_costs", "exact_placement",
           "random_placement", "identity_placement", "placement_cost", "relaxed_objective",
           "relaxed_placement"]

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


def identity_placement(params) -> Placement:
    return {n: (np.arange(k.shape[0]), np.arange(k.shape[1])) for n, k in layers.kernels(params).items()}


def random_placement(key, params) -> Placement:
    """Uniformly random row and column permutations of every layer's crossbar matrix.

    Args:
        key: PRNG key; layer k (in :func:`nvjax.layers.kernels` order) draws its row and column
            permutations from ``split(fold_in(key, k))``.
        params: the model parameters.

    Returns:
        dict layer name → (row_perm [n_in], col_perm [n_out]), NumPy int arrays.
    """
    check_key("key", key)
    out = {}
    for k, (n, kern) in enumerate(layers.kernels(params).items()):
        k_row, k_col = jax.random.split(jax.random.fold_in(key, k))
        out[n] = (np.asarray(jax.random.permutation(k_row, kern.shape[0])),
                  np.asarray(jax.random.permutation(k_col, kern.shape[1])))
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
