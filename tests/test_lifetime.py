"""Lifetime loop: scan == step-by-step loop, one compile, disturb bookkeeping, the policy."""
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import config as cfg_mod
from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import disturb as R
from nvjax import lifetime as L
from nvjax import cli


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.relu(nn.Dense(12, name="hidden")(x)))


def _setup(n=48, n_in=10, seed=0):
    model = Tiny()
    x = jax.random.uniform(jax.random.key(seed), (n, n_in))
    x = jnp.where(x < 0.3, 0.0, x)  # some rows not driven
    params = model.init(jax.random.key(seed + 1), x)
    y = jnp.argmax(model.apply(params, x), -1)  # software accuracy 1
    return model, params, x, y


def _args(policy="accuracy", v_read=0.45, ir="none", steps=6, every=2, device=None,
          inferences_per_step=2e6, **kw):
    """(params, x, y, tile config, lifetime config, device, disturb) of the test chip."""
    _, params, x, y = _setup()
    tc = xb.TileConfig(rows=8, cols=8, v_read=v_read, ir_drop=ir)
    cfg = L.LifetimeConfig(num_steps=steps, eval_every=every, batch_size=8,
                           inferences_per_step=inferences_per_step, policy=policy, **kw)
    return params, x, y, tc, cfg, device or D.pcm(), R.pcm_disturb()


def _fns(**kw):
    params, x, y, tc, cfg, device, disturb = _args(**kw)
    return L.lifetime(Tiny(), params, device, tc, disturb, x, y, config=cfg)


# The lifetime built inside one jitted function, with the parameters, data and every physics
# number (v_read, thresholds, device and disturb constants) as arguments: tests that differ only
# in those numbers share one compilation (only static structure -- step counts, policy,
# patience, ir_drop mode, fault model -- compiles anew).
@jax.jit
def _simulate(key, params, x, y, tc, cfg, device, disturb):
    return L.lifetime(Tiny(), params, device, tc, disturb, x, y, config=cfg).simulate(key)


@jax.jit
def _init_step(key, params, x, y, tc, cfg, device, disturb, xb_):
    """(state after init, state after one step on inputs xb_)."""
    fns = L.lifetime(Tiny(), params, device, tc, disturb, x, y, config=cfg)
    state = fns.init(key)
    return state, fns.step(state, xb_)


def _sim(key, **kw):
    return _simulate(key, *_args(**kw))


@pytest.mark.slow
def test_scan_equals_step_by_step_python_loop():
    key = jax.random.key(3)
    # a threshold that is never reached: the same compiled program as the run below
    g_err = _sim(key, policy="conductance_error", steps=8, every=2, g_error_max=1e9)[1].g_error
    thr = float(g_err[0] + g_err[1]) / 2  # reprograms at the second evaluation
    kw = dict(policy="conductance_error", steps=8, every=2, g_error_max=thr)
    fns = _fns(**kw)
    state_s, rec_s = _sim(key, **kw)
    step, ev, ck = jax.jit(fns.step), jax.jit(fns.evaluate), jax.jit(fns.check)
    state = jax.jit(fns.init)(key)
    recs = []
    for e in range(fns.config.num_evals):
        for s in range(e * 2, e * 2 + 2):
            state = step(state, fns.batch(s))
        state, rec = ck(state, ev(state, e))
        recs.append(rec)
    rec_l = jax.tree_util.tree_map(lambda *a: np.stack(a), *recs)
    assert np.asarray(rec_s.reprogrammed).any()  # the case exercises reprogramming
    for a, b in zip(rec_s, rec_l):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(state_s.damage), jax.tree_util.tree_leaves(state.damage)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)
    assert int(state_s.num_programs) == 1 + int(np.asarray(rec_s.reprogrammed).sum())


@pytest.mark.slow
def test_whole_run_compiles_once_and_a_chip_alone_equals_its_row():
    fns = _fns()
    traced = fns._replace(simulate=chex.assert_max_traces(fns.simulate, n=1))
    rec = L.run(traced, jax.random.key(7), 5, chunk_size=2)  # three chunks, one trace
    assert rec.accuracy.shape == (5, 3)
    _, one = jax.jit(fns.simulate)(jax.random.fold_in(jax.random.key(7), 2))
    for a, b in zip(rec, one):
        np.testing.assert_allclose(a[2], b, rtol=1e-6)


