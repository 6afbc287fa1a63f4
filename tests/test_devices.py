"""Device models (DESIGN.md §3) against independent expectations.

Closed forms (σ tables, drift power law, bit-slice σ_W), hand-computed constants and statistical
tests with fixed seeds; every statistical tolerance is a few standard errors (SE) computed from
the sample size, never a value taken from the function under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import devices as D
from nvjax import encoding as E

N = 100_000  # samples for the statistical tests (cheap on CPU)
Z = 4.0      # tolerance in standard errors
S = 512      # size of the non-statistical tests (one shape: fewer eager compilations)


# --------------------------------------------------------------------------------------------
# helpers (plain numpy; independent of nvjax)
# --------------------------------------------------------------------------------------------
def _np(x):
    return np.asarray(x, dtype=np.float64)


def _se_mean(x):
    x = _np(x).ravel()
    return x.std(ddof=1) / math.sqrt(x.size)


def _se_std(x):
    """Standard error of the sample standard deviation from the sample's 4th central moment
    (delta method: Var(s²) ≈ (m4 − s⁴)/n, SE(s) ≈ SE(s²)/(2s)); = s/sqrt(2n) for normal data."""
    x = _np(x).ravel()
    d = x - x.mean()
    s2 = np.mean(d ** 2)
    m4 = np.mean(d ** 4)
    return math.sqrt(max(m4 - s2 ** 2, 0.0) / x.size) / (2.0 * math.sqrt(s2))


def _assert_std(x, expected, z=Z, extra=0.0):
    s = _np(x).std()
    tol = z * _se_std(x) + extra
    assert abs(s - expected) <= tol, f"std {s:.6g} vs expected {expected:.6g} (tol {tol:.3g})"


def _assert_mean(x, expected, z=Z):
    m = _np(x).mean()
    tol = z * _se_mean(x)
    assert abs(m - expected) <= tol, f"mean {m:.6g} vs expected {expected:.6g} (tol {tol:.3g})"


def _assert_fraction(mask, p, z=Z):
    f = _np(mask).mean()
    tol = z * math.sqrt(p * (1 - p) / _np(mask).size)
    assert abs(f - p) <= tol, f"fraction {f:.6g} vs expected {p:.6g} (tol {tol:.3g})"


def _Phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _full(value, n=N):
    return jnp.full((n,), value, jnp.float32)


# --------------------------------------------------------------------------------------------
# D1 PCM: programming noise
# --------------------------------------------------------------------------------------------
PCM_SIGMA_TABLE = [(0.0, 0.263), (0.25, 0.681), (0.5, 0.953), (0.75, 1.077), (1.0, 1.055)]


@pytest.mark.parametrize("gh,sigma", PCM_SIGMA_TABLE)
def test_pcm_sigma_table(gh, sigma):
    # DESIGN.md §3 D1 check values (3 decimals), g_max = 25 µS.
    s = float(D.programming_sigma(D.pcm(), jnp.float32(gh * 25.0)))
    assert round(s, 3) == pytest.approx(sigma, abs=1e-9)


def test_pcm_sigma_scales_with_g_max():
    # σ_p is (polynomial in ĝ)·g_max/25: at the same ĝ = 0.5 a 50 µS device has twice σ.
    s = float(D.programming_sigma(D.pcm(g_max=50.0), jnp.float32(25.0)))
    assert s == pytest.approx(2 * (-1.1731 * 0.25 + 1.9650 * 0.5 + 0.26348), rel=1e-6)


@pytest.mark.parametrize("gh,sigma", [t for t in PCM_SIGMA_TABLE if t[0] > 0])
def test_pcm_programming_std_empirical(gh, sigma):
    g_t = gh * 25.0
    st = D.program(jax.random.key(1), D.pcm(), _full(g_t))
    err = _np(st.g) - g_t
    # 3-decimal table values: allow their rounding (5e-4) on top of the sampling error.
    _assert_std(err, sigma, extra=5e-4)
    _assert_mean(err, 0.0)


def test_pcm_programming_clamp_at_zero():
    # g_prog = max(σ_p(0)·ξ, 0): half the cells exactly 0, mean σ/sqrt(2π).
    sigma0 = 0.26348
    st = D.program(jax.random.key(2), D.pcm(), _full(0.0))
    g = _np(st.g)
    assert np.all(g >= 0)
    _assert_fraction(g == 0.0, 0.5)
    se = sigma0 * math.sqrt(0.5 - 1 / (2 * math.pi)) / math.sqrt(N)  # std of max(σξ,0)
    assert abs(g.mean() - sigma0 / math.sqrt(2 * math.pi)) <= Z * se


# --------------------------------------------------------------------------------------------
# D1 PCM: drift exponents
# --------------------------------------------------------------------------------------------
def _folded_normal_moments(mu, sd):
    """Mean and std of |μ + σξ| (folded normal), closed form."""
    m = sd * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sd ** 2)) + mu * (1 - 2 * _Phi(-mu / sd))
    return m, math.sqrt(mu ** 2 + sd ** 2 - m ** 2)


# μ_ν, σ_ν computed by hand from DESIGN §3:
#   ĝ = 1:    μ = clip(0.0244, .049, .1) = 0.049;  σ = clip(−0.0059, .008, .045) = 0.008
#   ĝ = 0.01: ln ĝ = −4.605170; μ = 0.0155·4.605170 + 0.0244 = 0.0957801 (inside the clip);
#             σ = 0.0125·4.605170 − 0.0059 = 0.0516646 → clipped to 0.045
#   ĝ = 0.1:  ln ĝ = −2.302585; μ = 0.0600901; σ = 0.0228823 (neither clipped)
NU_CASES = [(1.0, 0.049, 0.008), (0.01, 0.0957801, 0.045), (0.1, 0.0600901, 0.0228823)]


@pytest.mark.parametrize("gh,mu,sd", NU_CASES)
def test_pcm_drift_exponent_statistics(gh, mu, sd):
    # ν = |μ + σξ|. At ĝ = 1 folding is negligible (6σ); at ĝ = 0.01 (μ/σ = 2.1) and 0.1 it is
    # not (1.7 % and 0.4 % of cells fold), so compare with the folded-normal moments.
    lg = math.log(gh)
    assert mu == pytest.approx(min(max(-0.0155 * lg + 0.0244, 0.049), 0.1), abs=1e-6)
    assert sd == pytest.approx(min(max(-0.0125 * lg - 0.0059, 0.008), 0.045), abs=1e-6)
    m, s = _folded_normal_moments(mu, sd)
    st = D.program(jax.random.key(3), D.pcm(), _full(gh * 25.0))
    nu = _np(st.nu)
    assert np.all(nu >= 0)
    _assert_mean(nu, m)
    _assert_std(nu, s)


def test_pcm_drift_exponent_floor_at_tiny_conductance():
    # ĝ = 0 is floored at 1e-7: ln = −16.1, μ and σ both at their upper clip (0.1, 0.045).
    st = D.program(jax.random.key(4), D.pcm(), _full(0.0))
    m, s = _folded_normal_moments(0.1, 0.045)
    _assert_mean(st.nu, m)
    _assert_std(st.nu, s)


# --------------------------------------------------------------------------------------------
# D1 PCM: drift power law
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 1.0, 3600.0, 86400.0, 3.15e7])
def test_pcm_drift_power_law_exact_without_read_noise(t):
    dev = D.pcm(read_q=0.0)
    g_t = jnp.asarray(np.random.default_rng(0).uniform(0, 25, S), jnp.float32)
    st = D.program(jax.random.key(5), dev, g_t)
    g = np.asarray(D.read(jax.random.key(6), dev, st, t))
    expected = _np(st.g) * ((t + 20.0) / 20.0) ** (-_np(st.nu))
    np.testing.assert_allclose(g, expected, rtol=2e-6, atol=0)
    if t == 0.0:  # no drift at t = 0: exactly the programmed conductance
        np.testing.assert_array_equal(g, np.asarray(st.g))


@pytest.mark.parametrize("t", [0.0, 1e-7, 2.4e-7])
def test_pcm_t0_no_drift_default_device(t):
    # Physical convention (t' = t): for t < t_r the read-noise time factor ln((t + t_r)/2t_r) is
    # negative, floored at 0 (the 1/f band is empty; documented in devices.PCM), and drift is
    # ((t + t0)/t0)^−ν ≈ 1: the read equals the programmed state (exactly at t = 0).
    dev = D.pcm(read_q=0.0088)
    st = D.program(jax.random.key(7), dev, _full(10.0, S))
    g = np.asarray(D.read(jax.random.key(8), dev, st, t))
    expected = _np(st.g) * ((t + 20.0) / 20.0) ** (-_np(st.nu))
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=0)
    if t == 0.0:
        np.testing.assert_array_equal(g, np.asarray(st.g))


def test_pcm_drift_median_follows_power_law():
    # Median over cells with the same target (ĝ = 1, μ_ν = 0.049, σ_ν = 0.008), with read noise on:
    # ln median(g(t)) should be linear in ln((t + t0)/t0) with slope −median(ν) = −0.049.
    dev = D.pcm()
    st = D.program(jax.random.key(9), dev, _full(25.0))
    ts = np.array([0.0, 1e2, 1e3, 1e4, 1e5, 1e6])
    x = np.log((ts + 20.0) / 20.0)
    y = np.array([np.log(np.median(_np(D.read(jax.random.fold_in(jax.random.key(10), i), dev, st, t))))
                  for i, t in enumerate(ts)])
    slope, intercept = np.polyfit(x, y, 1)
    # SE of a median of n normals ≈ 1.25σ/sqrt(n): ~3e-5 for ν; the read-noise and programming
    # spreads (≤ 5 %) shift each median by ≤ 2e-4 in ln g, i.e. ≤ 1e-4 on the slope.
    assert slope == pytest.approx(-0.049, abs=5e-4)
    assert np.max(np.abs(y - (slope * x + intercept))) < 1e-3   # straight line in log-log
    assert intercept == pytest.approx(np.log(25.0), abs=1e-3)


# --------------------------------------------------------------------------------------------
# D1 PCM: 1/f read noise
# --------------------------------------------------------------------------------------------
def _q_s(g_prog, g_max=25.0):
    return np.minimum(0.0088 / np.maximum((g_prog / g_max) ** 0.65, 1e-3), 0.2)


def _time_factor(t, t_r=250e-9):
    return math.sqrt(math.log((t + t_r) / (2 * t_r)))


NO_DRIFT = dict(nu_mu=(0.0, 0.0, 0.0, 0.0), nu_sigma=(0.0, 0.0, 0.0, 0.0))


@pytest.mark.parametrize("gh", [0.25, 0.5, 1.0])
def test_pcm_read_noise_std(gh):
    t = 86400.0
    dev = D.pcm(**NO_DRIFT)
    st = D.program(jax.random.key(11), dev, _full(gh * 25.0))
    assert np.all(np.asarray(st.nu) == 0.0)
    g0 = _np(st.g)
    assert g0.min() > 0
    r = _np(D.read(jax.random.key(12), dev, st, t))
    assert np.all(r >= 0)
    rel = (r - g0) / g0            # = Q_s(g_prog)·sqrt(ln((t+t_r)/(2t_r)))·ξ (no clamp: ≥ 10σ)
    expected = math.sqrt(np.mean((_q_s(g0) * _time_factor(t)) ** 2))
    # e.g. ĝ = .5: Q_s = 0.0088/0.5^0.65 = 0.013808, factor sqrt(25.875) = 5.0867 → 7.02 %
    if gh == 0.5:
        assert expected == pytest.approx(0.0702, abs=1e-3)
    _assert_std(rel, expected)
    _assert_mean(rel, 0.0)


@pytest.mark.parametrize("t", [0.0, 1.0, 86400.0])
def test_pcm_read_noise_time_aihwkit_convention(t):
    # noise_time='t+t0' (aihwkit 1.2): σ_rel = Q_s·sqrt(ln((t + t0 + t_r)/(2 t_r))), never 0:
    # at t = 0 the factor is sqrt(ln(20.00000025/5e-7)) = 4.1838, at 1 s 4.1897 (vs 3.8090 for
    # t' = t), at 1 day 5.0869.
    hand = {0.0: 4.18382, 1.0: 4.18965, 86400.0: 5.08690}
    assert _time_factor(t + 20.0) == pytest.approx(hand[t], abs=1e-4)
    dev = D.pcm(noise_time="t+t0", **NO_DRIFT)
    assert dev.convention == "custom"
    st = D.program(jax.random.key(63), dev, _full(12.5))
    g0 = _np(st.g)
    rel = (_np(D.read(jax.random.key(64), dev, st, t)) - g0) / g0
    _assert_std(rel, math.sqrt(np.mean((_q_s(g0) * hand[t]) ** 2)))
    _assert_mean(rel, 0.0)


def test_pcm_conventions():
    phys, aihw = D.pcm(), D.pcm(convention="aihwkit")
    assert (phys.drift_reference, phys.noise_time, phys.pair_remap) == ("ones", "t", False)
    assert (aihw.drift_reference, aihw.noise_time, aihw.pair_remap) == ("onehot", "t+t0", True)
    assert phys.convention == "physical" and aihw.convention == "aihwkit"
    assert D.pcm(convention="physical") == phys
    # one field overridden: the others keep the convention's value
    d = D.pcm(convention="aihwkit", pair_remap=False)
    assert (d.drift_reference, d.pair_remap, d.convention) == ("onehot", False, "custom")
    # conventions are static structure: hashable, not leaves, kept through tree maps and jit
    leaves, tdef = jax.tree_util.tree_flatten(aihw)
    assert all(not isinstance(l, str) for l in leaves)
    assert tdef != jax.tree_util.tree_flatten(phys)[1]
    hash(tdef)
    assert jax.tree.map(lambda a: a, aihw).noise_time == "t+t0"
    assert jax.jit(lambda dv: dv.g_max * 2)(aihw) == 50.0
    for bad in [dict(convention="ibm"), dict(noise_time="t0"), dict(drift_reference="eye"),
                dict(pair_remap="yes"), dict(pair_remap=1)]:
        with pytest.raises(ValueError, match="pcm"):
            D.pcm(**bad)


def test_pcm_read_noise_clamp_never_negative():
    # Near ĝ = 0 the relative noise reaches Q_s·factor ≈ 0.2·5.09 ≈ 1: the clamp at 0 is active.
    # P(read = 0 | g_prog) = Φ(−1/(Q_s(g_prog)·factor)) for g_prog > 0, 1 for g_prog = 0.
    t = 86400.0
    dev = D.pcm(**NO_DRIFT)
    st = D.program(jax.random.key(13), dev, _full(0.1))
    g0 = _np(st.g)
    r = _np(D.read(jax.random.key(14), dev, st, t))
    assert np.all(r >= 0)
    f = _time_factor(t)
    p_cell = np.where(g0 > 0, [_Phi(-1 / (q * f)) for q in _q_s(np.maximum(g0, 1e-30))], 1.0)
    p = p_cell.mean()
    assert 0.05 < p < 0.9
    _assert_fraction(r == 0.0, p)


# --------------------------------------------------------------------------------------------
# D2 ReRAM
# --------------------------------------------------------------------------------------------
C_1S = [0.348, 16.030, -43.853, 45.393, -16.815]
C_1D = [0.701, 22.086, -50.773, 47.095, -16.458]


def _poly(c, x):
    return sum(ci * x ** i for i, ci in enumerate(c))


def test_reram_sigma_hand_values():
    # by hand: 0.348 + 16.030·.5 − 43.853·.25 + 45.393·.125 − 16.815·.0625 = 2.0229375
    assert _poly(C_1S, 0.5) == pytest.approx(2.0229375, abs=1e-9)
    #          0.701 + 22.086·.5 − 50.773·.25 + 47.095·.125 − 16.458·.0625 = 3.909
    assert _poly(C_1D, 0.5) == pytest.approx(3.909, abs=1e-9)
    dev = D.reram()
    assert float(D.programming_sigma(dev, jnp.float32(20.0), t=1.0)) == pytest.approx(2.0229375, rel=1e-5)
    assert float(D.programming_sigma(dev, jnp.float32(20.0), t=86400.0)) == pytest.approx(3.909, rel=1e-5)


@pytest.mark.parametrize("gh", [0.25, 0.5, 0.75])
def test_reram_std_after_programming_and_after_one_day(gh):
    dev = D.reram()
    g_t = gh * 40.0
    st = D.program(jax.random.key(15), dev, _full(g_t))
    r1 = _np(D.read(jax.random.key(16), dev, st, 1.0)) - g_t
    _assert_std(r1, _poly(C_1S, gh))
    _assert_mean(r1, 0.0)
    # t = 1 day: total std = σ_1d(ĝ) exactly, both σ evaluated at the target ĝ
    rd = _np(D.read(jax.random.key(17), dev, st, 86400.0)) - g_t
    _assert_std(rd, _poly(C_1D, gh))
    _assert_mean(rd, 0.0)
    # Our model (ReRAM docstring): variance linear in ln t, halfway at t = sqrt(86400) s.
    rm = _np(D.read(jax.random.key(18), dev, st, math.sqrt(86400.0))) - g_t
    s_half = math.sqrt((_poly(C_1S, gh) ** 2 + _poly(C_1D, gh) ** 2) / 2)
    _assert_std(rm, s_half)


def test_reram_one_day_error_is_gaussian_at_low_target():
    # Issue 14: with the relaxation amplitude evaluated at the noisy programmed conductance the
    # 1-day σ at ĝ = 0.3 was 0.9 % low and the error non-Gaussian. At the target it is the sum of
    # two independent normals, N(0, σ_1d(ĝ)²), read through the clamp at 0 µS: the error is
    # e = max(σ_1d·Z, −g_T) (the programming clamp is 5.2 σ_1s away, negligible), c = g_T/σ_1d.
    dev = D.reram()
    gh = 0.3
    g_t = gh * 40.0
    n = 400_000   # SE of σ 0.11 %: 4 SE = 0.45 %, half the 0.9 % of the old bias
    st = D.program(jax.random.key(60), dev, _full(g_t, n))
    e = _np(D.read(jax.random.key(61), dev, st, 86400.0)) - g_t
    s_1d = _poly(C_1D, gh)  # 0.701 + 6.6258 − 4.56957 + 1.271565 − 0.1333098 (by hand)
    assert s_1d == pytest.approx(3.895485, abs=1e-5)
    c = g_t / s_1d                                     # 3.0805: the clamp cuts 0.1 % of cells
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mean = s_1d * phi - g_t * _Phi(-c)                 # moments of max(σZ, −g_T), closed form
    second = s_1d ** 2 * (_Phi(c) - c * phi) + g_t ** 2 * _Phi(-c)
    _assert_mean(e, mean)
    _assert_std(e, math.sqrt(second - mean ** 2))
    # Gaussian shape inside the clamp: P(|e| ≤ kσ) = 1 − 2Φ(−k) for kσ < g_T
    for k in (0.5, 1.0, 2.0, 3.0):
        _assert_fraction(np.abs(e) <= k * s_1d, 1 - 2 * _Phi(-k))
    _assert_fraction(e == -g_t, _Phi(-c))


# --------------------------------------------------------------------------------------------
# D3 per-level Gaussian cell
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonuniform", [1.0, 4.0])
def test_levels_per_level_std(nonuniform):
    dev = D.levels(bits=2, sigma=0.1, nonuniform=nonuniform, g_min=0.0, g_max=1.0)
    n = N
    for lvl in range(4):
        g_l = lvl / 3.0
        st = D.program(jax.random.fold_in(jax.random.key(19), lvl), dev, _full(g_l, n))
        err = _np(st.g) - g_l
        sig = 0.1 * (nonuniform if lvl in (1, 2) else 1.0) * (1.0 - 0.0)
        _assert_std(err, sig)
        _assert_mean(err, 0.0)


def test_levels_sigma_relative_to_range_and_table():
    # σ is relative to (g_max − g_min): range [2, 6] and table (.01, .02, .03, .04).
    dev = D.levels(bits=2, sigma=[0.01, 0.02, 0.03, 0.04], g_min=2.0, g_max=6.0)
    n = N
    for lvl in range(4):
        g_l = 2.0 + lvl * 4.0 / 3.0
        st = D.program(jax.random.fold_in(jax.random.key(20), lvl), dev, _full(g_l, n))
        _assert_std(_np(st.g) - g_l, 0.01 * (lvl + 1) * 4.0)
        _assert_mean(_np(st.g) - g_l, 0.0)


def _sigma_w_ratio(bits, slice_bits):
    s = bits // slice_bits
    return math.sqrt(sum(2 ** (2 * i * slice_bits) for i in range(s))) / sum(2 ** (i * slice_bits) for i in range(s))


def test_sigma_w_closed_form_value():
    # DESIGN: 0.7776 for M = 8, K = 2  (sqrt(1 + 16 + 256 + 4096)/85 = 66.098/85)
    assert _sigma_w_ratio(8, 2) == pytest.approx(0.7776, abs=1e-4)


@pytest.mark.parametrize("bits,slice_bits", [(8, 2), (8, 4)])
@pytest.mark.slow
def test_bit_slice_sigma_w_closed_form(bits, slice_bits):
    # σ_W = σ·max|W|·sqrt(Σ 2^{2iK})/Σ 2^{iK} holds for ONE noisy slice stack.
    # Pair signing puts a weight on one stack only, but a physical array programs both stacks and
    # both carry noise, so the decoded error variance of a signed pair is doubled. Here:
    #  (a) non-negative weights, only the g_pos stack programmed (g_neg left at its exact level)
    #      → the closed form itself;
    #  (b) signed weights with both stacks programmed → sqrt(2)× the closed form.
    sigma = 0.05
    w_max = 1.0
    n_w = N // 2
    rng = np.random.default_rng(21)
    dev = D.levels(bits=slice_bits, sigma=sigma)
    kw = dict(bits=bits, slice_bits=slice_bits, g_min=0.0, g_max=1.0)
    ratio = _sigma_w_ratio(bits, slice_bits)

    q = rng.integers(0, 2 ** bits, n_w)
    w = jnp.asarray(q / (2 ** bits - 1) * w_max, jnp.float32)
    sl = E.to_slices(w, w_max=w_max, **kw)
    noisy = sl._replace(g_pos=D.program(jax.random.key(22), dev, sl.g_pos).g)
    err = (_np(E.from_slices(noisy, **kw)) - _np(E.from_slices(sl, **kw))) / w_max
    _assert_std(err, sigma * ratio)
    _assert_mean(err, 0.0)

    q = rng.integers(-(2 ** bits - 1), 2 ** bits, n_w)
    w = jnp.asarray(q / (2 ** bits - 1) * w_max, jnp.float32)
    sl = E.to_slices(w, w_max=w_max, **kw)
    k1, k2 = jax.random.split(jax.random.key(23))
    noisy = sl._replace(g_pos=D.program(k1, dev, sl.g_pos).g, g_neg=D.program(k2, dev, sl.g_neg).g)
    err = (_np(E.from_slices(noisy, **kw)) - _np(E.from_slices(sl, **kw))) / w_max
    _assert_std(err, math.sqrt(2) * sigma * ratio)


# --------------------------------------------------------------------------------------------
# D4 PCM pulse response (used by nvjax.programming.row_program)
# --------------------------------------------------------------------------------------------
def test_d4_set_step_mean_and_std():
    # no clipping (floor and ceiling far away), no device variability
    dev = D.pulse_pcm(g_lo=-1e3, g_hi=1e3, sigma_gain=0.0, sigma_gmax=0.0)
    levels = np.array([1.0, 5.0, 10.0], np.float32)
    g = jnp.asarray(np.repeat(levels[:, None], N, axis=1))
    dg = _np(D.set_pulse(jax.random.key(30), dev, None, g)) - _np(g)
    for i, gi in enumerate(levels):
        _assert_mean(dg[i], -0.084 * gi + 0.892)
        _assert_std(dg[i], 0.09 * gi + 0.575)
    # step_scale and a per-device gain multiply the mean step only
    var = D.DeviceVariation(gain=jnp.full(g.shape, 1.5), g_ceiling=jnp.full(g.shape, 1e3))
    dg2 = _np(D.set_pulse(jax.random.key(31), dev, var, g, step_scale=2.0)) - _np(g)
    for i, gi in enumerate(levels):
        _assert_mean(dg2[i], 3.0 * (-0.084 * gi + 0.892))
        _assert_std(dg2[i], 0.09 * gi + 0.575)


def test_d4_set_clipping_and_mask():
    dev = D.pulse_pcm(sigma_gain=0.0, sigma_gmax=0.0)
    g = jnp.concatenate([jnp.full((S,), 0.1), jnp.full((S,), 19.9)])
    var = D.DeviceVariation(gain=jnp.ones_like(g), g_ceiling=jnp.full(g.shape, 19.95))
    out = _np(D.set_pulse(jax.random.key(32), dev, var, g))
    assert np.all(out >= 0.1 - 1e-6) and np.all(out <= 19.95 + 1e-5)
    assert np.any(out == np.float32(0.1)) and np.any(out == np.float32(19.95))   # clips happen
    mask = jnp.arange(2 * S) % 2 == 0
    out_m = np.asarray(D.set_pulse(jax.random.key(32), dev, var, g, mask))
    np.testing.assert_array_equal(out_m[1::2], np.asarray(g)[1::2])
    np.testing.assert_array_equal(out_m[::2], np.asarray(out, np.float32)[::2])


def test_d4_reset_values():
    dev = D.pulse_pcm()
    g = D.reset(jax.random.key(33), dev, (N,))
    _assert_mean(g, 0.1)
    _assert_std(g, 0.01)
    old = jnp.full((S,), 7.0)
    mask = jnp.arange(S) < S // 2
    new = np.asarray(D.reset(jax.random.key(34), dev, old, mask))
    assert np.all(new[S // 2:] == 7.0) and np.all(np.abs(new[: S // 2] - 0.1) < 0.1)


def test_d4_device_variation():
    dev = D.pulse_pcm(sigma_gain=0.2, sigma_gmax=2.0)
    var = D.draw_devices(jax.random.key(35), dev, (4, N // 4))
    assert var.gain.shape == var.g_ceiling.shape == (4, N // 4)
    _assert_mean(var.gain, 1.0)
    _assert_std(var.gain, 0.2)
    _assert_mean(var.g_ceiling, 20.0)
    _assert_std(var.g_ceiling, 2.0)


def test_d4_variation_and_reset_from_normals_by_hand():
    dev = D.pulse_pcm(sigma_gain=0.2, sigma_gmax=2.0)
    z = jnp.array([[1.0, -0.5, 0.0], [0.5, -1.0, -20.0]])
    var = D.variation_from_normals(dev, z)
    np.testing.assert_allclose(var.gain, [1.2, 0.9, 1.0], rtol=1e-6)
    # ceiling 20 + 2·z, raised to g_lo = 0.1 where the draw falls below it
    np.testing.assert_allclose(var.g_ceiling, [21.0, 18.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(D.reset_from_normals(dev, jnp.array([0.0, 1.0, -2.0])),
                               [0.1, 0.11, 0.08], rtol=1e-6)
    # draw_devices is variation_from_normals of one normal draw [2, *shape] of its key
    key = jax.random.key(36)
    drawn = D.draw_devices(key, dev, (3,))
    again = D.variation_from_normals(dev, jax.random.normal(key, (2, 3)))
    np.testing.assert_array_equal(np.asarray(drawn.gain), np.asarray(again.gain))
    np.testing.assert_array_equal(np.asarray(drawn.g_ceiling), np.asarray(again.g_ceiling))


def test_d4_bad_inputs():
    with pytest.raises(TypeError, match="nope"):
        D.pulse_pcm(nope=1.0)
    with pytest.raises(ValueError, match="sigma_gain"):
        D.pulse_pcm(sigma_gain=-0.1)
    with pytest.raises(ValueError, match="g_hi"):
        D.pulse_pcm(g_lo=5.0, g_hi=5.0)
    with pytest.raises(TypeError, match="PulsePCM"):
        D.set_pulse(jax.random.key(0), D.pcm(), None, jnp.ones(3))
    with pytest.raises(TypeError, match="PulsePCM"):
        D.check_pulse_device(D.pcm())
    with pytest.raises(ValueError, match="mask"):
        D.reset(jax.random.key(0), D.pulse_pcm(), (3,), jnp.ones(3, bool))


# --------------------------------------------------------------------------------------------
# D5 flash
# --------------------------------------------------------------------------------------------
def test_flash_lognormal():
    # default center='mean': g = g_T·exp(σξ − σ²/2), so ln(g/g_T) ~ N(−σ²/2, σ²) and E[g] = g_T
    dev = D.flash(sigma_vth=0.012, n_slope=1.4)
    assert dev.center == "mean"
    s_ln = 0.012 / (1.4 * 0.02585)   # σ_Vth/(n·V_T), V_T = 25.85 mV
    g_t = 5.0
    st = D.program(jax.random.key(24), dev, _full(g_t))
    lr = np.log(_np(st.g) / g_t)
    _assert_std(lr, s_ln)
    _assert_mean(lr, -s_ln ** 2 / 2)
    _assert_mean(st.g, g_t)
    _assert_std(st.g, g_t * math.sqrt(math.expm1(s_ln ** 2)))
    assert float(D.programming_sigma(dev, jnp.float32(g_t))) == pytest.approx(
        g_t * math.sqrt(math.expm1(s_ln ** 2)), rel=1e-5)
    # read adds nothing for flash
    np.testing.assert_array_equal(np.asarray(D.read(jax.random.key(25), dev, st, 1e4)), np.asarray(st.g))


def test_flash_median_center_is_high_by_half_sigma_squared():
    # center='median' (the V_th target itself): median at g_T, mean g_T·exp(σ²/2) — 3.4 % high
    # at the default σ_ln = 0.01/(1.5·0.02585) = 0.25789 (exp(0.033254) = 1.03381).
    s_ln = 0.01 / (1.5 * 0.02585)
    assert math.exp(s_ln ** 2 / 2) == pytest.approx(1.03381, abs=1e-5)
    dev = D.flash(center="median")
    g_t = 5.0
    st = D.program(jax.random.key(62), dev, _full(g_t))
    _assert_mean(np.log(_np(st.g) / g_t), 0.0)
    _assert_mean(st.g, g_t * math.exp(s_ln ** 2 / 2))
    sig = g_t * math.sqrt(math.expm1(s_ln ** 2)) * math.exp(s_ln ** 2 / 2)
    _assert_std(st.g, sig)
    assert float(D.programming_sigma(dev, jnp.float32(g_t))) == pytest.approx(sig, rel=1e-5)
    with pytest.raises(ValueError, match="center"):
        D.flash(center="mode")


# --------------------------------------------------------------------------------------------
# D6 stuck-at faults
# --------------------------------------------------------------------------------------------
def test_stuck_at_fractions_and_persistence():
    dev = D.pcm(p_stuck_min=0.1, p_stuck_max=0.05)
    st = D.program(jax.random.key(26), dev, _full(12.5))
    g = _np(st.g)
    at_min, at_max = g == 0.0, g == 25.0   # healthy cells at ĝ = .5 (σ = .95 µS) never hit these
    _assert_fraction(at_min, 0.1)
    _assert_fraction(at_max, 0.05)
    np.testing.assert_array_equal(at_min, np.asarray(st.stuck) == 1)
    np.testing.assert_array_equal(at_max, np.asarray(st.stuck) == 2)
    for t in (1.0, 86400.0, 1e7):
        r = _np(D.read(jax.random.key(27), dev, st, t))
        np.testing.assert_array_equal(r[at_min], 0.0)
        np.testing.assert_array_equal(r[at_max], 25.0)
        healthy = ~(at_min | at_max)
        assert np.all(r[healthy] < 25.0) and np.all(r[healthy] > 0.0)


def test_stuck_at_nonzero_g_min_levels():
    dev = D.levels(bits=2, sigma=0.0, g_min=0.2, g_max=1.0, p_stuck_min=0.1, p_stuck_max=0.05)
    g_t = _full(0.2 + 0.8 / 3)
    st = D.program(jax.random.key(28), dev, g_t)
    g = _np(st.g)
    _assert_fraction(g == np.float32(0.2), 0.1)
    _assert_fraction(g == np.float32(1.0), 0.05)
    # σ = 0: healthy cells sit exactly at their level
    healthy = np.asarray(st.stuck) == 0
    np.testing.assert_allclose(g[healthy], 0.2 + 0.8 / 3, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# ideal device, zero-noise limits
# --------------------------------------------------------------------------------------------
def test_ideal_device_exact():
    g_t = jnp.asarray(np.random.default_rng(29).uniform(0, 25, (S // 8, 8)), jnp.float32)
    st = D.program(jax.random.key(30), D.ideal(), g_t)
    np.testing.assert_array_equal(np.asarray(st.g), np.asarray(g_t))
    np.testing.assert_array_equal(np.asarray(D.read(jax.random.key(31), D.ideal(), st, 1e6)),
                                  np.asarray(g_t))
    assert float(jnp.max(D.programming_sigma(D.ideal(), g_t))) == 0.0


def test_levels_zero_sigma_exact():
    dev = D.levels(bits=2, sigma=0.0)
    g_t = jnp.asarray([0.0, 1 / 3, 2 / 3, 1.0], jnp.float32)
    st = D.program(jax.random.key(32), dev, g_t)
    np.testing.assert_allclose(np.asarray(st.g), [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# determinism, jit, vmap, grad, pytrees
# --------------------------------------------------------------------------------------------
ALL_DEVICES = {
    "pcm": (D.pcm(p_stuck_min=0.01, p_stuck_max=0.01), 20.0),
    "reram": (D.reram(), 30.0),
    "levels": (D.levels(bits=2, sigma=0.1), 1.0),
    "flash": (D.flash(), 10.0),
}


@pytest.mark.parametrize("name", list(ALL_DEVICES))
def test_determinism(name):
    dev, g_max = ALL_DEVICES[name]
    g_t = jnp.asarray(np.random.default_rng(33).uniform(0, g_max, S), jnp.float32)
    a = D.program(jax.random.key(0), dev, g_t)
    b = D.program(jax.random.key(0), dev, g_t)
    c = D.program(jax.random.key(1), dev, g_t)
    np.testing.assert_array_equal(np.asarray(a.g), np.asarray(b.g))
    assert not np.array_equal(np.asarray(a.g), np.asarray(c.g))
    ra = D.read(jax.random.key(2), dev, a, 3600.0)
    rb = D.read(jax.random.key(2), dev, b, 3600.0)
    np.testing.assert_array_equal(np.asarray(ra), np.asarray(rb))
    if name == "pcm":  # only PCM read noise depends on the read key
        np.testing.assert_array_equal(np.asarray(a.nu), np.asarray(b.nu))
        rc = D.read(jax.random.key(3), dev, a, 3600.0)
        assert not np.array_equal(np.asarray(ra), np.asarray(rc))


@pytest.mark.parametrize("name", list(ALL_DEVICES))
@pytest.mark.slow
def test_jit_equals_eager(name):
    dev, g_max = ALL_DEVICES[name]
    g_t = jnp.asarray(np.random.default_rng(34).uniform(0, g_max, S), jnp.float32)

    def f(key, device, g):
        k1, k2 = jax.random.split(key)
        st = D.program(k1, device, g)
        return st.g, D.read(k2, device, st, 3600.0)

    eager = f(jax.random.key(5), dev, g_t)
    jitted = jax.jit(f)(jax.random.key(5), dev, g_t)
    for a, b in zip(eager, jitted):
        # Same random numbers, but XLA fuses/contracts the jitted arithmetic (e.g. g_T + σ·ξ as
        # one FMA), so ~5-25 % of cells differ by 1-2 float32 ulps of g_max (measured: ≤ 4e-6 µS
        # for ReRAM at 40 µS); bitwise identity is not attainable on CPU, so allow ~8 ulps.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6 * g_max)


@pytest.mark.slow
def test_vmap_over_keys_equals_individual_calls():
    dev = D.pcm(p_stuck_min=0.05)
    g_t = jnp.asarray(np.random.default_rng(35).uniform(0, 25, S), jnp.float32)
    keys = jax.random.split(jax.random.key(36), 5)

    def f(key):
        k1, k2 = jax.random.split(key)
        return D.read(k2, dev, D.program(k1, dev, g_t), 86400.0)

    batched = np.asarray(jax.jit(jax.vmap(f))(keys))
    f1 = jax.jit(f)
    assert batched.shape == (5, S)
    for i in range(5):
        np.testing.assert_allclose(batched[i], np.asarray(f1(keys[i])), rtol=1e-6, atol=1e-5)
    assert not np.array_equal(batched[0], batched[1])


def test_grad_through_program_and_read():
    dev = D.pcm()
    g_t = jnp.asarray(np.random.default_rng(37).uniform(1, 24, S), jnp.float32)

    def loss(g):
        st = D.program(jax.random.key(38), dev, g)
        return jnp.mean(D.read(jax.random.key(39), dev, st, 86400.0))

    grad = np.asarray(jax.grad(loss)(g_t))
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0)


def test_grad_of_programming_closed_form():
    # read_q = 0 and t = 0 make read the identity on g_prog = g_T + σ_p(g_T)·ξ, so
    # d mean(g)/d g_T,i = (1 + σ_p'(g_T,i)·ξ_i)/n with σ_p' = (2·c2·ĝ + c1)/25 (g_max = 25) and
    # ξ_i = (g_i − g_T,i)/σ_p(g_T,i) recovered from the programmed state.
    dev = D.pcm(read_q=0.0)
    g_np = np.random.default_rng(40).uniform(5, 20, S)   # clamp at 0 irrelevant
    g_t = jnp.asarray(g_np, jnp.float32)

    def loss(g):
        return jnp.mean(D.read(jax.random.key(42), dev, D.program(jax.random.key(41), dev, g), 0.0))

    grad = np.asarray(jax.grad(loss)(g_t))
    gh = g_np / 25.0
    sig = -1.1731 * gh ** 2 + 1.9650 * gh + 0.26348
    xi = (_np(D.program(jax.random.key(41), dev, g_t).g) - g_np) / sig
    expected = (1.0 + (2 * -1.1731 * gh + 1.9650) / 25.0 * xi) / g_np.size
    np.testing.assert_allclose(grad, expected, rtol=1e-4)


def test_grad_at_zero_conductance_finite():
    # ĝ = 0 sits on the floors of the ν law and of Q_s: gradients must still be finite.
    dev = D.pcm()
    g_t = jnp.zeros((S,), jnp.float32)

    def loss(g):
        st = D.program(jax.random.key(43), dev, g)
        return jnp.mean(D.read(jax.random.key(44), dev, st, 86400.0))

    assert np.all(np.isfinite(np.asarray(jax.grad(loss)(g_t))))


def test_device_parameters_are_pytrees_vmap_over_stacked_devices():
    d1, d2 = D.pcm(g_max=25.0), D.pcm(g_max=50.0)
    stacked = jax.tree.map(lambda a, b: jnp.stack([jnp.asarray(a, jnp.float32),
                                                   jnp.asarray(b, jnp.float32)]), d1, d2)
    assert isinstance(stacked, D.PCM)
    g_t = _full(12.5)
    key = jax.random.key(45)
    out = np.asarray(jax.vmap(lambda d: D.program(key, d, g_t).g)(stacked))
    assert out.shape == (2, N)
    np.testing.assert_allclose(out[0], np.asarray(D.program(key, d1, g_t).g), rtol=1e-6)
    np.testing.assert_allclose(out[1], np.asarray(D.program(key, d2, g_t).g), rtol=1e-6)
    # independent check: same 12.5 µS is ĝ = .5 on the 25 µS device and ĝ = .25 on the 50 µS
    # device, where σ_p = 0.953 and 2·0.681 µS respectively.
    _assert_std(out[0] - 12.5, -1.1731 * 0.25 + 1.9650 * 0.5 + 0.26348)
    _assert_std(out[1] - 12.5, 2 * (-1.1731 * 0.0625 + 1.9650 * 0.25 + 0.26348))


def test_levels_device_is_pytree():
    leaves = jax.tree.leaves(D.levels(bits=2, sigma=0.1))
    assert any(np.shape(l) == (4,) for l in leaves)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_negative_target_raises():
    with pytest.raises(ValueError, match=r"program\(g_target\)"):
        D.program(jax.random.key(0), D.pcm(), jnp.asarray([1.0, -0.5]))


def test_target_above_g_max_raises():
    with pytest.raises(ValueError, match="g_max"):
        D.program(jax.random.key(0), D.pcm(), jnp.asarray([1.0, 26.0]))
    with pytest.raises(ValueError):
        D.program(jax.random.key(0), D.reram(), jnp.asarray([41.0]))


def test_non_finite_target_raises():
    with pytest.raises(ValueError):
        D.program(jax.random.key(0), D.pcm(), jnp.asarray([1.0, jnp.nan]))


def test_unknown_parameter_raises():
    with pytest.raises(TypeError, match="foo"):
        D.pcm(foo=1)
    with pytest.raises(TypeError, match="bar"):
        D.reram(bar=2.0)
    with pytest.raises(TypeError, match="baz"):
        D.flash(baz=2.0)


def test_levels_bad_table_raises():
    with pytest.raises(ValueError):
        D.levels(bits=2, sigma=[0.1, 0.1])
    with pytest.raises(ValueError):
        D.levels(bits=2, sigma=-0.1)
    with pytest.raises(ValueError):
        D.levels(bits=0)


def test_read_negative_time_raises():
    st = D.program(jax.random.key(0), D.pcm(), _full(10.0, S))
    with pytest.raises(ValueError, match="t"):
        D.read(jax.random.key(1), D.pcm(), st, -1.0)


def test_not_a_device_raises():
    with pytest.raises(TypeError):
        D.program(jax.random.key(0), object(), _full(1.0, S))
