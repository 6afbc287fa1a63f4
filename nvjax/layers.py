"""Flax introspection shared by every module that maps a network onto crossbars.

Which parameters are crossbar weights (every ``kernel`` leaf of a ``nn.Dense``/``nn.Conv``), how
a kernel becomes a 2-D crossbar matrix and back, the layer names ('/'-joined module paths), and
the row vectors a layer's crossbar is driven with (conv inputs as im2col patches), and a logical
matrix in the physical layout of a placement (:func:`to_physical`).

This module imports only jax, numpy and flax.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

__all__ = ["strip_params", "kernel_matrix", "matrix_to_kernel", "layer_names", "kernels",
           "module_name", "as_rows", "layer_inputs", "inverse_permutation", "CROSSBAR_LAYERS"]

#: The Flax layer types whose kernels are deployed on crossbars.
CROSSBAR_LAYERS = (nn.Dense, nn.Conv)


def strip_params(params):
    """The inner parameter dict: ``{'params': p}`` → ``p``; anything else is returned as is."""
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def kernel_matrix(kernel):
    """A Dense kernel [n_in, n_out] as is; a Conv kernel [*window, C_in, C_out] → [C_in·Πwindow, C_out]
    (channel-major, the feature order of ``lax.conv_general_dilated_patches``)."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim == 2:
        return kernel
    nd = kernel.ndim - 2
    perm = (nd,) + tuple(range(nd)) + (nd + 1,)
    return jnp.transpose(kernel, perm).reshape(-1, kernel.shape[-1])


def matrix_to_kernel(w, shape: Tuple[int, ...]):
    """The inverse of :func:`kernel_matrix`: a crossbar matrix back to a kernel of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return w
    nd = len(shape) - 2
    w = w.reshape((shape[-2],) + shape[:nd] + (shape[-1],))
    return jnp.transpose(w, tuple(range(1, nd + 1)) + (0, nd + 1))


def layer_names(params) -> Tuple[str, ...]:
    """Names ('/'-joined module paths) of every parametrized layer holding a ``kernel``."""
    flat = flatten_dict(strip_params(params))
    return tuple("/".join(k[:-1]) for k in flat if k[-1] == "kernel")


def kernels(params) -> Dict[str, Any]:
    """Layer name → its kernel as a crossbar matrix [n_in, n_out] (:func:`kernel_matrix`)."""
    flat = flatten_dict(strip_params(params))
    return {"/".join(k[:-1]): kernel_matrix(v) for k, v in flat.items() if k[-1] == "kernel"}


def module_name(module: nn.Module) -> str:
    """The '/'-joined path of a bound Flax module (its layer name)."""
    return "/".join(module.path)


def as_rows(module: nn.Module, x) -> Tuple[jax.Array, Callable]:
    """Inputs of a Dense/Conv call as a 2-D batch of row vectors, and a function to reshape back.

    Conv inputs become im2col patches (``lax.conv_general_dilated_patches``; any strides and
    padding, no dilation, feature_group_count 1), in the feature order of :func:`kernel_matrix`.

    Returns:
        (rows [N, n_in], back) where ``back(y [N, n_out])`` has the layer's output shape.
    """
    if isinstance(module, nn.Dense):
        lead = x.shape[:-1]
        return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(lead + (y.shape[-1],))
    if getattr(module, "feature_group_count", 1) != 1:
        raise NotImplementedError("chip: grouped convolutions are not supported")
    ks = tuple(module.kernel_size)
    nd = len(ks)
    if any(d not in (None, 1) and d != (1,) * nd
           for d in (module.input_dilation, module.kernel_dilation)):
        raise NotImplementedError("chip: dilated convolutions are not supported")
    strides = module.strides or 1
    strides = (strides,) * nd if isinstance(strides, int) else tuple(strides)
    padding = module.padding
    if isinstance(padding, str):
        padding = padding.upper()
        if padding not in ("SAME", "VALID"):
            raise NotImplementedError(f"chip: conv padding {padding!r} is not supported")
    elif isinstance(padding, int):
        padding = [(padding, padding)] * nd
    else:
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    batched = x.ndim == nd + 2
    xb_ = x if batched else x[None]
    spatial = "HWD"[:nd] if nd <= 3 else None
    dn = ("N" + spatial + "C", "OI" + spatial, "N" + spatial + "C")
    patches = jax.lax.conv_general_dilated_patches(xb_, ks, strides, padding, dimension_numbers=dn)
    out_sp = patches.shape[1:-1]

    def back(y):
        y = y.reshape((xb_.shape[0],) + out_sp + (y.shape[-1],))
        return y if batched else y[0]
    return patches.reshape(-1, patches.shape[-1]), back


def layer_inputs(model: nn.Module, params, x) -> Dict[str, jax.Array]:
    """The 2-D input rows [N, n_in] of every Dense/Conv layer for model input ``x`` (ideal,
    software weights); a layer called several times keeps the rows of its last call."""
    seen = {}

    def rec(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, CROSSBAR_LAYERS):
            rows, _ = as_rows(mod, args[0])
            seen[module_name(mod)] = rows
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(rec):
        model.apply({"params": strip_params(params)}, jnp.asarray(x))
    return seen


def inverse_permutation(perm):
    """``inv`` with ``inv[perm[i]] = i`` (int array)."""
    return jnp.argsort(perm)


def to_physical(w, row_perm, col_perm):
    """A layer's logical matrix in the physical layout of a placement (:func:`nvjax.chip.deploy`).

    Args:
        w: logical matrix [n_in, n_out] (weights, or a per-cell quantity).
        row_perm, col_perm: int permutations of 0..P−1 and 0..Q−1, P ≥ n_in, Q ≥ n_out (may be
            traced); logical row i sits on physical row ``row_perm[i]``, logical column j on
            physical column ``col_perm[j]``, the positions ``row_perm[n_in:]`` and
            ``col_perm[n_out:]`` are empty.

    Returns:
        [P, Q] with ``out[row_perm[i], col_perm[j]] = w[i, j]`` and zeros on the empty rows and
        columns (``to_physical(ones, ...) > 0`` marks the occupied cells).
    """
    return _to_physical(jnp.asarray(w), jnp.asarray(row_perm), jnp.asarray(col_perm))


@jax.jit   # one compilation per shape (eager use would compile every small op separately)
def _to_physical(w, row_perm, col_perm):
    n_in, n_out = w.shape
    w = jnp.pad(w, ((0, row_perm.shape[0] - n_in), (0, col_perm.shape[0] - n_out)))
    return w[inverse_permutation(row_perm)][:, inverse_permutation(col_perm)]
