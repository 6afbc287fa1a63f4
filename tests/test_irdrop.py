"""IR drop: solver against a direct nodal solve, first-order form, limits, gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import irdrop


def _nodal(g_uS, v_in, r):
    """Direct nodal analysis (float64): unknowns V_row[i, j], V_col[i, j]; returns V_row − V_col."""
    R, C = g_uS.shape
    g = g_uS * 1e-6
    w = 1.0 / r
    n = 2 * R * C
    A = np.zeros((n, n))
    b = np.zeros(n)
    row = lambda i, j: i * C + j            # noqa: E731
    col = lambda i, j: R * C + i * C + j    # noqa: E731
    for i in range(R):
        for j in range(C):
            # KCL at word-line node (i, j): left segment (driver at j = 0), right segment, cell.
            k = row(i, j)
            A[k, k] += w + g[i, j]
            if j == 0:
                b[k] += w * v_in[i]
            else:
                A[k, k - 1] -= w
            if j < C - 1:
                A[k, k] += w
                A[k, k + 1] -= w
            A[k, col(i, j)] -= g[i, j]
            # KCL at bit-line node (i, j): upper segment, lower segment (ground below row R-1).
            m = col(i, j)
            A[m, m] += g[i, j] + w
            A[m, row(i, j)] -= g[i, j]
            if i > 0:
                A[m, m] += w
                A[m, col(i - 1, j)] -= w
            if i < R - 1:
                A[m, col(i + 1, j)] -= w
    v = np.linalg.solve(A, b)
    return (v[:R * C] - v[R * C:]).reshape(R, C)


@pytest.mark.parametrize("shape,r", [((6, 5), 50.0), ((12, 9), 20.0), ((4, 16), 100.0)])
@pytest.mark.slow
def test_solver_matches_nodal_solve(shape, r):
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 25, size=shape)
    v_in = rng.uniform(0, 0.2, size=shape[0])
    ref = _nodal(g, v_in, r)
    res = irdrop.voltages(jnp.asarray(g, jnp.float32), jnp.asarray(v_in, jnp.float32), r, tol=1e-7)
    assert bool(res.converged)
    drop = np.abs(v_in[:, None] - ref).max()
    assert drop > 1e-4  # the case has a real IR drop
    rel = np.abs(np.asarray(res.v_cell) - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


def test_zero_wire_resistance_gives_ideal_voltages():
    g = jnp.full((5, 7), 20.0)
    v_in = jnp.linspace(0.0, 0.2, 5)
    res = irdrop.voltages(g, v_in, 0.0)
    np.testing.assert_array_equal(res.v_cell, jnp.broadcast_to(v_in[:, None], (5, 7)))
    np.testing.assert_array_equal(irdrop.voltages_first_order(g, v_in, 0.0), res.v_cell)


def test_first_order_agrees_with_solver_for_small_resistance():
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.uniform(0, 25, (16, 16)), jnp.float32)
    v_in = jnp.asarray(rng.uniform(0, 0.2, 16), jnp.float32)
    exact = irdrop.voltages(g, v_in, 1.0, tol=1e-7).v_cell
    approx = irdrop.voltages_first_order(g, v_in, 1.0)
    drop = np.abs(np.asarray(v_in)[:, None] - np.asarray(exact)).max()
    # the first-order error is second order in r·G: far below the drop itself
    assert np.abs(np.asarray(approx - exact)).max() < 1e-2 * drop


@pytest.mark.slow
def test_fixed_iterations_are_differentiable_and_vmappable():
    rng = np.random.default_rng(2)
    g = jnp.asarray(rng.uniform(0, 25, (6, 6)), jnp.float32)
    v_in = jnp.asarray(rng.uniform(0.05, 0.2, 6), jnp.float32)

    def f(g):
        return jnp.sum(irdrop.voltages(g, v_in, 50.0, num_iter=30).v_cell ** 2)
    grad = jax.grad(f)(g)
    assert np.all(np.isfinite(grad))
    eps = 1e-1
    e = jnp.zeros_like(g).at[2, 3].set(eps)
    fd = (f(g + e) - f(g - e)) / (2 * eps)
    assert float(grad[2, 3]) == pytest.approx(float(fd), rel=2e-2)
    gs = jnp.stack([g, 2 * g])
    vm = jax.vmap(lambda gg: irdrop.voltages(gg, v_in, 50.0).v_cell)(gs)
    np.testing.assert_allclose(vm[1], irdrop.voltages(2 * g, v_in, 50.0).v_cell, rtol=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError, match="v_in"):
        irdrop.voltages(jnp.ones((3, 4)), jnp.ones(4), 1.0)


def test_first_order_batch_and_transfer_are_the_linear_map_of_the_drives():
    g = jax.random.uniform(jax.random.key(0), (7, 5), minval=0.0, maxval=40.0)
    v = jax.random.uniform(jax.random.key(1), (4, 7), maxval=0.2)
    r = 80.0
    batch = irdrop.voltages_first_order(g, v, r)
    for b in range(4):
        np.testing.assert_allclose(batch[b], irdrop.voltages_first_order(g, v[b], r), rtol=1e-6)
        # hand-written first order: drops from the ideal currents, ladders summed cell by cell
        i0 = np.asarray(g, float) * np.asarray(v[b], float)[:, None]
        v_row = np.asarray(v[b], float)[:, None] - r * 1e-6 * np.cumsum(
            np.cumsum(i0[:, ::-1], 1)[:, ::-1], 1)
        v_col = r * 1e-6 * np.cumsum(np.cumsum(i0, 0)[::-1], 0)[::-1]
        np.testing.assert_allclose(batch[b], v_row - v_col, rtol=1e-5, atol=1e-9)
    m = irdrop.first_order_transfer(g, r)
    np.testing.assert_allclose(v @ m, jnp.sum(g * batch, axis=1), rtol=1e-5)
