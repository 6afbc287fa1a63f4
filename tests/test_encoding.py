"""Encodings (DESIGN.md §4) against hand-computed cases and independent NumPy references.

Every encoding must round-trip exactly when noise is off; slices, levels and codebooks are
compared with integer arithmetic done independently in NumPy (or by hand).
"""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import encoding as E


def _w(shape=(64, 16), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# differential pair
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per", ["layer", "column"])
@pytest.mark.parametrize("g_min,g_max", [(0.0, 25.0), (1.0, 21.0)])
def test_pair_round_trip_and_ranges(per, g_min, g_max):
    w = _w()
    w[:, 3] = 0.0                          # an all-zero column must round-trip too
    kappa = E.pair_scale(jnp.asarray(w), g_min, g_max, per=per)
    # independent κ
    if per == "layer":
        k_ref = (g_max - g_min) / np.abs(w).max()
    else:
        m = np.abs(w).max(axis=0)
        k_ref = (g_max - g_min) / np.where(m > 0, m, 1.0)
    np.testing.assert_allclose(np.asarray(kappa), k_ref, rtol=1e-6)

    gp, gm = E.to_pair(jnp.asarray(w), kappa, g_min, g_max)
    gp, gm = np.asarray(gp), np.asarray(gm)
    # G± within [g_min, g_max]; the largest |W| (per layer / column) reaches g_max
    assert gp.min() >= g_min and gm.min() >= g_min
    assert gp.max() <= g_max * (1 + 1e-6) and gm.max() <= g_max * (1 + 1e-6)
    assert max(gp.max(), gm.max()) == pytest.approx(g_max, rel=1e-6)
    # only one of G± above g_min per weight; exactly one for non-zero weights
    up_p, up_m = gp > g_min, gm > g_min
    assert not np.any(up_p & up_m)
    np.testing.assert_array_equal(up_p, w > 0)
    np.testing.assert_array_equal(up_m, w < 0)
    # independent reference: G± = clip(±κW, 0, span) + g_min
    np.testing.assert_allclose(gp, np.clip(w * k_ref, 0, g_max - g_min) + g_min, rtol=1e-6)
    np.testing.assert_allclose(gm, np.clip(-w * k_ref, 0, g_max - g_min) + g_min, rtol=1e-6)

    w_back = np.asarray(E.from_pair(jnp.asarray(gp), jnp.asarray(gm), kappa))
    # exact up to float32 rounding of G (an offset g_min > 0 costs ~eps·g_max/κ absolute)
    atol = 1e-6 * np.abs(w).max() * g_max / (g_max - g_min)
    np.testing.assert_allclose(w_back, w, rtol=1e-6, atol=atol)
    np.testing.assert_array_equal(w_back[:, 3], 0.0)


def test_pair_hand_case():
    # W = [[1, -.5], [.25, 0]], g_min = 1, g_max = 21 (span 20).
    w = jnp.asarray([[1.0, -0.5], [0.25, 0.0]])
    # per layer: κ = 20/1 = 20 → κW = [[20, -10], [5, 0]]
    k = E.pair_scale(w, 1.0, 21.0)
    assert float(k) == 20.0
    gp, gm = E.to_pair(w, k, 1.0, 21.0)
    np.testing.assert_allclose(np.asarray(gp), [[21.0, 1.0], [6.0, 1.0]], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(gm), [[1.0, 11.0], [1.0, 1.0]], rtol=1e-7)
    # per column: κ = [20/1, 20/.5] = [20, 40] → κW = [[20, -20], [5, 0]]
    kc = E.pair_scale(w, 1.0, 21.0, per="column")
    np.testing.assert_allclose(np.asarray(kc), [20.0, 40.0], rtol=1e-7)
    gp, gm = E.to_pair(w, kc, 1.0, 21.0)
    np.testing.assert_allclose(np.asarray(gp), [[21.0, 1.0], [6.0, 1.0]], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(gm), [[1.0, 21.0], [1.0, 1.0]], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(E.from_pair(gp, gm, kc)), np.asarray(w), rtol=1e-7)


def test_pair_zero_layer():
    w = jnp.zeros((3, 2))
    k = E.pair_scale(w, 0.0, 25.0)
    gp, gm = E.to_pair(w, k, 0.0, 25.0)
    np.testing.assert_array_equal(np.asarray(gp), 0.0)
    np.testing.assert_array_equal(np.asarray(gm), 0.0)
    np.testing.assert_array_equal(np.asarray(E.from_pair(gp, gm, k)), 0.0)


# --------------------------------------------------------------------------------------------
# MSP/LSP pairs
# --------------------------------------------------------------------------------------------
def test_msp_lsp_hand_case():
    # W = [1, −.5, .25], g_min = 0, g_max = 10, F = 2: κ = 3·10/1 = 30 and each pair carries
    # κW/3 = [10, −5, 2.5]: G⁺ = g⁺ = [10, 0, 2.5], G⁻ = g⁻ = [0, 5, 0].
    w = jnp.asarray([1.0, -0.5, 0.25])
    k = E.msp_lsp_scale(w, 0.0, 10.0, factor=2.0)
    assert float(k) == pytest.approx(30.0, rel=1e-7)
    Gp, Gm, gp, gm = (np.asarray(a) for a in E.to_msp_lsp(w, k, 0.0, 10.0, factor=2.0))
    np.testing.assert_allclose(Gp, [10.0, 0.0, 2.5], rtol=1e-6)
    np.testing.assert_allclose(Gm, [0.0, 5.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(gp, [10.0, 0.0, 2.5], rtol=1e-6)
    np.testing.assert_allclose(gm, [0.0, 5.0, 0.0], rtol=1e-6)
    # F·(G⁺ − G⁻) + (g⁺ − g⁻) = κW: 2·10 + 10 = 30, 2·(−5) − 5 = −15, 2·2.5 + 2.5 = 7.5
    np.testing.assert_allclose(2 * (Gp - Gm) + (gp - gm), [30.0, -15.0, 7.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(E.from_msp_lsp(Gp, Gm, gp, gm, k, factor=2.0)),
                               [1.0, -0.5, 0.25], rtol=1e-6)


@pytest.mark.parametrize("factor", [2.0, 4.0])
@pytest.mark.parametrize("per", ["layer", "column"])
def test_msp_lsp_round_trip(factor, per):
    w = _w(seed=1)
    g_min, g_max = 0.5, 20.0
    k = E.msp_lsp_scale(jnp.asarray(w), g_min, g_max, factor=factor, per=per)
    m = np.abs(w).max() if per == "layer" else np.abs(w).max(axis=0)
    np.testing.assert_allclose(np.asarray(k), (factor + 1) * (g_max - g_min) / m, rtol=1e-6)
    parts = E.to_msp_lsp(jnp.asarray(w), k, g_min, g_max, factor=factor)
    for p in parts:
        p = np.asarray(p)
        assert p.min() >= g_min and p.max() <= g_max * (1 + 1e-6)
    Gp, Gm, gp, gm = (np.asarray(p, np.float64) for p in parts)
    np.testing.assert_allclose(factor * (Gp - Gm) + (gp - gm), np.asarray(k, np.float64) * w,
                               rtol=1e-5, atol=1e-4)
    w_back = np.asarray(E.from_msp_lsp(*parts, k, factor=factor))
    np.testing.assert_allclose(w_back, w, rtol=1e-6, atol=2e-6 * np.abs(w).max())


# --------------------------------------------------------------------------------------------
# bit slicing
# --------------------------------------------------------------------------------------------
def _ref_codes(w, w_max, bits, signed):
    """Independent integer codes in float64 NumPy (round half to even, as IEEE/NumPy)."""
    n = 2 ** bits - 1 if signed == "pair" else 2 ** (bits - 1) - 1
    return np.clip(np.round(w.astype(np.float64) / w_max * n), -n, n).astype(np.int64), n


def _digits(u, bits, slice_bits):
    """[S, ...] base-2^K digits of non-negative integers, LSB first."""
    mask = 2 ** slice_bits - 1
    return np.stack([(u >> (i * slice_bits)) & mask for i in range(bits // slice_bits)])


CASES = [(8, 2), (8, 4), (6, 3)]


@pytest.mark.parametrize("bits,slice_bits", CASES)
@pytest.mark.parametrize("signed", ["pair", "twos"])
@pytest.mark.parametrize("g_min,g_max", [(0.0, 1.0), (2.0, 10.0)])
@pytest.mark.slow
def test_slices_round_trip(bits, slice_bits, signed, g_min, g_max):
    w = _w((50, 40), seed=2)
    w_max = float(np.abs(w).max())
    q, n = _ref_codes(w, w_max, bits, signed)
    kw = dict(bits=bits, slice_bits=slice_bits, g_min=g_min, g_max=g_max, signed=signed)
    sl = E.to_slices(jnp.asarray(w), **kw)            # w_max defaults to max|W|
    s = bits // slice_bits
    assert sl.g_pos.shape == (s, 50, 40) and sl.g_neg.shape == (s, 50, 40)
    w_step = w_max / n
    assert float(sl.w_step) == pytest.approx(w_step, rel=1e-6)
    # every slice sits on one of the 2^K levels g_min + s·Δ
    mask = 2 ** slice_bits - 1
    lvl = (g_max - g_min) / mask
    for g in (np.asarray(sl.g_pos, np.float64), np.asarray(sl.g_neg, np.float64)):
        idx = (g - g_min) / lvl
        np.testing.assert_allclose(idx, np.round(idx), atol=1e-4)
        assert idx.min() > -1e-4 and idx.max() < mask + 1e-4
    # the slice digits are those of the independently computed integer code
    pos = np.round((np.asarray(sl.g_pos, np.float64) - g_min) / lvl).astype(np.int64)
    neg = np.round((np.asarray(sl.g_neg, np.float64) - g_min) / lvl).astype(np.int64)
    if signed == "pair":
        np.testing.assert_array_equal(pos, _digits(np.where(q > 0, q, 0), bits, slice_bits))
        np.testing.assert_array_equal(neg, _digits(np.where(q < 0, -q, 0), bits, slice_bits))
    else:
        np.testing.assert_array_equal(pos, _digits(np.mod(q, 2 ** bits), bits, slice_bits))
        np.testing.assert_array_equal(neg, 0)
    # decode == q·w_step
    dec = np.asarray(E.from_slices(sl, **kw), np.float64)
    np.testing.assert_allclose(dec, q * w_step, rtol=1e-5, atol=1e-6 * w_max)
    np.testing.assert_array_equal(np.round(dec / w_step).astype(np.int64), q)
    # quantize_weights gives the same integer codes
    np.testing.assert_array_equal(
        np.asarray(E.quantize_weights(jnp.asarray(w), bits=bits, w_max=w_max, signed=signed)), q)


def test_slices_hand_case_8_2():
    # w_max = 1, M = 8, K = 2.
    # pair: q = round(w·255): .5 → 127.5 → 128 = 2·4³ → digits [0,0,0,2] (LSB first);
    #       1 → 255 → [3,3,3,3]; −.5 → −128 on the negative stack; 0 → nothing.
    w = jnp.asarray([0.5, -0.5, 1.0, 0.0])
    sl = E.to_slices(w, bits=8, slice_bits=2, w_max=1.0, g_min=0.0, g_max=3.0)   # level s ↔ s µS
    np.testing.assert_allclose(np.asarray(sl.g_pos).T, [[0, 0, 0, 2], [0, 0, 0, 0], [3, 3, 3, 3],
                                                        [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(sl.g_neg).T, [[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0],
                                                        [0, 0, 0, 0]], atol=1e-6)
    dec = E.from_slices(sl, bits=8, slice_bits=2, g_min=0.0, g_max=3.0)
    np.testing.assert_allclose(np.asarray(dec), [128 / 255, -128 / 255, 1.0, 0.0], rtol=1e-6)
    # twos: q = round(w·127): .5 → 63.5 → 64 = [0,0,0,1]; −.5 → −64 → 192 = [0,0,0,3];
    #       1 → 127 = 0b01111111 → [3,3,3,1]; −1 → −127 → 129 = 0b10000001 → [1,0,0,2].
    w = jnp.asarray([0.5, -0.5, 1.0, -1.0])
    sl = E.to_slices(w, bits=8, slice_bits=2, w_max=1.0, g_min=0.0, g_max=3.0, signed="twos")
    np.testing.assert_allclose(np.asarray(sl.g_pos).T, [[0, 0, 0, 1], [0, 0, 0, 3], [3, 3, 3, 1],
                                                        [1, 0, 0, 2]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sl.g_neg), 0.0)
    dec = E.from_slices(sl, bits=8, slice_bits=2, g_min=0.0, g_max=3.0, signed="twos")
    np.testing.assert_allclose(np.asarray(dec), [64 / 127, -64 / 127, 1.0, -1.0], rtol=1e-6)


def test_slices_hand_case_6_3():
    # M = 6, K = 3, w_max = 1: pair q = round(.5·63) = round(31.5) = 32 = 4·8 → [0, 4];
    # twos q = round(.5·31) = 16 → [0, 2]; −16 → 64 − 16 = 48 = 6·8 → [0, 6].
    sl = E.to_slices(jnp.asarray([0.5]), bits=6, slice_bits=3, w_max=1.0, g_min=0.0, g_max=7.0)
    np.testing.assert_allclose(np.asarray(sl.g_pos)[:, 0], [0, 4], atol=1e-6)
    sl = E.to_slices(jnp.asarray([0.5, -0.5]), bits=6, slice_bits=3, w_max=1.0, g_min=0.0,
                     g_max=7.0, signed="twos")
    np.testing.assert_allclose(np.asarray(sl.g_pos).T, [[0, 2], [0, 6]], atol=1e-6)


def test_quantize_weights_clips_to_w_max():
    q = E.quantize_weights(jnp.asarray([2.0, -3.0, 0.5]), bits=8, w_max=1.0)
    np.testing.assert_array_equal(np.asarray(q), [255, -255, 128])
    q = E.quantize_weights(jnp.asarray([2.0, -3.0, 0.5]), bits=8, w_max=1.0, signed="twos")
    np.testing.assert_array_equal(np.asarray(q), [127, -127, 64])


# --------------------------------------------------------------------------------------------
# levels and codebooks
# --------------------------------------------------------------------------------------------
def test_level_values_hand():
    np.testing.assert_allclose(np.asarray(E.level_values(0.0, 1.0, 5)), [0, .25, .5, .75, 1.0], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(E.level_values(2.0, 10.0, 4)), [2, 14 / 3, 22 / 3, 10], rtol=1e-6)


def test_quantize_levels_hand():
    # levels 0, .25, .5, .75, 1: 0.1 → 0; 0.13 → .25 (0.52 steps); 0.9 → 1 (3.6 steps);
    # out of range clipped: −1 → 0, 2 → 1; 0.6 → 0.5 (2.4 steps)
    g = jnp.asarray([0.1, 0.13, 0.9, -1.0, 2.0, 0.6])
    np.testing.assert_allclose(np.asarray(E.quantize_levels(g, 0.0, 1.0, 5)),
                               [0.0, 0.25, 1.0, 0.0, 1.0, 0.5], rtol=1e-7)
    # levels 1, 2, 3: 1.4 → 1, 1.6 → 2, 2.9 → 3
    np.testing.assert_allclose(np.asarray(E.quantize_levels(jnp.asarray([1.4, 1.6, 2.9]), 1.0, 3.0, 3)),
                               [1.0, 2.0, 3.0], rtol=1e-7)


def _brute_codebook(bits, slice_bits, allowed):
    s = bits // slice_bits
    return sorted(sum(d * 2 ** (i * slice_bits) for i, d in enumerate(ds))
                  for ds in itertools.product(sorted(set(allowed)), repeat=s))


def test_favorable_codebook_8_2_extremes():
    cb = E.favorable_codebook(bits=8, slice_bits=2, allowed={0, 3})
    assert len(cb) == 16
    # the magnitudes whose base-4 digits all lie in {0, 3}
    expected = [m for m in range(256) if all(((m >> (2 * i)) & 3) in (0, 3) for i in range(4))]
    assert list(np.asarray(cb)) == expected
    assert list(np.asarray(cb)) == _brute_codebook(8, 2, {0, 3})
    assert expected[:5] == [0, 3, 12, 15, 48] and expected[-1] == 255


@pytest.mark.parametrize("bits,slice_bits,allowed", [(8, 2, (0, 1, 3)), (8, 4, (0, 15)),
                                                     (6, 3, (0, 3, 7)), (8, 2, (1, 2))])
def test_favorable_codebook_brute_force(bits, slice_bits, allowed):
    cb = E.favorable_codebook(bits=bits, slice_bits=slice_bits, allowed=allowed)
    assert list(np.asarray(cb)) == _brute_codebook(bits, slice_bits, allowed)


@pytest.mark.parametrize("codebook", [
    _brute_codebook(8, 2, {0, 3}),
    _brute_codebook(8, 2, {0, 2}),        # even gaps: ties exist (e.g. 1 between 0 and 2)
    _brute_codebook(6, 3, {0, 1, 7}),
    [0, 5, 6, 100],
    _brute_codebook(8, 2, {1, 2}),        # 0 is not a code: q = 0 must map to a code too
])
@pytest.mark.slow
def test_project_to_codebook_brute_force(codebook):
    top = max(codebook)
    q = np.arange(-top - 3, top + 4)
    got = np.asarray(E.project_to_codebook(jnp.asarray(q, jnp.int32), np.asarray(codebook)))
    cb = np.asarray(sorted(codebook))
    # nearest magnitude by brute force; argmin takes the first (= lower) entry on ties
    best = cb[np.argmin(np.abs(np.abs(q)[:, None] - cb[None, :]), axis=1)]
    np.testing.assert_array_equal(got, np.where(q < 0, -best, best))
    assert np.all(np.isin(np.abs(got), cb))
    nz = (got != 0) & (q != 0)
    assert np.all(np.sign(got)[nz] == np.sign(q)[nz])   # sign kept


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="multiple"):
        E.to_slices(w, bits=8, slice_bits=3)
    with pytest.raises(ValueError):
        E.from_slices(E.to_slices(w), bits=8, slice_bits=3)
    with pytest.raises(ValueError):
        E.favorable_codebook(bits=8, slice_bits=3)
    with pytest.raises(ValueError, match="per"):
        E.pair_scale(w, 0.0, 1.0, per="row")
    with pytest.raises(ValueError, match="per"):
        E.msp_lsp_scale(w, 0.0, 1.0, per="row")
    with pytest.raises(ValueError):
        E.pair_scale(jnp.ones((4,)), 0.0, 1.0, per="column")
    with pytest.raises(ValueError, match="allowed"):
        E.favorable_codebook(bits=8, slice_bits=2, allowed=(0, 4))
    with pytest.raises(ValueError, match="allowed"):
        E.favorable_codebook(bits=8, slice_bits=2, allowed=(-1, 3))
    with pytest.raises(ValueError):
        E.favorable_codebook(bits=8, slice_bits=2, allowed=())
    with pytest.raises(ValueError, match="signed"):
        E.quantize_weights(w, signed="offset")
    with pytest.raises(ValueError, match="signed"):
        E.to_slices(w, signed="offset")
    with pytest.raises(ValueError):
        E.level_values(0.0, 1.0, 1)
    with pytest.raises(ValueError):
        E.quantize_levels(w, 0.0, 1.0, 1)
