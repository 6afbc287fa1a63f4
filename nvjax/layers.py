"""Flax introspection shared by every module that maps a network onto crossbars.

Which parameters are crossbar weights (every ``kernel`` leaf of a ``nn.Dense``/``nn.Conv``), how
a kernel becomes a 2-D crossbar matrix and back, the layer names ('/'-joined module paths), and
the row vectors a layer's crossbar is driven with (conv inputs as im2col patches), and a logical
matrix in the physical layout of a placement (:func:`to_physical`).

Flax NNX modules (:func:`from_nnx`) are wrapped as a linen module, :class:`NNXModel`, whose
crossbar layers (every ``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral`` and ``nnx.Einsum``)
are plain 2-D ``nn.Dense`` layers, so everything in nvjax that takes a linen model takes it.

This module imports only jax, numpy and flax.
"""
from __future__ import annotations

import functools
import itertools
import math
import sys
from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["strip_params", "split_variables", "variables", "kernel_matrix", "matrix_to_kernel",
           "layer_names", "kernels", "module_name", "as_rows", "im2col", "window_slices",
           "conv_geometry",
           "layer_inputs",
           "inverse_permutation", "CROSSBAR_LAYERS", "NNXModel", "from_nnx", "is_nnx"]

#: The Flax layer types whose kernels are deployed on crossbars.
CROSSBAR_LAYERS = (nn.Dense, nn.Conv)


def strip_params(params):
    """The inner parameter dict: ``{'params': p, ...}`` (a variables dict, other collections such
    as ``'batch_stats'`` dropped) → ``p``; anything else is returned as is."""
    return split_variables(params)[0]


def split_variables(variables) -> Tuple[Any, Dict[str, Any]]:
    """A Flax variables dict split into its parameters and its other collections.

    ``{'params': p, 'batch_stats': s, ...}`` → ``(p, {'batch_stats': s, ...})``; a tree without a
    top-level ``'params'`` key is taken as the inner parameter dict: ``p`` → ``(p, {})``.
    """
    if isinstance(variables, dict) and "params" in variables:
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}
    return variables, {}


def variables(params, state=None) -> Dict[str, Any]:
    """The variables dict ``{'params': params, **state}`` that ``model.apply`` takes (``params``
    may itself be a variables dict, whose other collections are kept unless ``state`` names
    them)."""
    inner, rest = split_variables(params)
    return {"params": inner, **rest, **(state or {})}


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
    ks, strides, padding = conv_geometry(module, x)
    nd = len(ks)
    batched = x.ndim == nd + 2
    xb_ = x if batched else x[None]
    patches = im2col(xb_, ks, strides, padding)
    out_sp = patches.shape[1:-1]

    def back(y):
        y = y.reshape((xb_.shape[0],) + out_sp + (y.shape[-1],))
        return y if batched else y[0]
    return patches.reshape(-1, patches.shape[-1]), back


