"""Flax (linen) models to deploy on crossbars, their training, evaluation and (de)serialization.

Models use only ``nn.Dense`` and ``nn.Conv`` (biases optional) as parametrized layers, so that
:mod:`nvjax.chip` can intercept every such call and map it onto crossbar tiles:

* :class:`MLP` -- Dense layers with ReLU between them, e.g. ``MLP((64, 10))`` is the 64-64-10
  digits network.
* :class:`LeNet` -- a small LeNet-style CNN for 8x8x1 digit images.
* :class:`LSTMClassifier` -- an LSTM reading the digits row by row (8 steps of 8 pixels), built
  from plain ``nn.Dense`` layers unrolled over the time steps (no ``nn.scan``), so the chip can
  intercept its calls like any other Dense layer.
* :class:`ResNet` -- a ResNet-20-style CNN for 32x32x3 images (three stages of residual blocks;
  convolutions and the classifier on crossbars, BatchNorm, ReLU and pooling digital).
* :class:`Transformer` -- a small pre-LayerNorm transformer encoder classifier for token
  sequences (attention projections and MLPs on crossbars; softmax, LayerNorm, residuals and the
  positional embedding digital).

Models with BatchNorm take ``train: bool = False`` (running statistics when False); their
variables carry a ``'batch_stats'`` collection next to ``'params'``.

Parameters are the Flax variables dict ``{'params': {...}}`` returned by :func:`train`;
:func:`accuracy` and :func:`save_params` also accept the inner ``params`` dict. Files are
msgpack (:mod:`flax.serialization`), written atomically.

This module imports ``data``, ``_train_loop``, ``_xla``, jax, flax and optax.
"""
from __future__ import annotations

import functools
import numbers
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from . import data as data_mod
from ._train_loop import as_key as _as_key
from ._train_loop import check_positive as _check_positive
from ._train_loop import fit as _fit
from ._train_loop import init_variables as _init_variables
from ._train_loop import train_data as _train_data
from ._xla import FAST_COMPILE_OPTIONS
from .data import Dataset

__all__ = ["MLP", "LeNet", "LSTMClassifier", "ResNet", "Transformer", "MODELS", "dataset",
           "train", "accuracy", "predict", "save_params", "load_params", "get_trained"]

Params = Any


class MLP(nn.Module):
    """Multilayer perceptron: Dense layers with ReLU between; the last layer gives logits.

    Layers are named ``Dense_0``, ``Dense_1``, ... . Inputs are flattened per example, so both
    ``[B, 64]`` and ``[B, 8, 8, 1]`` digits are accepted.

    Attributes:
        features: output width of each Dense layer; the last one is the number of classes.
    """
    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        """Logits ``[B, features[-1]]`` for inputs ``[B, ...]``."""
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class LeNet(nn.Module):
    """Small LeNet-style CNN for 8x8x1 digits (NHWC).

    ``Conv 3x3, 8 ch (SAME) -> ReLU -> avg-pool 2x2 -> Conv 3x3, 16 ch (SAME) -> ReLU ->
    flatten (256) -> Dense 64 -> ReLU -> Dense num_classes``. Layers: ``Conv_0``, ``Conv_1``,
    ``Dense_0``, ``Dense_1``.

    Attributes:
        num_classes: number of output logits.
    """
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        """Logits ``[B, num_classes]`` for images ``[B, 8, 8, 1]`` (or flat ``[B, 64]``)."""
        if x.ndim == 2:
            x = jnp.reshape(x, (x.shape[0], 8, 8, 1))
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.num_classes)(x)


