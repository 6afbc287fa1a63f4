"""Statistics for paired Monte Carlo comparisons of chip instances (read-disturb placement study).

The placement experiment simulates the *same* chips (same PRNG keys: same device variation, same
programming noise) under two placements, so its comparisons are paired, and its outcomes are
small samples of per-chip numbers (accuracy, reads to failure) that may be censored at the
simulated horizon. This module holds the few estimators it needs:

* :func:`bootstrap_ci` -- percentile bootstrap CI of a mean or median (vectorized, chunked);
* :func:`paired_difference` -- mean paired difference, its bootstrap CI and a Wilcoxon
  signed-rank p-value;
* :func:`two_way_bootstrap_ci` -- CI of a grand mean over chips x evaluation items resampling
  both (which chips *and* which test images), by multinomial count weights;
* :func:`two_way_bootstrap` -- the same resampling applied to several paired arms at once, for
  a statistic that combines them (a difference, a ratio, a recovered fraction);
* :func:`kaplan_meier` -- product-limit survival curve of right-censored times (e.g. reads until
  a chip's accuracy first drops below a threshold; chips that never drop are censored);
* :func:`km_median_difference` -- paired bootstrap of the difference of two KM medians.

Every function validates its arguments: ``TypeError`` for a value of the wrong type,
``ValueError`` for a wrong value (NaN and +-inf included), the message naming the argument.
Every resampling function takes an integer ``seed`` and is deterministic given it.

This module imports numpy and scipy only (no JAX), so analysis scripts can use it without
starting an accelerator runtime.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Tuple

import numpy as np
import scipy.stats

__all__ = ["bootstrap_ci", "paired_difference", "two_way_bootstrap_ci", "two_way_bootstrap",
           "kaplan_meier", "km_median_difference"]

#: Resamples per chunk (the index / weight matrices are [chunk, n]).
_CHUNK = 1000
#: Upper bound on the elements of one chunk's index / weight matrix (2**22 int64 = 32 MiB).
_MAX_CHUNK_ELEMENTS = 1 << 22
#: Slack for "S(t) <= 0.5": a product of fractions that is exactly 1/2 may round to 0.5 + 1 ulp.
_HALF = 0.5 + 1e-12

_STATISTICS = ("mean", "median")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_level(level) -> float:
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real):
        raise TypeError(f"level must be a real number in (0, 1), got {level!r} "
                        f"({type(level).__name__})")
    level = float(level)
    if not 0.0 < level < 1.0:                      # NaN fails too
        raise ValueError(f"level must be in (0, 1) (e.g. 0.95), got {level}")
    return level


def _real_array(name: str, value, ndim: int, *, allow_bool: bool = True) -> np.ndarray:
    """A finite real float64 array of exactly ``ndim`` dimensions."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real array, got {type(value).__name__}")
    try:
        a = np.asarray(value)
    except Exception as e:                         # ragged nested lists and the like
        raise ValueError(f"{name} could not be read as an array: {e}") from None
    if a.dtype == bool:
        if not allow_bool:
            raise TypeError(f"{name} must be a real (not bool) array, got dtype bool")
    elif not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN (at index {tuple(np.argwhere(np.isnan(a))[0])})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got +-inf "
                         f"(at index {tuple(np.argwhere(~np.isfinite(a))[0])})")
    return a


def _vector(name: str, value, min_len: int, *, allow_bool: bool = True) -> np.ndarray:
    a = _real_array(name, value, 1, allow_bool=allow_bool)
    if a.shape[0] < min_len:
        raise ValueError(f"{name} must have at least {min_len} elements, got {a.shape[0]}")
    return a


def _times(name: str, value, min_len: int) -> np.ndarray:
    t = _vector(name, value, min_len, allow_bool=False)
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got {t[t < 0][0]} "
                         f"(at index {int(np.argmax(t < 0))})")
    return t


def _observed(name: str, value, length: int, times_name: str) -> np.ndarray:
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be a bool array, got {type(value).__name__}")
    o = np.asarray(value)
    if o.dtype != bool:
        if not np.issubdtype(o.dtype, np.integer):
            raise TypeError(f"{name} must be a bool array (True = event observed, False = "
                            f"censored), got dtype {o.dtype}")
        if not np.isin(o, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 (or True/False), got "
                             f"{o[~np.isin(o, (0, 1))][0]}")
        o = o.astype(bool)
    if o.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {o.shape}")
    if o.shape[0] != length:
        raise ValueError(f"{name} must have the length of {times_name} ({length}), "
                         f"got {o.shape[0]}")
    return o


