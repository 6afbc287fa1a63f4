"""D7 read disturb: closed form, limits, monotonicity, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import disturb as R
from nvjax import lifetime as L


def test_reads_to_failure_closed_form():
    p = R.pcm_disturb(kappa=0.5)
    n = R.reads_to_failure(p, 0.25, 6.25, 1.0)
    expected = 1e8 * np.exp(-(0.25 - 0.2) / 0.05) * (6.25 / 25.0) ** 0.5 * np.exp(0.5)
    assert float(n) == pytest.approx(expected, rel=1e-5)


def test_conductance_hand_case_and_limits():
    p = R.reram_disturb()
    g0 = jnp.array([0.0, 10.0, 40.0])
    # 1e6 reads at V_ref with z = 0: s = 1e6/1e8 = 0.01, move = 0.1·0.01^0.5 = 0.01 of the gap
    s = R.accumulate(p, jnp.zeros(3), 1e6, 0.2, g0, jnp.zeros(3))
    np.testing.assert_allclose(s, 0.01, rtol=1e-6)
    g = R.disturbed_conductance(p, g0, s)
    np.testing.assert_allclose(g, g0 + (40.0 - g0) * 0.01, rtol=1e-5)
    # zero reads: no disturb at all
    s0 = R.accumulate(p, jnp.zeros(3), 0, 0.3, g0, jnp.zeros(3))
    np.testing.assert_array_equal(R.disturbed_conductance(p, g0, s0), g0)
    # saturation at G_inf
    np.testing.assert_allclose(R.disturbed_conductance(p, g0, jnp.full(3, 1e6)), 40.0)


def test_batches_accumulate_like_one_batch():
    p = R.pcm_disturb()
    g0, z = jnp.array([5.0]), jnp.array([0.3])
    one = R.accumulate(p, jnp.zeros(1), 3000, 0.22, g0, z)
    three = R.accumulate(p, R.accumulate(p, R.accumulate(p, jnp.zeros(1), 1000, 0.22, g0, z),
                                         1000, 0.22, g0, z), 1000, 0.22, g0, z)
    np.testing.assert_allclose(one, three, rtol=1e-6)


def test_monotone_in_reads_and_voltage():
    p = R.pcm_disturb()
    g0 = jnp.full(5, 3.0)
    reads = jnp.array([0.0, 1e3, 1e5, 1e7, 1e9])
    g = R.disturbed_conductance(p, g0, R.accumulate(p, 0.0, reads, 0.2, g0, 0.0))
    assert np.all(np.diff(np.asarray(g)) > 0)
    v = jnp.array([0.1, 0.15, 0.2, 0.25, 0.3])
    g = R.disturbed_conductance(p, g0, R.accumulate(p, 0.0, 1e5, v, g0, 0.0))
    assert np.all(np.diff(np.asarray(g)) > 0)


def test_spread_is_lognormal():
    p = R.pcm_disturb()
    z = R.draw_spread(jax.random.key(0), (100_000,))
    ln_n = np.log(np.asarray(R.reads_to_failure(p, 0.2, 10.0, z)))
    assert abs(ln_n.mean() - np.log(1e8)) < 4 * 0.5 / np.sqrt(1e5)
    assert abs(ln_n.std() - 0.5) < 4 * 0.5 / np.sqrt(2e5)


def test_gradients_match_finite_differences():
    p = R.pcm_disturb(kappa=0.3)

    def f(v, g):
        s = R.accumulate(p, 0.0, 2e5, v, g, 0.1)
        return R.disturbed_conductance(p, g, s)
    dv, dg = jax.grad(f, argnums=(0, 1))(0.23, 8.0)
    eps = 1e-3
    fd_v = (f(0.23 + eps, 8.0) - f(0.23 - eps, 8.0)) / (2 * eps)
    fd_g = (f(0.23, 8.0 + eps) - f(0.23, 8.0 - eps)) / (2 * eps)
    assert float(dv) == pytest.approx(float(fd_v), rel=1e-2)
    assert float(dg) == pytest.approx(float(fd_g), rel=1e-2)
    # finite at zero damage
    g0 = jax.grad(lambda g: R.disturbed_conductance(p, g, jnp.zeros(())))(5.0)
    assert np.isfinite(g0)


def test_accumulate_batch_equals_reads_one_voltage_at_a_time():
    p = R.pcm_disturb(kappa=0.7)
    g0 = jnp.array([[2.0, 20.0], [10.0, 5.0]])
    z = jnp.array([[0.3, -1.0], [0.0, 2.0]])
    v = jnp.array([[[0.1, 0.25], [0.3, 0.0]], [[0.2, 0.2], [-0.35, 0.15]], [[0.0, 0.0], [0.4, 0.05]]])
    n = jnp.array([[[1e4], [2e4]], [[5e3], [0.0]], [[7e3], [1e3]]])        # per row, [B, 2, 1]
    d = jnp.full((2, 2), 0.01)
    seq = d
    for b in range(3):
        seq = R.accumulate(p, seq, n[b], v[b], g0, z)
    np.testing.assert_allclose(R.accumulate_batch(p, d, n, v, g0, z), seq, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: R.pcm_disturb().replace(v_ref=float("nan")),
                                  lambda: R.DisturbParams(v_ref=float("nan"))],
                         ids=["replace", "constructor"])
def test_bad_params_built_without_the_presets_are_refused(make):
    """A NaN V_ref would make every damage NaN, which reads as no disturb at all: refused by
    check_params, by accumulate(_batch) called eagerly and by lifetime(), naming the field."""
    bad = make()
    for call in (lambda: R.check_params(bad),
                 lambda: R.accumulate(bad, 0.0, 10, 0.2, 5.0, 0.0),
                 lambda: R.accumulate_batch(bad, jnp.zeros(2), jnp.ones((1, 2)),
                                            jnp.full((1, 2), 0.2), jnp.full(2, 5.0), jnp.zeros(2)),
                 lambda: L.lifetime(None, None, D.pcm(), xb.TileConfig(), bad,
                                    jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32))):
        with pytest.raises(ValueError, match=r"disturb\.v_ref must be finite") as e:
            call()
        assert type(e.value).__name__ == "UserError"
    with pytest.raises(ValueError, match=r"disturb\.v0 must be > 0"):
        R.check_params(R.DisturbParams(v0=0.0))
    with pytest.raises(TypeError, match="DisturbParams"):
        R.check_params({"v_ref": 0.2})
    # traced values cannot be inspected and pass (the jitted lifetime loop)
    acc = jax.jit(lambda p: R.accumulate(p, 0.0, 10, 0.2, 5.0, 0.0))(R.pcm_disturb())
    assert np.isfinite(float(acc))
