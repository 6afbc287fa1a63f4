"""The stable public surface (DESIGN.md §12) is importable with these names."""
import inspect

import nvjax
from nvjax import devices, sweep


def test_top_level_surface():
    assert set(nvjax.__all__) == {"chip", "config", "crossbar", "data", "devices", "disturb", "encoding", "irdrop",
                                  "lifetime", "models", "sweep", "__version__"}
    assert isinstance(nvjax.__version__, str)


def test_device_contract():
    for name in ("pcm", "reram", "levels", "flash", "ideal", "program", "read"):
        assert callable(getattr(devices, name)), name
    assert list(inspect.signature(devices.program).parameters) == ["key", "device", "g_target"]
    assert list(inspect.signature(devices.read).parameters) == ["key", "device", "state", "t"]
    assert hasattr(nvjax.chip, "deploy") and hasattr(sweep, "reliability")