@pytest.mark.slow
def test_placements_are_arguments_one_trace_for_all():
    """The placement is an argument of the simulation: two different placements (same shapes)
    run through one trace, and they give different chips (the weights sit elsewhere)."""
    fns = _fns(ir="first_order")
    fns = fns._replace(simulate=chex.assert_max_traces(fns.simulate, n=1))
    ident = {"hidden": (np.arange(10), np.arange(12)), "out": (np.arange(12), np.arange(4))}
    rev = {"hidden": (np.arange(10)[::-1], np.arange(12)[::-1]),
           "out": (np.arange(12)[::-1], np.arange(4))}
    a = L.run(fns, jax.random.key(0), 2, placement=ident, chunk_size=2)
    b = L.run(fns, jax.random.key(0), 2, placement=rev, chunk_size=2)
    assert a.accuracy.shape == b.accuracy.shape == (2, 3)
    assert not np.array_equal(np.asarray(a.g_error), np.asarray(b.g_error))


@pytest.mark.slow
def test_zero_inputs_give_no_reads_and_no_disturb():
    args = _args()
    _, state = _init_step(jax.random.key(0), *args, jnp.zeros((8, 10)))
    for name in state.damage:
        assert float(jnp.max(state.reads[name])) == 0.0
    np.testing.assert_array_equal(state.damage["hidden"][0], 0.0)
    np.testing.assert_array_equal(state.damage["hidden"][1], 0.0)
    assert float(state.t) == pytest.approx(args[4].dt_s)


@pytest.mark.slow
def test_damage_of_one_step_matches_the_d7_law_by_hand():
    """ir_drop='none': every cell of row i sees v_read·x_i/max|x| on each driven read."""
    fns = _fns(v_read=0.3)
    xb_ = fns.batch(0)
    state, new = _init_step(jax.random.key(1), *_args(v_read=0.3), xb_)
    x = np.asarray(xb_, float)
    v = 0.3 * np.abs(x) / np.abs(x).max(axis=1, keepdims=True)
    n_per = 2e6 / 8
    for side, (z, g0) in enumerate(((state.spread["hidden"][0], state.chip.tiles["hidden"].pos.g),
                                    (state.spread["hidden"][1], state.chip.tiles["hidden"].neg.g))):
        nd_ref = 1e8 * np.exp(0.5 * np.asarray(z, float))          # N_D at V_ref (κ = 0)
        rate = ((x != 0) * np.exp((v - 0.2) / 0.05)).sum(0)         # Σ_b over driven reads
        expect = n_per * rate[:, None] / nd_ref
        np.testing.assert_allclose(new.damage["hidden"][side], expect, rtol=2e-5)
    np.testing.assert_allclose(new.reads["hidden"], n_per * (x != 0).sum(0), rtol=1e-6)


@pytest.mark.slow
def test_accuracy_falls_with_reads_and_ir_drop_lowers_the_damage():
    # a threshold never reached (no reprogramming): the compiled program of the tests above
    kw = dict(policy="conductance_error", g_error_max=1e9, v_read=0.5, steps=8, every=2,
              inferences_per_step=3e6)
    state, rec = _sim(jax.random.key(0), **kw)
    acc = np.asarray(rec.accuracy)
    assert not np.asarray(rec.reprogrammed).any()
    assert acc[-1] < acc[0] - 0.05
    assert np.all(np.diff(np.asarray(rec.g_error)) > 0)     # displacement grows with reads
    assert np.all(np.diff(np.asarray(rec.inferences_since)) > 0)
    # with wire resistance the cells see less than the drive: less damage, never more
    state_ir, _ = _sim(jax.random.key(0), ir="first_order", **kw)
    d = np.asarray(state.damage["hidden"][0])
    d_ir = np.asarray(state_ir.damage["hidden"][0])
    assert np.all(d_ir <= d * (1 + 1e-5)) and d_ir.sum() < d.sum()


