"""nvjax.stats against independent expectations: hand-computed Kaplan-Meier curves, the normal
theory width of a bootstrap CI, known shifts, and the structure of the two-way bootstrap.
"""
import numpy as np
import pytest

from nvjax import stats


# ------------------------------------------------------------------------------------------------
# Kaplan-Meier
# ------------------------------------------------------------------------------------------------

def test_kaplan_meier_hand_computed():
    # 6 chips; at t=3 two events and one censoring tie (events first: 5 at risk, not 4).
    times = [3.0, 2.0, 3.0, 8.0, 3.0, 5.0]
    observed = [True, True, True, True, False, False]
    # t=2: 6 at risk, 1 event -> S = 5/6
    # t=3: 5 at risk (2 events + the censoring at 3), 2 events -> S = 5/6 * 3/5 = 1/2
    # t=5: censored, no step; t=8: 1 at risk, 1 event -> S = 0
    km = stats.kaplan_meier(times, observed)
    assert km["times"].tolist() == [2.0, 3.0, 8.0]
    np.testing.assert_allclose(km["survival"], [5 / 6, 1 / 2, 0.0], atol=1e-12)
    assert km["median"] == 3.0            # S reaches exactly 0.5 at t=3
    assert km["num_censored"] == 2


def test_kaplan_meier_second_example_and_integer_observed():
    # t=1: 6 at risk -> 5/6; t=2: 5 at risk (event + censoring tie) -> 5/6*4/5 = 2/3;
    # t=4: 3 at risk (4, 6, 7) -> 2/3*2/3 = 4/9; t=7: 1 at risk -> 0
    km = stats.kaplan_meier(np.array([1, 2, 2, 4, 6, 7]), np.array([1, 1, 0, 1, 0, 1]))
    assert km["times"].tolist() == [1.0, 2.0, 4.0, 7.0]
    np.testing.assert_allclose(km["survival"], [5 / 6, 2 / 3, 4 / 9, 0.0], atol=1e-12)
    assert km["median"] == 4.0
    assert km["num_censored"] == 2


def test_kaplan_meier_median_none():
    # one event out of 4: S = 3/4 after t=1, then censorings only -> never reaches 0.5
    km = stats.kaplan_meier([1.0, 2.0, 3.0, 4.0], [True, False, False, False])
    np.testing.assert_allclose(km["survival"], [0.75])
    assert km["median"] is None
    assert km["num_censored"] == 3
    none = stats.kaplan_meier([5.0, 5.0], [False, False])           # all censored
    assert none["times"].size == 0 and none["survival"].size == 0
    assert none["median"] is None and none["num_censored"] == 2


# ------------------------------------------------------------------------------------------------
# bootstrap_ci
# ------------------------------------------------------------------------------------------------

def test_bootstrap_ci_normal_width():
    mu, sigma, n = 3.0, 2.0, 2000
    x = np.random.default_rng(123).normal(mu, sigma, n)
    est, lo, hi = stats.bootstrap_ci(x, seed=7)
    assert est == pytest.approx(x.mean())
    assert lo < mu < hi
    expected = 2 * 1.96 * sigma / np.sqrt(n)
    assert abs((hi - lo) / expected - 1.0) < 0.10
    # deterministic given the seed
    assert stats.bootstrap_ci(x, seed=7) == (est, lo, hi)


def test_bootstrap_ci_median_and_level():
    est, lo, hi = stats.bootstrap_ci([3.0, 1.0, 2.0, 10.0, 4.0], statistic="median",
                                     num_resamples=500)
    assert est == 3.0
    assert 1.0 <= lo <= 3.0 <= hi <= 10.0
    x = np.random.default_rng(0).normal(size=200)
    _, lo90, hi90 = stats.bootstrap_ci(x, level=0.90, num_resamples=2000)
    _, lo99, hi99 = stats.bootstrap_ci(x, level=0.99, num_resamples=2000)
    assert hi90 - lo90 < hi99 - lo99
    assert stats.bootstrap_ci([True, False, True, True], num_resamples=100)[0] == 0.75


# ------------------------------------------------------------------------------------------------
# paired_difference
# ------------------------------------------------------------------------------------------------

