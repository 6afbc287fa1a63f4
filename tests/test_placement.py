"""Placement cost models and the non-linear objective through the simulator."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import disturb as R
from nvjax import mapping
from nvjax import placement as pl
from nvjax import sensitivity
from nvjax import chip as C


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


def _setup():
    model = Tiny()
    x = jax.random.uniform(jax.random.key(0), (32, 8))
    x = jnp.where(x < 0.3, 0.0, x)
    params = model.init(jax.random.key(1), x)
    y = jnp.argmax(model.apply(params, x), -1)
    return model, params, x, y


def _onehots(placement, names):
    mats = []
    for n in names:
        for perm in placement[n]:
            mats.append(jax.nn.one_hot(jnp.asarray(perm), len(perm)))
    return tuple(mats)


@pytest.mark.slow
def test_layer_reads_by_hand():
    model, params, x, y = _setup()
    cfg = xb.TileConfig(v_read=0.3)
    p = R.pcm_disturb()
    a = pl.layer_reads(model, params, x, cfg, p)["hidden"]
    xn = np.asarray(x, float)
    u = xn / np.abs(xn).max(1, keepdims=True)
    expect = ((xn != 0) * np.exp((u * 0.3 - 0.2) / 0.05)).sum(0) / 32
    np.testing.assert_allclose(a, expect, rtol=1e-5)


@pytest.mark.slow
def test_position_factor_and_exact_placement():
    model, params, x, y = _setup()
    dev, p = D.pcm(), R.pcm_disturb()
    key = jax.random.key(7)
    none = pl.linear_costs(key, model, params, x, y, dev, xb.TileConfig(rows=8, cols=8), p)
    for c, d in none.values():
        np.testing.assert_array_equal(d, 1.0)
    cfg = xb.TileConfig(rows=8, cols=8, ir_drop="first_order", r_wire=2000.0, v_read=0.4)
    costs = pl.linear_costs(key, model, params, x, y, dev, cfg, p)
    c, d = costs["hidden"]
    assert c.shape == d.shape == (8, 6) and np.all(c >= 0)
    assert np.all(d <= 1.0) and d.min() < 0.9
    # criticality = saliency × reads per row
    sal = sensitivity.kernel_criticality(
        sensitivity.saliency(sensitivity.loss_fn(model, x, y), params), params)["hidden"]
    a = pl.layer_reads(model, params, x, cfg, p)["hidden"]
    np.testing.assert_allclose(c, np.asarray(sal) * np.asarray(a)[:, None], rtol=1e-5)
    ident = pl.identity_placement(params)
    ex = pl.exact_placement(costs)
    assert pl.placement_cost(costs, ex) <= pl.placement_cost(costs, ident) + 1e-12
    for n, (rp, cp) in ex.items():
        assert sorted(rp) == list(range(len(rp))) and sorted(cp) == list(range(len(cp)))
    # criticality 'magnitude': C = |w|·a, by hand; 'hessian': ½·|H_ii|·w² of
    # sensitivity.importance (tested against the exact Hessian there) with the same key
    mag = pl.linear_costs(key, model, params, x, y, dev, cfg, p, criticality="magnitude")
    w = np.abs(np.asarray(params["params"]["hidden"]["kernel"], np.float64))
    np.testing.assert_allclose(mag["hidden"][0], w * np.asarray(a)[:, None], rtol=1e-5)
    np.testing.assert_array_equal(mag["hidden"][1], d)
    hes = pl.linear_costs(key, model, params, x, y, dev, cfg, p, criticality="hessian",
                          num_probes=16)
    imp = sensitivity.importance(key, model, params, x, y, method="hessian", num_probes=16)
    np.testing.assert_allclose(hes["hidden"][0], np.asarray(imp["hidden"]) * np.asarray(a)[:, None],
                               rtol=1e-5)


@pytest.mark.slow
def test_random_placement_permutations_from_a_key():
    _, params, _, _ = _setup()
    a = pl.random_placement(jax.random.key(3), params)
    b = pl.random_placement(jax.random.key(3), params)
    c = pl.random_placement(jax.random.key(4), params)
    assert list(a) == ["hidden", "out"]
    for n, (rows, cols) in {"hidden": (8, 6), "out": (6, 4)}.items():
        rp, cp = a[n]
        assert isinstance(rp, np.ndarray) and np.issubdtype(rp.dtype, np.integer)
        assert sorted(rp.tolist()) == list(range(rows)) and sorted(cp.tolist()) == list(range(cols))
        np.testing.assert_array_equal(rp, b[n][0])
        np.testing.assert_array_equal(cp, b[n][1])
    assert any(not np.array_equal(a[n][i], c[n][i]) for n in a for i in (0, 1))
    with pytest.raises(TypeError, match="key"):
        pl.random_placement(3, params)                    # an int seed is not a key


@pytest.mark.slow
def test_objective_limits_zero_reads_and_no_ir_drop():
    model, params, x, y = _setup()
    dev, p = D.pcm(), R.pcm_disturb()
    loss = sensitivity.loss_fn(model, x, y)(params)
    obj0, names = pl.relaxed_objective(model, params, x, y, dev, xb.TileConfig(rows=8, cols=8), p, 0.0)
    ident = pl.identity_placement(params)
    rnd = pl.random_placement(jax.random.key(3), params)
    np.testing.assert_allclose(obj0(_onehots(ident, names)), loss, rtol=1e-5)
    np.testing.assert_allclose(obj0(_onehots(rnd, names)), loss, rtol=1e-5)
    # without IR drop a cell's position does not matter, even under disturb
    obj, _ = pl.relaxed_objective(model, params, x, y, dev, xb.TileConfig(rows=8, cols=8, v_read=0.5),
                                  p, 1e7)
    a, b = obj(_onehots(ident, names)), obj(_onehots(rnd, names))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a > loss + 1e-3   # disturb hurts
    # with IR drop it does
    cfg = xb.TileConfig(rows=8, cols=8, v_read=0.5, ir_drop="first_order", r_wire=3000.0)
    obj_ir, _ = pl.relaxed_objective(model, params, x, y, dev, cfg, p, 1e7)
    assert abs(float(obj_ir(_onehots(ident, names)) - obj_ir(_onehots(rnd, names)))) > 1e-5


@pytest.mark.slow
def test_objective_gradients_match_finite_differences():
    model, params, x, y = _setup()
    cfg = xb.TileConfig(rows=8, cols=8, v_read=0.5, ir_drop="first_order", r_wire=3000.0)
    obj, names = pl.relaxed_objective(model, params, x, y, D.pcm(), cfg, R.pcm_disturb(), 1e7)
    sizes = [8, 6, 6, 4]
    logits = tuple(jax.random.normal(jax.random.fold_in(jax.random.key(5), k), (n, n))
                   for k, n in enumerate(sizes))

    @jax.jit
    def f(lg):
        return obj(tuple(mapping.sinkhorn(l, 30) for l in lg))
    g = jax.jit(jax.grad(f))(logits)
    assert all(np.isfinite(np.asarray(gi)).all() for gi in g)
    direction = tuple(jax.random.normal(jax.random.fold_in(jax.random.key(6), k), l.shape)
                      for k, l in enumerate(logits))
    eps = 1e-2
    plus = f(tuple(l + eps * d for l, d in zip(logits, direction)))
    minus = f(tuple(l - eps * d for l, d in zip(logits, direction)))
    fd = (plus - minus) / (2 * eps)
    an = sum(jnp.sum(gi * d) for gi, d in zip(g, direction))
    np.testing.assert_allclose(an, fd, rtol=5e-2, atol=1e-6)


@pytest.mark.slow
def test_relaxed_placement_returns_permutations():
    model, params, x, y = _setup()
    cfg = xb.TileConfig(rows=8, cols=8, v_read=0.5, ir_drop="first_order", r_wire=3000.0)
    costs = pl.linear_costs(jax.random.key(7), model, params, x, y, D.pcm(), cfg, R.pcm_disturb())
    start = pl.exact_placement(costs)
    placed, info = pl.relaxed_placement(jax.random.key(0), model, params, x, y, D.pcm(), cfg,
                                        R.pcm_disturb(), 1e7, start=start, steps=30)
    for n, (rp, cp) in placed.items():
        assert sorted(rp) == list(range(len(rp))) and sorted(cp) == list(range(len(cp)))
    assert np.isfinite(np.asarray(info.loss_history)).all()
    with pytest.raises(ValueError, match="criticality"):
        pl.linear_costs(jax.random.key(7), model, params, x, y, D.pcm(), cfg, R.pcm_disturb(),
                        criticality="magic")
    with pytest.raises(TypeError, match="key"):
        pl.linear_costs(0, model, params, x, y, D.pcm(), cfg, R.pcm_disturb())


@pytest.mark.slow
def test_objective_with_ir_mvm_equals_the_simulated_chip_at_zero_reads():
    """n = 0: the objective is the cross-entropy of the network run on the placed tiles with
    first-order IR drop — computed independently by chip.apply on an ideal-device chip."""
    model, params, x, y = _setup()
    cfg = xb.TileConfig(rows=4, cols=4, v_read=0.5, ir_drop="first_order", r_wire=3000.0)
    dev = D.ideal(g_max=25.0)
    obj, names = pl.relaxed_objective(model, params, x, y, dev, cfg, R.pcm_disturb(), 0.0)
    placement = pl.random_placement(jax.random.key(2), params)
    chip = C.deploy(jax.random.key(0), model, params, dev, config=cfg,
                    placement={n: tuple(jnp.asarray(p, jnp.int32) for p in placement[n])
                               for n in names})
    logits = C.apply(jax.random.key(1), chip, x, 0.0)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    np.testing.assert_allclose(obj(_onehots(placement, names)), ce, rtol=1e-4)
    no_ir, _ = pl.relaxed_objective(model, params, x, y, dev, cfg, R.pcm_disturb(), 0.0, ir_mvm=False)
    assert abs(float(no_ir(_onehots(placement, names)) - ce)) > 1e-4  # the IR term matters here


@pytest.mark.slow
def test_position_factor_uses_the_converged_solver_and_first_order_validity_is_checked():
    """D from the IR-drop voltages of a direct nodal solve of each tile (all rows at v_read);
    the relaxed objective's first-order model warns, with its numbers, where it is not valid."""
    from test_irdrop import _nodal
    rng = np.random.default_rng(0)
    gp, gm = rng.uniform(0, 25, (12, 6)), rng.uniform(0, 25, (12, 6))
    cfg = xb.TileConfig(rows=8, cols=4, ir_drop="first_order", r_wire=2000.0, v_read=0.4)
    p = R.pcm_disturb()
    d = np.asarray(pl.position_factor(jnp.asarray(gp, jnp.float32), jnp.asarray(gm, jnp.float32),
                                      cfg, p))
    eta = np.zeros((12, 6))
    for g in (gp, gm):
        for r0 in (0, 8):
            for c0 in (0, 4):
                t = np.zeros((8, 4))
                blk = g[r0:r0 + 8, c0:c0 + 4]
                t[:blk.shape[0], :blk.shape[1]] = blk
                v = _nodal(t, np.full(8, 0.4), 2000.0)
                eta[r0:r0 + 8, c0:c0 + 4] += 0.5 * v[:blk.shape[0], :blk.shape[1]] / 0.4
    np.testing.assert_allclose(d, np.exp(0.4 * (eta - 1.0) / float(p.v0)), rtol=2e-4)
    model, params, x, y = _setup()
    with pytest.warns(RuntimeWarning, match=r"relaxed_objective.*off by about .* %.*8×8 tiles, "
                                            r"r_wire = 3000 Ω"):
        pl.relaxed_objective(model, params, x, y, D.pcm(),
                             xb.TileConfig(rows=8, cols=8, v_read=0.5, ir_drop="first_order",
                                           r_wire=3000.0), p, 1e7)


