"""Data sets: deterministic stratified splits, shapes, ranges, dtypes, argument checks."""
import jax
import numpy as np
import pytest

from nvjax import data


def _equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))


def test_digits_shapes_ranges_dtypes():
    ds = data.digits()
    assert isinstance(ds, data.Dataset)
    assert ds.x_train.shape == (1347, 64) and ds.x_test.shape == (450, 64)
    assert ds.y_train.shape == (1347,) and ds.y_test.shape == (450,)
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0  # 16/16 occurs
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == np.int32
        assert set(np.unique(y)) == set(range(10))
    # pixels are the original 0..16 levels divided by 16
    np.testing.assert_array_equal(ds.x_train * 16, np.round(ds.x_train * 16))


@pytest.mark.parametrize("fraction,seed", [(0.25, 0), (0.25, 5), (0.1, 1), (0.5, 2**31 + 3),
                                           (0.333, 7), (0.9, 11)])
def test_digits_equal_scikit_learns_data_and_split(fraction, seed):
    """data.digits reads scikit-learn's file and splits it itself (no sklearn import): the same
    images, labels and split as load_digits + train_test_split(stratify=y)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x, y = np.asarray(d.data, np.float32) / np.float32(16.0), np.asarray(d.target, np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=fraction, random_state=seed,
                                              shuffle=True, stratify=y)
    assert _equal(data.digits(test_fraction=fraction, seed=seed), (x_tr, y_tr, x_te, y_te))


def test_digits_unflattened_is_nhwc_and_same_split():
    flat = data.digits(seed=3)
    img = data.digits(seed=3, flatten=False)
    assert img.x_train.shape == (1347, 8, 8, 1) and img.x_test.shape == (450, 8, 8, 1)
    np.testing.assert_array_equal(img.x_train.reshape(-1, 64), flat.x_train)
    np.testing.assert_array_equal(img.y_test, flat.y_test)


def test_digits_split_is_deterministic_and_stratified():
    a, b = data.digits(seed=0), data.digits(seed=0)
    assert _equal(a, b)
    c = data.digits(seed=1)
    assert not np.array_equal(a.y_train, c.y_train)
    assert not np.array_equal(a.x_test, c.x_test)
    # train and test partition the 1797 images
    from sklearn.datasets import load_digits
    full = np.asarray(load_digits().data, np.float32) / 16
    for ds in (a, c):
        both = np.concatenate([ds.x_train, ds.x_test])
        np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(full, axis=0))
        assert both.shape == full.shape
    # stratified: class proportions of the test set match the whole set to within one sample
    y_all = np.concatenate([a.y_train, a.y_test])
    expected = np.bincount(y_all) * 0.25
    assert np.all(np.abs(np.bincount(a.y_test) - expected) <= 1.0)
    d = data.digits(seed=0, test_fraction=0.5)
    assert d.x_test.shape[0] in (898, 899)


def test_digits_arrays_are_fresh():
    a = data.digits()
    a.x_train[:] = -1
    assert data.digits().x_train.min() >= 0.0


@pytest.mark.parametrize("kwargs,name", [
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"test_fraction": -0.2}, "test_fraction"),
    ({"test_fraction": 0.001}, "test_fraction"),   # fewer test samples than classes
    ({"test_fraction": "0.2"}, "test_fraction"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"flatten": "yes"}, "flatten"),
])
def test_digits_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        data.digits(**kwargs)


def test_procedural_shapes_ranges_determinism():
    kw = dict(num_samples=1000, num_features=300, num_classes=7)
    a = data.procedural(5, **kw)
    assert a.x_train.shape == (750, 300) and a.x_test.shape == (250, 300)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    for x in (a.x_train, a.x_test):
        assert x.min() >= 0.0 and x.max() < 1.0
    assert set(np.unique(a.y_test)) == set(range(7))
    assert np.all(np.abs(np.bincount(a.y_train) - 750 / 7) <= 1.5)
    assert _equal(a, data.procedural(5, **kw))
    assert not np.array_equal(a.x_train, data.procedural(6, **kw).x_train)
    # JAX keys work too (typed and raw), deterministically
    k = data.procedural(jax.random.key(5), **kw)
    assert _equal(k, data.procedural(jax.random.key(5), **kw))
    assert not np.array_equal(k.x_train, data.procedural(jax.random.key(6), **kw).x_train)
    r = data.procedural(jax.random.PRNGKey(5), **kw)
    assert _equal(r, data.procedural(jax.random.PRNGKey(5), **kw))


def test_procedural_is_learnable_and_noise_controls_difficulty():
    # nearest class mean (from the training set) classifies the easy set almost perfectly
    def ncm_accuracy(ds):
        means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(5)])
        d = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1)
        return np.mean(d.argmin(1) == ds.y_test)

    kw = dict(num_samples=600, num_features=32, num_classes=5)
    assert ncm_accuracy(data.procedural(0, noise=0.1, **kw)) > 0.98
    assert ncm_accuracy(data.procedural(0, noise=2.0, **kw)) < 0.9
    z = data.procedural(0, noise=0.0, **kw)   # noise 0: every sample is its prototype
    assert np.unique(z.x_train, axis=0).shape[0] == 5


@pytest.mark.parametrize("kwargs,name", [
    ({"num_samples": 5}, "num_samples"),          # < 2 * num_classes
    ({"num_samples": 100.0}, "num_samples"),
    ({"num_features": 0}, "num_features"),
    ({"num_classes": 1}, "num_classes"),
    ({"noise": -0.1}, "noise"),
    ({"noise": float("nan")}, "noise"),
    ({"test_fraction": 1.5}, "test_fraction"),
])
def test_procedural_bad_arguments(kwargs, name):
    kw = dict(num_samples=100, num_features=8, num_classes=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        data.procedural(0, **kw)


@pytest.mark.parametrize("bad", [-1, 2**32, "seed", 1.0, None, True])
def test_procedural_bad_key(bad):
    with pytest.raises(ValueError, match="key_or_seed"):
        data.procedural(bad, num_samples=100, num_features=8, num_classes=4)
