"""Crossbar tiles: ideal limit, periphery against an independent NumPy model, counters, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import irdrop, layers


def _w_x(n_in=300, n_out=40, batch=9, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    x = rng.uniform(0, 1, size=(batch, n_in)).astype(np.float32)
    x[x < 0.3] = 0.0  # some rows not driven
    return w, x


@pytest.mark.parametrize("rows,cols,per_col", [(256, 256, False), (64, 16, False), (64, 16, True)])
def test_ideal_equals_matmul(rows, cols, per_col):
    w, x = _w_x()
    cfg = xb.TileConfig(rows=rows, cols=cols, per_column_scale=per_col)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y, _ = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0, config=cfg)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
    # a single vector works too
    y1, _ = xb.mvm(jax.random.key(1), D.ideal(), tiles, x[0], 0.0, config=cfg)
    np.testing.assert_allclose(y1, x[0] @ w, rtol=1e-5, atol=1e-4)


def test_ideal_device_with_pcm_noise_switched_off_is_exact():
    # PCM with read noise disabled at t = 0 reads exactly the programmed conductances.
    w, x = _w_x()
    cfg = xb.TileConfig(read_noise=False, drift_compensation=False)
    tiles = xb.program_tiles(jax.random.key(0), D.pcm(), w, config=cfg)
    y, _ = xb.mvm(jax.random.key(1), D.pcm(), tiles, x, 0.0, config=cfg)
    w_prog = (np.asarray(tiles.pos.g) - np.asarray(tiles.neg.g)) / float(tiles.kappa)
    np.testing.assert_allclose(y, x @ w_prog, rtol=1e-5, atol=1e-4)


def test_read_counters_count_driven_rows():
    w, x = _w_x(n_in=10, n_out=3, batch=5)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w)
    _, t1 = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0)
    _, t2 = xb.mvm(jax.random.key(2), D.ideal(), t1, x[:2], 0.0)
    expected = (x != 0).sum(0) + (x[:2] != 0).sum(0)
    np.testing.assert_array_equal(t2.reads, expected)
    assert t2.reads.dtype == jnp.int32


def test_quantize_symmetric_hand_values():
    # 3 bits: 3 steps per polarity over [-1, 1], step 1/3.
    x = jnp.array([0.0, 0.1, 0.2, 0.5, -0.5, 0.99, 2.0, -2.0])
    q = xb.quantize_symmetric(x, 1.0, 3)
    np.testing.assert_allclose(q, [0, 0, 1 / 3, 2 / 3, -2 / 3, 1, 1, -1], atol=1e-7)


def _numpy_periphery(x, w, cfg, kappa_span=1.0):
    """Independent NumPy model of DAC → per-row-tile partial sums → fixed-bound ADC → sum."""
    s_x = np.abs(x).max(1, keepdims=True)
    n = 2 ** (cfg.dac_bits - 1) - 1
    xq = np.clip(np.round(x / (s_x / n)), -n, n) * (s_x / n)
    w_max = np.abs(w).max()
    unit = s_x * w_max
    m = 2 ** (cfg.adc_bits - 1) - 1
    y = np.zeros((x.shape[0], w.shape[1]))
    for r0 in range(0, w.shape[0], cfg.rows):
        part = xq[:, r0:r0 + cfg.rows] @ w[r0:r0 + cfg.rows]
        bound = cfg.adc_bound * unit
        y += np.clip(np.round(part / (bound / m)), -m, m) * (bound / m)
    return y


@pytest.mark.slow
def test_dac_adc_match_independent_numpy_model():
    w, x = _w_x(n_in=150, n_out=12)
    cfg = xb.TileConfig(rows=64, dac_bits=5, adc_bits=6, adc_bound=3.0, drift_compensation=False)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y, _ = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0, config=cfg)
    ref = _numpy_periphery(x.astype(np.float64), w.astype(np.float64), cfg)
    # identical up to float rounding at quantization boundaries: compare most entries tightly
    close = np.isclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.99
    step = cfg.adc_bound * np.abs(x).max() * np.abs(w).max() / (2 ** (cfg.adc_bits - 1) - 1)
    assert np.max(np.abs(np.asarray(y) - ref)) <= 3 * step + 1e-4


def _numpy_bound_management(x, w, cfg, passes):
    """Independent NumPy model of aihwkit's iterative bound management (noise-free), per input
    vector and row × column tile: read at DAC full scale s_x·2^j, j = 0, 1, ..., until no
    output of the tile exceeds the ADC range by more than half a step, or ``passes`` reads."""
    n = 2 ** (cfg.dac_bits - 1) - 1
    m = 2 ** (cfg.adc_bits - 1) - 1
    w_max = np.abs(w).max(0) if cfg.per_column_scale else np.full(w.shape[1], np.abs(w).max())
    y = np.zeros((x.shape[0], w.shape[1]))
    reads = np.zeros(x.shape[0], int)
    for b in range(x.shape[0]):
        s_x = np.abs(x[b]).max() if cfg.dac_range == "absmax" else x.dtype.type(cfg.dac_bound)
        for r0 in range(0, w.shape[0], cfg.rows):
            for c0 in range(0, w.shape[1], cfg.cols):
                wt = w[r0:r0 + cfg.rows, c0:c0 + cfg.cols]
                for j in range(passes):
                    s = s_x * x.dtype.type(2.0 ** j)
                    xq = np.clip(np.round(x[b, r0:r0 + cfg.rows] / (s / n)), -n, n) * (s / n)
                    part = xq @ wt
                    step = cfg.adc_bound * s * w_max[c0:c0 + cfg.cols] / m
                    reads[b] = max(reads[b], j + 1)
                    if np.all(np.abs(part) / step < m + 0.5):
                        break
                y[b, c0:c0 + cfg.cols] += np.clip(np.round(part / step), -m, m) * step
    return y, reads


def test_bound_management_passes_follow_aihwkits_stopping_rule():
    cfg = xb.TileConfig(adc_bits=9, bound_management="iterative")
    assert xb.bound_management_passes(cfg) == 11                     # factors 1..1024 (> 1000)
    assert xb.bound_management_passes(cfg.replace(dac_bits=7)) == 5   # 1..16 (> 0.25·63)
    assert xb.bound_management_passes(cfg.replace(dac_bits=5)) == 3   # 1..4 (> 0.25·15)
    assert xb.bound_management_passes(xb.TileConfig(adc_bits=9)) == 1
    for bad in (dict(), dict(adc_bits=8, adc_range="max"), dict(adc_bits=8, adc_range="percentile")):
        with pytest.raises(ValueError, match="bound_management='iterative' needs an ADC"):
            xb.TileConfig(bound_management="iterative", **bad)
    with pytest.raises(ValueError, match="bound_management must be"):
        xb.TileConfig(bound_management="shift")


@pytest.mark.parametrize("dac_range", ["fixed", "absmax"])
def test_bound_management_matches_an_independent_model_and_reads_only_saturated_tiles(dac_range):
    # sums of up to 40 positive inputs on a 3-step-bound ADC: most vectors saturate some tile
    # at full scale; each (vector, row tile, column tile) is re-read at 2, 4, 8, 16 × the scale
    rng = np.random.default_rng(4)
    w = np.abs(rng.normal(size=(70, 12))).astype(np.float32)
    w[:, 6:] *= 0.05                                # the second column tile never saturates
    _check_bound_management(w, rng, dac_range, per_column_scale=False)


@pytest.mark.parametrize("per_column_scale", [False, True])
def test_bound_management_on_a_partial_last_column_tile_and_per_column_scales(per_column_scale):
    # 14 outputs on 6-column tiles (6 + 6 + 2): with one scale per layer only the partial last
    # tile saturates; with one per column (ADC range ∝ the column's max) every tile does
    rng = np.random.default_rng(5)
    w = np.abs(rng.normal(size=(70, 14))).astype(np.float32)
    w[:, :12] *= 0.05
    _check_bound_management(w, rng, "fixed", per_column_scale=per_column_scale,
                            saturating=slice(0, 14) if per_column_scale else slice(12, 14))


def _check_bound_management(w, rng, dac_range, per_column_scale, saturating=slice(0, 6)):
    quiet = np.ones(w.shape[1], bool)
    quiet[saturating] = False
    x = rng.uniform(0, 1, size=(16, 70)).astype(np.float32)
    x[3] *= 0.02
    x[3, 0] = 1.0                                   # one vector that passes at once
    cfg = xb.TileConfig(rows=40, cols=6, dac_bits=7, dac_range=dac_range, adc_bits=8,
                        adc_bound=3.0, drift_compensation=False, bound_management="iterative",
                        per_column_scale=per_column_scale)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y = jax.jit(lambda k, tl, a: xb.mvm(k, D.ideal(), tl, a, 0.0, config=cfg)[0])(
        jax.random.key(1), tiles, x)
    ref, reads = _numpy_bound_management(x.astype(np.float64), w.astype(np.float64), cfg, 5)
    assert reads[3] == 1 and reads.max() >= 3              # the case is not trivial
    s_x = np.abs(x).max(1, keepdims=True) if dac_range == "absmax" else 1.0
    w_max = np.abs(w).max(0) if per_column_scale else np.abs(w).max()
    step = 3.0 * s_x * w_max / 127                          # the ADC step of the first read
    if dac_range == "fixed":
        np.testing.assert_allclose(np.asarray(y) / step, ref / step, rtol=0, atol=1e-3)
    else:
        # with a range per vector, its largest input sits on a DAC rounding tie at the second
        # read (x_max / (2·x_max / 63) = 31.5), which float32 (XLA) and float64 break
        # differently: those outputs may differ by one ADC step of that read
        d = np.abs(np.asarray(y) - ref) / step
        assert np.mean(d < 1e-3) > 0.9 and d.max() < 2 + 1e-3
    # without bound management the saturated tiles clip: far from the exact product
    clip = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0,
                  config=cfg.replace(bound_management="none"))[0]
    exact = x @ w
    sat = ~quiet
    err = lambda a: (np.abs(np.asarray(a) - exact) / step)[:, sat].max()  # noqa: E731
    assert err(clip) > 10 * err(y)
    np.testing.assert_array_equal(np.asarray(clip)[:, quiet], np.asarray(y)[:, quiet])
    np.testing.assert_array_equal(np.asarray(clip)[3], np.asarray(y)[3])


def test_bound_management_keeps_the_draws_where_nothing_saturates_and_vmaps():
    # a wide ADC range: no output saturates, so the first read is the only one and its output
    # noise draws are those of the run without bound management (bit-equal)
    w, x = _w_x(n_in=100, n_out=20, batch=8)
    cfg = xb.TileConfig(rows=64, cols=16, dac_bits=7, adc_bits=9, adc_bound=1000.0,
                        out_noise=0.06, bound_management="iterative")
    tiles = xb.program_tiles(jax.random.key(0), D.pcm(), w, config=cfg)
    f = jax.jit(lambda k, c: xb.mvm(k, D.pcm(), tiles, x, 10.0, config=c)[0])
    np.testing.assert_array_equal(f(jax.random.key(2), cfg),
                                  f(jax.random.key(2), cfg.replace(bound_management="none")))
    # a narrow range with noise: re-reads happen; vmapped over keys = one key at a time
    narrow = cfg.replace(adc_bound=2.0)
    keys = jax.random.split(jax.random.key(5), 3)
    g = lambda k: xb.mvm(k, D.pcm(), tiles, x, 10.0, config=narrow)[0]  # noqa: E731
    batched = jax.jit(jax.vmap(g))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], jax.jit(g)(keys[i]), rtol=1e-6, atol=1e-6)
    clipped = jax.jit(lambda k: xb.mvm(k, D.pcm(), tiles, x, 10.0,
                                       config=narrow.replace(bound_management="none"))[0])(keys[0])
    assert float(jnp.max(jnp.abs(clipped))) < float(jnp.max(jnp.abs(batched[0])))  # re-read


def test_bound_management_on_inputs_below_the_adc_floor():
    # inputs of 1e-14 on unit weights: the ADC bound 12·max|x|·w_max = 1.2e-13 is under its
    # 1e-12 floor, so the first reads saturate; the 5th re-read (bound 2^5·1.2e-13 = 3.84e-12)
    # holds x@W = 2.56e-12, which it resolves to one ADC step of that bound
    w = np.ones((256, 4), np.float32)
    x = np.full((2, 256), 1e-14, np.float32)
    cfg = xb.TileConfig(adc_bits=8, adc_bound=12.0, drift_compensation=False,
                        bound_management="iterative")
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y = jax.jit(lambda k: xb.mvm(k, D.ideal(), tiles, x, 0.0, config=cfg)[0])(jax.random.key(1))
    np.testing.assert_allclose(np.asarray(y, np.float64), 2.56e-12, rtol=0, atol=3.84e-12 / 127)
    # forward-mode derivatives pass the ADC straight through, re-read tiles included: dy = dx @ W
    # up to the rounding error's share (the ADC step scales with max|x|: (round(q) - q)·d step)
    dx = np.linspace(-1.0, 1.0, 512, dtype=np.float32).reshape(2, 256)
    _, dy = jax.jvp(lambda a: xb.mvm(jax.random.key(1), D.ideal(), tiles, a, 0.0, config=cfg)[0],
                    (jnp.asarray(x),), (jnp.asarray(dx),))
    np.testing.assert_allclose(dy, dx @ w, rtol=1e-2)


def test_output_noise_statistics():
    # Ideal device, only output noise: y - x@W has σ = out_noise·s_x·w_max·sqrt(Ti).
    w, x = _w_x(n_in=200, n_out=50, batch=400)
    cfg = xb.TileConfig(rows=64, out_noise=0.05, drift_compensation=False)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y, _ = xb.mvm(jax.random.key(3), D.ideal(), tiles, x, 0.0, config=cfg)
    err = (np.asarray(y) - x @ w) / (np.abs(x).max(1, keepdims=True) * np.abs(w).max())
    expected = 0.05 * np.sqrt(xb.num_row_tiles(200, cfg))
    n = err.size
    assert abs(err.std() - expected) < 4 * expected / np.sqrt(2 * n)
    assert abs(err.mean()) < 4 * expected / np.sqrt(n)


def test_drift_compensation_undoes_uniform_drift():
    # All cells drift with the same exponent ν = 0.06 and no read noise: the drift is a uniform
    # scale ((t + t0)/t0)^(−ν), which global drift compensation removes exactly.
    dev = D.pcm(read_q=0.0, nu_mu=(0.0, 0.06, 0.06, 0.06), nu_sigma=(0.0, 0.0, 0.0, 0.0))
    w, x = _w_x()
    cfg = xb.TileConfig()
    tiles = xb.program_tiles(jax.random.key(0), dev, w, config=cfg)
    y0, _ = xb.mvm(jax.random.key(1), dev, tiles, x, 0.0, config=cfg)
    y1, _ = xb.mvm(jax.random.key(1), dev, tiles, x, 3.15e7, config=cfg)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)
    no_comp = xb.TileConfig(drift_compensation=False)
    y2, _ = xb.mvm(jax.random.key(1), dev, tiles, x, 3.15e7, config=no_comp)
    scale = ((3.15e7 + 20.0) / 20.0) ** -0.06
    np.testing.assert_allclose(y2, np.asarray(y0) * scale, rtol=1e-4, atol=1e-4)


def test_adc_calibration_by_max():
    w, x = _w_x(n_in=100, n_out=8)
    cfg = xb.TileConfig(rows=32, adc_bits=8, adc_range="max")
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg, calibration=x)
    ref = np.stack([np.abs(x[:, r:r + 32] @ w[r:r + 32]).max(0) for r in range(0, 100, 32)])
    np.testing.assert_allclose(tiles.adc_scale, ref, rtol=1e-5)
    y, _ = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0, config=cfg)
    step = ref.max() / 127
    assert np.max(np.abs(np.asarray(y) - x @ w)) <= 4 * step


@pytest.mark.slow
def test_jit_and_vmap_consistency():
    w, x = _w_x()
    dev = D.pcm()
    cfg = xb.TileConfig(dac_bits=7, adc_bits=9, out_noise=0.06)

    def f(key):
        k1, k2 = jax.random.split(key)
        tiles = xb.program_tiles(k1, dev, w, config=cfg)
        return xb.mvm(k2, dev, tiles, x, 86400.0, config=cfg)[0]
    keys = jax.random.split(jax.random.key(0), 3)
    eager = f(keys[1])
    np.testing.assert_allclose(jax.jit(f)(keys[1]), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(f)(keys)[1], eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_grad_through_mvm_is_finite():
    w, x = _w_x(n_in=20, n_out=4)
    dev = D.pcm()

    def loss(w):
        tiles = xb.program_tiles(jax.random.key(0), dev, w)
        return jnp.sum(xb.mvm(jax.random.key(1), dev, tiles, x, 100.0)[0] ** 2)
    g = jax.grad(loss)(jnp.asarray(w))
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_errors():
    w, x = _w_x()
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w)
    with pytest.raises(ValueError, match=r"mvm: expected inputs \[B, 300\]"):
        xb.mvm(jax.random.key(1), D.ideal(), tiles, x[:, :10], 0.0)
    with pytest.raises(ValueError, match="2-D weight"):
        xb.program_tiles(jax.random.key(0), D.ideal(), w[0])
    with pytest.raises(ValueError, match="dac_bits"):
        xb.TileConfig(dac_bits=1)
    with pytest.raises(ValueError, match="adc_range"):
        xb.TileConfig(adc_range="median")
    with pytest.raises(ValueError, match="rows"):
        xb.TileConfig(rows=0)


@pytest.mark.parametrize("method", ["first_order", "solver"])
@pytest.mark.slow
def test_ir_drop_zero_resistance_equals_matmul(method):
    w, x = _w_x(n_in=40, n_out=12, batch=3)
    cfg = xb.TileConfig(rows=16, cols=8, ir_drop=method, r_wire=0.0)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    y, _ = xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0, config=cfg)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ir_drop_mvm_matches_nodal_solve_of_each_tile():
    from test_irdrop import _nodal
    w, x = _w_x(n_in=10, n_out=6, batch=2)
    cfg = xb.TileConfig(rows=5, cols=4, ir_drop="solver", r_wire=200.0, drift_compensation=False)
    dev = D.ideal()
    tiles = xb.program_tiles(jax.random.key(0), dev, w, config=cfg)
    y, _ = xb.mvm(jax.random.key(1), dev, tiles, x, 0.0, config=cfg)
    gp, gm, kappa = np.asarray(tiles.pos.g, float), np.asarray(tiles.neg.g, float), float(tiles.kappa)
    ref = np.zeros((2, 6))
    for b in range(2):
        for r0 in range(0, 10, 5):
            for c0 in range(0, 6, 4):
                v = x[b, r0:r0 + 5].astype(float) * cfg.v_read
                for g, sgn in ((gp, 1), (gm, -1)):
                    gt = g[r0:r0 + 5, c0:c0 + 4]
                    ref[b, c0:c0 + gt.shape[1]] += sgn * (gt * _nodal(gt, v, 200.0)).sum(0)
    ref /= cfg.v_read * kappa
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.abs(np.asarray(y) - x @ w).max() > 1e-3  # the drop is visible


@pytest.mark.parametrize("method", ["first_order", "solver"])
@pytest.mark.slow
def test_ir_drop_large_batch_uses_linearity(method):
    """B > R takes the unit-drive path (the network is linear in the drives): it must equal the
    per-input solves of B <= R batches."""
    w, x = _w_x(n_in=10, n_out=6, batch=12)
    cfg = xb.TileConfig(rows=5, cols=4, ir_drop=method, r_wire=200.0, drift_compensation=False)
    dev = D.ideal()
    tiles = xb.program_tiles(jax.random.key(0), dev, w, config=cfg)
    y_big, _ = xb.mvm(jax.random.key(1), dev, tiles, x, 0.0, config=cfg)
    y_small = np.concatenate([xb.mvm(jax.random.key(1), dev, tiles, x[i:i + 4], 0.0, config=cfg)[0]
                              for i in range(0, 12, 4)])
    np.testing.assert_allclose(y_big, y_small, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(y_big) - x @ w).max() > 1e-3


@pytest.mark.slow
def test_cell_voltages_per_tile_match_irdrop():
    g = jax.random.uniform(jax.random.key(3), (10, 6), minval=0.0, maxval=25.0)
    v = jax.random.uniform(jax.random.key(4), (3, 10), maxval=0.2)
    cfg = xb.TileConfig(rows=5, cols=4, ir_drop="first_order", r_wire=50.0)
    vc = xb.cell_voltages(g, v, config=cfg)
    assert vc.shape == (3, 10, 6)
    for b in range(3):
        for r0 in range(0, 10, 5):
            for c0 in range(0, 6, 4):
                gt = np.zeros((5, 4))
                blk = np.asarray(g[r0:r0 + 5, c0:c0 + 4])
                gt[:, :blk.shape[1]] = blk
                ref = irdrop.voltages_first_order(jnp.asarray(gt), v[b, r0:r0 + 5], 50.0)
                np.testing.assert_allclose(vc[b, r0:r0 + 5, c0:c0 + 4], ref[:, :blk.shape[1]],
                                           rtol=1e-6, atol=1e-7)
    none = xb.cell_voltages(g, v, config=xb.TileConfig(rows=5, cols=4))
    np.testing.assert_array_equal(none, np.broadcast_to(np.asarray(v)[:, :, None], (3, 10, 6)))
    with pytest.raises(ValueError, match="v_rows"):
        xb.cell_voltages(g, v[:, :5], config=cfg)


@pytest.mark.slow
def test_cell_voltages_solver_matches_nodal_solve_and_a_failed_solve_raises_or_is_nan():
    from test_irdrop import _nodal
    g = jax.random.uniform(jax.random.key(3), (10, 6), minval=0.0, maxval=25.0)
    v = jax.random.uniform(jax.random.key(4), (2, 10), maxval=0.2)
    cfg = xb.TileConfig(rows=5, cols=4, ir_drop="solver", r_wire=500.0)
    vc = np.asarray(xb.cell_voltages(g, v, config=cfg))
    gn, vn = np.asarray(g, float), np.asarray(v, float)
    for b in range(2):
        for r0 in (0, 5):
            for c0 in (0, 4):
                t = np.zeros((5, 4))
                blk = gn[r0:r0 + 5, c0:c0 + 4]
                t[:, :blk.shape[1]] = blk
                ref = _nodal(t, vn[b, r0:r0 + 5], 500.0)[:, :blk.shape[1]]
                np.testing.assert_allclose(vc[b, r0:r0 + 5, c0:c0 + 4], ref, atol=1e-5)
    bad = cfg.replace(r_wire=1e5, ir_max_iter=2)
    with pytest.raises(ValueError, match=r"cell_voltages: the IR-drop solver did not converge.*"
                                         r"5×4 tiles, r_wire = 100000 Ω"):
        xb.cell_voltages(g, v, config=bad)
    nan = jax.jit(lambda gg, vv: xb.cell_voltages(gg, vv, config=bad))(g, v)
    assert np.all(np.isnan(np.asarray(nan)))


@pytest.mark.slow  # pre-distortion and solver on programmed tiles
def test_predistorted_tiles_read_with_either_ir_drop_mode_but_not_another_build():
    """Pre-distortion uses the first-order form whatever the mode, so tiles built with
    'first_order' may be read with 'solver' (and back); a config that would have stored other
    conductances (other iterations, r_wire, no pre-distortion) is still refused."""
    w = jax.random.normal(jax.random.key(0), (12, 6))
    x = jax.random.uniform(jax.random.key(1), (2, 12))
    cfg = xb.TileConfig(rows=8, cols=8, ir_drop="first_order", ir_predistort=2, r_wire=50.0)
    tiles = xb.program_tiles(jax.random.key(2), D.ideal(), w, config=cfg)
    y_fo, _ = xb.mvm(jax.random.key(3), D.ideal(), tiles, x, 0.0, config=cfg)
    y_sv, _ = xb.mvm(jax.random.key(3), D.ideal(), tiles, x, 0.0,
                     config=cfg.replace(ir_drop="solver"))
    assert np.all(np.isfinite(np.asarray(y_sv)))
    np.testing.assert_allclose(y_sv, y_fo, rtol=0.05, atol=0.05 * float(jnp.abs(y_fo).max()))
    for other, needle in ((cfg.replace(ir_predistort=3), "ir_predistort"),
                          (cfg.replace(r_wire=20.0), "r_wire"),
                          (cfg.replace(ir_drop="none"), "ir_predistort")):
        with pytest.raises(ValueError, match=rf"config differs.*{needle}"):
            xb.read_weights(jax.random.key(3), D.ideal(), tiles, 0.0, config=other)


def test_tile_checks_the_first_order_form_once_on_the_final_conductances(monkeypatch):
    calls = []

    def spy(g, r_wire, *, where, limit=0.05):
        calls.append((np.asarray(g), where))
        return 0.0
    monkeypatch.setattr(irdrop, "check_first_order", spy)
    cfg = xb.TileConfig(rows=16, cols=16, ir_drop="first_order", r_wire=70.0, ir_predistort=2)
    w = jax.random.normal(jax.random.key(0), (20, 24))
    gp, gm, _ = xb.tile(w, D.pcm(), config=cfg)
    assert len(calls) == 1 and calls[0][1].startswith("tile")
    grid = np.concatenate([xb.tile_grid(gp, cfg), xb.tile_grid(gm, cfg)])   # both sides, boosted
    np.testing.assert_array_equal(calls[0][0], grid)
    assert float(jnp.max(gp)) <= 25.0 and float(jnp.max(gp)) > 0.5 * 25.0
    calls.clear()
    xb.predistort_ir(gp, cfg, g_max=25.0)
    assert len(calls) == 1 and calls[0][1] == "predistort_ir"


@pytest.mark.slow
def test_failed_solve_message_says_whether_the_cap_or_the_residual_stopped_it():
    g = jax.random.uniform(jax.random.key(3), (10, 6), minval=0.0, maxval=25.0)
    v = jax.random.uniform(jax.random.key(4), (2, 10), maxval=0.2)
    cfg = xb.TileConfig(rows=5, cols=4, ir_drop="solver", r_wire=1e5, ir_max_iter=2)
    with pytest.raises(ValueError, match=r"ran into the iteration cap ir_max_iter = 2.*"
                                         r"raise TileConfig.ir_max_iter") as e:
        xb.cell_voltages(g, v, config=cfg)
    assert "stopped after" not in str(e.value)
    # a NaN conductance stops its tile's solve at once: more iterations would not help
    with pytest.raises(ValueError, match=r"did not converge in 2 of 8 tile solves.*stopped after "
                                         r"\d+ of at most 200 iterations because the residual "
                                         r"was not finite: raising ir_max_iter does not help; "
                                         r"1 conductance\(s\) are NaN") as e:
        xb.cell_voltages(g.at[1, 1].set(jnp.nan), v, config=cfg.replace(r_wire=1.0,
                                                                         ir_max_iter=200))
    assert "ran into the iteration cap" not in str(e.value)
    # a negative conductance is not a reason to fail by itself: this solve converges
    vc = xb.cell_voltages(jnp.full((10, 6), -5.0), v, config=cfg.replace(r_wire=5.0,
                                                                        ir_max_iter=200))
    assert np.all(np.isfinite(np.asarray(vc)))


def _conv_case(ks, c_in, c_out, strides, padding, cfg, seed=0):
    """A conv layer's kernel, inputs (channel 0 all zero) and its im2col rows via flax."""
    conv = nn.Conv(c_out, ks, strides=strides, padding=padding)
    x = jax.random.uniform(jax.random.key(seed), (3,) + (9,) * len(ks) + (c_in,))
    x = x.at[..., 0].set(0.0)
    v = conv.init(jax.random.key(seed + 1), x)
    kern = v["params"]["kernel"]
    rows, back = conv.apply(v, x, method=lambda m, a: layers.as_rows(m, a))
    geom = conv.apply(v, x, method=lambda m, a: layers.conv_geometry(m, a))
    return kern, x, rows, back, geom


