"""Monte Carlo driver: keys, chunk-size independence, instance-alone reproducibility, outputs."""
import json
import os

import chex
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


MODEL = MLP(features=(16, 10))


@pytest.fixture(scope="module")
def small_sweep():
    """(accuracy_instance of a small MLP, its arguments after the device)."""
    x = jax.random.uniform(jax.random.key(0), (40, 64))
    params = MODEL.init(jax.random.key(1), x)["params"]
    y = jnp.argmax(MODEL.apply({"params": params}, x), -1)  # software predictions as labels
    times = jnp.asarray((1.0, 86400.0), jnp.float32)
    return jobs.accuracy_instance(MODEL), (params, xb.TileConfig(), x, y, times)


def _toy(key, w):
    """A cheap instance function for engine properties: integer-valued draws, so no float
    rounding can differ between compilations."""
    return jnp.floor(8 * jax.random.uniform(key, (3,))) @ w


@pytest.mark.slow
def test_results_do_not_depend_on_chunk_size_and_instance_alone():
    key = jax.random.key(42)
    w = jnp.arange(6.0).reshape(3, 2)
    ref = sweep.run_instances(_toy, key, 300, w, chunk_size=300)
    assert ref.shape == (300, 2) and ref.std() > 0
    # an independent computation of instance i: fold_in(key, i), then the function
    want = np.stack([np.asarray(_toy(jax.random.fold_in(key, i), w)) for i in (0, 1, 217, 299)])
    np.testing.assert_array_equal(ref[[0, 1, 217, 299]], want)
    for chunk in (100, 7):
        np.testing.assert_array_equal(sweep.run_instances(_toy, key, 300, w, chunk_size=chunk), ref)
    for i in (0, 1, 217, 299):
        alone = sweep.run_instances(_toy, key, 1, w, chunk_size=1, start=i)
        np.testing.assert_array_equal(alone[0], ref[i])
    assert not np.array_equal(sweep.run_instances(_toy, jax.random.key(1), 50, w), ref[:50])


def test_compile_ahead_from_shapes_is_used_by_run_instances():
    """A chunk compiled ahead from ShapeDtypeStructs is the one run_instances uses with arrays of
    those shapes (the instance function is traced once, not again), the results are the
    independent fold_in computation, and other shapes compile their own chunk."""
    traces = []

    def fn(key, w):
        traces.append(1)
        return _toy(key, w)
    f = sweep.compile_chunk(fn)
    key = jax.random.key(7)
    ahead = sweep.compile_ahead(f, key, 10, jax.ShapeDtypeStruct((3, 2), jnp.float32),
                                chunk_size=4)
    assert sweep.compile_ahead(f, key, 10, jax.ShapeDtypeStruct((3, 2), jnp.float32),
                               chunk_size=4) is ahead   # the same shapes: the same compilation
    ahead.result(timeout=60)
    assert len(traces) == 1
    w = jnp.arange(6.0).reshape(3, 2)
    got = sweep.run_instances(fn, key, 10, w, chunk_size=4, compiled=f)
    assert len(traces) == 1                                 # nothing traced again
    want = np.stack([np.asarray(_toy(jax.random.fold_in(key, i), w)) for i in range(10)])
    np.testing.assert_array_equal(got, want)
    w5 = jnp.ones((3, 5))                                   # other shapes: compiled here
    assert sweep.run_instances(fn, key, 3, w5, chunk_size=4, compiled=f).shape == (3, 5)
    assert len(traces) == 2
    with pytest.raises(TypeError, match="compile_chunk"):
        sweep.compile_ahead(fn, key, 10, w)
    with pytest.raises(TypeError, match="key array"):
        sweep.compile_ahead(f, jax.ShapeDtypeStruct(key.shape, key.dtype), 10, w)


