"""The docstring examples of every nvjax module run (``doctest``) and print what they show.

Each module's examples run in the module's own namespace plus ``jax``, ``jnp``, ``np`` and the
nvjax submodules by name; examples marked ``# doctest: +SKIP`` (they need a trained model or
data) are skipped.
"""
import doctest
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvjax

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nvjax")
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")


def _examples(name):
    mod = importlib.import_module(f"nvjax.{name}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    return mod, [t for t in finder.find(mod, mod.__name__) if t.examples]


@pytest.mark.parametrize("name", [m for m in MODULES if _examples(m)[1]])
@pytest.mark.slow
def test_docstring_examples_run(name):
    mod, tests = _examples(name)
    extra = {"jax": jax, "jnp": jnp, "np": np, "nvjax": nvjax}
    extra.update({m: getattr(nvjax, m) for m in nvjax.__all__ if m != "__version__"})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        t.globs = {**vars(mod), **extra}
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} docstring examples of nvjax.{name} failed"
