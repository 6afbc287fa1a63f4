"""IR drop: the solver against a direct nodal solve (256² and 512² tiles up to 5 Ω and 25 µS), a
solve built to fail says so, the first-order form and its error estimate, limits, gradients."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from nvjax import crossbar as xb
from nvjax import devices as D
from nvjax import irdrop


def _dissection_order(R, C, leaf=4):
    """A nested-dissection order of the nodal unknowns (it makes the sparse LU of a 512 × 512
    tile ~3x cheaper than SuperLU's own orderings). A box of cells is split across its longer
    side: at row m only bit-line segments cross, so the bit-line nodes of row m separate the
    halves (the word-line nodes of row m are then a chain of their own); at column m only
    word-line segments cross, so the word-line nodes of column m separate them."""
    n = R * C
    out = []

    def rec(i0, i1, j0, j1):
        if i1 <= i0 or j1 <= j0:
            return
        if (i1 - i0) * (j1 - j0) <= leaf * leaf:
            k = (np.arange(i0, i1)[:, None] * C + np.arange(j0, j1)[None, :]).ravel()
            out.append(np.concatenate([k, k + n]))
        elif i1 - i0 >= j1 - j0:
            m = (i0 + i1) // 2
            rec(i0, m, j0, j1)
            rec(m + 1, i1, j0, j1)
            out.extend([m * C + np.arange(j0, j1), m * C + np.arange(j0, j1) + n])
        else:
            m = (j0 + j1) // 2
            rec(i0, i1, j0, m)
            rec(i0, i1, m + 1, j1)
            out.extend([np.arange(i0, i1) * C + m + n, np.arange(i0, i1) * C + m])
    rec(0, R, 0, C)
    order = np.concatenate(out)
    assert np.array_equal(np.sort(order), np.arange(2 * n))
    return order


def _nodal(g_uS, v_in, r, *, plain=False):
    """Direct nodal analysis (float64, sparse LU): returns V_row − V_col, V, [R, C].

    Unknowns: the word-line node voltages V_row[i, j] (indices 0..RC−1) and the bit-line node
    voltages V_col[i, j] (RC..2RC−1). Kirchhoff's current law at every node, conductances in S:
    a word-line node connects to its left neighbour (at j = 0: the driver at v_in[i], through one
    segment), to its right neighbour (none at j = C−1: open end) and through the cell to the
    bit-line node below it; a bit-line node connects to the bit-line nodes above (none at i = 0)
    and below (at i = R−1: the sense amplifier's virtual ground, through one segment) and
    through the cell to its word-line node. Every segment is 1/r. The matrix is symmetric
    positive definite, so SuperLU (scipy.sparse.linalg.splu, as in spsolve) factors it without
    pivoting in the order of :func:`_dissection_order`.
    """
    R, C = g_uS.shape
    g = np.asarray(g_uS, np.float64) * 1e-6
    w = 1.0 / r
    wl = np.arange(R * C).reshape(R, C)
    bl = wl + R * C
    rows, cols, vals = [], [], []

    def conductance(a, b, c):  # a two-terminal conductance c between node arrays a and b
        rows.extend([a.ravel(), b.ravel(), a.ravel(), b.ravel()])
        cols.extend([a.ravel(), b.ravel(), b.ravel(), a.ravel()])
        c = np.broadcast_to(c, a.shape).ravel()
        vals.extend([c, c, -c, -c])

    def to_fixed(a, c):        # a conductance c from node array a to a fixed-voltage terminal
        rows.append(a.ravel())
        cols.append(a.ravel())
        vals.append(np.broadcast_to(c, a.shape).ravel())

    conductance(wl, bl, g)                       # the cells
    conductance(wl[:, :-1], wl[:, 1:], w)        # word-line segments
    to_fixed(wl[:, 0], w)                        # driver segment (source v_in)
    conductance(bl[:-1], bl[1:], w)              # bit-line segments
    to_fixed(bl[-1], w)                          # segment to the virtual ground (0 V)
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(2 * R * C, 2 * R * C))
    rhs = np.zeros(2 * R * C)
    rhs[wl[:, 0]] = w * np.asarray(v_in, np.float64)   # current injected by the drivers
    if plain:                                          # SuperLU's own ordering and pivoting
        v = spla.spsolve(a, rhs)
        return (v[:R * C] - v[R * C:]).reshape(R, C)
    p = _dissection_order(R, C)
    lu = spla.splu(a[p][:, p].tocsc(), permc_spec="NATURAL", diag_pivot_thresh=0.0,
                   options={"SymmetricMode": True})
    v = np.empty(2 * R * C)
    v[p] = lu.solve(rhs[p])
    assert np.abs(a @ v - rhs).max() <= 1e-9 * np.abs(rhs).max()   # the solve is exact
    return (v[:R * C] - v[R * C:]).reshape(R, C)


def test_nodal_reference_by_hand_and_against_spsolve():
    # one cell: driver -r- cell G -r- ground: V_cell = v·(1/G)/(1/G + 2r)
    g, r, v = 25.0, 1000.0, 0.2
    expect = v / (1.0 + 2 * r * g * 1e-6)
    np.testing.assert_allclose(_nodal(np.array([[g]]), [v], r), [[expect]], rtol=1e-12)
    # one row of two cells: solve the 2-node word line by hand (bit lines: one segment each)
    g1, g2 = 10.0, 20.0
    c1, c2, w = g1 * 1e-6 / (1 + r * g1 * 1e-6), g2 * 1e-6 / (1 + r * g2 * 1e-6), 1 / r
    # cell + its bit-line segment in series: c_k; word-line nodes a, b
    m = np.array([[2 * w + c1, -w], [-w, w + c2]])
    a, b = np.linalg.solve(m, [w * v, 0.0])
    expect = [a * c1 / (g1 * 1e-6), b * c2 / (g2 * 1e-6)]
    np.testing.assert_allclose(_nodal(np.array([[g1, g2]]), [v], r), [expect], rtol=1e-10)
    # the ordered LU against SuperLU's own ordering (spsolve) on a rectangular tile
    rng = np.random.default_rng(5)
    g, v_in = rng.uniform(0, 25, (23, 17)), rng.uniform(-0.2, 0.2, 23)
    np.testing.assert_allclose(_nodal(g, v_in, 50.0), _nodal(g, v_in, 50.0, plain=True),
                               rtol=1e-10, atol=1e-13)


#: One compiled solver for every case of a shape: r_wire is traced.
_SOLVE = jax.jit(lambda g, v, r: irdrop.voltages(g, v, r))


def _acceptance(n, cases=None):
    """The solver against the nodal solve on an n×n tile, cases (conductances, r_wire in Ω):
    uniform U[0, 25] µS and all-25 µS (the strongest coupling) at 1, 2 and 5 Ω, or those named
    in ``cases``."""
    rng = np.random.default_rng(n)
    v_in = rng.uniform(0.0, 0.2, n)
    out = []
    for name, g in (("U[0,25]", rng.uniform(0.0, 25.0, (n, n))), ("25", np.full((n, n), 25.0))):
        for r in (1.0, 2.0, 5.0):
            if cases is not None and (name, r) not in cases:
                continue
            ref = _nodal(g, v_in, r)
            res = _SOLVE(jnp.asarray(g, jnp.float32), jnp.asarray(v_in, jnp.float32),
                         jnp.float32(r))
            err = np.abs(np.asarray(res.v_cell, np.float64) - ref).max() / np.abs(ref).max()
            out.append((name, r, bool(res.converged), int(res.num_iter), err,
                        np.abs(v_in[:, None] - ref).max()))
    for name, r, conv, n_iter, err, drop in out:
        assert conv, (n, name, r)
        assert err <= 1e-4, (n, name, r, err)
        assert drop > 0.02, (n, name, r, drop)   # a real IR drop (at 25 µS it diverged before)
        assert n_iter <= 8 * np.sqrt(1 + irdrop.coupling(jnp.full((n, n), 25.0), r)), n_iter


@pytest.mark.slow
def test_solver_matches_nodal_solve_256():
    _acceptance(256)


@pytest.mark.slow
def test_solver_matches_nodal_solve_512():
    # the two extremes (each nodal solve takes 2.4 s here): weakest coupling, strongest coupling
    _acceptance(512, cases={("U[0,25]", 1.0), ("25", 5.0)})


@pytest.mark.parametrize("shape,r,lo,hi", [((12, 9), 50.0, 0.0, 0.2), ((40, 30), 20.0, -0.2, 0.2)])
def test_solver_matches_nodal_solve_small_and_signed(shape, r, lo, hi):
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 25, size=shape)
    g[rng.uniform(size=shape) < 0.3] = 0.0   # empty cells
    v_in = rng.uniform(lo, hi, size=shape[0])
    ref = _nodal(g, v_in, r)
    res = irdrop.voltages(jnp.asarray(g, jnp.float32), jnp.asarray(v_in, jnp.float32), r)
    assert bool(res.converged) and float(res.residual) <= 1e-4
    assert np.abs(v_in[:, None] - ref).max() > 1e-4  # the case has a real IR drop
    rel = np.abs(np.asarray(res.v_cell) - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


def test_coupling_bounds_the_spectrum():
    """ρ̄ against the eigenvalues of the dense coupling operator r·diag(G)·(A ⊕ B), built cell by
    cell from the ladder sums (wire segments shared by two cells' currents)."""
    R, C, r = 5, 7, 300.0
    A = np.array([[min(k, j) + 1 for j in range(C)] for k in range(C)], float)
    B = np.array([[R - max(i, k) for k in range(R)] for i in range(R)], float)
    K = np.kron(np.eye(R), A.T) + np.kron(B, np.eye(C))  # vec(I·A + B·I), row-major vec
    rng = np.random.default_rng(0)
    for g in (np.full((R, C), 25.0), rng.uniform(0, 25, (R, C))):
        lam = np.linalg.eigvals(r * 1e-6 * g.reshape(-1)[:, None] * K)
        assert np.abs(lam.imag).max() < 1e-9 and lam.real.min() > -1e-12   # real, >= 0
        bound = float(irdrop.coupling(jnp.asarray(g), r))
        assert lam.real.max() <= bound * (1 + 1e-5)
        if np.all(g == 25.0):  # uniform G: the bound is the spectral radius
            assert lam.real.max() == pytest.approx(bound, rel=1e-5)


@pytest.mark.slow  # programs tiles and runs mvm
def test_a_solve_built_to_fail_says_so_and_mvm_raises():
    g = jnp.full((64, 64), 25.0)
    v = jnp.full((64,), 0.2)
    solve = jax.jit(lambda gg, r: irdrop.voltages(gg, v, r, max_iter=10))
    for gg, r in ((g, 300.0),                      # ρ̄ ≈ 25 needs ~40 iterations, not 10
                  (g, 1e6),                        # absurd r·G·N² (ρ̄ ≈ 8e4)
                  (g.at[3, 4].set(jnp.nan), 1.0)):  # NaN never converges
        res = solve(gg, r)
        assert not bool(res.converged)
        assert np.all(np.isnan(np.asarray(res.v_cell)))        # no finite wrong number
        assert not float(res.residual) <= 1e-4
    assert bool(solve(g, 1.0).converged)                       # ρ̄ ≈ 0.08: 10 are plenty
    # the crossbar: eager mvm raises with the numbers, jitted mvm gives NaN outputs
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 20)), jnp.float32)
    cfg = xb.TileConfig(rows=8, cols=4, ir_drop="solver", r_wire=3000.0, ir_max_iter=2)
    tiles = xb.program_tiles(jax.random.key(0), D.ideal(), w, config=cfg)
    with pytest.raises(ValueError, match=r"did not converge.*8×4 tiles, r_wire = 3000 Ω, "
                                         r"conductances up to .* µS.*ir_max_iter = 2"):
        xb.mvm(jax.random.key(1), D.ideal(), tiles, x, 0.0, config=cfg)
    y, _ = jax.jit(lambda t, xx: xb.mvm(jax.random.key(1), D.ideal(), t, xx, 0.0,
                                        config=cfg))(tiles, x)
    assert np.all(np.isnan(np.asarray(y)))