def test_paired_difference_known_shift():
    rng = np.random.default_rng(1)
    b = rng.normal(0.8, 0.05, 200)
    noise = rng.normal(0.0, 0.01, 200)
    a = b + 0.5 + noise
    r = stats.paired_difference(a, b, num_resamples=2000)
    assert r["p"] < 1e-6
    assert r["ci95"][0] <= 0.5 <= r["ci95"][1]
    assert r["mean"] == pytest.approx(0.5 + noise.mean())
    assert r["n"] == 200
    assert r["sd"] == pytest.approx(np.std(noise, ddof=1), rel=1e-6)
    assert r["sem"] == pytest.approx(np.std(noise, ddof=1) / np.sqrt(200), rel=1e-6)


def test_paired_difference_exchangeable():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.0, 1.0, (2, 100))
    r = stats.paired_difference(a, b, num_resamples=2000)
    assert r["p"] > 0.01
    assert r["ci95"][0] < 0.0 < r["ci95"][1]


def test_paired_difference_all_zero():
    a = [0.9, 0.8, 0.85, 0.7]
    r = stats.paired_difference(a, list(a))
    assert r["p"] == 1.0
    assert r["ci95"] == [0.0, 0.0]
    assert r["mean"] == 0.0 and r["sd"] == 0.0 and r["sem"] == 0.0 and r["n"] == 4


def test_paired_difference_level_changes_ci():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, (2, 50))
    r50 = stats.paired_difference(a, b, level=0.5, num_resamples=2000)
    r95 = stats.paired_difference(a, b, level=0.95, num_resamples=2000)
    assert r50["ci95"][1] - r50["ci95"][0] < r95["ci95"][1] - r95["ci95"][0]


# ------------------------------------------------------------------------------------------------
# two_way_bootstrap_ci
# ------------------------------------------------------------------------------------------------

def test_two_way_bootstrap_item_variance_widens_ci():
    rng = np.random.default_rng(4)
    n_c, n_i = 40, 300
    chip = rng.normal(0.0, 0.05, n_c)[:, None]
    item = rng.normal(0.0, 0.5, n_i)[None, :]
    # chip effects only: resampling items changes nothing, so the two-way CI matches the
    # bootstrap of the row means
    m_chip = np.broadcast_to(0.7 + chip, (n_c, n_i))
    est, lo, hi = stats.two_way_bootstrap_ci(m_chip, seed=0)
    _, lo_r, hi_r = stats.bootstrap_ci(m_chip.mean(axis=1), seed=0, num_resamples=2000)
    assert est == pytest.approx(0.7 + chip.mean())
    assert (hi - lo) / (hi_r - lo_r) == pytest.approx(1.0, abs=0.1)
    # item effects present: the row means do not see them, the two-way CI does
    m_both = 0.7 + chip + item
    est2, lo2, hi2 = stats.two_way_bootstrap_ci(m_both, seed=0)
    _, lo_r2, hi_r2 = stats.bootstrap_ci(m_both.mean(axis=1), seed=0, num_resamples=2000)
    assert est2 == pytest.approx(m_both.mean())
    assert lo2 < est2 < hi2
    # item sd of the mean 0.5/sqrt(300) ~ 0.029 vs chip 0.05/sqrt(40) ~ 0.008
    assert (hi2 - lo2) / (hi_r2 - lo_r2) > 2.0
    # item effects only: the row-mean bootstrap sees (almost) nothing
    m_item = np.broadcast_to(0.7 + item, (n_c, n_i))
    _, lo3, hi3 = stats.two_way_bootstrap_ci(m_item, seed=0)
    _, lo_r3, hi_r3 = stats.bootstrap_ci(m_item.mean(axis=1), seed=0, num_resamples=200)
    assert hi_r3 - lo_r3 < 1e-9
    expected = 2 * 1.96 * item.std(ddof=1) / np.sqrt(n_i)
    assert abs((hi3 - lo3) / expected - 1.0) < 0.15


def test_two_way_bootstrap_binary_matrix():
    m = np.random.default_rng(5).random((20, 100)) < 0.9
    est, lo, hi = stats.two_way_bootstrap_ci(m, num_resamples=500)
    assert est == pytest.approx(m.mean())
    assert 0.0 <= lo < est < hi <= 1.0