def _chunks(total: int, width: int):
    """Sizes of the resample chunks: at most _CHUNK rows and _MAX_CHUNK_ELEMENTS elements."""
    step = max(1, min(_CHUNK, _MAX_CHUNK_ELEMENTS // max(width, 1)))
    for start in range(0, total, step):
        yield min(step, total - start)


def _percentiles(samples: np.ndarray, level: float) -> Tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------

def bootstrap_ci(values, *, seed: int = 0, num_resamples: int = 10000, level: float = 0.95,
                 statistic: str = "mean") -> Tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean or median of a sample.

    Args:
        values: 1-D array [n] (n >= 2) of i.i.d. observations (any unit; bool is read as 0/1).
        seed: int >= 0, seed of ``np.random.default_rng``.
        num_resamples: int >= 1, bootstrap resamples (each draws n indices with replacement).
        level: confidence level in (0, 1).
        statistic: ``"mean"`` or ``"median"``.

    Returns:
        ``(estimate, lo, hi)`` as Python floats in the unit of ``values``: the statistic of the
        data itself and the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the statistic over
        the resamples.

    The resamples are drawn as [chunk, n] index matrices (at most 1000 resamples and 2**22
    indices a chunk), so memory stays bounded and there is no Python loop per resample.

    Example:
        >>> est, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], num_resamples=2000)
        >>> est
        2.5
        >>> bool(1.0 <= lo < est < hi <= 4.0)
        True
        >>> bootstrap_ci([3.0, 1.0, 2.0, 10.0], statistic="median")[0]
        2.5
    """
    x = _vector("values", values, 2)
    seed = _check_int("seed", seed, 0)
    num_resamples = _check_int("num_resamples", num_resamples, 1)
    level = _check_level(level)
    if not isinstance(statistic, str):
        raise TypeError(f"statistic must be a str ('mean' or 'median'), got "
                        f"{type(statistic).__name__}")
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    reduce = np.mean if statistic == "mean" else np.median
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    stats = np.empty(num_resamples)
    done = 0
    for m in _chunks(num_resamples, n):
        idx = rng.integers(0, n, size=(m, n))
        stats[done:done + m] = reduce(x[idx], axis=1)
        done += m
    lo, hi = _percentiles(stats, level)
    return float(reduce(x)), lo, hi


def paired_difference(a, b, *, seed: int = 0, num_resamples: int = 10000,
                      level: float = 0.95) -> Dict[str, Any]:
    """Paired comparison of two measurements of the same units (chips): a - b.

    Args:
        a, b: 1-D arrays [n] (n >= 2) of equal length; ``a[i]`` and ``b[i]`` belong to the same
            chip (e.g. accuracy under two placements with the same device draws).
        seed, num_resamples, level: of the bootstrap, as in :func:`bootstrap_ci`.

    Returns:
        dict with, in the unit of ``a`` (d = a - b):

        * ``mean`` -- mean of d;
        * ``ci95`` -- ``[lo, hi]``, percentile bootstrap CI of the mean of d at ``level`` (the
          key keeps its name whatever ``level`` is);
        * ``p`` -- two-sided Wilcoxon signed-rank p-value of d
          (``scipy.stats.wilcoxon(d, zero_method="zsplit")``); 1.0 when every d is exactly 0;
        * ``n`` -- number of pairs (int);
        * ``sd`` -- standard deviation of d (ddof=1);
        * ``sem`` -- ``sd / sqrt(n)``.

    Example:
        >>> r = paired_difference([1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5])
        >>> r["mean"], r["ci95"], r["p"], r["n"], r["sd"]
        (0.5, [0.5, 0.5], 0.125, 4, 0.0)
    """
    a = _vector("a", a, 2)
    b = _vector("b", b, 2)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length (paired), got {a.shape[0]} and "
                         f"{b.shape[0]}")
    d = a - b
    n = d.shape[0]
    mean, lo, hi = bootstrap_ci(d, seed=seed, num_resamples=num_resamples, level=level)
    if not d.any():
        p = 1.0
    else:
        p = float(scipy.stats.wilcoxon(d, zero_method="zsplit").pvalue)
    sd = float(np.std(d, ddof=1))
    return {"mean": mean, "ci95": [lo, hi], "p": p, "n": int(n), "sd": sd,
            "sem": sd / float(np.sqrt(n))}


def two_way_bootstrap_ci(matrix, *, seed: int = 0, num_resamples: int = 2000,
                         level: float = 0.95) -> Tuple[float, float, float]:
    """CI of a grand mean over chips x evaluation items, resampling chips and items.

    An accuracy averaged over chips and test images has two sources of sampling noise: which
    chips were simulated and which images were evaluated. Each resample draws chips and items
    independently with replacement, as multinomial count weights ``w_c`` [n_c] and ``w_i``
    [n_i], and takes ``w_c @ M @ w_i / (n_c n_i)``: no resampled matrix is materialized (a chunk
    holds [chunk, n_c], [chunk, n_i] and [chunk, n_i] arrays).

    This is the naive two-way ("pigeonhole") bootstrap: its variance counts the chip x item
    interaction twice, so the interval is slightly conservative (wider) when that term is
    large.

    Args:
        matrix: [num_chips, num_items] array (both >= 2) of per-chip, per-item scores (0/1
            correctness, bool allowed, or any real score).
        seed, num_resamples, level: as in :func:`bootstrap_ci`.

    Returns:
        ``(estimate, lo, hi)`` as Python floats: the grand mean of ``matrix`` and the percentile
        interval of the resampled grand means.

    Example:
        >>> m = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])
        >>> est, lo, hi = two_way_bootstrap_ci(m, num_resamples=500)
        >>> est
        0.75
        >>> bool(0.0 <= lo < est < hi <= 1.0)
        True
    """
    M = _real_array("matrix", matrix, 2)
    seed = _check_int("seed", seed, 0)
    num_resamples = _check_int("num_resamples", num_resamples, 1)
    level = _check_level(level)
    stats = _two_way_means([M], seed, num_resamples)[0]
    lo, hi = _percentiles(stats, level)
    return float(M.mean()), lo, hi


def _two_way_means(matrices, seed: int, num_resamples: int) -> np.ndarray:
    """[arms, num_resamples] grand means of each matrix over the same resampled chips and items
    (multinomial count weights, chunked: no resampled matrix is materialized)."""
    n_c, n_i = matrices[0].shape
    if n_c < 2 or n_i < 2:
        raise ValueError(f"matrix must have at least 2 chips (rows) and 2 items (columns), got "
                         f"shape {matrices[0].shape}")
    rng = np.random.default_rng(seed)
    p_c = np.full(n_c, 1.0 / n_c)
    p_i = np.full(n_i, 1.0 / n_i)
    out = np.empty((len(matrices), num_resamples))
    done = 0
    for m in _chunks(num_resamples, n_c + 2 * n_i):
        w_c = rng.multinomial(n_c, p_c, size=m).astype(np.float64)   # [m, n_c]
        w_i = rng.multinomial(n_i, p_i, size=m).astype(np.float64)   # [m, n_i]
        for a, M in enumerate(matrices):
            out[a, done:done + m] = np.einsum("ri,ri->r", w_c @ M, w_i) / (n_c * n_i)
        done += m
    return out


def two_way_bootstrap(statistic: Callable, matrices, *, seed: int = 0,
                      num_resamples: int = 2000, level: float = 0.95) -> Dict[str, Any]:
    """A statistic of several paired arms' grand means, bootstrapped over chips *and* items.

    The arms (e.g. a non-ideal chip, a corrected chip and software) were evaluated on the same
    chips and the same test images, so each resample draws one set of chips and one set of
    items (as in :func:`two_way_bootstrap_ci`) and applies it to every arm; ``statistic`` then
    combines the arms' resampled grand means (a difference, a ratio, a recovered fraction).

    Args:
        statistic: ``(*means) -> value``, elementwise on numpy arrays of means (one per arm).
        matrices: sequence of [num_chips, num_items] arrays (both >= 2), one per arm, all the
            same shape (an arm without chips, like software, repeats its row on every chip).
        seed, num_resamples, level: as in :func:`bootstrap_ci`.

    Returns:
        dict with ``estimate`` (``statistic`` of the full grand means), ``std`` and ``ci95``
        (``[lo, hi]``, percentile interval at ``level``) over the resamples; resamples where the
        statistic is NaN or infinite (a ratio over zero) are left out, ``num_valid`` says how
        many remain (the interval is NaN when none does).

    Example:
        >>> m = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])
        >>> r = two_way_bootstrap(lambda a, b: a - b, [m, m - 0.25], num_resamples=100)
        >>> r["estimate"], [round(v, 12) for v in r["ci95"]]
        (0.25, [0.25, 0.25])
    """
    if not callable(statistic):
        raise TypeError(f"statistic must be callable, got {type(statistic).__name__}")
    if isinstance(matrices, np.ndarray) or len(matrices) < 1:
        raise TypeError("matrices must be a non-empty sequence of 2-D arrays (one per arm)")
    mats = [_real_array(f"matrices[{i}]", m, 2) for i, m in enumerate(matrices)]
    if any(m.shape != mats[0].shape for m in mats):
        raise ValueError(f"matrices must all have the same shape, got "
                         f"{[m.shape for m in mats]}")
    seed = _check_int("seed", seed, 0)
    num_resamples = _check_int("num_resamples", num_resamples, 1)
    level = _check_level(level)
    means = _two_way_means(mats, seed, num_resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(statistic(*(m.mean() for m in mats)))
        values = np.asarray(statistic(*means), np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"estimate": estimate, "std": float("nan"), "ci95": [float("nan")] * 2,
                "num_valid": 0}
    lo, hi = _percentiles(values, level)
    return {"estimate": estimate, "std": float(np.std(values)), "ci95": [lo, hi],
            "num_valid": int(values.size)}


# ------------------------------------------------------------------------------------------------
# Kaplan-Meier
# ------------------------------------------------------------------------------------------------

def _km_weighted(times: np.ndarray, observed: np.ndarray, weights: np.ndarray):
    """Product-limit estimates of weighted copies of one data set.

    ``weights`` [m, n]: per-resample count of each subject (a bootstrap resample is the data
    set with subject j repeated ``weights[r, j]`` times). Returns the distinct event times of
    the (unweighted) data [K], S right after each [m, K] (unchanged at a time with no weighted
    event) and the medians [m] (NaN where S never reaches 0.5).

    At risk at t: subjects with time >= t, so a censoring tied with an event time counts as at
    risk there (events before censorings).
    """
    order = np.argsort(times, kind="stable")
    t = times[order]
    w = weights[:, order]
    event_times = np.unique(t[observed[order]])
    if event_times.size == 0:
        m = weights.shape[0]
        return event_times, np.ones((m, 0)), np.full(m, np.nan)
    start = np.searchsorted(t, event_times, side="left")
    end = np.searchsorted(t, event_times, side="right")
    # at_risk[:, k] = sum of w over sorted positions >= start[k]
    tail = np.cumsum(w[:, ::-1], axis=1)[:, ::-1]
    at_risk = tail[:, start]
    # events[:, k] = sum of w * observed over positions [start[k], end[k])
    ev_cum = np.concatenate([np.zeros((w.shape[0], 1)),
                             np.cumsum(w * observed[order], axis=1)], axis=1)
    events = ev_cum[:, end] - ev_cum[:, start]
    factor = 1.0 - np.divide(events, at_risk, out=np.zeros_like(events), where=at_risk > 0)
    survival = np.cumprod(factor, axis=1)
    reached = survival <= _HALF
    median = np.where(reached.any(axis=1), event_times[np.argmax(reached, axis=1)], np.nan)
    return event_times, survival, median


def kaplan_meier(times, observed) -> Dict[str, Any]:
    """Kaplan-Meier (product-limit) estimate of a survival curve with right censoring.

    S(t) = prod over event times t_k <= t of (1 - d_k / n_k), with d_k the events at t_k and n_k
    the subjects still at risk (time >= t_k). Ties: events come before censorings at an equal
    time, so a subject censored at t_k is counted at risk at t_k.

    Args:
        times: 1-D array [n] (n >= 1) of non-negative times (any unit: reads, seconds), each the
            event time of a subject or the time it was last seen (censored).
        observed: bool array [n]; True = the event happened at ``times[i]``, False = the subject
            was right-censored at ``times[i]`` (e.g. still working at the simulation horizon).
            Integer 0/1 is accepted.

    Returns:
        dict with

        * ``times`` -- float array [K]: the distinct event times, sorted ascending;
        * ``survival`` -- float array [K]: S(t) right after each of them;
        * ``median`` -- float: the smallest event time with S(t) <= 0.5, or None when S never
          reaches 0.5 (the median is censored beyond the horizon);
        * ``num_censored`` -- int: number of censored subjects.

    Example:
        >>> km = kaplan_meier([1.0, 2.0, 2.0, 3.0, 4.0, 5.0],
        ...                   [True, True, False, True, False, True])
        >>> km["times"].tolist()
        [1.0, 2.0, 3.0, 5.0]
        >>> np.round(km["survival"], 4).tolist()
        [0.8333, 0.6667, 0.4444, 0.0]
        >>> km["median"], km["num_censored"]
        (3.0, 2)
        >>> print(kaplan_meier([1.0, 2.0, 3.0], [True, False, False])["median"])
        None
    """
    t = _times("times", times, 1)
    o = _observed("observed", observed, t.shape[0], "times")
    event_times, survival, median = _km_weighted(t, o, np.ones((1, t.shape[0])))
    med = float(median[0])
    return {"times": event_times, "survival": survival[0],
            "median": None if np.isnan(med) else med,
            "num_censored": int((~o).sum())}


def km_median_difference(times_a, observed_a, times_b, observed_b, *, seed: int = 0,
                         num_resamples: int = 2000, level: float = 0.95) -> Dict[str, Any]:
    """Paired bootstrap of the difference of Kaplan-Meier medians, median(a) - median(b).

    Chip i was simulated under both conditions (``times_a[i]`` and ``times_b[i]``); each
    resample draws chips with replacement and uses the same draw for a and b, keeping the
    pairing. A KM median is undefined (None) when S never reaches 0.5, i.e. the median is
    censored beyond the horizon; the interval is then taken over the resamples in which both
    medians exist (conditional on that, so read it with ``fraction_defined``).

    Args:
        times_a, times_b: 1-D arrays [n] (n >= 2, equal lengths) of non-negative times.
        observed_a, observed_b: bool arrays [n]; False = censored (see :func:`kaplan_meier`).
        seed, num_resamples, level: as in :func:`bootstrap_ci`.

    Returns:
        dict with, in the unit of the times:

        * ``mean`` -- median(a) - median(b) of the data, or None if either median is None;
        * ``ci95`` -- ``[lo, hi]`` at ``level`` over the resamples where both medians exist, or
          None when fewer than half of the resamples have both (a ``note`` key then says so; it
          also explains a None ``mean``);
        * ``fraction_defined`` -- fraction of resamples in which both medians exist.

    Example:
        >>> r = km_median_difference([5.0, 6.0, 7.0, 8.0], [True] * 4,
        ...                          [3.0, 4.0, 5.0, 6.0], [True] * 4, num_resamples=200)
        >>> r["mean"], r["ci95"], r["fraction_defined"]
        (2.0, [2.0, 2.0], 1.0)
    """
    ta = _times("times_a", times_a, 2)
    oa = _observed("observed_a", observed_a, ta.shape[0], "times_a")
    tb = _times("times_b", times_b, 2)
    ob = _observed("observed_b", observed_b, tb.shape[0], "times_b")
    if ta.shape != tb.shape:
        raise ValueError(f"times_a and times_b must have the same length (paired chips), got "
                         f"{ta.shape[0]} and {tb.shape[0]}")
    seed = _check_int("seed", seed, 0)
    num_resamples = _check_int("num_resamples", num_resamples, 1)
    level = _check_level(level)
    n = ta.shape[0]

    ones = np.ones((1, n))
    med_a = float(_km_weighted(ta, oa, ones)[2][0])
    med_b = float(_km_weighted(tb, ob, ones)[2][0])
    rng = np.random.default_rng(seed)
    p = np.full(n, 1.0 / n)
    diffs = np.empty(num_resamples)
    done = 0
    for m in _chunks(num_resamples, 4 * n):
        w = rng.multinomial(n, p, size=m).astype(np.float64)           # same chips for a, b
        diffs[done:done + m] = _km_weighted(ta, oa, w)[2] - _km_weighted(tb, ob, w)[2]
        done += m
    defined = ~np.isnan(diffs)
    fraction = float(defined.mean())
    out: Dict[str, Any] = {"mean": None, "ci95": None, "fraction_defined": fraction}
    notes = []
    if np.isnan(med_a) or np.isnan(med_b):
        which = " and ".join(s for s, v in (("a", med_a), ("b", med_b)) if np.isnan(v))
        notes.append(f"the KM median of {which} is censored beyond the horizon "
                     f"(S never reaches 0.5), so the difference is undefined")
    else:
        out["mean"] = med_a - med_b
    if fraction < 0.5:
        notes.append(f"both medians exist in only {int(defined.sum())} of {num_resamples} "
                     f"resamples (< half), so no confidence interval is given")
    else:
        out["ci95"] = list(_percentiles(diffs[defined], level))
    if notes:
        out["note"] = "; ".join(notes)
    return out
