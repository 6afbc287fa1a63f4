"""Strict run configs and the command line."""
import dataclasses
import glob
import json
import os
import subprocess
import sys
import typing

import pytest
import yaml

from nvjax import cli
from nvjax import config as cfg_mod
from nvjax import devices as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path, load_script):
    with open(path) as f:
        raw = yaml.safe_load(f)
    if isinstance(raw, dict) and "experiment" in raw:  # experiment scripts own their schema
        load_script(raw["experiment"]).load_config(path)
        return
    cfg = cfg_mod.load_any(path)
    assert isinstance(cfg, (cfg_mod.RunConfig, cfg_mod.LifetimeRunConfig))


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,needle", [
    ("sweep: {num_instance: 3}\n", "unknown key 'sweep.num_instance'; did you mean 'num_instances'"),
    ("sweep: {num_instances: '10'}\n", "key 'sweep.num_instances': expected int"),
    ("sweep: {num_instances: 0}\n", "num_instances must be >= 1"),
    ("device: {kind: memristor}\n", "key 'device.kind'"),
    ("device: {kind: pcm, params: {gmax: 3.0}}\n", "gmax"),
    ("tile: {adc_bits: 1}\n", "adc_bits"),
    ("sweep: {t_read_s: [-1.0]}\n", "t_read_s"),
    ("sweep: {device_grid: {nope: [1.0]}}\n", "sweep.device_grid.nope"),
    ("model: {name: resnet}\n", "key 'model.name'"),
])
def test_bad_configs_name_key_and_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(cfg_mod.ConfigError) as e:
        cfg_mod.load(path)
    assert needle in str(e.value)
    assert path in str(e.value)


def test_device_points_cartesian(tmp_path):
    cfg = cfg_mod.load(_write(tmp_path, "sweep: {device_grid: {read_q: [0.0, 0.01], t0: [10.0, 20.0, 40.0]}}\n"))
    pts = cfg_mod.device_points(cfg)
    assert len(pts) == 6
    assert {(p["read_q"], p["t0"]) for p, _ in pts} == {(a, b) for a in (0.0, 0.01) for b in (10.0, 20.0, 40.0)}
    assert all(float(d.read_q) == p["read_q"] for p, d in pts)


def test_cli_rejects_bad_config(tmp_path, capsys):
    path = _write(tmp_path, "seeed: 1\n")
    assert cli.main(["run", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'seeed'" in err and path in err


@pytest.mark.slow
def test_cli_run_small(tmp_path):
    path = _write(tmp_path, "model: {epochs: 5}\nsweep: {num_instances: 10, chunk_size: 5, t_read_s: [1.0]}\nprogress: false\n")
    # the command's own compilation cache (not the test suite's): a rerun loads the compiled
    # chunks and gives the same bytes
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["NVJAX_CACHE_DIR"] = str(tmp_path / "cache")
    outs = [tmp_path / "o", tmp_path / "o2"]
    for out in outs:
        r = subprocess.run([sys.executable, "-m", "nvjax.cli", "run", path, "--out", str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert "mean %" in r.stdout
        if out == outs[0]:
            assert os.listdir(tmp_path / "cache" / "xla"), "no compiled program cached"
    summary = json.loads((outs[0] / "summary.json").read_text())
    assert summary["points"][0]["n"] == 10
    assert (outs[0] / "results.csv").read_bytes() == (outs[1] / "results.csv").read_bytes()



@pytest.mark.parametrize("cls", [cfg_mod.RunConfig, cfg_mod.LifetimeRunConfig])
def test_every_config_key_is_in_the_readme_reference(cls):
    """The README stands alone: every key a run config accepts is in its configuration
    reference (written as `key` or `a.b` in a table row)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ref = text[text.index("## Configuration reference"):]
    ref = ref[:ref.index("\n## ", 3)]
    missing = [key for key in _keys_resolved(cls) if f"`{key}`" not in ref]
    assert not missing, f"config keys missing from the README's reference: {missing}"


def _keys_resolved(cls, prefix=""):
    """Dotted key paths of a config dataclass (nested dataclass fields expanded)."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += _keys_resolved(tp, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_missing_keys_take_their_defaults():
    """One rule for both commands: a key or a whole section left out takes the dataclass default
    (documented in the README's configuration reference); only unknown keys are errors."""
    assert cfg_mod.from_dict({}, cfg_mod.RunConfig) == cfg_mod.RunConfig()
    assert cfg_mod.from_dict({"lifetime": {}}, cfg_mod.LifetimeRunConfig) == \
        cfg_mod.LifetimeRunConfig()
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "unknown or missing key" not in text.lower()  # the other rule is claimed nowhere
    assert "every key below may be left out, a whole section included" in text


def test_device_convention_key_selects_the_aihwkit_pcm_and_is_pcm_only():
    base = cfg_mod.to_dict(cfg_mod.RunConfig())
    d = {**base, "device": {**base["device"], "convention": "aihwkit"}}
    cfg = cfg_mod.from_dict(d, cfg_mod.RunConfig)
    assert cfg_mod.make_device(cfg.device) == D.pcm(convention="aihwkit")
    assert cfg_mod.make_device(cfg_mod.RunConfig().device) == D.pcm()
    bad = {**base, "device": {**base["device"], "kind": "reram", "convention": "aihwkit"}}
    with pytest.raises(cfg_mod.ConfigError, match="convention"):
        cfg_mod.from_dict(bad, cfg_mod.RunConfig)
    bad = {**base, "device": {**base["device"], "convention": "ibm"}}
    with pytest.raises(cfg_mod.ConfigError, match="convention"):
        cfg_mod.from_dict(bad, cfg_mod.RunConfig)