def test_compile_ahead_failure_surfaces_in_run_instances():
    """A function that cannot be compiled fails in the background; run_instances then compiles
    it where the error reaches the caller."""
    def bad(key, w):
        raise ValueError("no such physics")
    f = sweep.compile_chunk(bad)
    ahead = sweep.compile_ahead(f, jax.random.key(0), 4, jnp.ones(3), chunk_size=4)
    assert isinstance(ahead.exception(timeout=60), ValueError)
    with pytest.raises(ValueError, match="no such physics"):
        sweep.run_instances(bad, jax.random.key(0), 4, jnp.ones(3), chunk_size=4, compiled=f)


@pytest.mark.slow
def test_accuracy_sweep_does_not_depend_on_chunk_size(small_sweep):
    fn, args = small_sweep
    dev = D.pcm(g_max=5.0)  # a noisy device so accuracies vary
    key = jax.random.key(42)
    ref = sweep.run_instances(fn, key, 24, dev, *args, chunk_size=24)
    assert ref.shape == (24, 2) and ref.std() > 0
    np.testing.assert_array_equal(sweep.run_instances(fn, key, 24, dev, *args, chunk_size=8), ref)
    np.testing.assert_array_equal(
        sweep.run_instances(fn, key, 1, dev, *args, chunk_size=8, start=13)[0], ref[13])


@pytest.mark.slow
def test_second_run_traces_nothing_and_a_physics_grid_traces_once():
    """The compiled chunk is cached per instance function: a second sweep with the same function
    and shapes traces nothing; tile physics (r_wire, v_read, out_noise) and device parameters are
    traced arguments, so a grid over them traces each stage once."""
    x = jax.random.uniform(jax.random.key(0), (8, 12))
    params = MLP(features=(6, 3)).init(jax.random.key(1), x)["params"]
    model = MLP(features=(6, 3))

    @chex.assert_max_traces(n=1)
    def prepare(key, device, config):
        return chip_mod.deploy(key, model, params, device, config=config).tiles

    @chex.assert_max_traces(n=1)
    def finish(key, tiles, device, config):
        chip = chip_mod.with_tiles(model, params, device, config, tiles)
        return chip_mod.apply(key, chip, x, 60.0)

    fn = sweep.Staged(prepare, finish)
    base = xb.TileConfig(rows=4, cols=4, ir_drop="first_order", out_noise=0.01)
    outs = []
    for r in (0.5, 1.0, 2.0, 4.0):                      # 4-point grid over r_wire
        outs.append(sweep.run_instances(fn, jax.random.key(0), 6, D.pcm(),
                                        base.replace(r_wire=r), chunk_size=3))
    for q in (0.0088, 0.02, 0.05):                     # a device-parameter grid
        sweep.run_instances(fn, jax.random.key(0), 6, D.pcm(read_q=q), base, chunk_size=3)
    # the same points again: nothing is traced (assert_max_traces would raise)
    sweep.run_instances(fn, jax.random.key(0), 6, D.pcm(), base.replace(r_wire=2.0), chunk_size=3)
    # more wire resistance, more IR drop: outputs move further from the r_wire -> 0 case
    diffs = [float(np.abs(o - outs[0]).mean()) for o in outs[1:]]
    assert diffs[0] < diffs[1] < diffs[2]


