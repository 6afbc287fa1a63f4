"""Argument validation shared by every module (one policy).

TypeError for a value of the wrong type, :class:`UserError` (a ``ValueError``) for a value of the
right type that is out of range; every message names the argument, says what was expected and what
came. One policy: numbers must be finite (NaN and ±inf never pass, whatever the bounds), positive
where the physics divides by them or takes their logarithm, probabilities in [0, 1], times >= 0.
Range checks are written so that NaN fails them (``not lo <= x``, never ``x < lo``). Traced values
(inside ``jit``/``vmap``/``grad``) cannot be inspected and pass unchecked.

This module imports only jax and numpy.
"""
from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["UserError", "is_concrete", "check_int", "check_real", "check_time", "check_float_array",
           "check_key"]


class UserError(ValueError):
    """A problem with what the user supplied (a config value, a path, a file, a resumed run).

    The command line reports it as one line, ``nvjax <cmd>: error: <message>``, and exits 2; the
    message must name the key, argument or file at fault. Subclasses: ``config.ConfigError``.
    """


def is_concrete(x) -> bool:
    """False for a JAX tracer (a value only known when the compiled function runs)."""
    return not isinstance(x, jax.core.Tracer)


def check_int(name: str, value, minimum: int) -> int:
    """An ``int`` (not a bool) >= ``minimum``, returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name: str, value, *, minimum=None, maximum=None, strict_min=False) -> None:
    """A concrete real value (scalar or array) that is finite and within bounds; tracers pass."""
    if not is_concrete(value):
        return
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    a = np.asarray(value)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number) \
            or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise UserError(f"{name} must be finite, got {_show(value)}")
    if minimum is not None:
        bad = np.any(a <= minimum) if strict_min else np.any(a < minimum)
        if bad:
            op = ">" if strict_min else ">="
            raise UserError(f"{name} must be {op} {minimum:g}, got {_show(value)}")
    if maximum is not None and np.any(a > maximum):
        raise UserError(f"{name} must be <= {maximum:g}, got {_show(value)}")


def check_time(name: str, t) -> None:
    """A concrete time in s (scalar or array): finite and >= 0; tracers pass."""
    check_real(name, t, minimum=0.0)


def _show(value) -> str:
    """A short rendering of a value for a message (arrays summarized)."""
    a = np.asarray(value)
    if a.ndim == 0:
        return repr(a.item())
    if a.size <= 8:
        return repr(a.tolist())
    bad = ~np.isfinite(a)
    return (f"an array of shape {a.shape} ({int(bad.sum())} non-finite, "
            f"min {np.nanmin(np.where(bad, np.nan, a)) if not bad.all() else 'n/a'})")


def check_float_array(name: str, x, *, ndim: Optional[int] = None) -> jax.Array:
    """A finite floating-point array (optionally of ``ndim`` dimensions), as a JAX array."""
    if not hasattr(x, "dtype") and not isinstance(x, (list, tuple, numbers.Real)):
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise UserError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x))):
        raise UserError(f"{name} must be finite; found "
                         f"{int(np.sum(~np.isfinite(np.asarray(x))))} non-finite value(s)")
    return x


def check_key(name: str, key) -> None:
    """A JAX PRNG key (typed ``jax.random.key`` or raw ``PRNGKey`` data)."""
    if not isinstance(key, jax.Array):
        raise TypeError(f"{name} must be a PRNG key (jax.random.key), got {type(key).__name__}")
