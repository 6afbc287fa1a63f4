"""Frozen dataclasses as pytrees of physics numbers with static structure.

:func:`register_physics` makes a frozen dataclass a JAX pytree whose leaves are the named
physics fields (traced under ``jit``, sweepable with ``vmap``, differentiable) and whose other
fields are static structure (part of the treedef, hashed into the compilation cache). Unflatten
bypasses ``__init__``/``__post_init__`` (JAX rebuilds pytrees with tracers and placeholders), so
validation runs only when a user constructs or ``replace``-s an instance; derived attributes set
in ``__post_init__`` with ``object.__setattr__`` travel with the structure.

This module imports only jax.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

__all__ = ["register_physics"]


def register_physics(cls, physics_fields: Sequence[str]):
    """Register the frozen dataclass ``cls`` as a pytree with ``physics_fields`` as leaves.

    Returns:
        ``cls`` (usable as a decorator factory's result).
    """
    names = tuple(f.name for f in dataclasses.fields(cls))
    physics = tuple(physics_fields)
    unknown = set(physics) - set(names)
    if unknown:
        raise ValueError(f"register_physics: {cls.__name__} has no fields {sorted(unknown)}")
    static = tuple(n for n in names if n not in physics)

    def flatten(obj):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in physics)
        extras = tuple(sorted((k, v) for k, v in vars(obj).items() if k not in names))
        return children, (tuple(getattr(obj, n) for n in static), extras)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, v in zip(static, aux[0]):
            object.__setattr__(obj, n, v)
        for n, v in zip(physics, children):
            object.__setattr__(obj, n, v)
        for k, v in aux[1]:
            object.__setattr__(obj, k, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    return cls
