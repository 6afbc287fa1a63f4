"""Bundled and generated classification data sets (NumPy arrays, no downloads).

* :func:`digits` -- scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), pixels
  scaled to ``[0, 1]``, with a fixed stratified train/test split per seed.
* :func:`procedural` -- a synthetic data set of any size (Gaussian noise around random class
  prototypes, inputs clipped into ``[0, 1)``) to exercise larger layers.

Both return a :class:`Dataset` of NumPy arrays: inputs ``float32`` in ``[0, 1]`` (suitable as
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

__all__ = ["Dataset", "digits", "procedural"]


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


def _digits_file() -> str:
    """Path of ``digits.csv.gz`` inside the installed scikit-learn package (found without
    importing it)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("digits: the 8x8 digits ship with scikit-learn; install it "
                                  "(pip install scikit-learn)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("digits: scikit-learn is installed but its datasets/data/"
                            "digits.csv.gz was not found")


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
    if not isinstance(flatten, (bool, np.bool_)):
        raise ValueError(f"flatten must be a bool, got {flatten!r}")
    seed = _check_seed(seed)
    x, y = _load_digits()
    test_fraction = _check_fraction(test_fraction, len(y), 10)
    ds = _split(x, y, test_fraction, seed)
    if not flatten:
        ds = ds._replace(x_train=ds.x_train.reshape(-1, 8, 8, 1),
                         x_test=ds.x_test.reshape(-1, 8, 8, 1))
    return ds


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
