"""Fixtures shared by the test modules."""
import importlib.util
import os
import sys

import pytest

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


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A model cache folder shared by the tests of one module (trained models are reused)."""
    return str(tmp_path_factory.mktemp("models"))
