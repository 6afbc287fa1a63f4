"""E-scale (issue 16): strict config, the percentile CI, and a tiny end-to-end run whose chips are
recomputed one by one with chip.deploy/apply."""
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import chip as chip_mod
from nvjax import crossbar as xb
from nvjax import devices
from nvjax import models
from nvjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def escale(load_script):
    return load_script("e_scale")


def test_shipped_config(escale):
    cfg = escale.load_config(os.path.join(ROOT, "configs", "e_scale.yaml"))
    assert cfg.experiment == "e_scale" and cfg.num_chips == 1000
    assert [m.name for m in cfg.models] == ["resnet", "transformer"]
    assert min(cfg.t_read_s) == 1.0 and max(cfg.t_read_s) == 365 * 86400.0


@pytest.mark.parametrize("text,where", [
    ("models: [{name: resnet, chunk_size: 0}]\n", "chunk_size"),
    ("models: [{name: vgg}]\n", "name"),
    ("num_chips: 10\nbatch: 3\n", "batch"),
    ("t_read_s: [1.0, 1.0]\n", "t_read_s"),
    ("t_read_s: [0.0, 1.0]\n", "t_read_s"),
    ("models: [{name: resnet}, {name: resnet}]\n", "unique"),
])
def test_bad_config_is_refused_by_name(escale, tmp_path, text, where):
    p = tmp_path / "e.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=where):
        escale.load_config(str(p))


def test_percentile_ci_by_hand(escale):
    # a constant sample: every resample has the same percentile
    v, ci = escale._percentile_ci(np.full(50, 0.9), 1, 200, 0)
    assert v == 0.9 and ci == [0.9, 0.9]
    # 0..99: the 50th percentile is 49.5 (linear interpolation); the CI brackets it
    v, ci = escale._percentile_ci(np.arange(100.0), 50, 500, 0)
    assert v == 49.5 and ci[0] < 49.5 < ci[1] and ci[1] - ci[0] < 25


@pytest.mark.slow  # trains the transformer for one epoch and sweeps 6 chips
def test_tiny_run_equals_chips_computed_one_by_one(escale, tmp_path):
    cfg_path = tmp_path / "e.yaml"
    cfg_path.write_text(
        "models: [{name: transformer, eval_samples: 24, chunk_size: 3, epochs: 1}]\n"
        "num_chips: 6\nt_read_s: [1.0, 3.0e7]\nbootstrap: 50\nprogress: false\n"
        f"model_cache_dir: {tmp_path / 'models'}\n")
    out = tmp_path / "out"
    assert escale.main([str(cfg_path), "--out", str(out)]) == 0
    for f in ("results.json", "chips.csv", "e_scale.png", "summary.md"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())["models"]["transformer"]
    with open(out / "chips.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 2
    got = np.array([float(r["accuracy"]) for r in rows]).reshape(6, 2)

    # every chip again, alone: programmed with split(fold_in(k_chips, i))[0], read at time j
    # with fold_in(split(...)[1], j) (nvjax.jobs.accuracy_instance), k_chips = fold_in(key(0), 1)
    model, variables = models.get_trained("transformer", cache_dir=str(tmp_path / "models"),
                                          seed=0, epochs=1)
    ds = models.dataset("transformer", seed=0)
    x, y = jnp.asarray(ds.x_test[:24]), np.asarray(ds.y_test[:24])
    device, tile = devices.pcm(g_max=25.0), xb.TileConfig(rows=256, cols=256)
    k_chips = jax.random.fold_in(jax.random.key(0), 1)
    deploy = jax.jit(lambda k: chip_mod.deploy(k, model, variables, device, config=tile))
    read = jax.jit(lambda k, c, t: chip_mod.apply(k, c, x, t))
    for i in range(6):
        k_prog, k_read = jax.random.split(jax.random.fold_in(k_chips, i))
        chip = deploy(k_prog)
        for j, t in enumerate((1.0, 3.0e7)):
            logits = read(jax.random.fold_in(k_read, j), chip, jnp.float32(t))
            acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
            assert got[i, j] == pytest.approx(acc, abs=1e-6), (i, j)
    for j, p in enumerate(res["per_time"]):
        assert p["mean"] == pytest.approx(got[:, j].mean(), abs=1e-6)
        assert p["p50"] == pytest.approx(np.percentile(got[:, j], 50), abs=1e-6)
        assert p["mean_ci95"][0] <= p["mean"] <= p["mean_ci95"][1]
    assert res["software_accuracy"] == pytest.approx(
        float(models.accuracy(model, variables, np.asarray(x), y)), abs=1e-9)
    assert res["num_chips"] == 6 and res["peak_rss_mb_after"] > 0 and res["chips_per_s"] > 0
    assert "transformer" in (out / "summary.md").read_text()


def test_input_sampling_error_closed_form(escale):
    assert escale.image_se(0.75, 400) == pytest.approx(np.sqrt(0.75 * 0.25 / 400))
    assert escale.image_se(1.0, 256) == 0.0