def _forget_bias_init(hidden: int):
    """Bias initializer of the fused gate projection [i, f, g, o]: 1 for the forget gate, else 0."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.zeros(shape, dtype).at[hidden:2 * hidden].set(1)
    return init


class LSTMClassifier(nn.Module):
    """LSTM classifier: reads an image row by row as a sequence, classifies the last hidden state.

    The cell is written with three plain ``nn.Dense`` layers, each reused at every time step:

    * ``x_proj`` -- input projection ``[F] -> [4H]`` with bias (gates ``i, f, g, o`` stacked in
      that order; the forget-gate bias starts at 1). It is applied once to the whole sequence
      ``[B, T, F]`` (the input projection does not depend on the recurrence).
    * ``h_proj`` -- recurrent projection ``[H] -> [4H]``, no bias; called once per time step
      (``T`` calls per forward pass, the first one on ``h_0 = 0``).
    * ``head`` -- ``[H] -> [num_classes]`` with bias, on the last hidden state ``h_T``.

    With ``z_t = x_proj(x_t) + h_proj(h_{t-1})`` split into ``(z_i, z_f, z_g, z_o)``:
    ``c_t = σ(z_f)·c_{t-1} + σ(z_i)·tanh(z_g)``, ``h_t = σ(z_o)·tanh(c_t)``, ``h_0 = c_0 = 0``.
    The time loop is a Python loop over the static sequence length, not ``nn.scan``/``nn.RNN``,
    so :func:`nvjax.chip.apply` can intercept every call (the recurrent layer's tiles see ``T``
    MVMs per forward pass; its read counters count all of them).

    Attributes:
        hidden: hidden / cell state width ``H``.
        num_classes: number of output logits.
        row_size: pixels per time step ``F`` when the input is flat ``[B, T·F]``.

    Example:
        >>> model = LSTMClassifier(hidden=16)
        >>> v = model.init(jax.random.key(0), jnp.zeros((1, 64)))
        >>> model.apply(v, jnp.zeros((5, 8, 8, 1))).shape
        (5, 10)

    References:
        Hochreiter & Schmidhuber, "Long short-term memory", Neural Computation 9 (1997);
        forget gate: Gers, Schmidhuber & Cummins, Neural Computation 12 (2000); forget-gate bias
        of 1: Jozefowicz, Zaremba & Sutskever, ICML 2015.
    """
    hidden: int = 32
    num_classes: int = 10
    row_size: int = 8

    def _sequence(self, x):
        """Inputs ``[B, T·F]``, ``[B, T, F]`` or ``[B, T, F, 1]`` as a sequence ``[B, T, F]``."""
        if x.ndim == 2:
            if isinstance(self.row_size, bool) or not isinstance(self.row_size, numbers.Integral) \
                    or self.row_size < 1:
                raise ValueError(f"LSTMClassifier: row_size must be a positive int, "
                                 f"got {self.row_size!r}")
            if x.shape[1] % self.row_size:
                raise ValueError(f"LSTMClassifier: flat inputs [B, D] need D divisible by "
                                 f"row_size={self.row_size}, got shape {tuple(x.shape)}")
            return jnp.reshape(x, (x.shape[0], -1, self.row_size))
        if x.ndim == 4 and x.shape[-1] == 1:
            return x[..., 0]
        if x.ndim == 3:
            return x
        raise ValueError(f"LSTMClassifier: inputs must be [B, T*F], [B, T, F] or [B, T, F, 1], "
                         f"got shape {tuple(x.shape)}")

    @nn.compact
    def __call__(self, x):
        """Logits ``[B, num_classes]`` for inputs ``[B, 64]``, ``[B, 8, 8]`` or ``[B, 8, 8, 1]``
        (generally ``[B, T·F]`` with ``F = row_size``, ``[B, T, F]`` or ``[B, T, F, 1]``)."""
        seq = self._sequence(jnp.asarray(x))
        batch, steps = seq.shape[0], seq.shape[1]
        if steps < 1:
            raise ValueError("LSTMClassifier: the sequence has no time steps")
        H = self.hidden
        x_proj = nn.Dense(4 * H, bias_init=_forget_bias_init(H), name="x_proj")
        h_proj = nn.Dense(4 * H, use_bias=False, name="h_proj")
        zx = x_proj(seq)                                         # [B, T, 4H]
        h = jnp.zeros((batch, H), zx.dtype)
        c = jnp.zeros((batch, H), zx.dtype)
        for t in range(steps):                                   # static unroll, shared weights
            z = zx[:, t] + h_proj(h)
            z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
            c = nn.sigmoid(z_f) * c + nn.sigmoid(z_i) * jnp.tanh(z_g)
            h = nn.sigmoid(z_o) * jnp.tanh(c)
        return nn.Dense(self.num_classes, name="head")(h)


class _ResidualBlock(nn.Module):
    """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))``; the shortcut is the identity, or
    a strided 1x1 conv + BN (on crossbars like every conv) when the shape changes."""
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding="SAME",
                    use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
        y = norm()(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-style CNN for small images (NHWC), after He et al.'s CIFAR-10 ResNets.

    ``conv3x3(w0) -> BN -> ReLU``, then three stages of ``blocks`` residual blocks with widths
    ``widths`` (the first block of stages 2 and 3 has stride 2 and a 1x1-conv shortcut), global
    average pooling and ``Dense(num_classes)``. With the defaults (``blocks=3``, widths 16/32/64)
    it is ResNet-20: 19 convolutions and one Dense layer, about 0.27 M weights. Every conv and
    the Dense layer run on crossbars; BatchNorm (inference statistics), ReLU, the residual sums and
    the pooling are digital.

    Attributes:
        num_classes: number of output logits.
        blocks: residual blocks per stage.
        widths: channels of the three stages (the stem has ``widths[0]``).

    References:
        He, Zhang, Ren & Sun, "Deep residual learning for image recognition", CVPR 2016 (§4.2:
        the 6n+2-layer CIFAR-10 networks; n = 3 is ResNet-20).
    """
    num_classes: int = 10
    blocks: int = 3
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits ``[B, num_classes]`` for images ``[B, H, W, C]``."""
        if x.ndim != 4:
            raise ValueError(f"ResNet: inputs must be images [B, H, W, C], got shape "
                             f"{tuple(x.shape)}")
        x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, width in enumerate(self.widths):
            for b in range(self.blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = _ResidualBlock(width, stride)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class _EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer encoder layer with its projections as plain ``nn.Dense``."""
    dim: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        batch, length, _ = x.shape
        dh = self.dim // self.heads
        h = nn.LayerNorm()(x)
        split = lambda a: a.reshape(batch, length, self.heads, dh)  # noqa: E731
        q = split(nn.Dense(self.dim, name="query")(h))
        k = split(nn.Dense(self.dim, name="key")(h))
        v = split(nn.Dense(self.dim, name="value")(h))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(dh))
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.Dense(self.dim, name="out")(att.reshape(batch, length, self.dim))
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.mlp_dim, name="mlp_in")(h)
        return x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(h))


