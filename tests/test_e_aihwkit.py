"""The E-aihwkit experiment script: strict config, and a tiny end-to-end run (nvjax side; the
aihwkit side only where an aihwkit Python is installed, which CI does not have)."""
import json
import os
import subprocess

import pytest

from nvjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("e_aihwkit")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_shipped_config_loads_strictly(script):
    cfg = script.load_config(os.path.join(ROOT, "configs", "e_aihwkit.yaml"))
    assert cfg.experiment == "e_aihwkit" and set(cfg.models) == {"mlp", "lenet"}
    assert list(cfg.times_s) == [1.0, 3600.0, 86400.0, 365 * 86400.0]
    assert "aihwkit" in cfg.conventions and cfg.num_chips >= 200


@pytest.mark.parametrize("text,needle", [
    ("num_chip: 3\n", "unknown key 'num_chip'"),
    ("times_s: [0.0, 1.0]\n", "times_s"),
    ("times_s: [.nan]\n", "times_s"),
    ("conventions: [ibm]\n", "conventions"),
    ("models: [lstm]\n", "models"),
])
def test_bad_configs_raise(script, tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        script.load_config(_write(tmp_path / "bad.yaml", text))
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_aihwkit_python_resolution(script, monkeypatch, tmp_path):
    cfg = script.EAihwkitConfig(aihwkit_python="none")
    assert script.aihwkit_python(cfg) is None
    assert script.aihwkit_python(cfg.__class__(aihwkit_python="/x/python")) == "/x/python"
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv(script.AIHWKIT_ENV, str(fake))
    assert script.aihwkit_python(script.EAihwkitConfig()) == str(fake)


TINY = """\
experiment: e_aihwkit
seed: 0
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
times_s: [1.0, 86400.0]
num_chips: {chips}
chunk_size: 2
eval_samples: 40
conventions: [aihwkit]
aihwkit_python: {python}
progress: false
"""


def _aihwkit_ok(python):
    if python is None or not os.path.exists(python):
        return False
    return subprocess.run([python, "-c", "import aihwkit"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_tiny_run(script, tmp_path, model_cache):
    python = script.aihwkit_python(script.EAihwkitConfig())
    with_aihwkit = _aihwkit_ok(python)
    cfg = _write(tmp_path / "c.yaml", TINY.format(cache=model_cache, chips=2,
                                                  python=python if with_aihwkit else "none"))
    out = tmp_path / "out"
    assert script.main([cfg, "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_aihwkit.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())["models"]["mlp"]
    sides = {"nvjax/aihwkit"} | ({"aihwkit"} if with_aihwkit else set())
    assert set(res["sides"]) == sides
    for side in sides:
        pts = res["sides"][side]
        assert [p["t_s"] for p in pts] == [1.0, 86400.0]
        assert all(p["accuracy"]["n"] == 2 and 0 <= p["accuracy"]["mean"] <= 1 for p in pts)
    # 40 images: accuracies are multiples of 1/40
    acc = [p["accuracy"]["min"] * 40 for p in res["sides"]["nvjax/aihwkit"]]
    assert all(abs(a - round(a)) < 1e-4 for a in acc)
    summary = (out / "summary.md").read_text()
    assert ("aihwkit not run" in summary) != with_aihwkit
