"""Networks on chips: any Flax Dense/Conv model deploys and, with ideal cells, equals software."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import chip as C
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


@pytest.mark.slow
def test_effective_params_equal_apply_for_ideal_periphery():
    model = Nested()
    x, params = _init(model, (6, 11))
    chip = C.deploy(jax.random.key(2), model, params, D.pcm())
    a = C.apply(jax.random.key(3), chip, x, 86400.0)
    b = model.apply({"params": C.effective_params(jax.random.key(3), chip, 86400.0)}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, model.apply(params, x), atol=1e-3)  # PCM noise acts


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
