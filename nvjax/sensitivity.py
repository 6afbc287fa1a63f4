"""How much each weight matters, and how often each crossbar row is read.

This module computes the per-synapse and per-row statistics that programming and placement
decisions are built on (DESIGN.md §6 selective write-verify, §7.3 read-disturb-aware placement):

* :func:`saliency` -- first-order saliency ``|w ⊙ ∂L/∂w|``.
* :func:`hessian_diag` -- the diagonal of the Hessian of the loss by Hutchinson's estimator
  ``E[v ⊙ H v]`` with Rademacher probes ``v``; ``H v`` is a forward-over-reverse product
  (``jax.jvp`` of ``jax.grad``), probes are vmapped in chunks of ``batch`` (memory stays bounded).
* :func:`fisher_diag` -- the diagonal of the Fisher information (= the Gauss-Newton matrix of the
  softmax cross-entropy), ``E_x Σ_k p_k (∂ log p_k/∂w)²``: the loss increase of a small additive
  weight error δ is ``½·F_ii·δ²`` on average, whatever the weight's value.
* :func:`criticality_mc` -- Monte Carlo criticality: the saliency averaged over device-noise draws
  of the weights.
* :func:`swim_sensitivity` -- the SWIM sensitivity ``½·H_ii·σ_i²`` (Yan et al. 2022), the
  ranking of selective write-verify (:func:`nvjax.programming.selective_write_verify`).
* :func:`importance` -- per-kernel weight importance of a Flax classifier by one of three
  formulas (saliency ``|w·∂L/∂w|``, magnitude ``|w|``, Hessian ``½·|H_ii|·w²``, Fisher ``F_ii``), used by biased
  training (:func:`nvjax.training.top_mask`) and read-disturb-aware placement
  (:func:`nvjax.placement.linear_costs`).
* :func:`activation_stats` -- per Dense/Conv layer and per crossbar row: reads per inference and
  the mean/max absolute input, from the ideal (software) forward pass.
* :func:`kernel_criticality` -- a params-shaped tree mapped onto each layer's crossbar matrix
  layout (:func:`nvjax.layers.kernel_matrix`), to combine with per-row reads.

Every sensitivity function takes a generic ``loss(params) -> scalar`` (e.g. from :func:`loss_fn`),
so it works with any model and any parameter pytree; results have the structure of ``params``.
All of them are pure and traceable. Internally they are jitted with ``loss`` (and the integer
options) as static arguments: calling again with the *same* ``loss`` object reuses the compiled
computation (the jit cache then holds a reference to ``loss`` and whatever it closes over);
calling them inside a user's ``jax.jit`` works too.

Arguments are validated with the one policy of ``_checks`` (TypeError for a wrong type, ValueError
for a wrong value, the argument named). This module imports NumPy, jax, flax, optax, ``layers``
and ``_checks`` only.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict
from jax.flatten_util import ravel_pytree

from . import layers
from ._checks import check_int, check_key, is_concrete

__all__ = ["loss_fn", "saliency", "hessian_diag", "fisher_diag", "activation_stats", "criticality_mc",
           "swim_sensitivity", "importance", "kernel_criticality"]

Params = Any
Loss = Callable[[Params], jax.Array]

_NOISE_MODES = ("multiplicative", "additive")
_IMPORTANCE_METHODS = ("saliency", "magnitude", "hessian", "fisher")


# ----------------------------------------------------------------------------- validation helpers

def _check_float_tree(name: str, tree) -> None:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf, got {tree!r}")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"{name} must have floating-point leaves only, got a leaf of dtype "
                            f"{jnp.result_type(leaf)}")


def _check_loss(loss, params) -> None:
    if not callable(loss):
        raise TypeError(f"loss must be a callable params -> scalar, got {loss!r}")
    out = jax.eval_shape(loss, params)
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"loss must return a floating-point scalar, got {out!r}")
    if out.shape != ():
        raise ValueError(f"loss must return a floating-point scalar, got shape {out.shape}")


def _check_sigma(sigma, tree, tree_name: str):
    """σ as a pytree of the structure of ``tree`` (a scalar is broadcast to every leaf)."""
    treedef = jax.tree.structure(tree)
    if isinstance(sigma, bool):
        raise TypeError(f"sigma must be a number >= 0 or a pytree like {tree_name}, got {sigma!r}")
    is_scalar = isinstance(sigma, numbers.Real) or (hasattr(sigma, "shape") and
                                                    np.ndim(sigma) == 0)
    if is_scalar:
        sig_tree = jax.tree.unflatten(treedef, [sigma] * treedef.num_leaves)
    else:
        if jax.tree.structure(sigma) != treedef:
            raise ValueError(f"sigma must be a scalar or a pytree with the structure of "
                             f"{tree_name} ({treedef}), got structure {jax.tree.structure(sigma)}")
        sig_tree = sigma
    for s, leaf in zip(jax.tree.leaves(sig_tree), jax.tree.leaves(tree)):
        try:
            np.broadcast_shapes(np.shape(s), np.shape(leaf))
        except ValueError:
            raise ValueError(f"sigma leaf of shape {np.shape(s)} does not broadcast to the "
                             f"{tree_name} leaf of shape {np.shape(leaf)}") from None
        if is_concrete(s):
            a = np.asarray(s)
            if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise TypeError(f"sigma must be real, got dtype {a.dtype}")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise ValueError(f"sigma must be finite and >= 0, got {a!r}")
    return sig_tree


def _variables(params, state=None):
    """``{'params': inner, **collections}`` from parameters in either form (a whole variables
    dict included) and the fixed collections ``state``."""
    inner, rest = layers.split_variables(params)
    return {"params": inner, **rest, **(state or {})}


def _sum_over_indices(fn, num: int, batch: int):
    """Σ_{i<num} fn(i) for a pytree-valued ``fn``, vmapped ``batch`` at a time (``lax.scan``).

    The indices are padded up to a multiple of ``batch`` and the padding is masked out, so the
    body is compiled once (at most ``batch - 1`` wasted evaluations).
    """
    n_chunks = -(-num // batch)
    idx = jnp.arange(n_chunks * batch, dtype=jnp.uint32).reshape(n_chunks, batch)
    shapes = jax.eval_shape(fn, idx[0, 0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(acc, ids):
        vals = jax.vmap(fn)(ids)
        keep = ids < num

        def masked_sum(a, v):
            m = keep.reshape((-1,) + (1,) * (v.ndim - 1))
            return a + jnp.sum(jnp.where(m, v, jnp.zeros((), v.dtype)), axis=0)
        return jax.tree.map(masked_sum, acc, vals), None

    total, _ = jax.lax.scan(step, zeros, idx)
    return total


def _draw_like(sample, key, params):
    """A pytree like ``params`` filled by one draw ``sample(key, shape, dtype)`` of all entries."""
    flat, unravel = ravel_pytree(params)
    return unravel(sample(key, flat.shape, flat.dtype))


# ----------------------------------------------------------------------------- public functions

def loss_fn(model: nn.Module, x, y, *, state=None) -> Loss:
    """Mean softmax cross-entropy of a Flax classifier on a fixed batch, as a function of params.

    Args:
        model: a Flax module mapping inputs ``[N, ...]`` to logits ``[N, C]`` (a model with
            BatchNorm runs in inference mode, on its running statistics).
        x: inputs ``[N, ...]``.
        y: integer labels ``[N]`` in ``0..C-1``.
        state: the model's other variable collections, held fixed (e.g. ``{'batch_stats':
            ...}`` of a BatchNorm model: ``nvjax.layers.split_variables(variables)[1]``); None:
            none.

    Returns:
        ``loss(params) -> scalar``; ``params`` may be ``{'params': ...}`` or the inner dict (the
        sensitivity trees then have the same form).

    Raises:
        ValueError: when ``x``/``y`` have bad shapes.
        TypeError: when ``y`` is not integer.

    Example:
        >>> model, params = nvjax.models.get_trained("mlp")              # doctest: +SKIP
        >>> loss = loss_fn(model, ds.x_test, ds.y_test)                  # doctest: +SKIP
        >>> s = saliency(loss, params)                                   # doctest: +SKIP
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},) (one per row of x), "
                         f"got shape {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")

    state = {} if state is None else dict(state)

    def loss(params):
        logits = model.apply(_variables(params, state), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def saliency(loss: Loss, params: Params) -> Params:
    """First-order saliency ``|w ⊙ ∂L/∂w|`` of every parameter.

    Args:
        loss: ``loss(params) -> scalar``.
        params: parameter pytree (float leaves).

    Returns:
        A pytree like ``params`` (same shapes and dtypes), units of the loss.

    Example:
        >>> saliency(lambda w: jnp.sum(3.0 * w), jnp.array([1.0, -2.0]))
        Array([3., 6.], dtype=float32)
    """
    _check_float_tree("params", params)
    _check_loss(loss, params)
    return _saliency(loss, params)


@functools.partial(jax.jit, static_argnums=0)
def _saliency(loss, params):
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def hessian_diag(key, loss: Loss, params: Params, *, num_probes: int = 100,
                 batch: int = 10) -> Params:
    """Diagonal of the Hessian of ``loss`` by Hutchinson's estimator with Rademacher probes.

    ``diag(H) ≈ (1/num_probes) Σ_k v_k ⊙ (H v_k)``, ``v_k`` with independent ±1 entries; ``H v`` is
    ``jax.jvp`` of ``jax.grad(loss)`` (forward-over-reverse, no Hessian is formed). The estimate is
    unbiased; the variance of one probe's entry ``i`` is ``Σ_{j≠i} H_ij²`` (exact when ``H`` is
    diagonal). Probe ``k`` uses ``fold_in(key, k)``, so the result does not depend on ``batch`` and
    more probes extend the same sequence.

    Args:
        key: PRNG key for the probes.
        loss: ``loss(params) -> scalar``, twice differentiable.
        params: parameter pytree (float leaves).
        num_probes: number of Rademacher probes, ``>= 1``.
        batch: probes evaluated at once (vmapped); memory grows with it, ``>= 1``. Chunks are
            run by ``lax.scan``.

    Returns:
        A pytree like ``params``: the estimated ``H_ii`` (loss units per parameter unit²).

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18 (1989);
        C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a matrix", Appl.
        Numer. Math. 57 (2007).

    Example:
        >>> hessian_diag(jax.random.key(0), lambda w: jnp.sum(w ** 2), jnp.ones(3), num_probes=1)
        Array([2., 2., 2.], dtype=float32)
    """
    check_key("key", key)
    num_probes = check_int("num_probes", num_probes, 1)
    batch = min(check_int("batch", batch, 1), num_probes)
    _check_float_tree("params", params)
    _check_loss(loss, params)
    return _hessian_diag(loss, num_probes, batch, key, params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hessian_diag(loss, num_probes, batch, key, params):
    grad = jax.grad(loss)

    def one(i):
        v = _draw_like(jax.random.rademacher, jax.random.fold_in(key, i), params)
        _, hv = jax.jvp(grad, (params,), (v,))
        return jax.tree.map(jnp.multiply, v, hv)

    total = _sum_over_indices(one, num_probes, batch)
    return jax.tree.map(lambda t: t / num_probes, total)


def criticality_mc(key, loss: Loss, params: Params, *, sigma=0.1, num_samples: int = 32,
                   noise: str = "multiplicative", batch: int = 32) -> Params:
    """Monte Carlo criticality: the saliency ``|w̃ ⊙ ∂L/∂w(w̃)|`` averaged over noisy weights w̃.

    Device noise model (applied to every leaf of ``params``; pass a pytree ``sigma`` with zeros to
    spare e.g. digital biases), ``ε ~ N(0, 1)`` independent per weight and per sample:

    * ``noise='multiplicative'`` (default): ``w̃ = w + σ·|w|·ε`` (zero weights stay exactly zero);
    * ``noise='additive'``: ``w̃ = w + σ·max|w|·ε``, ``max|w|`` over the leaf (one layer's kernel),
      i.e. noise relative to the largest weight, as for conductance noise of fixed size on a
      differential pair scaled so that ``max|w|`` maps to ``g_max``.

    Sample ``s`` uses ``fold_in(key, s)``; the result does not depend on ``batch``. With
    ``sigma = 0`` it equals :func:`saliency`.

    Args:
        key: PRNG key for the noise draws.
        loss: ``loss(params) -> scalar``.
        params: parameter pytree (float leaves).
        sigma: relative noise level, ``>= 0``: a scalar, or a pytree like ``params`` whose leaves
            broadcast to the parameter leaves.
        num_samples: number of noise draws, ``>= 1``.
        noise: ``'multiplicative'`` or ``'additive'`` (see above).
        batch: draws evaluated at once (vmapped), ``>= 1``.

    Returns:
        A pytree like ``params``: the mean saliency under noise (loss units).

    Example:
        >>> criticality_mc(jax.random.key(0), lambda w: jnp.sum(w), jnp.array([1.0]), sigma=0.0,
        ...                num_samples=2)
        Array([1.], dtype=float32)
    """
    check_key("key", key)
    num_samples = check_int("num_samples", num_samples, 1)
    batch = min(check_int("batch", batch, 1), num_samples)
    if noise not in _NOISE_MODES:
        raise ValueError(f"noise must be one of {_NOISE_MODES}, got {noise!r}")
    _check_float_tree("params", params)
    sig = _check_sigma(sigma, params, "params")
    _check_loss(loss, params)
    return _criticality_mc(loss, num_samples, noise, batch, key, params, sig)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _criticality_mc(loss, num_samples, noise, batch, key, params, sig):
    if noise == "multiplicative":
        scale = jax.tree.map(lambda w, s: s * jnp.abs(w), params, sig)
    else:
        scale = jax.tree.map(lambda w, s: s * jnp.max(jnp.abs(w)), params, sig)
    grad = jax.grad(loss)

    def one(i):
        eps = _draw_like(jax.random.normal, jax.random.fold_in(key, i), params)
        w_n = jax.tree.map(lambda w, sc, e: (w + sc * e).astype(jnp.result_type(w)),
                           params, scale, eps)
        g = grad(w_n)
        return jax.tree.map(lambda w, gw: jnp.abs(w * gw), w_n, g)

    total = _sum_over_indices(one, num_samples, batch)
    return jax.tree.map(lambda t: t / num_samples, total)


def swim_sensitivity(hdiag: Params, sigma) -> Params:
    """SWIM sensitivity ``s_i = ½·H_ii·σ_i²``: expected loss increase from weight noise σ_i.

    The second-order term of ``E[ΔL]`` for independent zero-mean weight perturbations of std σ_i
    at a trained minimum (gradient ≈ 0). Negative curvature estimates give negative sensitivities
    (they are kept, not clamped). This is the ranking of selective write-verify: pass it to
    :func:`nvjax.programming.swim_mask`.

    Args:
        hdiag: diagonal of the Hessian, an array or a pytree (e.g. from :func:`hessian_diag`).
        sigma: weight-noise std (parameter units, ``>= 0``): a scalar, or a pytree like ``hdiag``
            whose leaves broadcast to its leaves; e.g. the programming noise in weight units,
            ``devices.programming_sigma(device, g_target)/κ`` for a differential pair of scale κ.

    Returns:
        A pytree like ``hdiag`` (loss units).

    References:
        Z. Yan, X. S. Hu, Y. Shi, "SWIM: Selective write-verify for computing-in-memory neural
        accelerators", DAC 2022.

    Example:
        >>> swim_sensitivity(jnp.array([2.0, 4.0]), 0.5)
        Array([0.25, 0.5 ], dtype=float32)
    """
    _check_float_tree("hdiag", hdiag)
    sig = _check_sigma(sigma, hdiag, "hdiag")
    return jax.tree.map(lambda h, s: (0.5 * h * jnp.square(s)).astype(jnp.result_type(h)),
                        hdiag, sig)


def fisher_diag(model: nn.Module, params: Params, x, *, batch: int = 64) -> Params:
    """Diagonal of the Fisher information of a softmax classifier (its Gauss-Newton diagonal).

    ``F_ii = (1/N)·Σ_n Σ_k p_nk·(∂ log p_nk/∂w_i)²`` with ``p_n = softmax(model(x_n))``: the exact
    expectation over the model's own predictive distribution (no label sampling), equal to the
    diagonal of the Gauss-Newton matrix ``Jᵀ·(diag p − p·pᵀ)·J`` of the cross-entropy. It is
    positive semi-definite, and ``½·F_ii·δ²`` is the expected loss increase of an additive error
    δ on weight i that does not depend on the weight's value -- the criticality of a conductance
    error such as read disturb's, which moves both devices of a pair toward G_∞ whatever the
    weight (DESIGN.md §7.3).

    Args:
        model: a Flax classifier mapping ``x`` to logits ``[N, K]``.
        params: its parameters (``{'params': ...}`` or the inner dict, float leaves).
        x: inputs ``[N, ...]`` (labels are not needed).
        batch: samples per vmapped chunk (memory: ``batch·K`` gradients at a time).

    Returns:
        A tree like ``params`` (loss units per weight unit squared); for a whole variables dict
        (``{'params': ..., 'batch_stats': ...}``: BatchNorm on its running statistics) the tree
        holds ``'params'`` only.

    References:
        S. Amari, "Natural gradient works efficiently in learning", Neural Comput. 10 (1998);
        N. Schraudolph, "Fast curvature matrix-vector products for second-order gradient
        descent", Neural Comput. 14 (2002) (Gauss-Newton = Fisher for softmax cross-entropy).

    Example:
        >>> import flax.linen as nn
        >>> m = nn.Dense(2); p = m.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> f = fisher_diag(m, p, jnp.ones((4, 3)))
        >>> bool(jnp.all(f["params"]["kernel"] >= 0))
        True
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"fisher_diag: x must be a non-empty batch [N, ...], got shape "
                         f"{tuple(x.shape)}")
    batch = check_int("batch", batch, 1)
    inner, state = layers.split_variables(params)
    _check_float_tree("params", inner)
    tree = _fisher(model, min(batch, x.shape[0]), inner, state, x)
    return {"params": tree} if isinstance(params, dict) and "params" in params else tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fisher(model, batch, params, state, x):
    n = x.shape[0]

    def one(i):
        xi = jax.lax.dynamic_index_in_dim(x, jnp.minimum(i, n - 1).astype(jnp.int32), 0, True)

        def logp(p):
            return jax.nn.log_softmax(model.apply(_variables(p, state), xi)[0])
        jac = jax.jacrev(logp)(params)                       # leaves [K, *shape]
        prob = jnp.exp(logp(params))
        return jax.tree.map(lambda j: jnp.tensordot(prob, jnp.square(j), axes=1), jac)
    total = _sum_over_indices(one, n, batch)
    return jax.tree.map(lambda t: t / n, total)


def importance(key, model: nn.Module, params: Params, x, y, *, method: str = "saliency",
               num_probes: int = 64) -> Dict[str, jax.Array]:
    """Importance of every crossbar weight (each ``kernel`` entry of the Dense/Conv layers).

    With ``L`` the mean softmax cross-entropy of ``model`` on ``(x, y)`` (:func:`loss_fn`):

    * ``'saliency'``: ``|w·∂L/∂w|`` (:func:`saliency`), the first-order loss change of removing w;
    * ``'magnitude'``: ``|w|``;
    * ``'fisher'``: ``F_ii`` (:func:`fisher_diag`, no weight factor): the loss increase per
      squared additive weight error, ``½·F_ii·δ²``; the criticality of errors that do not scale
      with the weight (read disturb after drift compensation);
    * ``'hessian'``: ``½·|H_ii|·w_i²`` with ``H_ii`` the Hutchinson estimate of the Hessian
      diagonal (:func:`hessian_diag`, ``num_probes`` Rademacher probes drawn from ``key``). At a
      trained minimum (∂L/∂w ≈ 0) setting ``w_i`` to 0 raises the loss by ``½·H_ii·w_i²`` to second
      order (the "optimal brain damage" saliency); the magnitude is taken because the estimate of
      ``H_ii`` can be negative.

    Args:
        key: PRNG key of the Hutchinson probes (required for every method, used by 'hessian').
        model: a Flax classifier mapping ``x`` to logits.
        params: its parameters (``{'params': ...}`` or the inner dict, float leaves).
        x: inputs ``[N, ...]``.
        y: integer labels ``[N]``.
        method: ``'saliency'``, ``'magnitude'``, ``'hessian'`` or ``'fisher'``.
        num_probes: Hutchinson probes of ``'hessian'``, ``>= 1``.

    Returns:
        dict layer name (``'/'``-joined module path, in :func:`nvjax.layers.layer_names` order) →
        array of the kernel's own shape (Dense ``[n_in, n_out]``, Conv ``[*window, C_in, C_out]``;
        :func:`kernel_criticality` or :func:`nvjax.layers.kernel_matrix` give the crossbar layout).
        Units: the loss's for 'saliency' and 'hessian', the weights' for 'magnitude', loss per
        weight² for 'fisher'.

    References:
        Y. LeCun, J. S. Denker, S. A. Solla, "Optimal brain damage", NIPS 1989 (the ½·H_ii·w²
        saliency); Hutchinson (1989) for the diagonal estimator (see :func:`hessian_diag`).

    Example:
        >>> imp = importance(jax.random.key(0), model, params, x, y)     # doctest: +SKIP
        >>> mask = nvjax.training.top_mask(imp, 0.1)                      # doctest: +SKIP
    """
    check_key("key", key)
    if method not in _IMPORTANCE_METHODS:
        raise ValueError(f"importance: method must be one of {_IMPORTANCE_METHODS}, got "
                         f"{method!r}")
    num_probes = check_int("num_probes", num_probes, 1)
    inner, state = layers.split_variables(params)
    _check_float_tree("params", inner)
    if method == "magnitude":
        tree = jax.tree.map(jnp.abs, inner)
    elif method == "saliency":
        tree = saliency(loss_fn(model, x, y, state=state), inner)
    elif method == "fisher":
        tree = layers.strip_params(fisher_diag(model, {"params": inner, **state}, x))
    else:
        h = hessian_diag(key, loss_fn(model, x, y, state=state), inner, num_probes=num_probes)
        tree = jax.tree.map(lambda hh, w: 0.5 * jnp.abs(hh) * jnp.square(w), h, inner)
    flat = flatten_dict(tree)
    out = {"/".join(path[:-1]): flat[path] for path in flatten_dict(inner) if path[-1] == "kernel"}
    if not out:
        raise ValueError("importance: params has no 'kernel' leaves (Dense/Conv layers)")
    return out


def activation_stats(model: nn.Module, params: Params, x) -> Dict[str, Dict[str, jax.Array]]:
    """Per Dense/Conv layer and per crossbar row: how often it is read and how hard it is driven.

    Runs the ideal (software) forward pass with every ``nn.Dense``/``nn.Conv`` call intercepted,
    as :func:`nvjax.chip.apply` does. A layer's crossbar inputs are its 2-D row vectors (Dense:
    one per input vector; Conv: one per patch, features in the channel-major im2col order of
    :func:`nvjax.layers.kernel_matrix`); row ``i`` is *read* by a vector whose entry ``i`` is
    non-zero (the counting rule of :func:`nvjax.crossbar.mvm`). A layer called several times
    accumulates over all calls.

    Args:
        model: the Flax module.
        params: its parameters (``{'params': ...}`` or the inner dict).
        x: a batch of ``N >= 1`` model inputs ``[N, ...]``.

    Returns:
        dict layer name (as :func:`nvjax.layers.layer_names`, in that order; layers that the forward
        pass never calls are left out) → dict with float arrays ``[n_in]``:
        ``'reads_per_inference'`` (reads of the row over the batch / N, i.e. per model input;
        for a conv, up to the number of output positions), ``'mean_abs'`` (mean ``|input|`` over
        all row vectors, zeros included) and ``'max_abs'`` (max ``|input|``).

    Raises:
        TypeError: when ``model`` is not a Flax module.
        ValueError: when ``x`` is not a non-empty batch, or the model calls no Dense/Conv layer.

    Example:
        >>> stats = activation_stats(model, params, ds.x_test)           # doctest: +SKIP
        >>> stats["Dense_0"]["reads_per_inference"].shape                # doctest: +SKIP
        (64,)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a non-empty batch of inputs [N, ...] with ndim >= 2, got "
                         f"shape {tuple(x.shape)}")
    inner, state = layers.split_variables(params)
    acc: Dict[str, list] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
            rows, _ = layers.as_rows(mod, jnp.asarray(args[0]))
            a = jnp.abs(rows)
            stats = (jnp.sum(rows != 0, axis=0, dtype=jnp.int32), jnp.sum(a, axis=0),
                     jnp.max(a, axis=0, initial=0), rows.shape[0])
            name = layers.module_name(mod)
            if name in acc:
                old = acc[name]
                stats = (old[0] + stats[0], old[1] + stats[1], jnp.maximum(old[2], stats[2]),
                         old[3] + stats[3])
            acc[name] = stats
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": inner, **state}, x)
    if not acc:
        raise ValueError("activation_stats: the model called no nn.Dense/nn.Conv layer")
    n = x.shape[0]
    order = [name for name in layers.layer_names(inner) if name in acc]
    order += [name for name in acc if name not in order]
    out = {}
    for name in order:
        reads, abs_sum, abs_max, count = acc[name]
        dtype = abs_sum.dtype if jnp.issubdtype(abs_sum.dtype, jnp.inexact) else jnp.float32
        out[name] = {"reads_per_inference": (reads / n).astype(dtype),
                     "mean_abs": (abs_sum / max(count, 1)).astype(dtype),
                     "max_abs": abs_max.astype(dtype)}
    return out


