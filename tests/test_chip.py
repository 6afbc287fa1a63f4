"""Networks on chips: any Flax Dense/Conv model deploys and, with ideal cells, equals software."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import chip as C
from nvjax import correction
from nvjax import layers
from nvjax import crossbar as xb
from nvjax import devices as D


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(6, (3, 2), strides=(2, 1), padding="VALID")(x))
        x = nn.Conv(3, (2, 2), strides=2, padding=1, use_bias=False)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(x)


class Nested(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(7, name="enc")(x)
        return nn.Dense(3, name="head")(nn.tanh(x))


def _init(model, shape, seed=0):
    x = jax.random.uniform(jax.random.key(seed), shape)
    return x, model.init(jax.random.key(seed + 1), x)


@pytest.mark.parametrize("model,shape", [(ConvNet(), (5, 8, 8, 1)), (Nested(), (6, 11))])
@pytest.mark.slow
def test_ideal_chip_equals_software(model, shape):
    x, params = _init(model, shape)
    chip = C.deploy(jax.random.key(2), model, params, D.ideal(), config=xb.TileConfig(rows=16, cols=8))
    out = C.apply(jax.random.key(3), chip, x, 0.0)
    np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4, atol=1e-5)


def test_kernel_matrix_is_the_im2col_layout():
    # A conv as a matmul of patches with kernel_matrix equals lax.conv (independent reference).
    k = jax.random.normal(jax.random.key(0), (3, 2, 4, 5))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    ref = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    p = jax.lax.conv_general_dilated_patches(x, (3, 2), (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "OIHW", "NHWC"))
    np.testing.assert_allclose(p @ layers.kernel_matrix(k), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 9, 9, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 10, 7, 4), (3, 2), (2, 1), ((0, 1), (2, 0))),
    ((1, 8, 5), (3,), (2,), ((1, 1),)),
    ((2, 6, 6, 6, 2), (2, 2, 2), (1, 2, 1), ((0, 0), (1, 0), (0, 1))),
    ((2, 9, 9, 3), (3, 3), (2, 2), ((-1, 1), (0, -1))),          # negative padding crops
])
def test_im2col_equals_lax_patches(shape, window, strides, padding):
    # strided slices give exactly the patches of lax.conv_general_dilated_patches (reference)
    x = jax.random.normal(jax.random.key(0), shape)
    sp = "HWD"[:len(window)]
    ref = jax.lax.conv_general_dilated_patches(
        x, window, strides, padding, dimension_numbers=("N" + sp + "C", "OI" + sp, "N" + sp + "C"))
    np.testing.assert_array_equal(layers.im2col(x, window, strides, padding), ref)


@pytest.mark.slow
def test_effective_params_equal_apply_for_ideal_periphery():
    model = Nested()
    x, params = _init(model, (6, 11))
    chip = C.deploy(jax.random.key(2), model, params, D.pcm())
    a = C.apply(jax.random.key(3), chip, x, 86400.0)
    b = model.apply({"params": C.effective_params(jax.random.key(3), chip, 86400.0)}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, model.apply(params, x), atol=1e-3)  # PCM noise acts


@pytest.mark.slow
def test_layer_names_and_read_counts():
    model = Nested()
    x, params = _init(model, (6, 11))
    assert layers.layer_names(params) == ("enc", "head")
    chip = C.deploy(jax.random.key(2), model, params, D.ideal())
    chip2 = C.apply_traced(jax.random.key(3), chip, x, 0.0).chip
    np.testing.assert_array_equal(chip2.tiles["enc"].reads, (np.asarray(x) != 0).sum(0))
    enc = params["params"]["enc"]
    h = np.tanh(np.asarray(x) @ np.asarray(enc["kernel"]) + np.asarray(enc["bias"]))
    np.testing.assert_array_equal(chip2.tiles["head"].reads, (h != 0).sum(0))


@pytest.mark.slow
def test_deploy_is_deterministic_and_jittable():
    model = Nested()
    x, params = _init(model, (6, 11))

    def f(key):
        chip = C.deploy(key, model, params, D.pcm())
        return C.apply(key, chip, x, 3600.0)
    a = f(jax.random.key(7))
    np.testing.assert_array_equal(a, f(jax.random.key(7)))
    np.testing.assert_allclose(jax.jit(f)(jax.random.key(7)), a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, f(jax.random.key(8)))


def test_errors():
    with pytest.raises(ValueError, match="no 'kernel'"):
        C.deploy(jax.random.key(0), Nested(), {"params": {"a": {"bias": jnp.zeros(3)}}}, D.ideal())
    with pytest.raises(TypeError, match="expected a device"):
        C.deploy(jax.random.key(0), Nested(), {}, "pcm")


@pytest.mark.slow
def test_placement_moves_weights_not_the_function():
    model = Nested()
    x, params = _init(model, (6, 11))
    rp = jax.random.permutation(jax.random.key(5), 11).astype(jnp.int32)
    cp = jax.random.permutation(jax.random.key(6), 7).astype(jnp.int32)
    cfg = xb.TileConfig(rows=4, cols=3)
    placed = C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg, placement={"enc": (rp, cp)})
    plain = C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg)
    # weight (i, j) sits on physical cell (rp[i], cp[j])
    np.testing.assert_array_equal(np.asarray(placed.tiles["enc"].pos.g)[np.ix_(rp, cp)],
                                  plain.tiles["enc"].pos.g)
    out = C.apply(jax.random.key(3), placed, x, 0.0)
    np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4, atol=1e-5)
    eff = C.effective_params(jax.random.key(3), placed, 0.0)
    np.testing.assert_allclose(eff["enc"]["kernel"], params["params"]["enc"]["kernel"], rtol=1e-5,
                               atol=1e-6)
    ins = C.apply_traced(jax.random.key(3), placed, x, 0.0).inputs
    np.testing.assert_array_equal(np.asarray(ins["enc"])[:, rp], x)   # physical row order
    # with IR drop the physical position matters
    cfg_ir = xb.TileConfig(rows=4, cols=3, ir_drop="first_order", r_wire=2000.0)
    a = C.apply(jax.random.key(3), C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg_ir,
                                            placement={"enc": (rp, cp)}), x, 0.0)
    b = C.apply(jax.random.key(3), C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg_ir), x, 0.0)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    with pytest.raises(ValueError, match="not a permutation"):
        C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg,
                 placement={"enc": (jnp.zeros(11, jnp.int32), cp)})
    with pytest.raises(ValueError, match="unknown layers"):
        C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg, placement={"dec": (rp, cp)})


@pytest.mark.slow
def test_deploy_calibrates_each_layers_adc_on_its_own_inputs():
    """deploy(calibration=x): every layer's per-column ADC range ('max') is max|rows @ W| over the
    rows that layer sees for input x in software (the hidden layer sees relu(x @ W0 + b0))."""
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jax.random.uniform(jax.random.key(0), (20, 5))
    params = model.init(jax.random.key(1), x)["params"]
    cfg = xb.TileConfig(rows=8, cols=8, adc_bits=8, adc_range="max")
    chip = C.deploy(jax.random.key(2), model, params, D.ideal(), config=cfg, calibration=x)
    w0, b0 = params["layers_0"]["kernel"], params["layers_0"]["bias"]
    w2 = params["layers_2"]["kernel"]
    h = np.maximum(np.asarray(x) @ np.asarray(w0) + np.asarray(b0), 0.0)
    np.testing.assert_allclose(chip.tiles["layers_0"].adc_scale[0],
                               np.abs(np.asarray(x) @ np.asarray(w0)).max(0), rtol=1e-5)
    np.testing.assert_allclose(chip.tiles["layers_2"].adc_scale[0],
                               np.abs(h @ np.asarray(w2)).max(0), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Placements with spare physical rows / columns / tiles (empty cells at zero conductance)
# ------------------------------------------------------------------------------------------------
SPARE_CFG = xb.TileConfig(rows=16, cols=16)
#: Nested's enc layer (11 x 7) on P = 20 physical rows (spare rows in the first 16-row tile and a
#: second row tile) and Q = 18 columns (spare columns and a second column tile); head unplaced.
SPARE_SHAPES = {"enc": (11, 7, 20, 18)}


def _spare_placement(seed):
    """Random permutations of 0..P-1 / 0..Q-1 for the layers of SPARE_SHAPES."""
    out = {}
    for i, (name, (_, _, P, Q)) in enumerate(SPARE_SHAPES.items()):
        k = jax.random.fold_in(jax.random.key(seed), i)
        out[name] = tuple(jax.random.permutation(kk, n).astype(jnp.int32)
                          for kk, n in zip(jax.random.split(k), (P, Q)))
    return out


def _block_perms(r0, c0, n_in, n_out, rows, cols):
    """Logical rows on physical rows r0.., columns on physical columns c0.., the rest empty."""
    used_r, used_c = np.arange(r0, r0 + n_in), np.arange(c0, c0 + n_out)
    rp = np.r_[used_r, np.setdiff1d(np.arange(rows), used_r)]
    cp = np.r_[used_c, np.setdiff1d(np.arange(cols), used_c)]
    return jnp.asarray(rp, jnp.int32), jnp.asarray(cp, jnp.int32)


def _scatter(w, rp, cp):
    """Independent reference of the physical layout: out[rp[i], cp[j]] = w[i, j], else zeros."""
    w, rp, cp = np.asarray(w), np.asarray(rp), np.asarray(cp)
    out = np.zeros((len(rp), len(cp)), w.dtype)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[rp[i], cp[j]] = w[i, j]
    return out


@pytest.mark.slow
def test_spare_placement_ideal_chip_equals_software():
    model = Nested()
    x, params = _init(model, (6, 11))
    pl = _spare_placement(4)
    chip = C.deploy(jax.random.key(2), model, params, D.ideal(), config=SPARE_CFG, placement=pl)
    for name, (_, _, P, Q) in SPARE_SHAPES.items():
        assert chip.tiles[name].pos.g.shape == (P, Q) and chip.tiles[name].reads.shape == (P,)
    tr = C.apply_traced(jax.random.key(3), chip, x, 0.0)
    np.testing.assert_allclose(tr.outputs, model.apply(params, x), rtol=1e-4, atol=1e-5)
    # enc's crossbar inputs: x on the physical rows row_perm[:11], zero drive on the empty rows
    rp, cp = (np.asarray(p) for p in pl["enc"])
    for perm, n in ((rp, 11), (cp, 7)):     # the weights use both tiles, each has spares
        assert (perm[:n] < 16).any() and (perm[:n] >= 16).any() and (perm[n:] < 16).any()
    ins = np.asarray(tr.inputs["enc"])
    np.testing.assert_array_equal(ins, _scatter(np.asarray(x).T, rp, np.arange(6)).T)
    reads = np.asarray(tr.chip.tiles["enc"].reads)
    np.testing.assert_array_equal(reads[rp[11:]], 0)             # empty rows are never read
    np.testing.assert_array_equal(reads[rp[:11]], (np.asarray(x) != 0).sum(0))
    eff = C.effective_params(jax.random.key(3), chip, 0.0)
    for name in SPARE_SHAPES:
        np.testing.assert_allclose(eff[name]["kernel"], params["params"][name]["kernel"],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_spare_placement_empty_cells_carry_no_conductance():
    model = Nested()
    x, params = _init(model, (6, 11))
    pl = _spare_placement(7)
    occupied = {n: _scatter(np.ones(s[:2], bool), *pl[n]) for n, s in SPARE_SHAPES.items()}
    # ideal cells whose weight-0 level is g_min = 2 µS: an unprogrammed cell must still be at 0
    dev = D.ideal(g_min=2.0)
    chip = C.deploy(jax.random.key(2), model, params, dev, config=SPARE_CFG, placement=pl)
    plain = C.deploy(jax.random.key(2), model, params, dev, config=SPARE_CFG)
    for name, occ in occupied.items():
        tl, rp, cp = chip.tiles[name], *pl[name]
        n_in, n_out = SPARE_SHAPES[name][:2]
        for side in (tl.pos, tl.neg):
            assert (np.asarray(side.g)[~occ] == 0).all() and (np.asarray(side.g)[occ] >= 2.0).all()
        np.testing.assert_allclose((np.asarray(tl.pos.g) - np.asarray(tl.neg.g)) / tl.kappa,
                                   _scatter(params["params"][name]["kernel"], rp, cp),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(tl.pos.g)[np.ix_(rp[:n_in], cp[:n_out])],
                                      plain.tiles[name].pos.g)
    # noisy, relaxing cells with stuck-at faults: empty cells are 0, not stuck, and read 0 later
    rr = D.reram(p_stuck_min=0.2, p_stuck_max=0.2)
    chip = C.deploy(jax.random.key(2), model, params, rr, config=SPARE_CFG, placement=pl)
    tl, occ = chip.tiles["enc"], occupied["enc"]
    for i, side in enumerate((tl.pos, tl.neg)):
        assert (np.asarray(side.g)[~occ] == 0).all()
        assert (np.asarray(side.stuck)[~occ] == 0).all()
        assert (np.asarray(side.stuck)[occ] > 0).any()            # faults elsewhere survive
        assert (np.asarray(side.relax)[~occ] == 0).all()
        g_t = np.asarray(D.read(jax.random.key(9 + i), rr, side, 86400.0))
        assert (g_t[~occ] == 0).all()
    # the drift-compensation reference counts the occupied cells only
    np.testing.assert_allclose(tl.ref0, xb.reference_sum(tl.pos.g - tl.neg.g, tl.kappa,
                                                         device=rr), rtol=1e-6)


@pytest.mark.slow
def test_spare_placement_position_matters_only_with_ir_drop():
    model = Nested()
    x, params = _init(model, (6, 11))

    @jax.jit                                    # one compilation per config, placements traced
    def run(pl, dev, cfg):
        chip = C.deploy(jax.random.key(2), model, params, dev, config=cfg, placement=pl)
        return C.apply(jax.random.key(3), chip, x, 0.0)

    def block(r0, c0):                          # the block in the first tile, the others empty
        return {"enc": _block_perms(r0, c0, 11, 7, 20, 18)}
    ir = SPARE_CFG.replace(ir_drop="first_order", r_wire=100.0)
    near, far = run(block(0, 0), D.ideal(), ir), run(block(5, 9), D.ideal(), ir)
    assert np.abs(np.asarray(near) - np.asarray(far)).max() > 1e-3   # position matters
    np.testing.assert_allclose(run(block(0, 0), D.ideal(), SPARE_CFG),
                               run(block(5, 9), D.ideal(), SPARE_CFG), rtol=1e-5, atol=1e-6)
    # the empty cells add no current: the block at the tile's origin with spares (unprogrammed
    # cells at g_min = 2 µS would drop voltage) equals the unplaced layer, whose tile padding is
    # zero conductance
    dev = D.ideal(g_min=2.0)
    np.testing.assert_allclose(run(block(0, 0), dev, ir), run(None, dev, ir), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_spare_placement_traced_under_jit():
    model = Nested()
    x, params = _init(model, (6, 11))

    def f(pl):     # unprogrammed cells would sit at g_min = 2 µS: the masking must act on traces
        chip = C.deploy(jax.random.key(2), model, params, D.ideal(g_min=2.0), config=SPARE_CFG,
                        placement=pl)
        return (C.apply(jax.random.key(3), chip, x, 3600.0), chip.tiles["enc"].pos.g,
                C.effective_params(jax.random.key(3), chip, 3600.0)["enc"]["kernel"])
    g = jax.jit(f)
    for seed in (4, 6):                      # two placements of the same shapes: one trace
        eager, jitted = f(_spare_placement(seed)), g(_spare_placement(seed))
        np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(jitted[1], eager[1])
        np.testing.assert_allclose(jitted[2], eager[2], rtol=1e-5, atol=1e-6)
    assert g._cache_size() == 1


def test_spare_placement_errors():
    model = Nested()
    x, params = _init(model, (6, 11))
    cp = jnp.arange(9, dtype=jnp.int32)

    def dep(rp, cp=cp):
        C.deploy(jax.random.key(2), model, params, D.ideal(), placement={"enc": (rp, cp)})
    short = r"'enc'.*row_perm must be a 1-D int array of length P >= 11"
    with pytest.raises(ValueError, match=short):
        dep(jnp.arange(10, dtype=jnp.int32))                     # shorter than n_in
    with pytest.raises(ValueError, match=r"'enc'.*col_perm must be .* P >= 7"):
        dep(jnp.arange(12, dtype=jnp.int32), jnp.arange(6, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"'enc'.*row_perm is not a permutation of 0..15"):
        dep(jnp.arange(16, dtype=jnp.int32).at[15].set(3))      # a duplicate
    with pytest.raises(ValueError, match=r"'enc'.*row_perm is not a permutation of 0..12"):
        dep(jnp.asarray([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13], jnp.int32))  # out of range
    with pytest.raises(ValueError, match=r"'enc'.*row_perm must be a 1-D int array.*float32"):
        dep(jnp.arange(12, dtype=jnp.float32))
    with pytest.raises(ValueError, match=r"'enc'.*col_perm must be a 1-D int array"):
        dep(jnp.arange(12, dtype=jnp.int32), jnp.arange(9, dtype=jnp.int32).reshape(3, 3))


@pytest.mark.slow
def test_spare_placement_correction_leaves_empty_cells_alone():
    model = Nested()
    x, params = _init(model, (6, 11))
    pl = _spare_placement(4)
    occ = _scatter(np.ones((11, 7), bool), *pl["enc"])
    # per-level cells whose lowest level is g_min = 1 µS: re-programming an empty cell (read 0,
    # nearest level 1 µS) would give it a conductance
    dev = D.levels(bits=2, sigma=0.05, g_min=1.0, g_max=25.0)

    @jax.jit                                    # (one compilation; the placement is traced)
    def deploy_and_reprogram(pl):
        chip = C.deploy(jax.random.key(2), model, params, dev, config=SPARE_CFG, placement=pl)
        fixed, pulses = correction.reprogram(jax.random.key(5), chip, tol=0.01, max_rounds=2)
        return fixed.tiles["enc"], pulses["enc"]
    tl, pulses = deploy_and_reprogram(pl)
    assert int(pulses) > 0
    for side in (tl.pos, tl.neg):
        assert (np.asarray(side.g)[~occ] == 0).all()
    # an ideal chip needs no correction: gain 1 and offset 0 in logical column order
    ideal = C.deploy(jax.random.key(2), model, params, D.ideal(g_min=2.0),
                     config=SPARE_CFG.replace(per_column_scale=True), placement=pl)
    for ref in (None, params):
        cal = correction.calibrate(jax.random.key(3), ideal, x, 0.0, reference_params=ref)
        assert cal.gain["enc"].shape == (7,)
        np.testing.assert_allclose(cal.gain["enc"], 1.0, atol=1e-4)
        np.testing.assert_allclose(cal.offset["enc"], 0.0, atol=1e-4)
