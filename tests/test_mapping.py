"""Placement solvers (DESIGN.md §7.3): brute force on small cases, bounds, relaxation, errors."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import mapping as M


def _all_injections(n, m):
    """[k, n] array of every injective map range(n) → range(m)."""
    return np.array(list(itertools.permutations(range(m), n)), dtype=np.int64)


def _brute_costs(cost, injections):
    n = cost.shape[0]
    return cost[np.arange(n)[None, :], injections].sum(axis=1)


def _brute_crossbar(C, D):
    """Minimum of Σ C[i,j]·D[r(i), c(j)] over all injective row maps r and column maps c."""
    rows = _all_injections(C.shape[0], D.shape[0])
    cols = _all_injections(C.shape[1], D.shape[1])
    # cost[a, b] = Σ_ij C[i,j] D[rows[a,i], cols[b,j]]
    d_sel = D[rows[:, None, :, None], cols[None, :, None, :]]  # [A, B, n, m]
    return float(np.min(np.einsum("ij,abij->ab", C, d_sel)))


# ------------------------------------------------------------------------------ assign

@pytest.mark.parametrize("seed", range(5))
def test_assign_matches_brute_force_square(seed):
    cost = np.random.default_rng(seed).random((6, 6))
    perm = M.assign(cost)
    brute = _brute_costs(cost, _all_injections(6, 6))  # all 720 permutations
    assert sorted(perm.tolist()) == list(range(6))
    assert M.assignment_cost(cost, perm) == pytest.approx(brute.min(), rel=1e-12)
    # continuous random costs: the optimum is unique, so the permutation itself must match
    np.testing.assert_array_equal(perm, _all_injections(6, 6)[np.argmin(brute)])


@pytest.mark.parametrize("seed", range(3))
def test_assign_rectangular_matches_brute_force(seed):
    cost = np.random.default_rng(100 + seed).normal(size=(4, 6))
    perm = M.assign(cost)
    assert perm.shape == (4,) and len(set(perm.tolist())) == 4 and perm.max() < 6
    brute = _brute_costs(cost, _all_injections(4, 6))  # 360 injections
    assert M.assignment_cost(cost, perm) == pytest.approx(brute.min(), rel=1e-12)


def test_assign_hand_case_and_dtype():
    cost = np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    perm = M.assign(cost)
    assert np.issubdtype(perm.dtype, np.integer)
    assert perm.tolist() == [1, 0, 2]  # 1 + 2 + 2 = 5 is the unique optimum
    assert M.assignment_cost(cost, perm) == 5.0


# ------------------------------------------------------------------------------ sort_and_pair

@pytest.mark.parametrize("seed", range(3))
def test_sort_and_pair_equals_assign_on_factorized_cost(seed):
    rng = np.random.default_rng(200 + seed)
    u, v = rng.random(7), rng.random(7)
    cost = np.outer(u, v)
    perm = M.sort_and_pair(u, v)
    assert M.assignment_cost(cost, perm) == pytest.approx(M.assignment_cost(cost, M.assign(cost)),
                                                          rel=1e-12)
    # rectangular: more targets than items
    v_long = rng.random(11)
    cost_long = np.outer(u, v_long)
    perm_long = M.sort_and_pair(u, v_long)
    assert len(set(perm_long.tolist())) == 7
    assert M.assignment_cost(cost_long, perm_long) == pytest.approx(
        M.assignment_cost(cost_long, M.assign(cost_long)), rel=1e-12)


def test_sort_and_pair_brute_force_small():
    rng = np.random.default_rng(7)
    u, v = rng.random(5), rng.random(6)
    cost = np.outer(u, v)
    brute = _brute_costs(cost, _all_injections(5, 6)).min()
    assert M.assignment_cost(cost, M.sort_and_pair(u, v)) == pytest.approx(brute, rel=1e-12)
    # hand case: largest u (index 1) gets the smallest v (index 1)
    assert M.sort_and_pair([1.0, 3.0, 2.0], [0.5, 0.1, 0.3]).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ crossbar_assign

def _sorted_start_cost(C, D):
    """The rearrangement start written out independently: heavy rows/cols on light ones."""
    r = np.empty(C.shape[0], int)
    r[np.argsort(-C.sum(1), kind="stable")] = np.argsort(D.sum(1), kind="stable")[:C.shape[0]]
    c = np.empty(C.shape[1], int)
    c[np.argsort(-C.sum(0), kind="stable")] = np.argsort(D.sum(0), kind="stable")[:C.shape[1]]
    return float(np.sum(C * D[np.ix_(r, c)]))


@pytest.mark.parametrize("seed,shape_c,shape_d", [(0, (12, 10), (12, 10)), (1, (12, 10), (16, 14)),
                                                  (2, (20, 20), (20, 20)), (3, (5, 9), (8, 9))])
def test_crossbar_assign_history_and_bounds(seed, shape_c, shape_d):
    rng = np.random.default_rng(300 + seed)
    C = rng.random(shape_c) * rng.random(shape_c[0])[:, None]
    D = np.exp(rng.normal(size=shape_d))
    r, c, hist = M.crossbar_assign(C, D)
    assert r.shape == (shape_c[0],) and c.shape == (shape_c[1],)
    assert len(set(r.tolist())) == shape_c[0] and r.max() < shape_d[0]
    assert len(set(c.tolist())) == shape_c[1] and c.max() < shape_d[1]
    assert np.all(np.diff(hist) <= 0), hist
    final = M.crossbar_cost(C, D, r, c)
    assert final == pytest.approx(hist[-1], rel=1e-12)
    identity = float(np.sum(C * D[:shape_c[0], :shape_c[1]]))
    assert final <= identity * (1 + 1e-12)
    assert final <= _sorted_start_cost(C, D) * (1 + 1e-12)
    # a single start keeps its own cost as the first history entry
    _, _, hist_sorted = M.crossbar_assign(C, D, starts=("sorted",))
    assert hist_sorted[0] == pytest.approx(_sorted_start_cost(C, D), rel=1e-12)
    assert np.all(np.diff(hist_sorted) <= 0)


@pytest.mark.parametrize("seed,shape_c,shape_d", [(0, (4, 4), (4, 4)), (1, (4, 4), (4, 4)),
                                                  (2, (3, 3), (4, 4))])
def test_crossbar_assign_separable_equals_brute_force(seed, shape_c, shape_d):
    rng = np.random.default_rng(400 + seed)
    C = np.outer(rng.random(shape_c[0]), rng.random(shape_c[1]))        # rank one
    D = np.outer(rng.random(shape_d[0]), rng.random(shape_d[1]))  # separable
    r, c, hist = M.crossbar_assign(C, D)
    assert hist[-1] == pytest.approx(_brute_crossbar(C, D), rel=1e-10)


def test_crossbar_assign_accepts_user_start_and_max_rounds_zero():
    rng = np.random.default_rng(5)
    C, D = rng.random((6, 6)), rng.random((6, 6))
    start = (np.arange(6)[::-1].copy(), np.arange(6))
    r, c, hist = M.crossbar_assign(C, D, starts=[start], max_rounds=0)
    np.testing.assert_array_equal(r, start[0])
    assert hist.shape == (1,) and hist[0] == pytest.approx(M.crossbar_cost(C, D, *start))


def test_crossbar_hand_case():
    C = np.array([[1.0, 2.0], [3.0, 4.0]])
    r, c, hist = M.crossbar_assign(C, C)
    assert (r.tolist(), c.tolist()) == ([1, 0], [1, 0])
    assert hist[-1] == 20.0  # 4 + 6 + 6 + 4 (the identity costs 30)


# ------------------------------------------------------------------------------ bottleneck

@pytest.mark.parametrize("seed,integer", [(0, False), (1, False), (2, True), (3, True), (4, True)])
def test_bottleneck_assign_matches_brute_force(seed, integer):
    rng = np.random.default_rng(500 + seed)
    cost = rng.integers(0, 6, (6, 6)).astype(float) if integer else rng.random((6, 6))
    perm = M.bottleneck_assign(cost)
    perms = _all_injections(6, 6)
    worst = cost[np.arange(6)[None, :], perms].max(axis=1)
    assert cost[np.arange(6), perm].max() == worst.min()
    # tie-break: minimum sum among the bottleneck-optimal assignments
    sums = _brute_costs(cost, perms)
    assert M.assignment_cost(cost, perm) == pytest.approx(sums[worst == worst.min()].min())


def test_bottleneck_assign_rectangular_and_hand_case():
    rng = np.random.default_rng(9)
    cost = rng.random((4, 6))
    perm = M.bottleneck_assign(cost)
    inj = _all_injections(4, 6)
    assert cost[np.arange(4), perm].max() == cost[np.arange(4)[None, :], inj].max(axis=1).min()
    # the two objectives disagree: sum-optimal [0, 1] (0 + 7, max 7) vs bottleneck [1, 0] (max 6)
    hand = np.array([[0.0, 6.0], [6.0, 7.0]])
    assert M.assign(hand).tolist() == [0, 1]
    assert M.bottleneck_assign(hand).tolist() == [1, 0]


# ------------------------------------------------------------------------------ relaxation

def test_sinkhorn_is_doubly_stochastic():
    la = jax.random.normal(jax.random.key(0), (3, 8, 8)) * 2.0
    P = M.sinkhorn(la, 50)
    assert P.shape == (3, 8, 8)
    assert bool(jnp.all(P >= 0))
    np.testing.assert_allclose(P.sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-4)
    # jit and vmap agree with the batched call
    Pj = jax.jit(jax.vmap(lambda x: M.sinkhorn(x, 50)))(la)
    np.testing.assert_allclose(Pj, P, atol=1e-6)
    # low temperature: the limit is the permutation maximizing Σ log_alpha·P
    cost = np.random.default_rng(1).random((6, 6))
    Pc = M.sinkhorn(jnp.asarray(-cost / 0.01, jnp.float32), 500)
    np.testing.assert_array_equal(np.argmax(np.asarray(Pc), axis=1), M.assign(cost))


def test_sinkhorn_wide_matrix_rows_one_columns_at_most_one():
    la = jax.random.normal(jax.random.key(1), (5, 9)) * 2.0
    P = M.sinkhorn(la, 200)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-4)
    assert float(P.sum(-2).max()) <= 1.0 + 1e-5
    assert float(P.sum()) == pytest.approx(5.0, rel=1e-4)
    # low temperature: the limit is the injection maximizing Σ log_alpha·P
    cost = np.random.default_rng(2).random((5, 9))
    Pc = M.sinkhorn(jnp.asarray(-cost / 0.01, jnp.float32), 500)
    np.testing.assert_array_equal(np.argmax(np.asarray(Pc), axis=1), M.assign(cost))


def _relaxed_linear(logits, cost, tau=0.7):
    return jnp.sum(M.sinkhorn(logits / tau, 30) * cost)


@pytest.mark.slow
def test_relaxed_objective_gradients_match_finite_differences():
    key_l, key_c, key_v = jax.random.split(jax.random.key(3), 3)
    logits = jax.random.normal(key_l, (5, 5))
    cost = jax.random.uniform(key_c, (5, 5))
    f = jax.jit(lambda lg: _relaxed_linear(lg, cost))
    grad = jax.grad(f)(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 1e-3  # non-trivial
    # central differences along random directions (float32: eps 1e-2, tolerance a few %)
    for k in jax.random.split(key_v, 4):
        v = jax.random.normal(k, logits.shape)
        eps = 1e-2
        fd = (f(logits + eps * v) - f(logits - eps * v)) / (2 * eps)
        assert float(jnp.sum(grad * v)) == pytest.approx(float(fd), rel=2e-2, abs=2e-4)
    chex.assert_numerical_grads(f, (logits,), order=1, modes=("rev",), atol=5e-3, rtol=5e-2,
                                eps=1e-2)


@pytest.mark.slow
def test_relaxed_gradients_finite_at_low_temperature():
    logits = jax.random.normal(jax.random.key(4), (6, 6)) * 10.0
    cost = jax.random.uniform(jax.random.key(5), (6, 6))
    grad = jax.grad(lambda lg: _relaxed_linear(lg, cost, tau=0.01))(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.slow
def test_relaxed_assign_within_one_percent_of_exact(seed):
    cost = np.random.default_rng(600 + seed).random((64, 64))
    exact = M.assignment_cost(cost, M.assign(cost))
    perm = M.relaxed_assign(jax.random.key(seed), cost)
    assert sorted(perm.tolist()) == list(range(64))
    assert M.assignment_cost(cost, perm) <= 1.01 * exact


@pytest.mark.slow
def test_relaxed_assign_scale_free_and_rectangular():
    rng = np.random.default_rng(700)
    cost = rng.random((64, 64))
    exact = M.assignment_cost(cost, M.assign(cost))
    perm = M.relaxed_assign(jax.random.key(1), 1e-7 * cost + 3.0)  # tiny scale plus an offset
    assert M.assignment_cost(cost, perm) <= 1.01 * exact
    rect = rng.random((10, 14))
    p = M.relaxed_assign(jax.random.key(2), rect, steps=300)
    assert p.shape == (10,) and len(set(p.tolist())) == 10 and p.max() < 14
    assert M.assignment_cost(rect, p) <= 1.01 * M.assignment_cost(rect, M.assign(rect))


def _placement_objective(x, y):
    # physical value at p is Σ_i P[i, p]·x[i]; squared error to the target layout y (non-linear)
    return lambda mats: jnp.sum((mats[0].T @ x - y) ** 2)


@pytest.mark.slow
def test_relaxed_permutations_nonlinear_objective_and_determinism():
    n = 10
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.permutation(n) / n + 0.05 * rng.random(n), jnp.float32)
    true = rng.permutation(n)
    y = jnp.zeros(n).at[true].set(x)  # y[true[i]] = x[i]
    obj = _placement_objective(x, y)
    perms, info = M.relaxed_permutations(jax.random.key(0), obj, [n], steps=400)
    np.testing.assert_array_equal(perms[0], true)
    assert info.loss_history.shape == (400,)
    assert float(info.loss_history[-1]) < float(info.loss_history[0])
    assert info.soft[0].shape == (n, n) and info.logits[0].shape == (n, n)
    np.testing.assert_allclose(info.soft[0].sum(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(info.soft[0].sum(1), 1.0, atol=1e-3)  # balancing error, float32
    # same key, same result
    perms2, info2 = M.relaxed_permutations(jax.random.key(0), obj, [n], steps=400)
    np.testing.assert_array_equal(perms2[0], perms[0])
    np.testing.assert_array_equal(info2.loss_history, info.loss_history)


def test_relaxed_permutations_gumbel_and_stochastic_objective():
    n = 6
    cost = jnp.asarray(np.random.default_rng(11).random((n, n)), jnp.float32)

    def obj(key, mats):  # a Monte Carlo objective: noisy cost, fresh noise each step
        return jnp.sum(mats[0] * (cost + 0.01 * jax.random.normal(key, cost.shape)))

    perms, info = M.relaxed_permutations(jax.random.key(1), obj, [n], steps=300, gumbel_scale=0.3,
                                         stochastic_objective=True)
    assert M.assignment_cost(np.asarray(cost), perms[0]) <= 1.01 * M.assignment_cost(
        np.asarray(cost), M.assign(np.asarray(cost)))
    _, info_b = M.relaxed_permutations(jax.random.key(2), obj, [n], steps=300, gumbel_scale=0.3,
                                       stochastic_objective=True)
    assert not np.array_equal(info.loss_history, info_b.loss_history)  # the key is used


@pytest.mark.slow
def test_relaxed_crossbar_assign():
    rng = np.random.default_rng(12)
    C = rng.random((12, 10)) * rng.random(12)[:, None]
    D = np.exp(rng.normal(0, 0.5, (16, 16))) * np.exp(-np.linspace(0, 1, 16))[:, None]
    r, c = M.relaxed_crossbar_assign(jax.random.key(0), C, D, steps=500)
    assert r.shape == (12,) and c.shape == (10,)
    assert len(set(r.tolist())) == 12 and len(set(c.tolist())) == 10
    relaxed = M.crossbar_cost(C, D, r, c)
    _, _, hist = M.crossbar_assign(C, D)
    identity = M.crossbar_cost(C, D, np.arange(12), np.arange(10))
    assert relaxed < identity
    assert relaxed <= 1.05 * hist[-1]
    # polishing the relaxed placement with the exact alternation never makes it worse
    _, _, hist_p = M.crossbar_assign(C, D, starts=[(r, c)])
    assert hist_p[0] == pytest.approx(relaxed) and hist_p[-1] <= relaxed


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("fn", [M.assign, M.bottleneck_assign])
@pytest.mark.parametrize("bad", [np.ones(3), np.ones((4, 3)), np.array([[1.0, np.nan], [0, 1]]),
                                 np.ones((2, 2, 2)), np.array([["a", "b"]])])
def test_exact_solvers_reject_bad_cost(fn, bad):
    with pytest.raises(ValueError, match="cost"):
        fn(bad)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="perm"):
        M.assignment_cost(np.ones((3, 3)), [0, 0, 1])
    with pytest.raises(ValueError, match="perm"):
        M.assignment_cost(np.ones((3, 3)), [0, 1, 3])
    with pytest.raises(ValueError, match="^u"):
        M.sort_and_pair([-1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="^v"):
        M.sort_and_pair([1.0, 2.0], [1.0, -2.0])
    with pytest.raises(ValueError, match="^v"):
        M.sort_and_pair([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="^D"):
        M.crossbar_assign(np.ones((4, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="^C"):
        M.crossbar_assign(np.ones(4), np.ones((3, 4)))
    with pytest.raises(ValueError, match="max_rounds"):
        M.crossbar_assign(np.ones((2, 2)), np.ones((2, 2)), max_rounds=-1)
    with pytest.raises(ValueError, match="starts"):
        M.crossbar_assign(np.ones((2, 2)), np.ones((2, 2)), starts=("best",))
    with pytest.raises(ValueError, match="starts"):
        M.crossbar_assign(np.ones((2, 2)), np.ones((2, 2)), starts=[([0, 0], [0, 1])])
    with pytest.raises(ValueError, match="col_perm"):
        M.crossbar_cost(np.ones((2, 2)), np.ones((2, 2)), [0, 1], [1, 1])
    with pytest.raises(ValueError, match="log_alpha"):
        M.sinkhorn(jnp.ones((4, 3)), 10)
    with pytest.raises(ValueError, match="num_iters"):
        M.sinkhorn(jnp.ones((3, 3)), 0)


@pytest.mark.parametrize("opts,name", [(dict(steps=0), "steps"), (dict(tau_end=0.0), "tau_end"),
                                       (dict(tau_start=-1.0), "tau_start"),
                                       (dict(learning_rate=float("nan")), "learning_rate"),
                                       (dict(gumbel_scale=-0.1), "gumbel_scale"),
                                       (dict(sinkhorn_iters=0), "sinkhorn_iters"),
                                       (dict(init_logits=[jnp.zeros((3, 3))]), "init_logits"),
                                       (dict(temperature=1.0), "opts")])
def test_relaxed_options_are_validated(opts, name):
    with pytest.raises(ValueError, match=name):
        M.relaxed_assign(jax.random.key(0), np.ones((4, 4)), **opts)


def test_relaxed_permutations_validates_objective_sizes_and_key():
    with pytest.raises(ValueError, match="objective"):
        M.relaxed_permutations(jax.random.key(0), lambda mats: mats[0], [3], steps=5)
    with pytest.raises(ValueError, match="objective"):
        M.relaxed_permutations(jax.random.key(0), "not callable", [3], steps=5)
    with pytest.raises(ValueError, match="sizes"):
        M.relaxed_permutations(jax.random.key(0), lambda mats: jnp.sum(mats[0]), [], steps=5)
    with pytest.raises(ValueError, match="sizes"):
        M.relaxed_permutations(jax.random.key(0), lambda mats: jnp.sum(mats[0]), [0], steps=5)
    with pytest.raises(ValueError, match="sizes"):
        M.relaxed_permutations(jax.random.key(0), lambda mats: jnp.sum(mats[0]), [(4, 3)], steps=5)
    with pytest.raises(ValueError, match="key"):
        M.relaxed_permutations(0, lambda mats: jnp.sum(mats[0]), [3], steps=5)
