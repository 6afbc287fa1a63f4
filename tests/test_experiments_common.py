"""experiments/_common.py's bootstrap over chips and test images (nvjax.stats.two_way_bootstrap)
and its claim rows and table."""
import numpy as np
import pytest

from nvjax import stats


@pytest.fixture(scope="module")
def common(load_script):
    return load_script("_common")


def test_chips_images_bootstrap_is_the_library_one(common):
    # the closed-form checks live in tests/test_stats.py; here: the same numbers come back
    rng = np.random.default_rng(2)
    m = (rng.random((20, 50)) < 0.7).astype(float)
    s = (rng.random((20, 50)) < 0.9).astype(float)
    value, std, ci = common.bootstrap_chips_images(lambda x, y: x / y, [m, s], 300, 4)
    r = stats.two_way_bootstrap(lambda x, y: x / y, [m, s], seed=4, num_resamples=300)
    assert (value, std, ci) == (r["estimate"], r["std"], r["ci95"])
    assert value == pytest.approx(m.mean() / s.mean())


def test_chips_images_bootstrap_warns_about_dropped_resamples(common):
    m = np.ones((4, 6))
    z = np.zeros((4, 6))
    z[0, 0] = 1.0          # the denominator is 0 in resamples that miss chip 0 or image 0
    with pytest.warns(UserWarning, match="resamples gave a NaN or infinite"):
        common.bootstrap_chips_images(lambda a, b: a / b, [m, z], 200, 1)


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
