"""Strict loading of YAML files (or dicts) into nested frozen dataclasses.

The schema is the dataclass itself. Every field annotation must be one of the
supported types below; values are checked strictly and every problem raises
:class:`ConfigError` naming the source file, the dotted key path, what was
expected and what was received, e.g.::

    configs/x.yaml: key 'sweep.num_instances': expected int, got '10' (str)

Supported annotations: ``int``, ``float``, ``str``, ``bool``,
``Literal[...]`` of strings/ints, ``Optional[X]`` / ``X | None``,
``tuple[X, ...]`` and fixed-length ``tuple[X, Y]`` (read from YAML lists),
``dict[str, X]`` and nested dataclasses. String annotations
(``from __future__ import annotations``) are resolved with
:func:`typing.get_type_hints`.

Strictness rules:

* Unknown keys raise (with a "did you mean" hint when close); missing keys
  raise unless the field has a default or default_factory (an ``Optional``
  annotation alone does not make a key optional).
* ``bool`` is never accepted for ``int``/``float``; ``float`` is never accepted
  for ``int``; numeric strings are rejected. ``int`` is accepted for ``float``
  and converted.
* A ``float`` must be finite: YAML's ``.nan``, ``.inf`` and ``-.inf`` (and
  numbers too large for a float) are rejected wherever a float is expected,
  inside lists and mappings too, naming the key (``key 'sweep.t_read_s[1]':
  expected a finite float, got nan``). No configuration value is meaningful as
  NaN or infinity; a bound that may be absent is ``Optional`` (null) instead.
* Exception: PyYAML follows YAML 1.1, which reads ``1e-3`` or ``1.0e3`` (no dot
  or no exponent sign) as a *string*. For ``float`` fields only, a string that
  matches :data:`_SCI_FLOAT_RE` (a decimal number *with an exponent*) is
  accepted and converted. Plain quoted numbers such as ``'0.5'`` still raise.

After a dataclass is built, its ``validate(self)`` method (if any) is called;
a ``ValueError`` it raises is re-raised as :class:`ConfigError` prefixed by
the file and the dotted path of that dataclass.

This module imports ``_checks`` (for :class:`UserError`, the base of :class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from ._checks import UserError

__all__ = ["ConfigError", "from_dict", "load_yaml", "to_dict"]

T = TypeVar("T")

#: Scientific-notation floats that PyYAML 1.1 leaves as strings (``1e-3``).
_SCI_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")

_NoneType = type(None)


class ConfigError(UserError):
    """Raised for any problem while loading or validating a configuration."""


def load_yaml(path: str | os.PathLike, cls: type[T]) -> T:
    """Loads a YAML file into an instance of dataclass ``cls``.

    Args:
        path: Path of the YAML file.
        cls: Dataclass type describing the schema.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: If the file is missing, unreadable, not valid YAML, empty,
            not a mapping at top level, or does not match the schema.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config file: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from e
    if data is None:
        raise ConfigError(f"{source}: config file is empty")
    return from_dict(data, cls, source=source)


def from_dict(data: Any, cls: type[T], *, source: str = "<dict>") -> T:
    """Builds an instance of dataclass ``cls`` from plain data.

    Args:
        data: A mapping (typically parsed YAML).
        cls: Dataclass type describing the schema.
        source: Name of the origin, used as the prefix of error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: If ``data`` does not match the schema or a ``validate``
            hook fails.
        TypeError: If ``cls`` is not a dataclass or uses an unsupported
            annotation (a bug in the schema, not in the config).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict: {cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: top level must be a mapping, got {_got(data)}")
    return _build(data, cls, "", source)


def to_dict(instance: Any) -> dict[str, Any]:
    """Converts a dataclass instance to plain, YAML/JSON-serializable data.

    Tuples become lists; the result round-trips through :func:`from_dict`.

    Args:
        instance: A dataclass instance.

    Returns:
        A dict mapping field names to plain values.
    """
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"to_dict: {instance!r} is not a dataclass instance")
    return _plain(instance)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _where(path: str) -> str:
    return f"key '{path}'" if path else "top level"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """Human-readable name of a supported annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is _NoneType:
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        inner = ", ".join(_type_name(a) for a in args)
        return f"list of length {len(args)} [{inner}]"
    if origin is dict:
        return f"mapping of str to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def _build(data: Mapping, cls: type, path: str, source: str) -> Any:
    """Builds dataclass ``cls`` at dotted ``path`` and runs its validate hook."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            key_s = str(key)
            msg = f"{source}: unknown key '{_join(path, key_s)}'"
            close = difflib.get_close_matches(key_s, names, n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
            raise ConfigError(f"{msg} (valid keys: {', '.join(names)})")
    kwargs = {}
    for f in fields:
        sub = _join(path, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], sub, source)
        elif (f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING):
            raise ConfigError(f"{source}: missing required key '{sub}'")
    try:
        instance = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # checks in __post_init__
        raise ConfigError(f"{source}: {_where(path)}: {e}") from e
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{source}: {_where(path)}: {e}") from e
    return instance


def _not_finite(value: Any, path: str, source: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {_where(path)}: expected a finite float, got {value!r} "
                      "(NaN and infinity are not valid configuration values)")


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    """Checks/converts ``value`` against annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {_where(path)}: expected "
                          f"{_type_name(tp)}, got {_got(value)}")

    if origin in (Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        arms = [a for a in args if a is not _NoneType]
        if float in arms and isinstance(value, float) and not math.isfinite(value):
            _not_finite(value, path, source)
        if len(arms) == 1:  # Optional[X]: keep the precise inner error.
            return _convert(value, arms[0], path, source)
        for arm in arms:
            try:
                return _convert(value, arm, path, source)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) or \
                isinstance(value, str) and _SCI_FLOAT_RE.match(value.strip()):
            try:
                out = float(value)
            except OverflowError:  # an int beyond the float range
                out = math.inf
            if not math.isfinite(out):
                _not_finite(value, path, source)
            return out
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if origin is tuple and args:
        if not isinstance(value, (list, tuple)):
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            elem_types = [args[0]] * len(value)
        elif len(value) != len(args):
            fail()
        else:
            elem_types = list(args)
        return tuple(_convert(v, t, f"{path}[{i}]", source)
                     for i, (v, t) in enumerate(zip(value, elem_types)))
    if origin is dict and args and args[0] is str:
        if not isinstance(value, Mapping):
            fail()
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"{source}: {_where(path)}: mapping keys must be str, "
                    f"got {_got(k)}")
            out[k] = _convert(v, args[1], _join(path, k), source)
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail()
        return _build(value, tp, path, source)
    raise TypeError(f"unsupported annotation {tp!r} for key '{path}'")