def window_slices(x, window, strides, padding) -> list:
    """For each window offset (row-major), the strided slice of the padded ``x``
    [B, *spatial, C] that the offset sees at every output position: [B, *out_spatial, C] each.

    ``padding`` is one ``(low, high)`` pair per spatial axis, zeros (negative values crop).
    The slabs of :func:`im2col`, and of :func:`nvjax.crossbar.conv_mvm`'s per-offset path.
    """
    nd = len(window)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in padding) + ((0, 0, 0),))
    out = [(xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(nd)]
    slabs = []
    for off in itertools.product(*(range(k) for k in window)):
        limit = tuple(off[d] + (out[d] - 1) * strides[d] + 1 for d in range(nd))
        slabs.append(jax.lax.slice(xp, (0,) + off + (0,),
                                   (xp.shape[0],) + limit + (xp.shape[-1],),
                                   (1,) + tuple(strides) + (1,)))
    return slabs


def im2col(x, window, strides, padding) -> jax.Array:
    """im2col patches of ``x`` [B, *spatial, C]: [B, *out_spatial, C·prod(window)], channel-major
    (feature ``c·prod(window) + k`` with ``k`` the row-major window offset), the layout of
    ``lax.conv_general_dilated_patches`` (zero padding ``padding`` = ``(low, high)`` per
    spatial axis, negative crops).

    Built from one strided slice per window offset (:func:`window_slices`): pure data movement.
    ``conv_general_dilated_patches`` computes the same patches as a convolution with a one-hot
    filter, C·prod(window) output features, i.e. C·prod(window)/C_out times the FLOPs of the
    layer's own convolution (9× for a 3×3 conv with as many output as input channels; a
    ResNet-20 chip forward through patches, batch 256, took 2.7 s with it and 1.7 s with this,
    2 cores).
    """
    p = jnp.stack(window_slices(x, window, strides, padding), axis=-1)   # [B, *out, C, K]
    return p.reshape(p.shape[:-2] + (p.shape[-2] * p.shape[-1],))


def conv_geometry(module, x) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[Tuple[int, int], ...]]:
    """A conv layer's (window, strides, explicit ``(low, high)`` padding per spatial axis) for
    inputs ``x`` ([B, *spatial, C] or unbatched [*spatial, C]), checked: no dilation, feature
    group count 1, padding 'SAME', 'VALID', an int or pairs (a Flax linen or NNX ``Conv``)."""
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
        padding = tuple(jax.lax.padtype_to_pads(x.shape[-nd - 1:-1], ks, strides, padding))
    elif isinstance(padding, int):
        padding = ((padding, padding),) * nd
    else:
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    return ks, strides, tuple((int(lo), int(hi)) for lo, hi in padding)


def layer_inputs(model: nn.Module, params, x) -> Dict[str, jax.Array]:
    """The 2-D input rows [N, n_in] of every Dense/Conv layer for model input ``x`` (ideal,
    software weights; ``params`` is the inner parameter dict or the whole variables dict, e.g.
    with ``batch_stats``); a layer called several times keeps the rows of its last call."""
    seen = {}

    def rec(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, CROSSBAR_LAYERS):
            rows, _ = as_rows(mod, args[0])
            seen[module_name(mod)] = rows
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(rec):
        model.apply(variables(params), jnp.asarray(x))
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


# ---------------------------------------------------------------------------------------------
# Flax NNX modules
# ---------------------------------------------------------------------------------------------

def is_nnx(model) -> bool:
    """Whether ``model`` is a Flax NNX module (``flax.nnx.Module``).

    Does not import ``flax.nnx`` (about 0.3 s): an NNX module exists only once it is imported.
    """
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _einsum_axes(einsum_str: str, name: str):
    """(input indices, kernel indices, contracted indices C, kernel output indices O, output
    indices) of an ``nnx.Einsum`` equation ``'lhs,rhs->out'`` that is one matrix product: every kernel index is
    either contracted with the input (C) or passed to the output (O)."""
    eq = einsum_str.replace(" ", "")
    if "..." in eq or "->" not in eq or eq.count(",") != 1:
        raise NotImplementedError(f"from_nnx: Einsum {name!r}: equation {einsum_str!r} is not "
                                  "supported (explicit 'lhs,rhs->out' without '...' only)")
    ins, out = eq.split("->")
    lhs, rhs = ins.split(",")
    contracted = tuple(i for i in rhs if i in lhs and i not in out)
    outs = tuple(i for i in rhs if i in out and i not in lhs)
    if len(contracted) + len(outs) != len(rhs) or any(i not in rhs and i not in out for i in lhs):
        raise NotImplementedError(
            f"from_nnx: Einsum {name!r}: {einsum_str!r} is not one matrix product (a kernel "
            "index shared by input and output is a batched/grouped product, and an index summed "
            "over one operand alone has no crossbar form)")
    return lhs, rhs, contracted, outs, out


