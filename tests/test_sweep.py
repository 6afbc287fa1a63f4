"""Monte Carlo driver: keys, chunk-size independence, instance-alone reproducibility, outputs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import config as cfg_mod
from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import sweep
from nvjax.models import MLP


def test_instance_keys_are_fold_in():
    k = jax.random.key(3)
    ks = sweep.instance_keys(k, [0, 5, 999])
    for row, i in zip(ks, [0, 5, 999]):
        np.testing.assert_array_equal(jax.random.key_data(row),
                                      jax.random.key_data(jax.random.fold_in(k, i)))


@pytest.fixture(scope="module")
def small_sweep():
    model = MLP(features=(16, 10))
    x = jax.random.uniform(jax.random.key(0), (40, 64))
    params = model.init(jax.random.key(1), x)
    y = jnp.argmax(model.apply(params, x), -1)  # software predictions as labels
    fn = sweep.accuracy_instance(model, params, xb.TileConfig(), x, y, (1.0, 86400.0))
    return fn


def test_results_do_not_depend_on_chunk_size_and_instance_alone(small_sweep):
    dev = D.pcm(g_max=5.0)  # a noisy device so accuracies vary
    key = jax.random.key(42)
    ref = sweep.run_instances(small_sweep, key, 1000, dev, chunk_size=1000)
    assert ref.shape == (1000, 2) and ref.std() > 0
    for chunk in (100, 7):
        np.testing.assert_array_equal(sweep.run_instances(small_sweep, key, 1000, dev,
                                                          chunk_size=chunk), ref)
    for i in (0, 1, 517, 999):
        alone = sweep.run_instances(small_sweep, key, 1, dev, chunk_size=1, start=i)
        np.testing.assert_array_equal(alone[0], ref[i])
    # same seed -> identical; other seed -> different
    np.testing.assert_array_equal(sweep.run_instances(small_sweep, key, 50, dev, chunk_size=25),
                                  ref[:50])
    assert not np.array_equal(sweep.run_instances(small_sweep, jax.random.key(1), 50, dev), ref[:50])


def test_summarize_closed_form():
    a = np.arange(1, 101) / 100.0
    s = sweep.summarize(a)
    assert s["mean"] == pytest.approx(0.505)
    assert s["std"] == pytest.approx(np.sqrt(np.sum((a - 0.505) ** 2) / 99))
    assert s["p50"] == pytest.approx(0.505)
    assert s["p1"] == pytest.approx(0.01 + 0.99 * 0.01)  # linear interpolation
    assert s["min"] == 0.01 and s["max"] == 1.0 and s["n"] == 100


def test_reliability_end_to_end(tmp_path):
    cfg = cfg_mod.from_dict({
        "seed": 1, "progress": False,
        "model": {"name": "mlp", "hidden": [32], "epochs": 10},
        "device": {"kind": "pcm"},
        "sweep": {"num_instances": 20, "chunk_size": 8, "t_read_s": [1.0, 86400.0],
                  "device_grid": {"read_q": [0.0, 0.02]}},
    }, cfg_mod.RunConfig)
    out = str(tmp_path / "run")
    summary = sweep.reliability(cfg, out, log=lambda s: None)
    assert os.path.exists(os.path.join(out, "accuracy_vs_time.png"))
    with open(os.path.join(out, "summary.json")) as f:
        disk = json.load(f)
    assert disk["points"] == json.loads(json.dumps(summary["points"]))
    assert len(disk["points"]) == 4
    for p in disk["points"]:
        assert {"mean", "std", "p1", "p50", "t_read_s", "device"} <= set(p)
        assert 0.5 < p["mean"] <= 1.0
    assert disk["config"]["sweep"]["num_instances"] == 20
    assert "jax" in disk["versions"] and disk["timings"]["sweep_s"] > 0
    import csv
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 * 2 * 2
    assert set(rows[0]) == {"instance", "point", "read_q", "t_read_s", "accuracy"}
    # the CSV agrees with the summary
    acc = [float(r["accuracy"]) for r in rows if r["point"] == "1" and float(r["t_read_s"]) == 86400.0]
    p = [q for q in disk["points"] if q["device"] == {"read_q": 0.02} and q["t_read_s"] == 86400.0][0]
    assert np.mean(acc) == pytest.approx(p["mean"], abs=1e-5)
    # a rerun reloads the saved weights and gives identical results
    again = sweep.reliability(cfg, out, log=lambda s: None)
    assert again["points"] == summary["points"]


@pytest.mark.parametrize("device", [
    {"kind": "reram"},
    {"kind": "levels", "params": {"bits": 2, "sigma": 0.05, "g_max": 10}},
    {"kind": "flash"},
    {"kind": "ideal", "p_stuck_min": 0.01},
    {"kind": "pcm", "p_stuck_max": 0.01},
])
def test_every_device_kind_runs_from_config(tmp_path, device):
    cfg = cfg_mod.from_dict({
        "progress": False, "model": {"hidden": [16], "epochs": 3}, "device": device,
        "tile": {"dac_bits": 8, "adc_bits": 8, "adc_range": "max"},
        "sweep": {"num_instances": 6, "chunk_size": 4, "t_read_s": [1.0, 86400.0]},
    }, cfg_mod.RunConfig)
    summary = sweep.reliability(cfg, None, log=lambda s: None)
    assert len(summary["points"]) == 2
    assert all(0.0 <= p["mean"] <= 1.0 and p["n"] == 6 for p in summary["points"])