# --------------------------------------------------------------------------- issue 15: costs v2

def test_complete_permutation_appends_the_empty_positions():
    assert pl.complete_permutation([3, 0], 5).tolist() == [3, 0, 1, 2, 4]
    with pytest.raises(ValueError, match="distinct"):
        pl.complete_permutation([1, 1], 4)
    with pytest.raises(ValueError, match="distinct"):
        pl.complete_permutation([0, 4], 4)
    cfg = xb.TileConfig(rows=16, cols=16)
    assert pl.physical_shape(20, 3, cfg) == (32, 16)
    assert pl.physical_shape(20, 3, cfg, spare_tiles=(1, 0)) == (48, 16)
    model, params, _, _ = _setup()
    ident = pl.identity_placement(params, cfg)
    assert {n: (len(r), len(c)) for n, (r, c) in ident.items()} == {"hidden": (16, 16),
                                                                      "out": (16, 16)}
    rnd = pl.random_placement(jax.random.key(0), params, cfg)
    assert sorted(rnd["hidden"][0].tolist()) == list(range(16))


def test_disturb_error_factor_matches_monte_carlo_of_d7():
    """Var[ΔG⁺ − ΔG⁻]/κ² per s̄^(2β) (the part drift compensation leaves), against D7's own
    conductance update on 4·10⁵ pairs of cells with independent ln N_D spreads (small damage:
    the min(1, ·) does not bind)."""
    dp = R.pcm_disturb(beta=0.5, sigma_ln=0.5, eps_f=0.1)
    g_pos = jnp.array([0.0, 20.0, 5.0])
    g_neg = jnp.array([0.0, 0.0, 12.0])
    kappa, s_bar = 2.0, 1e-3
    z = jax.random.normal(jax.random.key(3), (2, 400_000, 3))
    dgp = R.disturbed_conductance(dp, g_pos, s_bar * jnp.exp(-dp.sigma_ln * z[0])) - g_pos
    dgm = R.disturbed_conductance(dp, g_neg, s_bar * jnp.exp(-dp.sigma_ln * z[1])) - g_neg
    mc = jnp.var(dgp - dgm, axis=0) / kappa ** 2 / s_bar ** (2 * dp.beta)
    factor = pl.disturb_error_factor(g_pos, g_neg, kappa, dp)
    np.testing.assert_allclose(np.asarray(factor), np.asarray(mc), rtol=0.02)
    assert float(factor[0]) > 0          # a zero weight is still disturbed (the pair's spread)


