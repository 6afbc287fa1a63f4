"""A whole network on crossbars: deploy any Flax model's Dense/Conv kernels onto tiles, run it.

``deploy(key, model, params, device, config)`` programs every ``kernel`` of the parameter tree
onto differential-pair tiles (conv kernels [kh, kw, C_in, C_out] are unrolled to
[C_in·kh·kw, C_out], the im2col layout) and returns a :class:`Chip` pytree. ``apply(key, chip, x,
t)`` runs the Flax model with every ``nn.Dense``/``nn.Conv`` call intercepted and replaced by the
crossbar MVM of its tiles read at time ``t``; biases and everything else stay digital.

Conv layers: without IR drop or a placement, a conv runs on the tiles without im2col patches
(:func:`nvjax.crossbar.conv_mvm`: a convolution with the effective kernel, or one matmul per
window offset where the DAC, a per-tile ADC or output noise act per patch); otherwise its inputs
are turned into im2col patches (:func:`nvjax.layers.im2col`) and sent through the tiles as one
batch of vectors. Both agree to float rounding. Supported: any strides and padding, no
input/kernel dilation, feature_group_count 1.

Placement (``deploy(..., placement=...)``): a layer's logical rows and columns can be sent to any
physical rows and columns of its tile grid, which may have more of them than the layer needs
(spare rows, columns or whole tiles left empty, e.g. to keep inputs off the rows of a tile that
suffer most from IR drop or read disturb). An empty cell is modelled as zero conductance: both
devices of its pair are at G = 0 µS, so it carries no current (no contribution to the outputs or
to the IR drop of its tile).

Models may be any Flax linen model with its whole variables dict (collections besides
``'params'``, e.g. BatchNorm statistics, stay digital) or a Flax NNX module (converted by
:func:`nvjax.layers.from_nnx`).

This module imports ``devices``, ``crossbar``, ``layers``, ``_checks``, ``_ops`` and flax.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from . import crossbar as xb
from . import devices as dev_mod
from .layers import (as_rows, conv_geometry, from_nnx, inverse_permutation, is_nnx,
                     kernel_matrix, layer_inputs, layer_names, matrix_to_kernel, module_name,
                     split_variables, to_physical)
from ._checks import is_concrete
from ._ops import fold_in_range

__all__ = ["Chip", "Trace", "deploy", "with_tiles", "apply", "apply_traced", "effective_params"]


@struct.dataclass
class Chip:
    """A network deployed on crossbars (pytree).

    Attributes:
        tiles: dict layer name ('Dense_0', 'block/Conv_1', ...) → :class:`nvjax.crossbar.Tiles`.
        params: the model's parameters (kernels are used only for their shapes; biases are
            applied digitally from here).
        state: the model's other variable collections (e.g. ``{'batch_stats': ...}`` of
            BatchNorm layers, used as in inference), ``{}`` when it has none; digital.
        device: the device model (pytree of physics parameters).
        model: the Flax module (static).
        config: the :class:`nvjax.crossbar.TileConfig` (its physics numbers are leaves).
        placement: None, or layer name → (row_perm [P], col_perm [Q]) int32, permutations of
            0..P−1 and 0..Q−1 with P ≥ n_in and Q ≥ n_out (physical rows and columns of the
            layer's tile grid, row tiles of ``config.rows`` rows stacked): logical row i < n_in
            of the layer's weight matrix [n_in, n_out] sits on physical row ``row_perm[i]`` (any
            row tile), logical column j < n_out on physical column ``col_perm[j]``; the entries
            ``row_perm[n_in:]`` and ``col_perm[n_out:]`` are the physical rows and columns left
            EMPTY. An empty cell (on an empty row or column) is modelled as zero conductance
            (G⁺ = G⁻ = 0 µS, not stuck: it carries no current). The tiles (conductances
            [P, Q], read counters [P], disturb state) are stored in the physical layout;
            P == n_in and Q == n_out is a plain permutation.
        gain, offset: None, or layer name → [n_out] per-column digital correction (logical
            column order) applied to the layer's crossbar output before its bias:
            y ← gain·y + offset (fitted by :func:`nvjax.correction.calibrate`); layers not named
            are uncorrected.
    """
    tiles: Dict[str, Any]
    params: Any
    device: Any
    model: nn.Module = struct.field(pytree_node=False)
    config: xb.TileConfig
    placement: Optional[Dict[str, Any]] = None
    gain: Optional[Dict[str, Any]] = None
    offset: Optional[Dict[str, Any]] = None
    state: Dict[str, Any] = struct.field(default_factory=dict)

    @property
    def variables(self) -> Dict[str, Any]:
        """The Flax variables dict ``{'params': params, **state}`` (software weights)."""
        return {"params": self.params, **self.state}


def _check_perm(name, what, perm, n):
    """A placement permutation as int32, checked: 1-D int of length P >= n, and (where concrete)
    a permutation of 0..P-1."""
    perm = jnp.asarray(perm)
    if perm.ndim != 1 or perm.shape[0] < n or not jnp.issubdtype(perm.dtype, jnp.integer):
        raise ValueError(f"deploy: placement[{name!r}] {what} must be a 1-D int array of length "
                         f"P >= {n} (a permutation of 0..P-1; entries from {n} on are the empty "
                         f"physical positions), got {perm.dtype} {tuple(perm.shape)}")
    m = perm.shape[0]
    if is_concrete(perm) and not np.array_equal(np.sort(np.asarray(perm)), np.arange(m)):
        raise ValueError(f"deploy: placement[{name!r}] {what} is not a permutation of 0..{m - 1}")
    return perm.astype(jnp.int32)


def _layer_perms(placement, name):
    """The (row_perm, col_perm) of layer ``name``, or None (identity placement)."""
    return placement[name] if placement is not None and name in placement else None


@jax.jit
def _rows_to_physical(rows, row_perm):
    """Input rows [N, n_in] → physical rows [N, P] (zero drive on the empty rows)."""
    rows = jnp.pad(rows, ((0, 0), (0, row_perm.shape[0] - rows.shape[1])))
    return rows[:, inverse_permutation(row_perm)]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _from_physical(w, perms, n_in, n_out):
    """Physical matrix [P, Q] → logical [n_in, n_out] (the inverse of
    :func:`nvjax.layers.to_physical`)."""
    rp, cp = perms
    return w[rp[:n_in]][:, cp[:n_out]]


def _has_spares(perms, n_in, n_out) -> bool:
    """Whether the placement leaves physical rows or columns empty (static: from the shapes)."""
    return perms[0].shape[0] > n_in or perms[1].shape[0] > n_out


def _clear_cells(state: dev_mod.CellState, keep) -> dev_mod.CellState:
    """``state`` with the cells outside ``keep`` at zero conductance: g = 0, no drift, no
    relaxation, not stuck (a stuck code would make the read return g_min or g_max)."""
    zero = lambda a: None if a is None else jnp.where(keep, a, jnp.zeros((), a.dtype))  # noqa: E731
    return dev_mod.CellState(g=zero(state.g), nu=zero(state.nu), relax=zero(state.relax),
                             stuck=zero(state.stuck))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _clear_empty(device, tiles: xb.Tiles, perms, n_in: int, n_out: int) -> xb.Tiles:
    """Tiles with every empty cell of the placement ``perms`` (no logical row or column, see
    :class:`Chip`) at zero conductance on both sides, and the drift-compensation reference
    recomputed from the remaining cells."""
    keep = to_physical(jnp.ones((n_in, n_out), bool), *perms)    # [P, Q], True: holds a weight
    pos, neg = _clear_cells(tiles.pos, keep), _clear_cells(tiles.neg, keep)
    return tiles.replace(pos=pos, neg=neg,
                         ref0=xb.reference_sum(pos.g - neg.g, tiles.kappa, device=device))


def deploy(key, model: nn.Module, params, device, *,
           config: xb.TileConfig = xb.TileConfig(), calibration: Optional[jax.Array] = None, placement: Optional[Dict[str, Any]] = None
           ) -> Chip:
    """Program every Dense/Conv kernel of ``params`` onto crossbar tiles.

    Args:
        key: PRNG key; layer ``k`` (in ``layer_names`` order) uses ``fold_in(key, k)``.
        model: the Flax linen module the parameters belong to, or a Flax NNX module (then
            ``params=None``; it is converted by :func:`nvjax.layers.from_nnx`, and the chip's
            ``model`` is the resulting :class:`nvjax.layers.NNXModel`, its layers named by their
            NNX paths joined by '.').
        params: its variables (``{'params': ..., 'batch_stats': ..., ...}``: every collection
            besides ``'params'`` is kept digital, e.g. BatchNorm statistics) or the inner
            parameter dict.
        device: device model from :mod:`nvjax.devices`.
        config: tile options.
        calibration: optional model inputs used to calibrate per-column ADC ranges.
        placement: optional layer name → (row_perm [P], col_perm [Q]), int arrays, permutations
            of 0..P−1 and 0..Q−1 with P ≥ n_in and Q ≥ n_out (see :class:`Chip`): logical row
            i < n_in goes to physical row ``row_perm[i]``, logical column j < n_out to physical
            column ``col_perm[j]``, and the remaining physical rows/columns stay empty. The
            layer's weights are zero-padded to [P, Q] and scattered to the physical layout before
            programming; afterwards every empty cell is set to zero conductance on both sides
            (an empty cell is modelled as zero conductance; its stuck-at code is cleared) and the
            drift-compensation reference is recomputed. The calibration rows are scattered to
            [N, P] likewise (zero drive on empty rows). The values may be traced (only their
            lengths are static); they are checked to be permutations where concrete. Layers not
            named keep the identity placement.

    Returns:
        :class:`Chip`.

    Raises:
        ValueError: a placement names an unknown layer, or a permutation is not a 1-D int array,
            is shorter than the layer's rows (columns), or (concrete) is not a permutation.
    """
    dev_mod.check_device(device, "deploy: device")
    if is_nnx(model):
        if params is not None:
            raise ValueError("deploy: a Flax NNX module carries its own parameters; pass "
                             "params=None")
        model, params = from_nnx(model)
    elif params is None:
        raise ValueError("deploy: params is None (only a Flax NNX module carries its own)")
    params, state = split_variables(params)
    flat = flatten_dict(params)
    kernels = {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == "kernel"}
    if not kernels:
        raise ValueError("deploy: the parameter tree has no 'kernel' leaves (Dense/Conv layers)")
    calib_rows = layer_inputs(model, {"params": params, **state}, calibration) \
        if calibration is not None else {}
    if placement is not None:
        unknown = set(placement) - set(kernels)
        if unknown:
            raise ValueError(f"deploy: placement names unknown layers {sorted(unknown)} "
                             f"(layers: {list(kernels)})")
        checked = {}
        for name, (rp, cp) in placement.items():
            n_in, n_out = kernel_matrix(kernels[name]).shape
            checked[name] = (_check_perm(name, "row_perm", rp, n_in),
                             _check_perm(name, "col_perm", cp, n_out))
        placement = checked
    tiles = {}
    layer_keys = fold_in_range(key, len(kernels))          # layer i: fold_in(key, i)
    for i, (name, kernel) in enumerate(kernels.items()):
        w = kernel_matrix(kernel)
        calib = calib_rows.get(name)
        perms = _layer_perms(placement, name)
        if perms is not None:
            n_in, n_out = w.shape
            w = to_physical(w, *perms)          # W_phys[row_perm[i], col_perm[j]] = W[i, j], [P, Q]
            calib = None if calib is None else _rows_to_physical(calib, perms[0])
        tl = xb.program_tiles(layer_keys[i], device, w, config=config,
                              calibration=calib)
        if perms is not None and _has_spares(perms, n_in, n_out):
            tl = _clear_empty(device, tl, perms, n_in, n_out)
        tiles[name] = tl
    return Chip(tiles=tiles, params=params, device=device, model=model, config=config,
                placement=placement, state=state)


def with_tiles(model: nn.Module, params, device, config: xb.TileConfig, tiles: Dict[str, Any], *,
               placement: Optional[Dict[str, Any]] = None) -> Chip:
    """The :class:`Chip` of ``tiles`` programmed earlier by :func:`deploy` with the same model,
    parameters, device, config and placement.

    For a two-stage sweep (:class:`nvjax.sweep.Staged`) whose first stage returns only
    ``deploy(...).tiles`` (the part that differs between chip instances) and whose second stage
    rebuilds the chip here from the shared parts.
    """
    if set(tiles) != set(layer_names(params)):
        raise ValueError(f"with_tiles: tiles for layers {sorted(tiles)} do not match the "
                         f"parameters' layers {sorted(layer_names(params))}")
    params, state = split_variables(params)
    return Chip(tiles=tiles, params=params, device=device, model=model,
                config=config, placement=placement, state=state)


class Trace(NamedTuple):
    """What :func:`apply_traced` returns."""
    outputs: Any                 # the model's outputs
    chip: "Chip"                 # the chip with its per-row read counters advanced
    inputs: Dict[str, jax.Array]  # layer name → crossbar input rows [N, P] (physical order)


def apply(key, chip: Chip, x, t):
    """Run the model with every Dense/Conv layer on its crossbar tiles, read at time ``t``.

    Args:
        key: PRNG key; layer ``k`` uses ``fold_in(key, k)`` for its read and output noise (its
            c-th further call in the same forward pass ``fold_in(fold_in(key, k), c)``).
        chip: from :func:`deploy`.
        x: model inputs (a batch).
        t: time since programming, s.

    Returns:
        The model's outputs (:func:`apply_traced` also returns the read counters and the
        crossbar inputs of every layer).
    """
    return apply_traced(key, chip, x, t).outputs


def apply_traced(key, chip: Chip, x, t) -> Trace:
    """:func:`apply`, also returning what the forward pass did to the crossbars.

    Returns:
        :class:`Trace` ``(outputs, chip, inputs)``: the outputs; the chip with its per-row read
        counters advanced; and per layer the row vectors its tiles were driven with, ``[N, P]``
        in physical row order (P = n_in without a placement; with one, the logical inputs sit
        on the physical rows ``row_perm[:n_in]`` and the empty rows get zero drive; conv
        layers: one per patch; a layer called several times, e.g. a recurrent projection, gets
        the rows of all its calls concatenated). Unused parts cost nothing under ``jit``.
    """
    names = list(chip.tiles)
    new_tiles = dict(chip.tiles)
    inputs = {}
    calls = {}
    layer_keys = fold_in_range(key, len(names))      # fold_in(key, k) for layer k

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if not isinstance(mod, (nn.Dense, nn.Conv)):
            if module_name(mod) in new_tiles:     # e.g. nn.DenseGeneral, nn.Einsum
                raise NotImplementedError(
                    f"chip.apply: layer {module_name(mod)!r} is a {type(mod).__name__}, whose "
                    "kernel was deployed but whose call cannot run on crossbars; linen models "
                    "run nn.Dense and nn.Conv on crossbars (multi-axis kernels: write the layer "
                    "as nn.Dense, or use a Flax NNX module, see nvjax.layers.from_nnx)")
            return next_fun(*args, **kwargs)
        name = module_name(mod)
        if name not in new_tiles:
            raise KeyError(f"chip.apply: layer {name!r} was not deployed (deployed: {names})")
        x_in = jnp.asarray(args[0])
        rows, back = as_rows(mod, x_in)
        perms = _layer_perms(chip.placement, name)
        if perms is not None:
            rows = _rows_to_physical(rows, perms[0])              # [N, P], physical row order
        c = calls.get(name, 0)
        calls[name] = c + 1
        inputs[name] = rows if c == 0 else jnp.concatenate([inputs[name], rows])
        k = layer_keys[names.index(name)]
        if c:  # a layer called again in the same forward pass (e.g. recurrent): fresh read noise
            k = jax.random.fold_in(k, c)
        kshape = mod.variables["params"]["kernel"].shape
        if isinstance(mod, nn.Conv) and x_in.ndim == len(kshape) and xb.conv_supported(
                chip.config, int(np.prod(kshape[:-2])), placed=perms is not None):
            # a conv on the tiles' effective kernel: no im2col patches (unused under jit)
            ks, strides, padding = conv_geometry(mod, x_in)
            y, new_tiles[name] = xb.conv_mvm(k, chip.device, new_tiles[name], x_in, t,
                                             kernel_shape=kshape, strides=strides,
                                             padding=padding, config=chip.config)
            y = y.reshape(-1, kshape[-1])                          # [N, C_out], as from mvm
        else:
            y, new_tiles[name] = xb.mvm(k, chip.device, new_tiles[name], rows, t,
                                        config=chip.config)
        if perms is not None:
            y = y[:, perms[1][:kshape[-1]]]                            # [N, Q] → logical columns
        if chip.gain is not None and name in chip.gain:
            y = y * chip.gain[name]
        if chip.offset is not None and name in chip.offset:
            y = y + chip.offset[name]
        bias = mod.variables["params"].get("bias") if mod.use_bias else None
        if bias is not None:
            y = y + bias
        return back(y)

    with nn.intercept_methods(intercept):
        out = chip.model.apply(chip.variables, x)
    return Trace(out, chip.replace(tiles=new_tiles), inputs)


def effective_params(key, chip: Chip, t):
    """The parameter tree with every kernel replaced by its drift-compensated read-out weights
    (the inner parameter dict; ``{'params': it, **chip.state}`` is what ``model.apply`` takes).

    Equivalent to :func:`apply` when the periphery is ideal (no DAC/ADC/output noise), and cheaper
    to reuse for several batches (one read of the conductances). A per-column calibration
    (``chip.gain``/``chip.offset``) is folded into the kernel columns and the bias.
    """
    flat = flatten_dict(chip.params)
    names = list(chip.tiles)
    layer_keys = fold_in_range(key, len(names))
    for i, name in enumerate(names):
        tiles = chip.tiles[name]
        k_read, _ = jax.random.split(layer_keys[i])  # as in crossbar.mvm
        w_eff, alpha = xb.read_weights(k_read,
                                       chip.device, tiles, t, config=chip.config)
        path = tuple(name.split("/")) + ("kernel",)
        kern = flat[path]
        w = w_eff * alpha                                          # physical, [P, Q]
        perms = _layer_perms(chip.placement, name)
        if perms is not None:
            w = _from_physical(w, perms, *kernel_matrix(kern).shape)
        if chip.gain is not None and name in chip.gain:
            w = w * chip.gain[name]
        if chip.offset is not None and name in chip.offset:
            bpath = tuple(name.split("/")) + ("bias",)
            if bpath not in flat:
                raise NotImplementedError(f"effective_params: layer {name!r} has a column offset "
                                          "but no bias to fold it into")
            flat[bpath] = flat[bpath] + chip.offset[name]
        flat[path] = matrix_to_kernel(w, kern.shape)
    return unflatten_dict(flat)