@pytest.mark.slow
def test_reprogramming_resets_and_keeps_the_chips_faults():
    dev = D.pcm(p_stuck_min=0.1, p_stuck_max=0.05)
    kw = dict(policy="conductance_error", g_error_max=0.02, v_read=0.5, steps=8, every=2,
              device=dev)
    args = _args(**kw)
    state0, _ = _init_step(jax.random.key(4), *args, jnp.zeros((8, 10)))
    state, rec = _simulate(jax.random.key(4), *args)
    flags = np.asarray(rec.reprogrammed)
    np.testing.assert_array_equal(flags, np.asarray(rec.g_error) > 0.02)  # patience 1
    assert flags.all()
    # every evaluation follows a reprogramming: the counters restart each time
    np.testing.assert_allclose(rec.inferences_since, 2 * 2e6)
    np.testing.assert_allclose(rec.t_s, 2 * args[4].dt_s, rtol=1e-6)
    assert int(state.num_programs) == 1 + flags.sum()
    for name, t in state.chip.tiles.items():
        np.testing.assert_array_equal(t.pos.stuck, state0.chip.tiles[name].pos.stuck)
        assert not np.array_equal(t.pos.g, state0.chip.tiles[name].pos.g)  # a new draw
        # the same draw, kept (two compiled programs may round it 1 ulp apart; a new draw
        # would differ by O(1))
        np.testing.assert_allclose(state.spread[name][0], state0.spread[name][0], rtol=1e-6,
                                   atol=1e-6)
        stuck = np.asarray(t.pos.stuck)
        np.testing.assert_array_equal(np.asarray(t.pos.g)[stuck == 1], 0.0)
        np.testing.assert_array_equal(np.asarray(t.pos.g)[stuck == 2], 25.0)


@pytest.mark.slow
def test_patience_delays_the_policy():
    rec1 = _sim(jax.random.key(4), policy="conductance_error", g_error_max=0.02, v_read=0.5,
                steps=8, every=2)[1]
    rec3 = _sim(jax.random.key(4), policy="conductance_error", g_error_max=0.02, v_read=0.5,
                steps=8, every=2, patience=3)[1]
    np.testing.assert_array_equal(rec1.reprogrammed, [True, True, True, True])
    np.testing.assert_array_equal(rec3.reprogrammed, [False, False, True, False])


def test_summary_and_events():
    cfg = L.LifetimeConfig(num_steps=4, eval_every=1, inferences_per_step=10.0, policy="accuracy")
    rec = L.LifetimeRecord(
        accuracy=np.array([[0.9, 0.8, 0.9, 0.8], [0.9] * 4]),
        fresh_accuracy=np.full((2, 4), 0.9), g_error=np.zeros((2, 4)),
        reprogrammed=np.array([[False, True, False, True], [False] * 4]),
        t_s=np.zeros((2, 4)), inferences_since=np.array([[10, 20, 10, 20], [10, 20, 30, 40.]]),
        max_row_reads=np.zeros((2, 4)))
    s = L.summarize(rec, cfg)
    assert s["reprograms_mean"] == 1.0 and s["chips_reprogrammed"] == 1
    assert s["interval_mean"] == 20.0
    assert s["first_interval_median"] is None  # half the chips never reprogrammed (censored)
    ev = L.reprogram_events(rec, cfg)
    assert [(e[0], e[1], e[2], e[3]) for e in ev] == [(0, 0, 20.0, 20.0), (0, 1, 40.0, 20.0)]
    np.testing.assert_allclose(L.eval_inferences(cfg), [10, 20, 30, 40])


def test_bad_inputs():
    with pytest.raises(ValueError, match="eval_every"):
        L.LifetimeConfig(num_steps=10, eval_every=3)
    with pytest.raises(ValueError, match="policy"):
        L.LifetimeConfig(policy="sometimes")
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="g_inf"):
        L.lifetime(model, params, D.pcm(), xb.TileConfig(), R.pcm_disturb(g_inf=80.0), x, y)
    with pytest.raises(ValueError, match="batch_size"):
        L.lifetime(model, params, D.pcm(), xb.TileConfig(), R.pcm_disturb(), x[:4], y[:4])
    with pytest.raises(TypeError, match="DisturbParams"):
        L.lifetime(model, params, D.pcm(), xb.TileConfig(), {"n_ref": 1e8}, x, y)