class _Uniform(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, use_bias=False, kernel_init=nn.initializers.constant(0.5),
                        name="d")(x)


@pytest.mark.slow
def test_drive_position_factors_bit_line_favours_rows_far_from_the_sense_amplifier():
    """Uniform positive kernel, all inputs driven: the bit-line voltage is highest at the row
    farthest from the sense amplifier (row 0), so D grows toward the last row; the word-line
    drop grows away from the driver, so D falls along the columns; no IR drop: all ones."""
    model = _Uniform()
    x = jnp.ones((4, 8))
    params = model.init(jax.random.key(0), x)
    dev, dp = D.pcm(g_max=25.0), R.pcm_disturb()
    cfg = xb.TileConfig(rows=8, cols=8, v_read=0.45, ir_drop="first_order", r_wire=20.0)
    ident = pl.identity_placement(params, cfg)
    d = pl.drive_position_factors(model, params, x, dev, cfg, dp, ident)["d"]
    assert d.shape == (8, 8) and np.all(d > 0) and np.all(d <= 1 + 1e-6)
    assert np.all(np.diff(d[:, :6], axis=0) > 0)          # toward the sense amplifier
    assert np.all(np.diff(d[0, :6]) < 0)                  # away from the driver
    none = pl.drive_position_factors(model, params, x, dev, cfg.replace(ir_drop="none"), dp,
                                     ident)["d"]
    np.testing.assert_array_equal(none, np.ones((8, 8)))