def test_two_way_bootstrap_additive_variance_closed_form():
    # correct[c, i] = a[c] + b[i]: the grand mean over resampled chips and items has variance
    # var(a)/C + var(b)/I (population variances: the bootstrap resamples the empirical law)
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 0.05, 40)
    b = rng.normal(0.0, 0.2, 300)
    m = 0.8 + a[:, None] + b[None, :]
    expected = np.sqrt(a.var() / 40 + b.var() / 300)
    r = stats.two_way_bootstrap(lambda x: x, [m], seed=0, num_resamples=4000)
    assert r["estimate"] == pytest.approx(m.mean())
    assert r["std"] == pytest.approx(expected, rel=0.06)
    assert r["ci95"][1] - r["ci95"][0] == pytest.approx(2 * 1.96 * expected, rel=0.1)
    assert r["num_valid"] == 4000
    # one arm: the same interval as two_way_bootstrap_ci with the same seed
    _, lo, hi = stats.two_way_bootstrap_ci(m, seed=0, num_resamples=4000)
    assert r["ci95"] == pytest.approx([lo, hi])


def test_two_way_bootstrap_pairs_the_arms():
    rng = np.random.default_rng(2)
    m = (rng.random((20, 50)) < 0.7).astype(float)
    # arms that differ by a constant everywhere: the difference never varies
    r = stats.two_way_bootstrap(lambda x, y: x - y, [m, m - 0.1], num_resamples=300, seed=3)
    assert r["estimate"] == pytest.approx(0.1)
    assert r["std"] == pytest.approx(0.0, abs=1e-12)
    assert r["ci95"] == pytest.approx([0.1, 0.1])
    # a ratio over an arm that is zero in some resamples: those resamples are left out
    z = np.zeros((20, 50))
    z[0, 0] = 1.0
    r2 = stats.two_way_bootstrap(lambda x, y: x / y, [m, z], num_resamples=300, seed=3)
    assert 0 < r2["num_valid"] < 300


def test_two_way_bootstrap_bad_input():
    m = np.ones((3, 4))
    with pytest.raises(TypeError, match="statistic"):
        stats.two_way_bootstrap(None, [m])
    with pytest.raises(ValueError, match="same shape"):
        stats.two_way_bootstrap(lambda x, y: x - y, [m, np.ones((3, 5))])
    with pytest.raises(TypeError, match="matrices"):
        stats.two_way_bootstrap(lambda x: x, m)
    with pytest.raises(ValueError, match="matrices\\[0\\]"):
        stats.two_way_bootstrap(lambda x: x, [np.full((3, 4), np.nan)])


# ------------------------------------------------------------------------------------------------
# km_median_difference
# ------------------------------------------------------------------------------------------------

def test_km_median_difference_identical_and_shift():
    times = np.array([4.0, 9.0, 2.0, 7.0, 5.0, 11.0, 3.0, 8.0])
    observed = np.ones(8, bool)
    same = stats.km_median_difference(times, observed, times, observed, num_resamples=300)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert same["fraction_defined"] == 1.0 and "note" not in same
    # uncensored, a = b + 3 chip by chip: every resample's medians differ by exactly 3
    shift = stats.km_median_difference(times + 3.0, observed, times, observed, num_resamples=300)
    assert shift["mean"] == 3.0 and shift["ci95"] == [3.0, 3.0]


def test_km_median_difference_matches_medians_of_data():
    # medians by hand: a = 5 (S: 7/8, 6/8, 5/8, 4/8 at 1, 2, 4, 5) ; b = 3
    ta = [1.0, 2.0, 4.0, 5.0, 6.0, 9.0, 10.0, 12.0]
    tb = [1.0, 2.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0]
    r = stats.km_median_difference(ta, [True] * 8, tb, [True] * 8, num_resamples=500)
    assert r["mean"] == 2.0
    assert r["ci95"][0] <= 2.0 <= r["ci95"][1]
    assert r["fraction_defined"] == 1.0