@pytest.mark.parametrize("ks,c_in,c_out,strides,padding,rows,extra", [
    ((3, 3), 5, 7, (1, 1), "SAME", 18, {}),
    ((3, 3), 5, 7, (2, 2), "SAME", 18, dict(adc_bits=6, adc_range="fixed", adc_bound=3.0)),
    ((3, 3), 6, 4, (2, 2), "VALID", 9, dict(dac_bits=5, dac_range="fixed", adc_bits=8,
                                            adc_range="max")),
    ((1, 1), 6, 4, (2, 2), "VALID", 4, dict(adc_bits=8, adc_range="max")),
    ((3,), 4, 3, (1,), "SAME", 6, {}),
    # a DAC range per input vector (each patch's max|x|), alone and with a per-tile ADC and
    # output noise, on row tiles that split a channel's window (rows not a multiple of kh·kw)
    ((3, 3), 5, 7, (1, 1), "SAME", 16, dict(dac_bits=7)),
    ((3, 3), 5, 7, (2, 2), "SAME", 16, dict(dac_bits=5, adc_bits=9, adc_range="fixed",
                                            adc_bound=12.0, out_noise=0.06)),
    ((3, 3), 6, 4, (2, 1), "VALID", 20, dict(adc_bits=8, adc_range="max")),
    ((3,), 4, 3, (2,), "SAME", 5, dict(dac_bits=7, out_noise=0.1)),
    ((2, 2, 2), 3, 4, (1, 2, 1), "SAME", 7, dict(dac_bits=6, adc_bits=8, adc_range="fixed",
                                                 adc_bound=8.0)),
    # patches wholly in the padding (scale 0, no NaN from the noise), and negative padding
    ((2, 2), 3, 4, (1, 1), ((3, 3), (3, 3)), 7, dict(out_noise=0.05)),
    ((3, 3), 4, 5, (1, 2), ((-1, 1), (0, -1)), 16, dict(dac_bits=7, adc_bits=9,
                                                          adc_range="fixed", adc_bound=12.0)),
    # iterative bound management (a narrow ADC range: re-reads) on each conv path: a DAC range
    # per patch, a fixed DAC range, no DAC
    ((3, 3), 5, 7, (1, 1), "SAME", 16, dict(dac_bits=7, adc_bits=9, adc_bound=0.5,
                                            out_noise=0.06, bound_management="iterative")),
    ((3, 3), 5, 7, (2, 1), "SAME", 18, dict(dac_bits=6, dac_range="fixed", dac_bound=1.0,
                                            adc_bits=8, adc_bound=0.5,
                                            bound_management="iterative")),
    ((3, 3), 6, 4, (1, 1), "VALID", 20, dict(adc_bits=8, adc_bound=0.5, out_noise=0.05,
                                             bound_management="iterative")),
    # column tiles narrower than the layer (7 outputs on 3-column tiles: 3 + 3 + 1)
    ((3, 3), 5, 7, (1, 1), "SAME", 16, dict(cols=3, dac_bits=7, adc_bits=9, adc_bound=0.5,
                                            out_noise=0.06, bound_management="iterative")),
])
def test_conv_mvm_equals_mvm_on_im2col_patches(ks, c_in, c_out, strides, padding, rows, extra):
    # the conv path and the patches path share the conductance read (same key) and the
    # output-noise draws (same shape and order), so their outputs agree to float rounding, ADC
    # codes included, and their read counters exactly
    cfg = xb.TileConfig(**{"rows": rows, "cols": 8, **extra})
    kern, x, patches, back, (window, st, pad) = _conv_case(ks, c_in, c_out, strides, padding, cfg)
    tiles = xb.program_tiles(jax.random.key(2), D.pcm(), layers.kernel_matrix(kern), config=cfg)
    assert xb.conv_supported(cfg, int(np.prod(ks)))
    y_rows, t_rows = xb.mvm(jax.random.key(3), D.pcm(), tiles, patches, 100.0, config=cfg)
    y_conv, t_conv = jax.jit(lambda k, tl, a: xb.conv_mvm(
        k, D.pcm(), tl, a, 100.0, kernel_shape=kern.shape, strides=st, padding=pad,
        config=cfg))(jax.random.key(3), tiles, x)
    np.testing.assert_allclose(y_conv, back(y_rows), atol=2e-6 * float(jnp.abs(y_rows).max()))
    np.testing.assert_array_equal(t_conv.reads, t_rows.reads)
    assert int(t_rows.reads[0]) == 0 and int(t_rows.reads[-1]) > 0   # channel 0 never driven


