"""experiments/_common.py's statistics and claim rows: the bootstrap over chips and test images
against the closed-form variance of an additive design, and the claim table's validation."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def common(load_script):
    return load_script("_common")


def test_two_way_bootstrap_matches_additive_variance(common):
    # correct[c, i] = a[c] + b[i]: the grand mean over resampled chips and images has variance
    # var(a)/C + var(b)/I (population variances: the bootstrap resamples the empirical law)
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 0.05, 40)
    b = rng.normal(0.0, 0.2, 300)
    m = 0.8 + a[:, None] + b[None, :]
    expected = np.sqrt(a.var() / 40 + b.var() / 300)
    value, std, (lo, hi) = common.bootstrap_chips_images(lambda x: x, [m], 4000, 0)
    assert value == pytest.approx(m.mean())
    assert std == pytest.approx(expected, rel=0.06)
    assert lo < value < hi
    assert hi - lo == pytest.approx(2 * 1.96 * expected, rel=0.1)


def test_two_way_bootstrap_is_paired(common):
    # two arms that differ by a constant on every chip and image: their difference never varies
    rng = np.random.default_rng(2)
    m = (rng.random((20, 50)) < 0.7).astype(float)
    value, std, ci = common.bootstrap_chips_images(lambda x, y: x - y, [m, m - 0.1], 200, 3)
    assert value == pytest.approx(0.1)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert ci == pytest.approx([0.1, 0.1])


def test_two_way_bootstrap_images_alone(common):
    # every chip identical: the spread is the images' binomial standard error sqrt(p(1-p)/I)
    row = np.zeros(400)
    row[:300] = 1.0
    m = np.tile(row, (10, 1))
    _, std, _ = common.bootstrap_chips_images(lambda x: x, [m], 4000, 5)
    assert std == pytest.approx(np.sqrt(0.75 * 0.25 / 400), rel=0.06)


def test_claim_rows_and_table(common):
    row = common.claim("R ~ 0.95", "0.95", "0.74 [0.70, 0.78]", "partly", "quantization | no",
                       value=0.74, ci=(0.70, 0.78))
    assert row["ci"] == [0.70, 0.78] and row["value"] == 0.74
    table = common.claims_table([row])
    assert table.splitlines()[2] == \
        "| R ~ 0.95 | 0.95 | 0.74 [0.70, 0.78] | partly | quantization \\| no |"
    with pytest.raises(ValueError, match="verdict"):
        common.claim("c", "p", "o", "yes", "w")
    with pytest.raises(ValueError, match="ci"):
        common.claim("c", "p", "o", "partly", "w", ci=[1.0])