class Transformer(nn.Module):
    """A small transformer encoder classifier for sequences ``[B, L, F]`` (e.g. one-hot tokens).

    ``Dense(dim)`` input embedding plus a learned positional embedding, ``layers`` pre-LayerNorm
    encoder layers (multi-head self-attention with ``heads`` heads, then a GELU MLP of width
    ``mlp_dim``, each with a residual connection), a final LayerNorm, mean pooling over the
    sequence and ``Dense(num_classes)``. The query, key, value and output projections and the
    MLP layers are plain ``nn.Dense`` (so each is one crossbar matrix); the embedding, the
    attention scores and softmax, LayerNorm, GELU and the residual sums are digital.

    Attributes:
        num_classes: number of output logits.
        dim: model width (divisible by ``heads``).
        heads: attention heads.
        layers: encoder layers.
        mlp_dim: hidden width of each MLP.
        max_length: longest sequence the positional embedding covers.

    References:
        Vaswani et al., "Attention is all you need", NeurIPS 2017; pre-LayerNorm placement:
        Xiong et al., "On layer normalization in the transformer architecture", ICML 2020.
    """
    num_classes: int = 12
    dim: int = 32
    heads: int = 4
    layers: int = 2
    mlp_dim: int = 64
    max_length: int = 64

    @nn.compact
    def __call__(self, x):
        """Logits ``[B, num_classes]`` for sequences ``[B, L, F]``, ``L <= max_length``."""
        if x.ndim != 3:
            raise ValueError(f"Transformer: inputs must be sequences [B, L, F], got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] > self.max_length:
            raise ValueError(f"Transformer: sequence length {x.shape[1]} exceeds max_length="
                             f"{self.max_length}")
        if self.dim % self.heads:
            raise ValueError(f"Transformer: dim={self.dim} must be divisible by heads="
                             f"{self.heads}")
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (self.max_length, self.dim))
        x = nn.Dense(self.dim, name="embed")(x) + pos[:x.shape[1]]
        for i in range(self.layers):
            x = _EncoderLayer(self.dim, self.heads, self.mlp_dim, name=f"layer_{i}")(x)
        x = nn.LayerNorm()(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


#: Names accepted by :func:`get_trained`: (constructor, data set of :func:`dataset`, default
#: epochs).
MODELS = {
    "mlp": (lambda: MLP(features=(64, 10)), "digits", 40),
    "lenet": (lambda: LeNet(num_classes=10), "digits-images", 30),
    "lstm": (lambda: LSTMClassifier(hidden=32, num_classes=10), "digits-images", 100),
    "resnet": (lambda: ResNet(num_classes=10), "images", 3),
    "transformer": (lambda: Transformer(num_classes=12), "sequences", 20),
}


def dataset(name: str, *, seed: int = 0) -> Dataset:
    """The data set a model of :data:`MODELS` is trained and evaluated on.

    ``'mlp'``: the 8x8 digits, flat ``[N, 64]``; ``'lenet'``, ``'lstm'``: the digits as images
    ``[N, 8, 8, 1]``; ``'resnet'``: :func:`nvjax.data.procedural_images` (6000 images 32x32x3,
    10 classes, pixel noise 0.4; 4800 train, 1200 test; ResNet-20 reaches 95.7 % test accuracy
    after its 3 default epochs, seed 0); ``'transformer'``: :func:`nvjax.data.procedural_sequences`
    (6000 one-hot sequences of 16 tokens, vocabulary 12, 12 classes given by the order of 4
    markers; 4800 train, 1200 test).
    All are split (and generated) by ``seed``.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    kind = MODELS[name][1]
    if kind in ("digits", "digits-images"):
        return data_mod.digits(seed=seed, flatten=kind == "digits")
    if kind == "images":   # pixel noise 0.4: ResNet-20 reaches 95-96 %, not 100 % (at 0.25)
        return data_mod.procedural_images(seed, num_samples=6000, noise=0.4)
    return data_mod.procedural_sequences(seed, num_samples=6000, num_markers=4, num_classes=12)


def _variables(params: Params) -> Params:
    """``{'params': ...}`` from either the variables dict or the inner params dict."""
    if isinstance(params, dict) and "params" in params:     # a variables dict (+ batch_stats)
        return params
    return {"params": params}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE_OPTIONS)
def _logits(model, variables, x):
    return model.apply(variables, x)


def predict(model: nn.Module, params: Params, x, *, batch_size: int = 2048) -> np.ndarray:
    """Predicted class of each input.

    Args:
        model: a Flax module.
        params: its variables ``{'params': ...}`` (or the inner dict).
        x: inputs ``[N, ...]``.
        batch_size: evaluation batch size (bounds memory).

    Returns:
        int32 array ``[N]``.
    """
    variables = _variables(params)
    x = np.asarray(x)
    out = [np.asarray(jnp.argmax(_logits(model, variables, x[i:i + batch_size]), -1))
           for i in range(0, x.shape[0], batch_size)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)


def accuracy(model: nn.Module, params: Params, x, y, *, batch_size: int = 2048) -> float:
    """Fraction of inputs classified correctly.

    Args:
        model: a Flax module.
        params: its variables ``{'params': ...}`` (or the inner dict).
        x: inputs ``[N, ...]``.
        y: integer labels ``[N]``.
        batch_size: evaluation batch size.

    Returns:
        Accuracy in ``[0, 1]`` as a Python float.
    """
    y = np.asarray(y)
    if np.asarray(x).shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {np.asarray(x).shape[0]} "
                         f"and {y.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("accuracy of an empty set (x has no rows)")
    return float(np.mean(predict(model, params, x, batch_size=batch_size) == y))


def train(key, model: nn.Module, data: Dataset, *, epochs: int, batch_size: int = 64,
          learning_rate: float = 1e-3, weight_decay: float = 0.0,
          progress: bool = False) -> Tuple[Params, Dict[str, List[float]]]:
    """Train ``model`` on ``data`` with Adam(W) and softmax cross-entropy.

    A model whose variables have collections besides ``'params'`` (BatchNorm statistics) is
    called with ``train=True`` and those collections mutable; they are updated by the model (the
    running averages), not by the optimizer.

    Each epoch visits the training set in a random order (drawn from ``key``) in minibatches of
    ``batch_size``; the last ``N_train mod batch_size`` samples of each permutation are skipped
    (different ones every epoch). One epoch is one jitted ``lax.scan`` over the minibatches.
    The result is deterministic for a given key on a given backend.

    Args:
        key: JAX PRNG key (or an int seed) for initialization and shuffling.
        model: a Flax module mapping inputs ``[B, ...]`` to logits ``[B, C]``.
        data: a :class:`~nvjax.data.Dataset`; labels in ``0..C-1``.
        epochs: number of passes over the training set, ``>= 1``.
        batch_size: minibatch size, ``1 <= batch_size <= N_train``.
        learning_rate: Adam step size, ``> 0``.
        weight_decay: decoupled (AdamW) weight decay, ``>= 0`` (0 is plain Adam).
        progress: print one line per epoch.

    Returns:
        ``(params, history)``: the variables ``{'params': ...}`` (and e.g. ``'batch_stats'``)
        and a dict with per-epoch lists
        ``'train_loss'`` (mean minibatch loss), ``'test_accuracy'`` and ``'time_s'``
        (cumulative wall time, including compilation).

    Raises:
        ValueError: on a bad argument; the message names it.
    """
    _check_positive("epochs", epochs, True)
    _check_positive("batch_size", batch_size, True)
    _check_positive("learning_rate", learning_rate, False)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) \
            or not np.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    x_train, y_train, steps = _train_data(data, batch_size)
    key = _as_key(key)
    init_key, shuffle_key = jax.random.split(key)
    variables = _init_variables(model, init_key, x_train[:1])
    tx = optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay > 0 \
        else optax.adam(learning_rate)

    collections = sorted(c for c in variables if c != "params")

    def loss_fn(v, t, xb, yb):
        if collections:        # BatchNorm: batch statistics, running averages updated
            logits, new = model.apply(v, xb, train=True, mutable=collections)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new
        logits = model.apply(v, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return _fit(loss_fn, variables, tx, x_train, y_train, steps=steps, batch_size=batch_size,
                epochs=epochs, shuffle_key=shuffle_key, progress=progress,
                evaluate=lambda v: accuracy(model, v, data.x_test, data.y_test))


def save_params(path: str, params: Params) -> None:
    """Write ``params`` (any pytree of arrays, e.g. ``{'params': ...}``) to a msgpack file.

    The file is written to a temporary file in the same folder and renamed over ``path``, so a
    reader never sees a partial file. Missing parent folders are created.

    Args:
        path: destination file (conventionally ``*.msgpack``).
        params: the parameters to save.
    """
    data = serialization.to_bytes(params)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_params(path: str, template: Optional[Params] = None) -> Params:
    """Read parameters written by :func:`save_params`.

    Args:
        path: the msgpack file.
        template: optional pytree with the expected structure (e.g. from ``model.init``); when
            given, the result has its structure, and the file must hold exactly its keys
            with the same shapes (else ``ValueError``).

    Returns:
        The parameters: with a template, restored into its structure; without, the nested dict
        of the file (e.g. ``{'params': {'Dense_0': {'kernel': ..., 'bias': ...}, ...}}``) with
        JAX arrays as leaves.
    """
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    state = serialization.msgpack_restore(data)
    if template is None:
        return jax.tree.map(jnp.asarray, state)
    from flax.traverse_util import flatten_dict
    want = flatten_dict(serialization.to_state_dict(template), sep="/")
    got = flatten_dict(state, sep="/") if isinstance(state, dict) else {}
    if set(want) != set(got):
        raise ValueError(f"load_params: {path} does not match template: missing "
                         f"{sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}")
    bad = [f"{k}: {np.shape(got[k])} vs template {np.shape(want[k])}" for k in want
           if np.shape(got[k]) != np.shape(want[k])]
    if bad:
        raise ValueError(f"load_params: {path} has shapes that differ from the template: {bad}")
    return serialization.from_state_dict(template, state)


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def get_trained(name: str, *, cache_dir: Optional[str] = None, seed: int = 0,
                epochs: Optional[int] = None) -> Tuple[nn.Module, Params]:
    """A model trained on its data set (:func:`dataset`, split ``seed``), optionally cached.

    Args:
        name: ``'mlp'`` (64-64-10 MLP on flat digits), ``'lenet'`` (:class:`LeNet` on 8x8x1
            images), ``'lstm'`` (:class:`LSTMClassifier`, H = 32, on 8x8x1 images read as 8
            rows of 8 pixels), ``'resnet'`` (:class:`ResNet`-20 on 32x32x3 procedural images)
            or ``'transformer'`` (:class:`Transformer`, 2 layers, width 32, 12 classes, on
            procedural sequences).
        cache_dir: folder for ``{name}_seed{seed}_epochs{epochs}.msgpack``; reloaded when it
            exists (and matches the model's parameter shapes), else trained and written. None:
            always train, nothing written.
        seed: seed of the data split and of training.
        epochs: training epochs; None uses the model's default (mlp 40, lenet 30, lstm 100,
            resnet 3, transformer 20).

    Returns:
        ``(model, params)`` with ``params = {'params': ...}`` (and ``'batch_stats'`` for the
        ResNet).

    Raises:
        ValueError: on an unknown ``name`` (the message lists the valid names) or bad ``epochs``.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}, got {name!r}")
    make, _, default_epochs = MODELS[name]
    epochs = default_epochs if epochs is None else epochs
    _check_positive("epochs", epochs, True)
    model = make()
    ds = dataset(name, seed=seed)
    path = None
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), f"{name}_seed{seed}_epochs{epochs}.msgpack")
        if os.path.exists(path):
            params = load_params(path)
            expected = jax.eval_shape(model.init, jax.random.key(0), ds.x_test[:1])
            if _shapes(params) == _shapes(expected):
                return model, params
    params, _ = train(jax.random.key(seed), model, ds, epochs=epochs)
    if path is not None:
        save_params(path, params)
    return model, params
