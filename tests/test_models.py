"""Models: shapes, layer types, training to >= 95 % on digits, serialization, get_trained."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from nvjax import data, models


@pytest.fixture(scope="module")
def digits_flat():
    return data.digits(seed=0)


@pytest.fixture(scope="module")
def digits_img():
    return data.digits(seed=0, flatten=False)


@pytest.fixture(scope="module")
def trained_mlp(digits_flat):
    model = models.MLP(features=(64, 10))
    params, history = models.train(jax.random.key(0), model, digits_flat, epochs=40)
    return model, params, history


@pytest.fixture(scope="module")
def trained_lenet(digits_img):
    model = models.LeNet()
    params, history = models.train(jax.random.key(0), model, digits_img, epochs=30)
    return model, params, history


def _param_shapes(params):
    return {"/".join(k.key for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}


def _parametrized_layers(model, variables, x):
    """Types of all modules called that own parameters."""
    seen = []

    def rec(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and mod.has_variable("params", "kernel"):
            seen.append(type(mod))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(rec):
        out = model.apply(variables, x)
    return out, seen


def test_mlp_shapes_and_names(digits_flat, digits_img):
    model = models.MLP(features=(64, 10))
    v = model.init(jax.random.key(0), digits_flat.x_train[:2])
    assert _param_shapes(v) == {"params/Dense_0/kernel": (64, 64), "params/Dense_0/bias": (64,),
                                "params/Dense_1/kernel": (64, 10), "params/Dense_1/bias": (10,)}
    out, layers = _parametrized_layers(model, v, digits_flat.x_test[:5])
    assert out.shape == (5, 10) and layers == [nn.Dense, nn.Dense]
    # image inputs are flattened inside
    np.testing.assert_allclose(model.apply(v, digits_img.x_test[:5]), out, rtol=1e-6)
    deep = models.MLP(features=(32, 16, 3))
    assert deep.apply(deep.init(jax.random.key(1), np.zeros((1, 20))), np.zeros((4, 20))).shape \
        == (4, 3)


def test_lenet_shapes_and_layer_types(digits_img):
    model = models.LeNet()
    v = model.init(jax.random.key(0), digits_img.x_train[:1])
    shapes = _param_shapes(v)
    assert shapes["params/Conv_0/kernel"] == (3, 3, 1, 8)
    assert shapes["params/Conv_1/kernel"] == (3, 3, 8, 16)
    assert shapes["params/Dense_0/kernel"] == (256, 64)
    assert shapes["params/Dense_1/kernel"] == (64, 10)
    assert all(f"params/{n}/bias" in shapes for n in ("Conv_0", "Conv_1", "Dense_0", "Dense_1"))
    assert len(shapes) == 8
    out, layers = _parametrized_layers(model, v, digits_img.x_test[:7])
    assert out.shape == (7, 10)
    assert layers == [nn.Conv, nn.Conv, nn.Dense, nn.Dense]
    # flat inputs are reshaped to 8x8x1
    np.testing.assert_allclose(model.apply(v, digits_img.x_test[:7].reshape(7, 64)), out,
                               rtol=1e-6)
    assert models.LeNet(num_classes=3).apply(
        models.LeNet(num_classes=3).init(jax.random.key(0), np.zeros((1, 8, 8, 1))),
        np.zeros((2, 8, 8, 1))).shape == (2, 3)


def test_mlp_trains_to_95_percent(trained_mlp, digits_flat):
    model, params, history = trained_mlp
    acc = models.accuracy(model, params, digits_flat.x_test, digits_flat.y_test)
    assert isinstance(acc, float)
    assert acc >= 0.95
    assert history["test_accuracy"][-1] == acc
    assert len(history["train_loss"]) == len(history["test_accuracy"]) == 40
    assert history["train_loss"][-1] < history["train_loss"][0]
    # the inner params dict is accepted as well
    assert models.accuracy(model, params["params"], digits_flat.x_test, digits_flat.y_test) == acc


def test_lenet_trains_to_95_percent(trained_lenet, digits_img):
    model, params, history = trained_lenet
    acc = models.accuracy(model, params, digits_img.x_test, digits_img.y_test)
    assert acc >= 0.95
    assert len(history["test_accuracy"]) == 30


def test_training_is_deterministic(digits_flat):
    model = models.MLP(features=(16, 10))
    p1, h1 = models.train(jax.random.key(3), model, digits_flat, epochs=2, batch_size=128)
    p2, h2 = models.train(3, model, digits_flat, epochs=2, batch_size=128)   # int seed = key(3)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert h1["train_loss"] == h2["train_loss"]
    p3, _ = models.train(jax.random.key(4), model, digits_flat, epochs=2, batch_size=128)
    assert not np.array_equal(p1["params"]["Dense_0"]["kernel"], p3["params"]["Dense_0"]["kernel"])
    # AdamW path runs and changes the result
    p4, h4 = models.train(jax.random.key(3), model, digits_flat, epochs=2, batch_size=128,
                          weight_decay=0.1)
    assert np.isfinite(h4["train_loss"]).all()
    assert not np.array_equal(p1["params"]["Dense_0"]["kernel"], p4["params"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("kwargs,name", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 10_000}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"weight_decay": -1e-4}, "weight_decay"),
])
def test_train_bad_arguments(kwargs, name, digits_flat):
    kw = {"epochs": 1}
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        models.train(jax.random.key(0), models.MLP((10,)), digits_flat, **kw)


def test_accuracy_length_mismatch(trained_mlp, digits_flat):
    model, params, _ = trained_mlp
    with pytest.raises(ValueError, match="same length"):
        models.accuracy(model, params, digits_flat.x_test, digits_flat.y_test[:-1])


def test_save_load_round_trip(tmp_path, trained_lenet, digits_img):
    model, params, _ = trained_lenet
    path = tmp_path / "sub" / "lenet.msgpack"
    models.save_params(str(path), params)
    assert os.listdir(path.parent) == ["lenet.msgpack"]  # no temporary file left behind
    x = digits_img.x_test
    want = np.asarray(model.apply(params, x))
    for loaded in (models.load_params(str(path)), models.load_params(path, template=params)):
        assert jax.tree.structure(loaded) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
        jax.tree.map(lambda a, b: a.dtype == b.dtype or pytest.fail("dtype"), loaded, params)
        np.testing.assert_array_equal(np.asarray(model.apply(loaded, x)), want)
    # overwriting replaces the file
    zeros = jax.tree.map(np.zeros_like, params)
    models.save_params(path, zeros)
    assert float(np.abs(models.load_params(path)["params"]["Dense_1"]["kernel"]).max()) == 0.0
    # a template of the wrong structure is rejected
    with pytest.raises(ValueError, match="template"):
        models.load_params(path, template={"params": {"Dense_0": {"kernel": np.zeros(1)}}})
    wrong_shape = jax.tree.map(lambda a: np.zeros(a.shape + (1,), a.dtype), params)
    with pytest.raises(ValueError, match="shapes"):
        models.load_params(path, template=wrong_shape)


def test_get_trained_caches(tmp_path):
    model, params = models.get_trained("mlp", cache_dir=str(tmp_path), epochs=2)
    assert isinstance(model, models.MLP) and tuple(model.features) == (64, 10)
    files = os.listdir(tmp_path)
    assert files == ["mlp_seed0_epochs2.msgpack"]
    mtime = os.path.getmtime(tmp_path / files[0])
    model2, params2 = models.get_trained("mlp", cache_dir=str(tmp_path), epochs=2)
    assert os.path.getmtime(tmp_path / files[0]) == mtime   # reloaded, not rewritten
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    _, params3 = models.get_trained("mlp", epochs=2)          # no cache: same training
    jax.tree.map(np.testing.assert_array_equal, params, params3)
    lenet, lp = models.get_trained("lenet", epochs=1)
    assert isinstance(lenet, models.LeNet) and "Conv_0" in lp["params"]


def test_get_trained_bad_arguments():
    with pytest.raises(ValueError, match="name.*'lenet'.*'mlp'"):
        models.get_trained("resnet")
    with pytest.raises(ValueError, match="epochs"):
        models.get_trained("mlp", epochs=0)
