"""Models: shapes, layer types, training to >= 95 % on digits (LSTM: >= 90 % in a short run),
serialization, get_trained; the LSTM against an independent NumPy implementation."""
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


@pytest.fixture(scope="module")
def trained_lstm(digits_img):
    model = models.LSTMClassifier()
    params, history = models.train(jax.random.key(0), model, digits_img, epochs=40)
    return model, params, history


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _lstm_reference(p, seq):
    """Independent float64 NumPy LSTM: logits [B, C] and hidden states [h_0 = 0, ..., h_T]."""
    seq = np.asarray(seq, np.float64)
    wx, bx = (np.asarray(p["x_proj"][k], np.float64) for k in ("kernel", "bias"))
    wh = np.asarray(p["h_proj"]["kernel"], np.float64)
    wo, bo = (np.asarray(p["head"][k], np.float64) for k in ("kernel", "bias"))
    hidden = wh.shape[0]
    h = np.zeros((seq.shape[0], hidden))
    c = np.zeros_like(h)
    hs = [h]
    for t in range(seq.shape[1]):
        z = seq[:, t] @ wx + bx + h @ wh
        i, f, g, o = (z[:, k * hidden:(k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        hs.append(h)
    return h @ wo + bo, hs


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_lenet_trains_to_95_percent(trained_lenet, digits_img):
    model, params, history = trained_lenet
    acc = models.accuracy(model, params, digits_img.x_test, digits_img.y_test)
    assert acc >= 0.95
    assert len(history["test_accuracy"]) == 30


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(ValueError, match="name.*'lenet'.*'mlp'.*'resnet'.*'transformer'"):
        models.get_trained("vgg")
    with pytest.raises(ValueError, match="epochs"):
        models.get_trained("mlp", epochs=0)


@pytest.mark.slow
def test_lstm_shapes_names_and_reference(digits_img):
    model = models.LSTMClassifier()
    v = model.init(jax.random.key(0), digits_img.x_train[:2])
    assert _param_shapes(v) == {"params/x_proj/kernel": (8, 128), "params/x_proj/bias": (128,),
                                "params/h_proj/kernel": (32, 128),
                                "params/head/kernel": (32, 10), "params/head/bias": (10,)}
    assert sum(a.size for a in jax.tree.leaves(v)) == 8 * 128 + 128 + 32 * 128 + 32 * 10 + 10
    # forget-gate bias starts at 1, the other gates at 0 (gate order i, f, g, o)
    np.testing.assert_array_equal(v["params"]["x_proj"]["bias"],
                                  np.repeat([0.0, 1.0, 0.0, 0.0], 32))
    # one input projection, 8 recurrent calls of the same (shared) Dense, one head
    x = digits_img.x_test[:6]
    out, layers = _parametrized_layers(model, v, x)
    assert out.shape == (6, 10) and layers == [nn.Dense] * 10
    # against the NumPy LSTM, with random (non-initial) parameters
    keys = iter(jax.random.split(jax.random.key(1), 8))
    rand = jax.tree.map(lambda a: 0.7 * jax.random.normal(next(keys), a.shape), v)
    want, _ = _lstm_reference(rand["params"], x[..., 0])
    np.testing.assert_allclose(model.apply(rand, x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lstm_input_layouts_give_identical_logits(digits_img):
    model = models.LSTMClassifier()
    x = digits_img.x_test[:9]
    v = model.init(jax.random.key(2), x)
    out = np.asarray(model.apply(v, x))                                  # [B, 8, 8, 1]
    np.testing.assert_array_equal(model.apply(v, x.reshape(9, 64)), out)   # [B, 64]
    np.testing.assert_array_equal(model.apply(v, x[..., 0]), out)          # [B, 8, 8]
    # other widths and sequence lengths; flat inputs are cut into rows of row_size
    small = models.LSTMClassifier(hidden=5, num_classes=3, row_size=4)
    xs = jax.random.uniform(jax.random.key(3), (2, 3, 4))
    vs = small.init(jax.random.key(4), xs)
    assert vs["params"]["h_proj"]["kernel"].shape == (5, 20)
    np.testing.assert_array_equal(small.apply(vs, xs.reshape(2, 12)), small.apply(vs, xs))
    np.testing.assert_allclose(small.apply(vs, xs), _lstm_reference(vs["params"], xs)[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 63), (2, 8, 8, 3), (8,), (2, 1, 8, 8, 1)])
def test_lstm_bad_input_shape(shape):
    with pytest.raises(ValueError, match="LSTMClassifier"):
        models.LSTMClassifier().init(jax.random.key(0), np.zeros(shape, np.float32))


@pytest.mark.slow
def test_lstm_trains(trained_lstm, digits_img, digits_flat):
    model, params, history = trained_lstm
    acc = models.accuracy(model, params, digits_img.x_test, digits_img.y_test)
    assert acc >= 0.90
    assert history["test_accuracy"][-1] == acc
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    # flat inputs classify identically
    assert models.accuracy(model, params, digits_flat.x_test, digits_flat.y_test) == acc


@pytest.mark.slow
def test_lstm_save_load_round_trip(tmp_path, trained_lstm, digits_img):
    model, params, _ = trained_lstm
    path = tmp_path / "lstm.msgpack"
    models.save_params(path, params)
    want = np.asarray(model.apply(params, digits_img.x_test))
    template = model.init(jax.random.key(9), digits_img.x_test[:1])
    for loaded in (models.load_params(path), models.load_params(path, template=template)):
        assert jax.tree.structure(loaded) == jax.tree.structure(params)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
        np.testing.assert_array_equal(np.asarray(model.apply(loaded, digits_img.x_test)), want)
    wrong = models.LSTMClassifier(hidden=16).init(jax.random.key(0), digits_img.x_test[:1])
    with pytest.raises(ValueError, match="shapes"):
        models.load_params(path, template=wrong)


@pytest.mark.slow
def test_get_trained_lstm(tmp_path):
    assert models.MODELS["lstm"][1:] == ("digits-images", 100)
    model, params = models.get_trained("lstm", cache_dir=tmp_path, epochs=1)
    assert isinstance(model, models.LSTMClassifier) and model.hidden == 32
    assert set(params["params"]) == {"x_proj", "h_proj", "head"}
    assert os.listdir(tmp_path) == ["lstm_seed0_epochs1.msgpack"]
    _, again = models.get_trained("lstm", cache_dir=tmp_path, epochs=1)   # reloaded from cache
    jax.tree.map(np.testing.assert_array_equal, params, again)
