"""Sensitivity: saliency, Hutchinson Hessian diagonal, activation statistics, criticality.

Independent expectations: closed forms for linear/quadratic/separable losses and for the
softmax-regression gradient, the full ``jax.hessian`` of a flattened small model, hand-counted
reads from NumPy-built patches, a hand-written crossbar layout.
Tolerances of stochastic estimators come from their known per-probe variance.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nvjax import chip as C
from nvjax import layers
from nvjax import sensitivity as S
from nvjax import crossbar as xb
from nvjax import devices as D


def _sym(seed, n):
    a = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    return (a + a.T) / 2


def _quadratic(a):
    """L(params) = ½ wᵀ A w with w = ravel(params); and a params pytree of matching size."""
    params = {"a": jnp.linspace(-1.0, 1.5, 3), "b": jnp.array([[0.5, -2.0], [1.0, 0.25]])}
    _, unravel = ravel_pytree(params)
    a = jnp.asarray(a)

    def loss(p):
        w, _ = ravel_pytree(p)
        return 0.5 * w @ a @ w
    return loss, params, unravel


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


# ----------------------------------------------------------------------------- saliency

def test_saliency_linear_and_quadratic_closed_form():
    c = jnp.array([1.0, -2.0, 0.5, 3.0])
    w = jnp.array([0.3, 0.7, -4.0, 0.0])
    np.testing.assert_allclose(S.saliency(lambda p: jnp.sum(c * p), w), np.abs(np.asarray(w * c)),
                               rtol=1e-6)
    a = _sym(0, 7)
    loss, params, unravel = _quadratic(a)
    w, _ = ravel_pytree(params)
    expect = unravel(jnp.asarray(np.abs(np.asarray(w) * (a @ np.asarray(w)))))
    got = S.saliency(loss, params)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6), got, expect)


# ----------------------------------------------------------------------------- Hessian diagonal

def test_hessian_diag_separable_is_exact():
    # H diagonal ⇒ v_i (Hv)_i = H_ii v_i² = H_ii for every Rademacher probe.
    c = jnp.array([1.0, 2.5, -3.0, 0.5])
    params = {"w": jnp.array([0.2, -1.0, 3.0, 0.7]), "u": jnp.array([[0.1, 2.0], [-0.3, 1.2]])}

    def loss(p):
        return 0.5 * jnp.sum(c * p["w"] ** 2) + jnp.sum(jnp.sin(p["u"]))
    for num_probes in (1, 5):
        h = S.hessian_diag(jax.random.key(0), loss, params, num_probes=num_probes, batch=2)
        np.testing.assert_allclose(h["w"], c, rtol=1e-6)
        np.testing.assert_allclose(h["u"], -np.sin(np.asarray(params["u"])), rtol=1e-5, atol=1e-6)


def test_hessian_diag_quadratic_converges_to_diag_within_standard_errors():
    a = _sym(1, 7)
    loss, params, unravel = _quadratic(a)
    n = 20000
    h, _ = ravel_pytree(S.hessian_diag(jax.random.key(1), loss, params, num_probes=n, batch=1000))
    off = a - np.diag(np.diag(a))
    se = np.sqrt(np.sum(off ** 2, axis=1) / n)        # per-probe variance Σ_{j≠i} A_ij²
    z = (np.asarray(h) - np.diag(a)) / se
    assert np.all(np.abs(z) < 5), z
    # and the estimate is genuinely noisy (not accidentally exact): some |z| is not tiny
    assert np.max(np.abs(z)) > 0.1


def _small_mlp_full_hessian():
    """The SmallMLP case of the Hessian tests: (model, x, y, params, loss, unravel, exact
    Hessian of the loss over the flattened parameters)."""
    model = SmallMLP()
    x = jax.random.normal(jax.random.key(0), (6, 5))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    params = model.init(jax.random.key(1), x)
    loss = S.loss_fn(model, x, y)
    flat, unravel = ravel_pytree(params)
    full = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat))
    return model, x, y, params, loss, unravel, full


@pytest.mark.slow
def test_hessian_diag_mlp_matches_full_hessian():
    model, x, y, params, loss, unravel, full = _small_mlp_full_hessian()
    n = 8000
    h = S.hessian_diag(jax.random.key(2), loss, params, num_probes=n, batch=1000)
    assert jax.tree.structure(h) == jax.tree.structure(params)
    est = np.asarray(ravel_pytree(h)[0])
    off = full - np.diag(np.diag(full))
    se = np.sqrt(np.sum(off ** 2, axis=1) / n)
    np.testing.assert_array_less(np.abs(est - np.diag(full)), 5 * se + 1e-5)


@pytest.mark.slow
def test_hessian_diag_independent_of_batch_and_jittable():
    loss, params, _ = _quadratic(_sym(2, 7))
    key = jax.random.key(3)
    ref = S.hessian_diag(key, loss, params, num_probes=23, batch=23)
    for b in (1, 7, 100):
        got = S.hessian_diag(key, loss, params, num_probes=23, batch=b)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5), got, ref)
    jitted = jax.jit(lambda k, p: S.hessian_diag(k, loss, p, num_probes=23, batch=7))(key, params)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5), jitted, ref)
    other = S.hessian_diag(jax.random.key(4), loss, params, num_probes=23, batch=7)
    assert not np.allclose(ravel_pytree(other)[0], ravel_pytree(ref)[0])


# ----------------------------------------------------------------------------- activation stats

class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(nn.relu(nn.Dense(3, name="hid")(x)))


def test_activation_stats_dense_exact_counts():
    model = TwoDense()
    x = jnp.array([[1.0, 0.0, -2.0, 0.0],
                   [0.0, 0.0, 3.0, 0.5],
                   [0.0, 0.0, 0.0, -1.0]])
    params = model.init(jax.random.key(0), x)
    w0 = np.array([[1.0, -1.0, 0.0], [2.0, 2.0, 2.0], [0.5, 1.0, -1.0], [-1.0, 1.0, 0.0]],
                  np.float32)
    params = {"params": {"hid": {"kernel": jnp.asarray(w0), "bias": jnp.zeros(3)},
                         "out": params["params"]["out"]}}
    stats = S.activation_stats(model, params, x)
    assert tuple(stats) == layers.layer_names(params) == ("hid", "out")
    xn = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(stats["hid"]["reads_per_inference"]) * 3, [1, 0, 2, 2])
    np.testing.assert_allclose(stats["hid"]["mean_abs"], np.abs(xn).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["hid"]["max_abs"], [1.0, 0.0, 3.0, 1.0])
    h = np.maximum(xn @ w0, 0)   # hand model: relu of the hidden layer (bias 0)
    # by hand: x @ w0 = [0,-3,2], [1,3.5,-3], [1,-1,0] -> relu [0,0,2], [1,3.5,0], [1,0,0]
    np.testing.assert_allclose(stats["out"]["reads_per_inference"], (h != 0).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats["out"]["reads_per_inference"]) * 3, [2, 1, 1])
    np.testing.assert_allclose(stats["out"]["max_abs"], np.abs(h).max(0), rtol=1e-6)
    for s in stats.values():
        assert s["reads_per_inference"].shape == s["mean_abs"].shape == s["max_abs"].shape


class ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), padding="SAME")(x)
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _numpy_patches_same3x3(x):
    """[N, H, W, C] → [N·H·W, C·9] patches of a 3×3 SAME (pad 1) stride-1 conv, channel-major."""
    n, hh, ww, c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for b in range(n):
        for i in range(hh):
            for j in range(ww):
                rows.append([xp[b, i + dy, j + dx, ch] for ch in range(c) for dy in range(3)
                             for dx in range(3)])
    return np.array(rows)


@pytest.mark.slow
def test_activation_stats_conv_counts_per_patch_feature():
    model = ConvDense()
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, size=(2, 4, 5, 2)).astype(np.float32)
    x[rng.uniform(size=x.shape) < 0.4] = 0.0                       # known zeros
    x[0, :, :, 1] = 0.0                                            # a whole channel off
    params = model.init(jax.random.key(0), x)
    stats = S.activation_stats(model, params, x)
    assert tuple(stats) == layers.layer_names(params) == ("Conv_0", "Dense_0")
    p = _numpy_patches_same3x3(x)
    assert p.shape == (2 * 4 * 5, 18)
    np.testing.assert_allclose(stats["Conv_0"]["reads_per_inference"], (p != 0).sum(0) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(stats["Conv_0"]["mean_abs"], np.abs(p).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["Conv_0"]["max_abs"], np.abs(p).max(0), rtol=1e-6)
    # corner feature (channel 0, dy=0, dx=0) can never be read at the top row / left column
    assert stats["Conv_0"]["reads_per_inference"][0] <= 3 * 4
    assert stats["Dense_0"]["reads_per_inference"].shape == (4 * 5 * 3,)
    assert layers.kernel_matrix(params["params"]["Conv_0"]["kernel"]).shape[0] == 18


@pytest.mark.slow
def test_activation_stats_layer_names_match_chip_for_nested_models():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="inner")(x)

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(2, (2, 2), padding="VALID")(x))
            x = Block(name="block")(x.reshape(x.shape[0], -1))
            return nn.Dense(3)(x)

    model = Outer()
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1))
    params = model.init(jax.random.key(1), x)
    stats = S.activation_stats(model, params["params"], x)
    assert tuple(stats) == layers.layer_names(params)
    kc = S.kernel_criticality(params, params)
    for name in stats:
        assert stats[name]["reads_per_inference"].shape == (kc[name].shape[0],)


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = nn.Dense(3)
        return d(x) + d(x[:, ::-1])          # one layer (one crossbar) read twice per input


def test_activation_stats_accumulate_repeated_calls_and_agree_with_chip_read_counters():
    x = jnp.array([[1.0, 0.0, 0.0, 2.0, 0.0],
                   [0.0, 0.0, 3.0, 0.0, 0.0]])
    model = Shared()
    params = model.init(jax.random.key(0), x)
    stats = S.activation_stats(model, params, x)
    both = np.concatenate([np.asarray(x), np.asarray(x)[:, ::-1]])
    np.testing.assert_array_equal(np.asarray(stats["Dense_0"]["reads_per_inference"]) * 2,
                                  (both != 0).sum(0))
    np.testing.assert_allclose(stats["Dense_0"]["mean_abs"], np.abs(both).mean(0), rtol=1e-6)
    # the simulator's own per-row read counters give the same numbers
    chip = C.deploy(jax.random.key(1), model, params, D.ideal(), config=xb.TileConfig(rows=8, cols=8))
    chip = C.apply_traced(jax.random.key(2), chip, x, 0.0).chip
    np.testing.assert_array_equal(np.asarray(stats["Dense_0"]["reads_per_inference"]) * 2,
                                  chip.tiles["Dense_0"].reads)


# ----------------------------------------------------------------------------- criticality

@pytest.mark.slow
def test_criticality_mc_sigma_zero_equals_saliency():
    model = SmallMLP()
    x = jax.random.normal(jax.random.key(0), (6, 5))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    params = model.init(jax.random.key(1), x)
    loss = S.loss_fn(model, x, y)
    sal = S.saliency(loss, params)
    for noise in ("multiplicative", "additive"):
        crit = S.criticality_mc(jax.random.key(2), loss, params, sigma=0.0, num_samples=5,
                                noise=noise, batch=2)
        jax.tree.map(lambda c, s: np.testing.assert_allclose(c, s, rtol=1e-5, atol=1e-7),
                     crit, sal)


@pytest.mark.parametrize("noise", ["multiplicative", "additive"])
def test_criticality_mc_quadratic_closed_form(noise):
    # L = ½ Σ c w²: saliency at w̃ is c·w̃², E = c·(w² + s²), s = σ|w| or σ·max|w|.
    c = jnp.array([1.0, 2.0, 0.5, 3.0, 1.5])
    w = jnp.array([0.5, -1.0, 2.0, 0.0, 0.25])
    sigma, n = 0.3, 20000
    crit = S.criticality_mc(jax.random.key(5), lambda p: 0.5 * jnp.sum(c * p ** 2), w,
                            sigma=sigma, num_samples=n, noise=noise, batch=5000)
    wn, cn = np.asarray(w), np.asarray(c)
    s = sigma * (np.abs(wn) if noise == "multiplicative" else np.max(np.abs(wn)))
    mean = cn * (wn ** 2 + s ** 2)
    var = cn ** 2 * (4 * wn ** 2 * s ** 2 + 2 * s ** 4)   # Var(c·(w + sε)²)
    se = np.sqrt(var / n)
    assert np.all(np.abs(np.asarray(crit) - mean) <= 5 * se + 1e-7), (crit, mean, se)


def test_criticality_mc_sigma_pytree_spares_leaves():
    loss, params, _ = _quadratic(_sym(3, 7))
    sigma = {"a": 0.0, "b": 0.5}
    crit = S.criticality_mc(jax.random.key(0), loss, params, sigma=sigma, num_samples=4)
    sal = S.saliency(loss, params)
    assert not np.allclose(crit["b"], sal["b"])
    # leaf "a" is not perturbed, but its gradient depends on the perturbed "b": only shape checks
    assert crit["a"].shape == sal["a"].shape


# ----------------------------------------------------------------------------- SWIM, layout

def test_swim_sensitivity_closed_form():
    h = {"k": jnp.array([[2.0, -1.0], [0.5, 4.0]]), "b": jnp.array([3.0])}
    got = S.swim_sensitivity(h, 0.2)
    np.testing.assert_allclose(got["k"], 0.5 * np.asarray(h["k"]) * 0.04, rtol=1e-6)
    np.testing.assert_allclose(got["b"], [0.06], rtol=1e-6)
    sig = {"k": jnp.array([[1.0, 2.0], [0.0, 0.5]]), "b": jnp.array([2.0])}
    got = S.swim_sensitivity(h, sig)
    np.testing.assert_allclose(got["k"], [[1.0, -2.0], [0.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [6.0], rtol=1e-6)


def test_kernel_criticality_hand_layout():
    # Conv kernel [kh=2, kw=2, C_in=2, C_out=3] with entry value 1000·dy + 100·dx + 10·c + o: its
    # crossbar row for (c, dy, dx) is c·4 + dy·2 + dx (channel-major im2col, as the patches of
    # test_activation_stats_conv_counts_per_patch_feature), column o. Written out by hand.
    dy, dx, c, o = np.meshgrid(np.arange(2), np.arange(2), np.arange(2), np.arange(3),
                               indexing="ij")
    conv = (1000 * dy + 100 * dx + 10 * c + o).astype(np.float32)
    dense = np.array([[1.0, -2.0], [3.0, 4.0], [5.0, 6.0], [-7.0, 8.0]], np.float32)
    tree = {"params": {"Conv_0": {"kernel": jnp.asarray(conv), "bias": jnp.full(3, 9.0)},
                       "block": {"inner": {"kernel": jnp.asarray(dense),
                                           "bias": jnp.zeros(2)}}}}
    params = jax.tree.map(jnp.zeros_like, tree)
    kc = S.kernel_criticality(tree, params)
    assert list(kc) == ["Conv_0", "block/inner"]          # biases dropped, '/'-joined paths
    expect_conv = np.array([
        [0, 1, 2], [100, 101, 102], [1000, 1001, 1002], [1100, 1101, 1102],      # c = 0
        [10, 11, 12], [110, 111, 112], [1010, 1011, 1012], [1110, 1111, 1112],   # c = 1
    ], np.float32)
    np.testing.assert_array_equal(np.asarray(kc["Conv_0"]), expect_conv)
    np.testing.assert_array_equal(np.asarray(kc["block/inner"]), dense)   # Dense: as is
    # the inner dict works too
    kc2 = S.kernel_criticality(tree["params"], params["params"])
    np.testing.assert_array_equal(np.asarray(kc2["Conv_0"]), expect_conv)


# ----------------------------------------------------------------------------- importance

class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="lin")(x)


def test_importance_saliency_and_magnitude_closed_form():
    # one Dense layer with softmax cross-entropy: ∂L/∂W = xᵀ(softmax(xW + b) − onehot(y))/N
    model = Linear()
    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    params = model.init(jax.random.key(1), x)
    w = np.asarray(params["params"]["lin"]["kernel"], np.float64)
    b = np.asarray(params["params"]["lin"]["bias"], np.float64)
    xn = np.asarray(x, np.float64)
    z = xn @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = xn.T @ (p - np.eye(3)[np.asarray(y)]) / 8
    key = jax.random.key(2)
    sal = S.importance(key, model, params, x, y)            # default: saliency
    assert list(sal) == ["lin"] and sal["lin"].shape == (5, 3)
    np.testing.assert_allclose(sal["lin"], np.abs(w * grad), rtol=1e-4, atol=1e-7)
    mag = S.importance(key, model, params["params"], x, y, method="magnitude")
    np.testing.assert_array_equal(np.asarray(mag["lin"]), np.abs(np.asarray(w, np.float32)))


def test_importance_keeps_kernel_shapes():
    model = ConvDense()
    x = jnp.ones((2, 4, 5, 2))
    params = model.init(jax.random.key(0), x)
    mag = S.importance(jax.random.key(1), model, params, x, jnp.array([0, 1]), method="magnitude")
    assert list(mag) == ["Conv_0", "Dense_0"]
    conv = params["params"]["Conv_0"]["kernel"]
    assert mag["Conv_0"].shape == conv.shape == (3, 3, 2, 3)       # not the crossbar layout
    np.testing.assert_array_equal(np.asarray(mag["Conv_0"]), np.abs(np.asarray(conv)))


@pytest.mark.slow
def test_importance_hessian_is_half_abs_hii_w2_of_the_full_hessian():
    # ½·|H_ii|·w² against the exact Hessian diagonal of the flattened model (jax.hessian);
    # Hutchinson's per-probe variance of entry i is Σ_{j≠i} H_ij², and |½|a|w² − ½|b|w²| ≤
    # ½w²|a − b|, so the tolerance is ½w²·5·SE.
    model, x, y, params, loss, unravel, full = _small_mlp_full_hessian()
    full = full.astype(np.float64)
    n = 4000
    imp = S.importance(jax.random.key(2), model, params, x, y, method="hessian", num_probes=n)
    se = np.sqrt(np.sum((full - np.diag(np.diag(full))) ** 2, axis=1) / n)
    hii = unravel(jnp.asarray(np.diag(full), jnp.float32))["params"]
    se_t = unravel(jnp.asarray(se, jnp.float32))["params"]
    for name in ("Dense_0", "Dense_1"):
        w = np.asarray(params["params"][name]["kernel"], np.float64)
        expect = 0.5 * np.abs(np.asarray(hii[name]["kernel"], np.float64)) * w ** 2
        tol = 0.5 * w ** 2 * 5 * np.asarray(se_t[name]["kernel"], np.float64) + 1e-7
        assert imp[name].shape == w.shape
        np.testing.assert_array_less(np.abs(np.asarray(imp[name], np.float64) - expect), tol)


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_naming_the_argument():
    loss, params, _ = _quadratic(_sym(4, 7))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_probes"):
        S.hessian_diag(key, loss, params, num_probes=0)
    with pytest.raises(TypeError, match="num_probes"):
        S.hessian_diag(key, loss, params, num_probes=2.0)
    with pytest.raises(TypeError, match="key"):
        S.hessian_diag(0, loss, params, num_probes=2)
    with pytest.raises(ValueError, match="batch"):
        S.hessian_diag(key, loss, params, num_probes=4, batch=0)
    with pytest.raises(ValueError, match="num_samples"):
        S.criticality_mc(key, loss, params, num_samples=0)
    with pytest.raises(ValueError, match="sigma"):
        S.criticality_mc(key, loss, params, sigma=-0.1)
    with pytest.raises(ValueError, match="sigma"):
        S.criticality_mc(key, loss, params, sigma={"a": 0.1})
    with pytest.raises(ValueError, match="noise"):
        S.criticality_mc(key, loss, params, noise="gaussian")
    with pytest.raises(ValueError, match="sigma"):
        S.swim_sensitivity(params, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        S.swim_sensitivity(params, {"a": jnp.ones(3), "b": jnp.ones(5)})
    with pytest.raises(ValueError, match="loss"):
        S.saliency(lambda p: ravel_pytree(p)[0], params)          # not a scalar
    with pytest.raises(TypeError, match="params"):
        S.saliency(lambda p: jnp.sum(p), jnp.arange(3))           # integer params
    with pytest.raises(TypeError, match="sigma"):
        S.swim_sensitivity(params, True)
    model = SmallMLP()
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match="y"):
        S.loss_fn(model, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="y"):
        S.loss_fn(model, x, jnp.zeros(4))
    mparams = model.init(key, x)
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(TypeError, match="key"):
        S.importance(0, model, mparams, x, y)                     # an int seed is not a key
    with pytest.raises(ValueError, match="method"):
        S.importance(key, model, mparams, x, y, method="curvature")
    with pytest.raises(TypeError, match="num_probes"):
        S.importance(key, model, mparams, x, y, method="hessian", num_probes=8.0)
    with pytest.raises(ValueError, match="x"):
        S.activation_stats(model, mparams, jnp.ones(5))
    with pytest.raises(ValueError, match="x"):
        S.activation_stats(model, mparams, jnp.ones((0, 5)))
    bad = {"params": {"Dense_0": mparams["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match="tree"):
        S.kernel_criticality(bad, mparams)
    wrong = jax.tree.map(lambda a: a[..., :1], mparams)
    with pytest.raises(ValueError, match="shape"):
        S.kernel_criticality(wrong, mparams)


@pytest.mark.slow
def test_fisher_diag_equals_the_gauss_newton_diagonal():
    """Against the full Gauss-Newton matrix Jᵀ(diag p − ppᵀ)J of a small MLP, built from the
    forward-mode Jacobian of the logits (a different route from fisher_diag's reverse mode)."""
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))
    m = M()
    p = m.init(jax.random.key(0), jnp.ones((1, 5)))
    x = jax.random.normal(jax.random.key(1), (7, 5))
    f = S.fisher_diag(m, p, x, batch=3)       # 7 samples in chunks of 3 (padding)
    flat, unravel = ravel_pytree(p)
    gn = 0.0
    for i in range(7):
        jac = jax.jacfwd(lambda fl: m.apply(unravel(fl), x[i][None])[0])(flat)
        pr = jax.nn.softmax(m.apply(p, x[i][None])[0])
        gn = gn + jnp.diag(jac.T @ (jnp.diag(pr) - jnp.outer(pr, pr)) @ jac)
    np.testing.assert_allclose(np.asarray(ravel_pytree(f)[0]), np.asarray(gn / 7), atol=1e-6)