@pytest.mark.parametrize("extra", [dict(dac_bits=7, adc_bits=9, adc_bound=0.5, out_noise=0.06,
                                        bound_management="iterative"), dict(dac_bits=7)])
def test_conv_mvm_in_blocks_of_images_equals_the_patch_path(monkeypatch, extra):
    # blocks of 2 of the 3 images (one zero image pads the last block), per-patch DAC range
    n_tiles = xb.num_row_tiles(5 * 9, xb.TileConfig(rows=16))
    cols = 7 * n_tiles if len(extra) > 1 else 7
    monkeypatch.setattr(xb, "CONV_BLOCK_OUTPUTS", 2 * 81 * cols)
    test_conv_mvm_equals_mvm_on_im2col_patches((3, 3), 5, 7, (1, 1), "SAME", 16, extra)


def test_bound_management_runs_with_ir_drop():
    # re-reads on tiles with wire resistance (the first-order form): finite, and they differ
    # from clipping where outputs saturate
    w, x = _w_x(n_in=40, n_out=8, batch=6)
    cfg = xb.TileConfig(rows=16, cols=8, dac_bits=7, adc_bits=8, adc_bound=0.5,
                        ir_drop="first_order", r_wire=0.5, bound_management="iterative")
    tiles = xb.program_tiles(jax.random.key(0), D.pcm(), w, config=cfg)
    y = jax.jit(lambda c: xb.mvm(jax.random.key(1), D.pcm(), tiles, x, 1.0, config=c)[0])
    bm, clip = y(cfg), y(cfg.replace(bound_management="none"))
    assert np.all(np.isfinite(np.asarray(bm))) and float(jnp.max(jnp.abs(bm - clip))) > 0