@pytest.mark.slow
def test_tile_physics_vmap_and_grad():
    """vmap over r_wire equals a Python loop, and the MVM is differentiable in r_wire (first
    order: d|y|/dr < 0, the voltage drop grows with the wire resistance)."""
    w = jax.random.uniform(jax.random.key(2), (8, 5), minval=-1.0, maxval=1.0)
    x = jax.random.uniform(jax.random.key(3), (4, 8))
    base = xb.TileConfig(rows=8, cols=8, ir_drop="first_order", read_noise=False,
                         drift_compensation=False)
    tiles = xb.program_tiles(jax.random.key(4), D.ideal(), w, config=base)

    def y(r):
        return xb.mvm(jax.random.key(5), D.ideal(), tiles, x, 0.0, config=base.replace(r_wire=r))[0]
    rs = jnp.array([0.0, 100.0, 1000.0])
    np.testing.assert_allclose(jax.vmap(y)(rs), jnp.stack([y(r) for r in rs]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y(0.0), x @ w, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda r: jnp.sum(jnp.abs(y(r))))(100.0)
    assert np.isfinite(g) and g < 0


@pytest.mark.slow
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
            assert f is sweep.compile_chunk(staged, vmap_width=width)   # cached
            got = sweep.run_instances(staged, k, 23, 2.0, chunk_size=chunk, compiled=f)
            np.testing.assert_array_equal(got, ref)
    with pytest.raises(TypeError, match="callable"):
        sweep.Staged(prepare, None)


@pytest.mark.slow
def test_two_stage_accuracy_instance_equals_one_stage(small_sweep):
    """accuracy_instance (two stages: deploy, then reads) gives the accuracies of deploy + apply
    written as one function, and with_tiles rebuilds the deployed chip exactly."""
    fn, (params, cfg, x, y, times) = small_sweep
    assert isinstance(fn, sweep.Staged) and fn is jobs.accuracy_instance(MODEL)

    def one_stage(key, device):
        k_prog, k_read = jax.random.split(key)
        chip = chip_mod.deploy(k_prog, MODEL, params, device, config=cfg)
        return jnp.stack([jnp.mean(jnp.argmax(chip_mod.apply(jax.random.fold_in(k_read, j), chip,
                                                             x, times[j]), -1) == y)
                          for j in range(2)])
    dev = D.pcm(g_max=5.0)
    key = jax.random.key(42)
    a = sweep.run_instances(fn, key, 32, dev, params, cfg, x, y, times, chunk_size=16)
    b = sweep.run_instances(one_stage, key, 32, dev, chunk_size=16)
    assert a.std() > 0
    # accuracies are multiples of 1/40: float rounding between the two compilations could flip a
    # logit tie at most, never on this many instances
    np.testing.assert_allclose(a, b, atol=1e-6)
    chip = chip_mod.deploy(key, MODEL, params, dev, config=cfg)
    again = chip_mod.with_tiles(MODEL, params, dev, cfg, chip.tiles)
    np.testing.assert_array_equal(chip_mod.apply(key, again, x, 10.0),
                                  chip_mod.apply(key, chip, x, 10.0))
    with pytest.raises(ValueError, match="do not match"):
        chip_mod.with_tiles(MODEL, params, dev, cfg, {"Dense_0": chip.tiles["Dense_0"]})


def test_summarize_closed_form():
    a = np.arange(1, 101) / 100.0
    s = sweep.summarize(a)
    assert s["mean"] == pytest.approx(0.505)
    assert s["std"] == pytest.approx(np.sqrt(np.sum((a - 0.505) ** 2) / 99))
    assert s["p50"] == pytest.approx(0.505)
    assert s["p1"] == pytest.approx(0.01 + 0.99 * 0.01)  # linear interpolation
    assert s["min"] == 0.01 and s["max"] == 1.0 and s["n"] == 100


@pytest.mark.slow
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
    # the chunk compiled beside the training (from the parameters' shapes) is the one the sweep
    # runs with the trained parameters
    assert summary["timings"]["compiled_during_training"] is True
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
    assert again["timings"]["compiled_during_training"] is True   # loaded weights match too


@pytest.mark.parametrize("device", [
    {"kind": "reram"},
    {"kind": "levels", "params": {"bits": 2, "sigma": 0.05, "g_max": 10}},
    {"kind": "flash"},
    {"kind": "ideal", "p_stuck_min": 0.01},
    {"kind": "pcm", "p_stuck_max": 0.01},
])
@pytest.mark.slow
def test_every_device_kind_runs_from_config(tmp_path, device):
    cfg = cfg_mod.from_dict({
        "progress": False, "model": {"hidden": [16], "epochs": 3}, "device": device,
        "tile": {"dac_bits": 8, "adc_bits": 8, "adc_range": "max"},
        "sweep": {"num_instances": 6, "chunk_size": 4, "t_read_s": [1.0, 86400.0]},
    }, cfg_mod.RunConfig)
    summary = jobs.reliability(cfg, None, log=lambda s: None)
    assert len(summary["points"]) == 2
    assert all(0.0 <= p["mean"] <= 1.0 and p["n"] == 6 for p in summary["points"])