class _Layout(NamedTuple):
    """The static description of one NNX crossbar layer."""
    name: str            # the layer's path joined by '.'
    path: tuple          # its path in the module
    kind: str            # 'linear', 'conv', 'general' (LinearGeneral) or 'einsum'
    shape: tuple         # the NNX kernel's shape
    n_in: int            # crossbar matrix rows
    n_out: int           # crossbar matrix columns
    info: Any            # LinearGeneral: its input axes; Einsum: its equation
    bias: bool           # whether its bias is the crossbar layer's (Einsum: digital)


def _layer_layout(name, path, sub) -> _Layout:
    lay = _layout(name, path, sub)
    return _Layout(*lay, lay[2] != "einsum" and getattr(sub, "bias", None) is not None)


def _layout(name, path, sub):
    from flax import nnx
    shape = tuple(sub.kernel.shape)
    if isinstance(sub, nnx.Linear):
        return (name, path, "linear", shape, shape[0], shape[1], None)
    if isinstance(sub, nnx.Conv):
        if sub.feature_group_count != 1:
            raise NotImplementedError(f"from_nnx: Conv {name!r}: grouped convolutions "
                                      "(feature_group_count != 1) are not supported")
        return (name, path, "conv", shape, math.prod(shape[:-1]), shape[-1], None)
    if isinstance(sub, nnx.LinearGeneral):
        if sub.batch_axis:
            raise NotImplementedError(f"from_nnx: LinearGeneral {name!r}: batch_axis is not "
                                      "supported (a batched product is not one crossbar matrix)")
        n_in = math.prod(sub.in_features)
        return (name, path, "general", shape, n_in, math.prod(shape) // n_in,
                tuple(int(a) for a in sub.axis))
    if isinstance(sub, nnx.Einsum):
        if sub.einsum_str is None:
            raise NotImplementedError(f"from_nnx: Einsum {name!r} takes its equation at call "
                                      "time; give it to the constructor")
        _, rhs, c, o, _ = _einsum_axes(sub.einsum_str, name)
        size = dict(zip(rhs, shape))
        return (name, path, "einsum", shape, math.prod(size[i] for i in c),
                math.prod(size[i] for i in o), sub.einsum_str.replace(" ", ""))
    raise TypeError(f"from_nnx: {name!r} is not a crossbar layer")  # pragma: no cover


def _nnx_matrix(layout, kernel):
    """An NNX layer's kernel as its crossbar matrix [n_in, n_out]."""
    kind, n_in, n_out, info = layout.kind, layout.n_in, layout.n_out, layout.info
    if kind == "conv":
        return kernel_matrix(kernel)
    if kind == "einsum":
        _, rhs, c, o, _ = _einsum_axes(info, layout.name)
        kernel = jnp.transpose(kernel, [rhs.index(i) for i in c + o])
    return jnp.reshape(kernel, (n_in, n_out))


def _nnx_kernel(layout, w):
    """The inverse of :func:`_nnx_matrix`."""
    kind, shape, info = layout.kind, layout.shape, layout.info
    if kind == "conv":
        return matrix_to_kernel(w, shape)
    if kind == "einsum":
        _, rhs, c, o, _ = _einsum_axes(info, layout.name)
        order = [rhs.index(i) for i in c + o]
        w = jnp.reshape(w, [shape[k] for k in order])
        return jnp.transpose(w, [order.index(k) for k in range(len(shape))])
    return jnp.reshape(w, shape)