def test_conv_mvm_output_noise_has_the_closed_form_spread_and_refuses_ir_drop():
    cfg = xb.TileConfig(rows=9, cols=8, out_noise=0.05)
    kern, x, patches, back, (window, st, pad) = _conv_case((3, 3), 4, 6, (1, 1), "SAME", cfg)
    tiles = xb.program_tiles(jax.random.key(2), D.ideal(), layers.kernel_matrix(kern), config=cfg)
    quiet = xb.TileConfig(rows=9, cols=8)
    clean = back(xb.mvm(jax.random.key(3), D.ideal(), tiles, patches, 1.0, config=quiet)[0])
    noisy_conv = xb.conv_mvm(jax.random.key(3), D.ideal(), tiles, x, 1.0, kernel_shape=kern.shape,
                             strides=st, padding=pad, config=cfg)[0]
    # per output: the sum over the 4 row tiles of σ·max|patch|·(g_max − g_min)/κ·N(0, 1), so
    # sd = σ·max|patch|·(g_max − g_min)/κ·√4 (closed form)
    g_min, g_max = D.g_range(D.ideal())
    unit = (g_max - g_min) / np.asarray(tiles.kappa)
    s_patch = np.asarray(jnp.max(jnp.abs(patches), axis=1)).reshape(np.asarray(clean).shape[:-1])
    z = np.asarray(noisy_conv - clean) / (0.05 * 2.0 * s_patch[..., None] * unit)
    assert abs(z.std() - 1) < 0.05 and abs(z.mean()) < 0.05
    assert xb.conv_supported(xb.TileConfig(rows=8, adc_bits=8, dac_bits=7), 9)
    assert not xb.conv_supported(quiet, 9, placed=True)
    ir = xb.TileConfig(rows=9, cols=8, ir_drop="first_order")
    assert not xb.conv_supported(ir, 9)
    with pytest.raises(ValueError, match="im2col"):
        xb.conv_mvm(jax.random.key(3), D.ideal(), tiles, x, 1.0, kernel_shape=kern.shape,
                    strides=st, padding=pad, config=ir)