def test_km_median_difference_censored_beyond_horizon():
    ta = [1.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    oa = [True, False, False, False, False, False]          # median of a: None
    tb = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ob = [True] * 6
    r = stats.km_median_difference(ta, oa, tb, ob, num_resamples=300)
    assert r["mean"] is None
    assert r["ci95"] is None
    assert r["fraction_defined"] < 0.5
    assert "censored beyond the horizon" in r["note"] and "resamples" in r["note"]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def test_validation_lengths_and_sizes():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="values"):
        stats.bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="a must have at least 2"):
        stats.paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="observed"):
        stats.kaplan_meier([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="times_a and times_b"):
        stats.km_median_difference([1.0, 2.0], [True, True], [1.0, 2.0, 3.0], [True] * 3)
    with pytest.raises(ValueError, match="observed_b"):
        stats.km_median_difference([1.0, 2.0], [True, True], [1.0, 2.0], [True])
    with pytest.raises(ValueError, match="matrix"):
        stats.two_way_bootstrap_ci(np.ones((1, 5)))
    with pytest.raises(ValueError, match="matrix"):
        stats.two_way_bootstrap_ci(np.ones(5))
    with pytest.raises(ValueError, match="values"):
        stats.bootstrap_ci(np.ones((3, 2)))


def test_validation_nan_and_inf():
    with pytest.raises(ValueError, match="values.*NaN"):
        stats.bootstrap_ci([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="b.*NaN"):
        stats.paired_difference([1.0, 2.0], [1.0, np.nan])
    with pytest.raises(ValueError, match="matrix.*NaN"):
        stats.two_way_bootstrap_ci([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(ValueError, match="times.*NaN"):
        stats.kaplan_meier([1.0, np.nan], [True, True])
    with pytest.raises(ValueError, match="times_b.*NaN"):
        stats.km_median_difference([1.0, 2.0], [True, True], [np.nan, 2.0], [True, True])
    with pytest.raises(ValueError, match="values.*finite"):
        stats.bootstrap_ci([1.0, np.inf])
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci([1.0, 2.0], level=float("nan"))


def test_validation_bad_values():
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="level"):
            stats.paired_difference([1.0, 2.0], [0.0, 1.0], level=level)
    with pytest.raises(ValueError, match="level"):
        stats.two_way_bootstrap_ci(np.ones((2, 2)), level=2)
    with pytest.raises(ValueError, match="level"):
        stats.km_median_difference([1.0, 2.0], [True, True], [1.0, 2.0], [True, True], level=0)
    with pytest.raises(ValueError, match="statistic"):
        stats.bootstrap_ci([1.0, 2.0], statistic="mode")
    with pytest.raises(ValueError, match="seed"):
        stats.bootstrap_ci([1.0, 2.0], seed=-1)
    with pytest.raises(ValueError, match="num_resamples"):
        stats.two_way_bootstrap_ci(np.ones((2, 2)), num_resamples=0)
    with pytest.raises(ValueError, match="times"):
        stats.kaplan_meier([-1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="observed"):
        stats.kaplan_meier([1.0, 2.0], [0, 2])


def test_validation_types():
    with pytest.raises(TypeError, match="level"):
        stats.bootstrap_ci([1.0, 2.0], level="0.95")
    with pytest.raises(TypeError, match="statistic"):
        stats.bootstrap_ci([1.0, 2.0], statistic=None)
    with pytest.raises(TypeError, match="seed"):
        stats.bootstrap_ci([1.0, 2.0], seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        stats.paired_difference([1.0, 2.0], [0.0, 1.0], seed=True)
    with pytest.raises(TypeError, match="num_resamples"):
        stats.km_median_difference([1.0, 2.0], [True, True], [1.0, 2.0], [True, True],
                                   num_resamples=10.0)
    with pytest.raises(TypeError, match="values"):
        stats.bootstrap_ci("1 2 3")
    with pytest.raises(TypeError, match="values"):
        stats.bootstrap_ci(["a", "b"])
    with pytest.raises(TypeError, match="a"):
        stats.paired_difference(None, [1.0, 2.0])
    with pytest.raises(TypeError, match="matrix"):
        stats.two_way_bootstrap_ci(np.ones((2, 2), complex))
    with pytest.raises(TypeError, match="observed"):
        stats.kaplan_meier([1.0, 2.0], [0.5, 1.0])
    with pytest.raises(TypeError, match="times"):
        stats.kaplan_meier([True, False], [True, True])