def _nnx_rows(layout, sub, x):
    """An NNX layer's input as rows [N, n_in] and the function mapping rows of outputs
    [N, n_out] back to the layer's output shape (without bias)."""
    kind, shape, n_in, n_out, info = (layout.kind, layout.shape, layout.n_in, layout.n_out,
                                      layout.info)
    if kind == "linear":
        lead = x.shape[:-1]
        return x.reshape(-1, n_in), lambda y: y.reshape(lead + (n_out,))
    if kind == "conv":
        return as_rows(sub, x)
    if kind == "general":
        axes = tuple(a % x.ndim for a in info)
        free = [a for a in range(x.ndim) if a not in axes]
        lead = tuple(x.shape[a] for a in free)
        rows = jnp.transpose(x, free + list(axes)).reshape(-1, n_in)
        out_shape = shape[len(axes):]
        return rows, lambda y: y.reshape(lead + out_shape)
    lhs, rhs, c, o, out = _einsum_axes(info, layout.name)
    size = dict(zip(lhs, x.shape))
    size.update(zip(rhs, shape))
    free = [i for i in lhs if i not in c]
    rows = jnp.transpose(x, [lhs.index(i) for i in free + list(c)]).reshape(-1, n_in)

    def back(y):
        y = y.reshape([size[i] for i in free + list(o)])
        return jnp.transpose(y, [(free + list(o)).index(i) for i in out])
    return rows, back


def _key(path) -> str:
    return ".".join(str(p) for p in path)


class NNXModel(nn.Module):
    """A Flax NNX module as a linen module whose crossbar layers are 2-D ``nn.Dense`` layers.

    Made by :func:`from_nnx`, with its variables. Calling it merges the NNX module from its graph
    definition and the variables, and runs it with every crossbar layer's call sent through a
    linen ``nn.Dense`` named after the layer (its NNX path joined by '.', e.g. ``'blocks.0.mlp'``)
    on the layer's input rows (conv: im2col patches; ``LinearGeneral``/``Einsum``: the input's
    contracted axes flattened), so :func:`nvjax.chip.apply` intercepts it like any Dense layer.
    The merged module is put in inference mode (``.eval()``: BatchNorm running statistics,
    dropout off).

    Variables: ``'params'``: one ``{'kernel' [n_in, n_out], 'bias' [n_out]}`` per crossbar layer
    (``Einsum`` biases stay digital) and ``'digital'``, every other parameter by its joined path;
    ``'nnx_state'``: the module's other variables (e.g. BatchNorm statistics) by joined path.

    Attributes:
        graphdef: the NNX graph definition (static, hashable).
        layouts: per crossbar layer ``(name, path, kind, kernel shape, n_in, n_out, info,
            crossbar bias?)``.
        digital_paths: paths of the other parameters.
        state_paths: paths of the non-parameter variables.
    """
    graphdef: Any
    layouts: Tuple[Any, ...]
    digital_paths: Tuple[Any, ...]
    state_paths: Tuple[Any, ...]

    @nn.compact
    def __call__(self, x):
        from flax import nnx
        digital = self.param("digital", lambda key: {})
        state = self.variables.get("nnx_state", {})
        dense = {}
        params = {p: digital[_key(p)] for p in self.digital_paths}
        stored = self.variables.get("params", {})
        for lay in self.layouts:
            name, path, kind, shape, has_bias = lay.name, lay.path, lay.kind, lay.shape, lay.bias
            dense[name] = nn.Dense(lay.n_out, use_bias=has_bias, name=name)
            if name in stored:     # the merged module's own kernel/bias (its call is rerouted)
                params[path + ("kernel",)] = _nnx_kernel(lay, stored[name]["kernel"])
                if has_bias:
                    out_shape = shape[len(lay.info):] if kind == "general" else shape[-1:]
                    params[path + ("bias",)] = jnp.reshape(stored[name]["bias"], out_shape)
        if any(lay.name not in stored for lay in self.layouts):
            raise ValueError("NNXModel: its variables come from nvjax.layers.from_nnx; it "
                             "cannot be initialized with init()")
        rest = {p: state[_key(p)] for p in self.state_paths}
        module = nnx.merge(self.graphdef, unflatten_dict(params), unflatten_dict(rest))
        module.eval()
        by_path = {lay.path: lay for lay in self.layouts}
        for path, sub in nnx.iter_graph(module):
            lay = by_path.get(tuple(path))
            if lay is not None:
                object.__setattr__(sub, "_nvjax_call", _Route(lay, sub, dense[lay.name]))
                sub.__class__ = _routed_class(type(sub))
        return module(x)


