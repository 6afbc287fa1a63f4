"""Fixtures shared by the test modules, and the suite's XLA settings.

Compilation, not computation, dominates nearly every test, so the suite tells XLA:CPU to compile
fast (set before JAX starts; subprocesses inherit it): LLVM optimization level 0
(``--xla_backend_optimization_level=0``) and, on the jaxlib versions where it was measured,
XLA's classic elemental emitters instead of its MLIR fusion emitters
(``--xla_cpu_use_fusion_emitters=false``). On the lifetime test program these compile in 5.5 s
instead of 10.1 s (level 1) and 14 s (XLA's defaults); the whole suite used 20 instead of 34
minutes of CPU (2-core machine, 2026-12-01). Results agree with the default build to rounding
(floating-point contraction and vectorization differ), which no test depends on beyond a few
ulps; the library itself compiles with its own options (nvjax/_xla.py). ``NVJAX_TEST_XLA_OPT=1``
keeps XLA's defaults. XLA aborts on a flag it does not know, so the emitter flag is only set on
jaxlib versions listed in ``_FUSION_EMITTER_FLAG_VERSIONS``.

Many tests build the same computation again from fresh closures (a new ``jax.jit`` each time,
so JAX's in-memory cache cannot see it); JAX's persistent compilation cache recognises identical
programs by their fingerprint. The suite points it at a folder made for this one run (the pytest
process, its xdist workers and the subprocesses of the CLI tests share it; removed at exit), so
nothing carries over between runs. ``NVJAX_TEST_XLA_CACHE=0`` turns it off.
"""
import atexit
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile

#: jaxlib release series on which ``--xla_cpu_use_fusion_emitters`` exists (measured).
_FUSION_EMITTER_FLAG_VERSIONS = ("0.10.",)


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:      # pragma: no cover
        return ""


if os.environ.get("NVJAX_TEST_XLA_OPT", "0") != "1":
    _flags = ["--xla_backend_optimization_level=0"]
    if _jaxlib_version().startswith(_FUSION_EMITTER_FLAG_VERSIONS):
        _flags.append("--xla_cpu_use_fusion_emitters=false")
    _have = os.environ.get("XLA_FLAGS", "")
    _new = [f for f in _flags if f.split("=")[0] not in _have]
    if _new:
        os.environ["XLA_FLAGS"] = " ".join([_have] + _new).strip()
if os.environ.get("NVJAX_TEST_XLA_CACHE", "1") == "1" \
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="nvjax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir        # inherited by workers
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, _cache_dir, True)

import pytest  # noqa: E402

from nvjax import models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
    """Import experiments/<name>.py as a module (registered in sys.modules, so the dataclass
    hints of its config resolve); loaded once per session."""
    mod_name = f"_exp_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name,
                                                  os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)``: the experiment script experiments/<name>.py as a module."""
    return _load_script


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A model cache folder shared by every test of the session (each process, under xdist):
    a model trained by ``nvjax.models.get_trained(..., cache_dir=model_cache)`` or by an
    experiment script given ``model_cache_dir: <model_cache>`` is trained once and reloaded after.
    Use the same ``(name, seed, epochs)`` across test files to share it."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def trained_model(model_cache):
    """``trained_model(name, epochs=None, seed=0) -> (model, params)``: ``get_trained`` through the
    session's :func:`model_cache` (trained at most once per session and process)."""
    def get(name, epochs=None, seed=0):
        return models.get_trained(name, cache_dir=model_cache, seed=seed, epochs=epochs)
    return get