def test_lifetime_config_file_is_strict(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    cfg = cfg_mod.load_lifetime(os.path.join(root, "configs", "lifetime.yaml"))
    assert cfg.num_chips >= 100 and cfg.lifetime.num_steps * cfg.lifetime.inferences_per_step >= 1e6
    d = cfg_mod.to_dict(cfg)
    d["disturb"]["params"] = {"n_reff": 1e7}
    with pytest.raises(cfg_mod.ConfigError, match="n_reff"):
        cfg_mod.from_dict(d, cfg_mod.LifetimeRunConfig)
    d = cfg_mod.to_dict(cfg)
    d["lifetime"]["eval_every"] = 7
    with pytest.raises(cfg_mod.ConfigError, match="multiple"):
        cfg_mod.from_dict(d, cfg_mod.LifetimeRunConfig)
    assert cfg_mod.make_disturb(cfg_mod.DisturbConfig(), cfg_mod.DeviceConfig(kind="reram")).g_inf == 40.0


@pytest.mark.slow
def test_cli_lifetime_writes_results(tmp_path):
    path = tmp_path / "lt.yaml"
    path.write_text(
        "model: {name: mlp, hidden: [16], epochs: 3}\n"
        "tile: {rows: 64, cols: 16, v_read: 0.5, ir_drop: first_order}\n"
        "lifetime: {num_steps: 4, eval_every: 2, batch_size: 8, inferences_per_step: 1.0e6}\n"
        "num_chips: 3\nchunk_size: 2\neval_samples: 40\nprogress: false\n")
    out = tmp_path / "out"
    assert cli.main(["lifetime", str(path), "--out", str(out)]) == 0
    for f in ("summary.json", "results.csv", "events.csv", "lifetime.png", "params.msgpack"):
        assert (out / f).exists(), f
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 2
    import json
    s = json.loads((out / "summary.json").read_text())
    assert s["num_chips"] == 3 and len(s["accuracy_p50"]) == 2


@pytest.mark.slow
def test_max_disturb_rows_uses_an_evenly_spaced_subset():
    fns = _fns(v_read=0.3, max_disturb_rows=4)
    xb_ = fns.batch(0)
    state, new = _init_step(jax.random.key(1), *_args(v_read=0.3, max_disturb_rows=4), xb_)
    x = np.asarray(xb_, float)[np.linspace(0, 7, 4).astype(int)]
    v = 0.3 * np.abs(x) / np.abs(x).max(axis=1, keepdims=True)
    n_per = 2e6 / 8 * 8 / 4
    z = np.asarray(state.spread["hidden"][0], float)
    expect = n_per * ((x != 0) * np.exp((v - 0.2) / 0.05)).sum(0)[:, None] / (1e8 * np.exp(0.5 * z))
    np.testing.assert_allclose(new.damage["hidden"][0], expect, rtol=2e-5)
    np.testing.assert_allclose(new.reads["hidden"], n_per * (x != 0).sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match="max_disturb_rows"):
        L.LifetimeConfig(max_disturb_rows=0)


@pytest.mark.slow
def test_failed_ir_drop_solve_is_flagged_and_nan_never_a_number():
    """ir_drop='solver' with a solve that cannot converge: eagerly the lifetime raises (naming
    r_wire, the tile size and the conductance scale); jitted, the record carries
    ir_converged=False and NaN accuracies, never argmax's guess on NaN logits — and the same
    compiled run at a small r_wire converges and says so."""
    model, params, x, y = _setup()
    tc = xb.TileConfig(rows=8, cols=8, v_read=0.45, ir_drop="solver", r_wire=5e4, ir_max_iter=3)
    cfg = L.LifetimeConfig(num_steps=2, eval_every=1, batch_size=8, inferences_per_step=2e6,
                           policy="none")

    def build(r):
        return L.lifetime(model, params, D.pcm(), tc.replace(r_wire=r), R.pcm_disturb(), x, y,
                          config=cfg)
    with pytest.raises(ValueError, match=r"did not converge.*8×8 tiles, r_wire = 50000 Ω, "
                                         r"conductances up to"):
        build(5e4).init(jax.random.key(0))              # the fresh accuracy's MVMs, eagerly
    run = jax.jit(lambda r: build(r).simulate(jax.random.key(0))[1])   # r_wire traced
    rec = run(5e4)
    assert rec.ir_converged.shape == (2,) and not np.asarray(rec.ir_converged).any()
    assert np.all(np.isnan(np.asarray(rec.accuracy)))
    assert L.summarize(jax.tree_util.tree_map(lambda a: np.asarray(a)[None], rec),
                       cfg)["ir_unconverged_points"] == 2
    rec = run(1.0)
    assert np.asarray(rec.ir_converged).all() and np.all(np.isfinite(np.asarray(rec.accuracy)))