@pytest.mark.slow
def test_fisher_costs_and_alternating_placement_never_worse_than_its_start():
    model, params, x, _ = _setup()
    x = x.at[:, 0].set(0.0)                                # row 0 of 'hidden' is never read
    dev, dp = D.pcm(g_max=25.0), R.pcm_disturb()
    cfg = xb.TileConfig(rows=16, cols=16, v_read=0.45, ir_drop="first_order", r_wire=20.0)
    costs = pl.fisher_costs(model, params, x, dev, cfg, dp)
    assert costs["hidden"].shape == (8, 6) and costs["out"].shape == (6, 4)
    assert np.all(costs["hidden"] >= 0) and np.all(costs["hidden"][0] == 0)
    start = pl.identity_placement(params, cfg)
    best, info = pl.alternating_placement(model, params, x, dev, cfg, dp, costs, start=start,
                                          rounds=2)
    d0 = pl.drive_position_factors(model, params, x, dev, cfg, dp, start)
    assert info["history"][0] == pytest.approx(pl.self_consistent_cost(costs, d0, start, 0.5))
    d1 = pl.drive_position_factors(model, params, x, dev, cfg, dp, best)
    assert pl.self_consistent_cost(costs, d1, best, 0.5) <= info["history"][0] + 1e-12
    for n, (r, c) in best.items():
        assert sorted(r.tolist()) == list(range(16)) and sorted(c.tolist()) == list(range(16))


@pytest.mark.slow
def test_horizon_objective_without_noise_or_reads_is_the_software_loss():
    """Ideal device, no reads (horizon → 0): every chip's weights are the software weights, so
    the objective is the software cross-entropy, for any placement; with position factors D = 0
    (no disturb anywhere) and a long horizon too."""
    model, params, x, y = _setup()
    dev, dp = D.ideal(g_max=25.0), R.pcm_disturb()
    cfg = xb.TileConfig(rows=16, cols=16, v_read=0.45)
    shapes = {"hidden": (8, 6), "out": (6, 4)}
    logits = model.apply(params, x)
    ce = float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)))
    zeros = {n: np.zeros((16, 16)) for n in shapes}
    ones = {n: np.ones((16, 16)) for n in shapes}
    for factors, horizon in ((ones, 1e-9), (zeros, 1e9)):
        obj, names = pl.horizon_objective(model, params, x, y, dev, cfg, dp, factors,
                                          horizon=horizon, num_points=2, num_chips=2)
        for p in (pl.identity_placement(params, cfg),
                  pl.random_placement(jax.random.key(4), params, cfg)):
            val = float(obj(jax.random.key(0), pl.hard_matrices(p, names, shapes)))
            assert val == pytest.approx(ce, rel=1e-4)
    # with disturb on, the loss grows with the horizon
    obj, names = pl.horizon_objective(model, params, x, y, dev, cfg, dp, ones, horizon=1e9,
                                      num_points=2, num_chips=2)
    mats = pl.hard_matrices(pl.identity_placement(params, cfg), names, shapes)
    assert float(obj(jax.random.key(0), mats)) > ce + 1e-3
