"""The minibatch training loop shared by :func:`nvjax.models.train` and
:func:`nvjax.training.train`, and its argument checks.

This module imports ``_xla``, jax, numpy and optax.
"""
from __future__ import annotations

import functools
import numbers
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._xla import FAST_COMPILE_OPTIONS

__all__ = ["as_key", "check_positive", "train_data", "fit", "init_variables"]


def as_key(key):
    """A PRNG key from a key or an int seed (entry points accept both)."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return key


def check_positive(name, value, integer, prefix=""):
    """Raise ValueError unless ``value`` is a finite positive int (``integer``) or number."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 \
            or not np.isfinite(value):
        raise ValueError(f"{prefix}{name} must be a positive {'int' if integer else 'number'}, "
                         f"got {value!r}")


def train_data(data, batch_size, prefix=""):
    """(x_train f32, y_train i32, steps per epoch), checked."""
    x_train = jnp.asarray(data.x_train, jnp.float32)
    y_train = jnp.asarray(data.y_train, jnp.int32)
    n = x_train.shape[0]
    if y_train.shape != (n,):
        raise ValueError(f"{prefix}data.y_train must have shape ({n},), got {tuple(y_train.shape)}")
    if batch_size > n:
        raise ValueError(f"{prefix}batch_size must be <= the number of training samples ({n}), "
                         f"got {batch_size}")
    return x_train, y_train, n // batch_size


def fit(loss_fn, variables, tx, x_train, y_train, *, steps, batch_size, epochs, shuffle_key,
         evaluate, progress, extra=(), what="test accuracy"):
    """The minibatch loop shared by :func:`train` and :func:`nvjax.training.train`.

    ``loss_fn(v, t, xb, yb, *extra)`` with ``t`` the global step (uint32, counted over all
    epochs); epoch ``e`` visits ``permutation(fold_in(shuffle_key, e), N)`` in ``steps``
    minibatches (the rest skipped) as one jitted ``lax.scan`` (stateful models: one jitted step
    per minibatch, see below); ``extra`` are traced jit
    arguments (e.g. noise parameters). ``evaluate(v) -> accuracy`` after each epoch. When
    ``variables`` has collections besides ``'params'`` (BatchNorm statistics), ``loss_fn`` returns
    ``(loss, new_collections)`` (``model.apply(..., mutable=...)``'s second output); those
    collections are replaced by the model's, never optimized (the optimizer state covers the
    parameters only).
    """
    n = x_train.shape[0]
    stateful = set(variables) != {"params"}     # e.g. BatchNorm's 'batch_stats'
    opt_state = tx.init(variables["params"] if stateful else variables)

    def order(k):
        """The epoch's minibatches: [steps, batch_size] indices."""
        return jax.random.permutation(k, n)[: steps * batch_size].reshape(steps, batch_size)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE_OPTIONS)  # compile-dominated
    def epoch(v, s, k, e, extra_):
        def step(carry, inp):
            v, s = carry
            idx, t = inp
            loss, grads = jax.value_and_grad(loss_fn)(v, t, x_train[idx], y_train[idx], *extra_)
            updates, s = tx.update(grads, s, v)
            return (optax.apply_updates(v, updates), s), loss
        perm = order(k)
        t = e * steps + jnp.arange(steps, dtype=jnp.uint32)
        (v, s), losses = jax.lax.scan(step, (v, s), (perm, t))
        return v, s, losses.mean()

    # Stateful (BatchNorm) models are convolutional networks here, and XLA:CPU runs a
    # convolution inside a while loop (the scan) through a generic loop kernel instead of its
    # convolution library: a ResNet-20 step took 10 s in the scan against 0.94 s alone (batch
    # 64, 2 cores). Those models step from Python, one compiled step per minibatch (the same
    # minibatches and updates).
    @functools.partial(jax.jit, compiler_options=FAST_COMPILE_OPTIONS)
    def one_step(v, s, idx, t, extra_):
        rest = {c: a for c, a in v.items() if c != "params"}

        def params_loss(p):
            return loss_fn({"params": p, **rest}, t, x_train[idx], y_train[idx], *extra_)
        (loss, new_rest), g = jax.value_and_grad(params_loss, has_aux=True)(v["params"])
        updates, s = tx.update(g, s, v["params"])     # only the parameters are optimized
        return {"params": optax.apply_updates(v["params"], updates), **new_rest}, s, loss

    order_jit = jax.jit(order)

    def stepped_epoch(v, s, k, e, extra_):
        perm = order_jit(k)
        losses = []
        for i in range(steps):
            v, s, loss = one_step(v, s, perm[i], jnp.uint32(int(e) * steps + i), extra_)
            losses.append(loss)
        return v, s, jnp.mean(jnp.stack(losses))

    history: Dict[str, List[float]] = {"train_loss": [], "test_accuracy": [], "time_s": []}
    t0 = time.perf_counter()
    for e in range(int(epochs)):
        run_epoch = stepped_epoch if stateful else epoch
        variables, opt_state, loss = run_epoch(variables, opt_state,
                                               jax.random.fold_in(shuffle_key, e),
                                               jnp.uint32(e), tuple(extra))
        acc = evaluate(variables)
        history["train_loss"].append(float(loss))
        history["test_accuracy"].append(acc)
        history["time_s"].append(time.perf_counter() - t0)
        if progress:
            print(f"epoch {e + 1}/{epochs}: train loss {float(loss):.4f}, {what} "
                  f"{acc:.4f} ({history['time_s'][-1]:.1f} s)", flush=True)
    return variables, history


def init_variables(model, key, x):
    """``model.init(key, x)`` as one compiled call (LLVM level 1).

    Eagerly, every initializer op is its own small compilation (29 for the digits MLP, about
    3 s on 2 cores); one jit of the whole init takes about 0.6 s and gave the same parameters
    (same SHA-256).
    """
    return jax.jit(model.init, compiler_options=FAST_COMPILE_OPTIONS)(key, x)