class _Route:
    """One NNX crossbar layer's call: rows → the layer's linen Dense → back (+ Einsum bias)."""

    def __init__(self, layout, sub, dense):
        self.layout, self.sub, self.dense = layout, sub, dense

    def __call__(self, x, *args, **kwargs):
        if args or kwargs:
            raise NotImplementedError(f"NNXModel: layer {self.layout.name!r} was called with "
                                      "extra arguments; only layer(x) is supported")
        x = jnp.asarray(x)
        rows, back = _nnx_rows(self.layout, self.sub, x)
        y = back(self.dense(rows))
        if self.layout.kind == "einsum" and self.sub.bias is not None:
            kernel = self.sub.kernel[...]
            y = y + jnp.reshape(self.sub.bias[...], self.sub._infer_broadcasted_bias_shape(
                self.layout.info, x, kernel))
        return y


@functools.lru_cache(maxsize=None)
def _routed_class(base):
    """A subclass of an NNX layer class whose ``__call__`` is the instance's ``_nvjax_call``
    (made once per class)."""
    return type(base.__name__, (base,),
                {"__call__": lambda self, *a, **k: self._nvjax_call(*a, **k),
                 "__module__": __name__})


def from_nnx(module) -> Tuple[NNXModel, Dict[str, Any]]:
    """A Flax NNX module as ``(linen model, variables)`` for everything in nvjax.

    Every ``nnx.Linear``, ``nnx.Conv`` (no feature groups), ``nnx.LinearGeneral`` (no
    ``batch_axis``) and ``nnx.Einsum`` (an equation that is one matrix product, e.g.
    ``'btd,dhk->bthk'``) becomes a crossbar layer whose kernel is reshaped to a 2-D matrix
    ``[n_in, n_out]`` (``LinearGeneral``: input axes × output features; ``Einsum``: the kernel's
    contracted indices × its output indices, in the equation's order; conv: the im2col layout
    of :func:`kernel_matrix`), named by its path in the module joined by '.'. Everything else
    (other parameters, normalization, activations) stays digital.

    Returns:
        ``(model, variables)``: an :class:`NNXModel` and its variables; ``model.apply(variables,
        x)`` equals ``module(x)`` in inference mode.

    Raises:
        TypeError: ``module`` is not an NNX module.
        ValueError: it has no crossbar layer.
        NotImplementedError: a layer's form has no single crossbar matrix (named).
    """
    if not is_nnx(module):
        raise TypeError(f"from_nnx: expected a flax.nnx.Module, got {type(module).__name__}")
    from flax import nnx
    layer_types = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    flat = flatten_dict(params.to_pure_dict())
    layouts = []
    for path, sub in nnx.iter_graph(module):
        if isinstance(sub, layer_types):
            path = tuple(path)
            layouts.append(_layer_layout(_key(path), path, sub))
    if not layouts:
        raise ValueError("from_nnx: the module has no Linear/Conv/LinearGeneral/Einsum layer")
    layouts.sort(key=lambda lay: lay.name)
    variables = {"params": {}}
    taken = set()
    for lay in layouts:
        name, path = lay.name, lay.path
        entry = {"kernel": _nnx_matrix(lay, flat[path + ("kernel",)])}
        taken.add(path + ("kernel",))
        if lay.bias:
            entry["bias"] = jnp.reshape(flat[path + ("bias",)], (lay.n_out,))
            taken.add(path + ("bias",))
        variables["params"][name] = entry
    digital_paths = tuple(p for p in flat if p not in taken)
    variables["params"]["digital"] = {_key(p): flat[p] for p in digital_paths}
    state_flat = flatten_dict(rest.to_pure_dict())
    if state_flat:
        variables["nnx_state"] = {_key(p): v for p, v in state_flat.items()}
    model = NNXModel(graphdef=graphdef, layouts=tuple(layouts), digital_paths=digital_paths,
                     state_paths=tuple(state_flat))
    return model, variables