def kernel_criticality(tree: Params, params: Params) -> Dict[str, jax.Array]:
    """A params-shaped tree (saliency, Hessian diagonal, ...) in each layer's crossbar layout.

    Every ``kernel`` leaf is reshaped like :func:`nvjax.layers.kernel_matrix` (Dense ``[n_in,
    n_out]`` as is; Conv ``[*window, C_in, C_out]`` → ``[C_in·Πwindow, C_out]``), so entry
    ``[i, j]`` belongs to the synapse on crossbar row ``i`` (see :func:`activation_stats`) and
    column ``j``. Other leaves (biases) are dropped.

    Args:
        tree: a pytree with the structure of ``params`` (``{'params': ...}`` or the inner dict).
        params: the model parameters (gives the layer names and kernel shapes).

    Returns:
        dict layer name (in :func:`nvjax.layers.layer_names` order) → ``[n_in, n_out]`` array.

    Raises:
        TypeError: when ``tree`` is not a nested dict.
        ValueError: when ``tree`` lacks a kernel of ``params`` or its shape differs.

    Example:
        >>> crit = kernel_criticality(saliency(loss, params), params)   # doctest: +SKIP
    """
    flat_p = flatten_dict(layers.strip_params(params))
    t_inner = layers.strip_params(tree)
    if not isinstance(t_inner, dict):
        raise TypeError(f"tree must be a nested dict like params, got {type(tree).__name__}")
    flat_t = flatten_dict(t_inner)
    out = {}
    for path, kernel in flat_p.items():
        if path[-1] != "kernel":
            continue
        name = "/".join(path[:-1])
        if path not in flat_t:
            raise ValueError(f"tree has no kernel for layer {name!r} (it must have the structure "
                             f"of params)")
        leaf = flat_t[path]
        if np.shape(leaf) != np.shape(kernel):
            raise ValueError(f"tree's kernel of layer {name!r} has shape {np.shape(leaf)}, params' "
                             f"has {np.shape(kernel)}")
        out[name] = layers.kernel_matrix(leaf)
    if not out:
        raise ValueError("params has no 'kernel' leaves (Dense/Conv layers)")
    return out