def test_zero_wire_resistance_gives_ideal_voltages():
    g = jnp.full((5, 7), 20.0)
    v_in = jnp.linspace(0.0, 0.2, 5)
    res = irdrop.voltages(g, v_in, 0.0)
    np.testing.assert_array_equal(res.v_cell, jnp.broadcast_to(v_in[:, None], (5, 7)))
    np.testing.assert_array_equal(irdrop.voltages_first_order(g, v_in, 0.0), res.v_cell)
    zero = irdrop.voltages(g, jnp.zeros(5), 5.0)                 # no drive: zero, converged
    assert bool(zero.converged) and not np.any(np.asarray(zero.v_cell))


def test_first_order_agrees_with_solver_for_small_resistance():
    rng = np.random.default_rng(1)
    g = rng.uniform(0, 25, (16, 16))
    v_in = rng.uniform(0, 0.2, 16)
    exact = _nodal(g, v_in, 1.0)
    approx = np.asarray(irdrop.voltages_first_order(jnp.asarray(g, jnp.float32),
                                                    jnp.asarray(v_in, jnp.float32), 1.0))
    drop = np.abs(v_in[:, None] - exact).max()
    # the first-order error is second order in r·G: far below the drop itself
    assert np.abs(approx - exact).max() < 1e-2 * drop


