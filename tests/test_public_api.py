"""The stable public surface (DESIGN.md §12) is importable with these names."""
import inspect

import jax

import nvjax
from nvjax import devices, sweep
from nvjax import mapping


def test_top_level_surface():
    assert set(nvjax.__all__) == {"chip", "config", "crossbar", "data", "devices", "disturb", "encoding", "irdrop",
                                  "lifetime", "mapping", "models", "placement", "prng", "programming", "sensitivity", "sweep",
                                  "training", "__version__"}
    assert isinstance(nvjax.__version__, str)


def test_device_contract():
    for name in ("pcm", "reram", "levels", "flash", "ideal", "program", "read"):
        assert callable(getattr(devices, name)), name
    assert list(inspect.signature(devices.program).parameters) == ["key", "device", "g_target"]
    assert list(inspect.signature(devices.read).parameters) == ["key", "device", "state", "t"]
    assert hasattr(nvjax.chip, "deploy") and hasattr(sweep, "reliability")


def test_mapping_contract():
    import numpy as np
    cost = np.array([[3.0, 1.0], [1.0, 3.0]])
    assert mapping.assign(cost).tolist() == [1, 0]
    assert mapping.relaxed_assign(jax.random.key(0),
                                  cost, steps=100).tolist() == [1, 0]
