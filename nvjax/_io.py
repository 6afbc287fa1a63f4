"""Files and provenance: atomic writes, CSV tables, software versions.

This module imports ``_version``, numpy, jax (for the backend's name) and the standard library.
"""
from __future__ import annotations

import csv
import json
import os
import platform
from typing import Any, Dict, Iterable, Sequence

import jax
import numpy as np

from ._version import __version__

__all__ = ["flatten_dotted", "atomic_write", "atomic_write_with", "write_json", "write_csv", "versions", "RESUME_VERSIONS"]


def atomic_write_with(path: str, write, *, binary: bool = False) -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file beside it, which is
    flushed, fsync-ed and moved into place with ``os.replace`` (removed on any error)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    atomic_write_with(path, lambda f: f.write(text))


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (trailing newline), written atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file with one header row, written atomically."""
    def write(f):
        w = csv.writer(f)
        w.writerow(list(header))
        w.writerows(rows)
    atomic_write_with(path, write)


def versions() -> Dict[str, str]:
    """Versions of nvjax and its main dependencies, Python, the platform and the JAX backend."""
    import flax  # noqa: PLC0415  (not an nvjax import: a heavy optional-at-import dependency)
    import jaxlib  # noqa: PLC0415
    return {"nvjax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "backend": jax.default_backend(),
            "devices": str(jax.devices()), "process_count": str(jax.process_count())}


#: Keys of :func:`versions` that must match for a run to resume (results are bit-identical only
#: on the same software and backend; device and process counts may differ).
RESUME_VERSIONS = ("nvjax", "jax", "jaxlib", "backend")


def flatten_dotted(d, prefix=""):
    """{'a': {'b': 1}, 'c': 2} -> {'a.b': 1, 'c': 2} (dotted keys; an empty dict stays a value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