@pytest.mark.parametrize("n,r,kind", [(64, 5.0, "U"), (64, 10.0, "25"), (48, 20.0, "half")])
def test_first_order_error_estimate_against_nodal_solve(n, r, kind):
    """The documented validity range: the estimate ρ²/(1 + ρ) is within a factor 1.5 of the
    first-order cell-voltage error measured against the nodal solve."""
    rng = np.random.default_rng(3)
    if kind == "U":
        g = rng.uniform(0, 25, (n, n))
    elif kind == "25":
        g = np.full((n, n), 25.0)
    else:                      # half the rows empty: the error is not set by the mean alone
        g = np.zeros((n, n))
        g[: n // 2] = 25.0
    v_in = rng.uniform(0, 0.2, n)
    exact = _nodal(g, v_in, r)
    fo = np.asarray(irdrop.voltages_first_order(jnp.asarray(g, jnp.float32),
                                                jnp.asarray(v_in, jnp.float32), r), np.float64)
    measured = np.abs(fo - exact).max() / np.abs(exact).max()
    est = float(irdrop.first_order_error(jnp.asarray(g, jnp.float32), r))
    assert measured / 1.5 <= est <= 1.5 * measured, (est, measured)


def test_check_first_order_warns_with_numbers():
    g = jnp.full((2, 1, 64, 64), 25.0)                       # a grid of two 64×64 tiles
    with pytest.warns(RuntimeWarning, match=r"off by about 1[23] %.*64×64 tiles, r_wire = 5 Ω"):
        est = irdrop.check_first_order(g, 5.0, where="here")
    assert est == pytest.approx(0.125, abs=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert irdrop.check_first_order(g, 0.5, where="here") < 0.05   # valid: silent
        assert jax.jit(lambda gg: irdrop.check_first_order(gg, 5.0, where="x") is None)(g)
    with pytest.warns(RuntimeWarning, match="predistort_ir"):
        xb.predistort_ir(jnp.full((64, 64), 25.0),
                         xb.TileConfig(rows=64, cols=64, ir_drop="first_order", r_wire=5.0),
                         num_iter=1)


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
