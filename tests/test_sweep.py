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
from nvjax import jobs
from nvjax import sweep
from nvjax.models import MLP
from nvjax import chip as chip_mod


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
    fn = jobs.accuracy_instance(model, params, xb.TileConfig(), x, y, (1.0, 86400.0))
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


def test_staged_is_prepare_then_finish():
    """A Staged pair: called directly it is finish(key, prepare(key)); swept, each chunk runs as two
    compiled calls and gives exactly the values of a hand-written one-stage function (integer-valued
    draws, so no rounding can differ)."""
    def prepare(key, scale):
        return {"a": jnp.floor(8 * jax.random.uniform(key, (3,))) * scale}

    def finish(key, state, scale):
        return state["a"].sum() + jnp.floor(4 * jax.random.uniform(jax.random.fold_in(key, 1)))

    def plain(key, scale):
        a = jnp.floor(8 * jax.random.uniform(key, (3,))) * scale
        return a.sum() + jnp.floor(4 * jax.random.uniform(jax.random.fold_in(key, 1)))

    staged = sweep.Staged(prepare, finish)
    k = jax.random.key(5)
    assert float(staged(k, 2.0)) == float(plain(k, 2.0))
    ref = sweep.run_instances(plain, k, 23, 2.0, chunk_size=23)
    for chunk in (23, 4):
        for width in (None, 2):
            f = sweep.compile_chunk(staged, vmap_width=width)
            assert len(f._jits) == 2
            got = sweep.run_instances(staged, k, 23, 2.0, chunk_size=chunk, compiled=f)
            np.testing.assert_array_equal(got, ref)
    with pytest.raises(TypeError, match="callable"):
        sweep.Staged(prepare, None)


def test_two_stage_accuracy_instance_equals_one_stage(small_sweep):
    """accuracy_instance (two stages: deploy, then reads) gives the accuracies of deploy + apply
    written as one function, and with_tiles rebuilds the deployed chip exactly."""
    assert isinstance(small_sweep, sweep.Staged)
    model = MLP(features=(16, 10))
    x = jax.random.uniform(jax.random.key(0), (40, 64))
    params = model.init(jax.random.key(1), x)
    y = jnp.argmax(model.apply(params, x), -1)
    times = jnp.asarray((1.0, 86400.0), jnp.float32)
    cfg = xb.TileConfig()

    def one_stage(key, device):
        k_prog, k_read = jax.random.split(key)
        chip = chip_mod.deploy(k_prog, model, params, device, config=cfg)
        return jnp.stack([jnp.mean(jnp.argmax(chip_mod.apply(jax.random.fold_in(k_read, j), chip,
                                                             x, times[j]), -1) == y)
                          for j in range(2)])
    dev = D.pcm(g_max=5.0)
    key = jax.random.key(42)
    a = sweep.run_instances(small_sweep, key, 64, dev, chunk_size=16)
    b = sweep.run_instances(one_stage, key, 64, dev, chunk_size=16)
    assert a.std() > 0
    # accuracies are multiples of 1/40: float rounding between the two compilations could flip a
    # logit tie at most, never on this many instances
    np.testing.assert_allclose(a, b, atol=1e-6)
    chip = chip_mod.deploy(key, model, params, dev, config=cfg)
    again = chip_mod.with_tiles(model, params, dev, cfg, chip.tiles)
    np.testing.assert_array_equal(chip_mod.apply(key, again, x, 10.0),
                                  chip_mod.apply(key, chip, x, 10.0))
    with pytest.raises(ValueError, match="do not match"):
        chip_mod.with_tiles(model, params, dev, cfg, {"Dense_0": chip.tiles["Dense_0"]})


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
    summary = jobs.reliability(cfg, out, log=lambda s: None)
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
    again = jobs.reliability(cfg, out, log=lambda s: None)
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
    summary = jobs.reliability(cfg, None, log=lambda s: None)
    assert len(summary["points"]) == 2
    assert all(0.0 <= p["mean"] <= 1.0 and p["n"] == 6 for p in summary["points"])
