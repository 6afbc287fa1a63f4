"""Read-disturb-aware placement (DESIGN.md §7.3): which logical row/column goes to which cell.

Each synapse (i, j) of a layer carries a weight factor ``C[i, j]`` = criticality × activation
(reads per inference); each physical cell (p, q) a disturb rate ``D[p, q] = 1/N_D(V_pq)`` at its
read voltage (Paul, Song, Titirsha, Das, arXiv 2201.11527). A placement sends synapse (i, j) to a
cell and costs Σ C·D. Physically only row and column permutations within a tile — and the choice
of tile — are free, so the crossbar form of the problem is

    min over injective row map r and column map c of  Σ_ij C[i, j] · D[r(i), c(j)],

with D the padded physical grid of all tiles a layer may use ([P, Q], P ≥ n, Q ≥ m).

Solvers:

* exact, NumPy/SciPy (return NumPy int arrays):
  :func:`assign` (linear assignment, Hungarian-type, ``scipy.optimize.linear_sum_assignment``),
  :func:`sort_and_pair` (the factorized cost u[i]·v[j], rearrangement inequality),
  :func:`bottleneck_assign` (min–max assignment: the reprogramming interval is set by the worst
  cell), :func:`crossbar_assign` (alternating exact row and column assignments; every step is
  exact, so the cost never increases);
* relaxed, JAX + optax: :func:`sinkhorn` / :func:`log_sinkhorn` (doubly-stochastic relaxation of
  a permutation), :func:`relaxed_permutations` (Sinkhorn-parametrized search over one or several
  permutations for any differentiable objective — e.g. a Monte Carlo accuracy loss through the
  simulator — then projected to permutations by exact assignment), and its linear and crossbar
  special cases :func:`relaxed_assign`, :func:`relaxed_crossbar_assign`.

Conventions: a permutation ``perm`` maps *logical* index i to *physical* index ``perm[i]``; costs
carry whatever unit their factors carry (C in reads, D in 1/reads gives expected failures).

This module imports only ``_xla``, numpy, scipy (optimize, sparse), jax and optax.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize as _sp_optimize
from scipy import sparse as _sp_sparse
from scipy.sparse import csgraph as _sp_csgraph

from ._xla import FAST_COMPILE_OPTIONS

__all__ = ["assign", "assignment_cost", "sort_and_pair", "bottleneck_assign", "crossbar_assign",
           "crossbar_cost", "sinkhorn", "log_sinkhorn", "RelaxedInfo", "relaxed_permutations",
           "relaxed_assign", "relaxed_crossbar_assign"]


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------

def _as_matrix(x, name: str) -> np.ndarray:
    """``x`` as a finite real float64 2-D NumPy array, or ValueError naming ``name``."""
    try:
        a = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: expected a 2-D array of real numbers, got {type(x).__name__}"
                         ) from err
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: expected a 2-D array of real numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: all entries must be finite, found {int(np.sum(~np.isfinite(a)))}"
                         " non-finite entries")
    return a


def _as_vector(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                               or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: expected a 1-D array of real numbers, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: all entries must be finite")
    return a


def _check_wide(shape, name: str) -> None:
    n, m = shape
    if n > m:
        raise ValueError(f"{name}: expected n ≤ m (at least as many columns/targets as rows/items),"
                         f" got shape {shape}; transpose it to assign the columns instead")


def _as_injection(perm, n: int, m: int, name: str) -> np.ndarray:
    """``perm`` as an int array of n distinct indices in range(m), or ValueError naming it."""
    a = np.asarray(perm)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name}: expected integer indices, got dtype {a.dtype}")
    if n and (a.min() < 0 or a.max() >= m):
        raise ValueError(f"{name}: indices must lie in [0, {m}), got range "
                         f"[{a.min()}, {a.max()}]")
    if np.unique(a).size != n:
        raise ValueError(f"{name}: indices must be distinct (an injective map), found repeats")
    return a.astype(np.int64)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int ≥ {minimum}, got {value}")
    return int(value)


def _check_float(value, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '≥ 0'}, "
                         f"got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# Exact solvers (NumPy / SciPy)
# ---------------------------------------------------------------------------------------------

def assign(cost) -> np.ndarray:
    """Exact minimum-cost assignment of rows to columns.

    Solves min over injective ``perm`` of Σ_i cost[i, perm[i]] with
    ``scipy.optimize.linear_sum_assignment`` (shortest augmenting paths, Crouse 2016). For a square
    matrix ``perm`` is a permutation; for a rectangular one (n ≤ m) every row gets a distinct
    column and m − n columns stay unused (e.g. n logical rows into m physical rows).

    Args:
        cost: [n, m] real, finite, n ≤ m (any unit).

    Returns:
        perm: [n] int64 NumPy array, ``perm[i]`` = column given to row i.

    Raises:
        ValueError: naming ``cost`` if it is not 2-D, has non-finite entries or n > m.

    Example:
        >>> assign([[4.0, 1.0], [2.0, 3.0]]).tolist()
        [1, 0]
    """
    c = _as_matrix(cost, "cost")
    _check_wide(c.shape, "cost")
    rows, cols = _sp_optimize.linear_sum_assignment(c)
    perm = np.empty(c.shape[0], np.int64)
    perm[rows] = cols
    return perm


def assignment_cost(cost, perm) -> float:
    """Σ_i cost[i, perm[i]] for an injective ``perm`` (see :func:`assign`).

    Args:
        cost: [n, m] real, finite.
        perm: [n] distinct ints in range(m).

    Returns:
        The total cost (Python float, unit of ``cost``).
    """
    c = _as_matrix(cost, "cost")
    p = _as_injection(perm, c.shape[0], c.shape[1], "perm")
    return float(np.sum(c[np.arange(c.shape[0]), p]))


def _pair_sorted(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Largest u gets smallest v (stable sorts, so ties keep index order)."""
    order_u = np.argsort(-u, kind="stable")
    order_v = np.argsort(v, kind="stable")
    perm = np.empty(u.shape[0], np.int64)
    perm[order_u] = order_v[:u.shape[0]]
    return perm


def sort_and_pair(u, v) -> np.ndarray:
    """Optimal assignment for the factorized cost cost[i, j] = u[i]·v[j], u, v ≥ 0.

    By the rearrangement inequality Σ_i u[i]·v[perm[i]] is smallest when the largest u is paired
    with the smallest v, the second largest with the second smallest, and so on; with more targets
    than items (len(v) > len(u)) the len(u) smallest v are used (u ≥ 0 makes any larger v no
    better). O((n + m) log(n + m)) instead of the O(n³) of :func:`assign`; ties are broken by
    index (stable sorts).

    Args:
        u: [n] item weights, finite, ≥ 0 (e.g. criticality × reads of logical rows).
        v: [m] target rates, finite, ≥ 0, m ≥ n (e.g. disturb rate of physical rows).

    Returns:
        perm: [n] int64, ``perm[i]`` = target of item i.

    Raises:
        ValueError: naming ``u`` or ``v`` if not 1-D, not finite, negative, or len(v) < len(u).

    Example:
        >>> sort_and_pair([1.0, 3.0, 2.0], [0.5, 0.1, 0.3]).tolist()
        [0, 1, 2]
    """
    a = _as_vector(u, "u")
    b = _as_vector(v, "v")
    if np.any(a < 0):
        raise ValueError(f"u: entries must be ≥ 0 (the rearrangement argument needs it), got "
                         f"min {a.min()}")
    if np.any(b < 0):
        raise ValueError(f"v: entries must be ≥ 0 (the rearrangement argument needs it), got "
                         f"min {b.min()}")
    if b.shape[0] < a.shape[0]:
        raise ValueError(f"v: expected at least len(u) = {a.shape[0]} entries, got {b.shape[0]}")
    return _pair_sorted(a, b)


def _has_perfect_matching(mask: np.ndarray) -> bool:
    """Whether every row of the bipartite graph ``mask`` [n, m] can be matched (Hopcroft–Karp)."""
    graph = _sp_sparse.csr_matrix(mask.astype(np.int8))
    match = _sp_csgraph.maximum_bipartite_matching(graph, perm_type="column")
    return bool(np.all(match >= 0))


def bottleneck_assign(cost) -> np.ndarray:
    """Exact min–max assignment: minimize max_i cost[i, perm[i]].

    The maximum-reprogramming-interval variant of placement: the interval is set by the worst
    cell, so the largest single cost matters, not the sum. The bottleneck value t* is found by
    binary search over the sorted distinct entries of ``cost``: t is feasible iff the bipartite
    graph {(i, j): cost[i, j] ≤ t} has a matching covering every row (Hopcroft–Karp,
    ``scipy.sparse.csgraph.maximum_bipartite_matching``). Among all bottleneck-optimal assignments
    the one of minimum *sum* is returned: entries above t* are forbidden (set to +inf) and
    ``scipy.optimize.linear_sum_assignment`` solves the rest exactly.

    Args:
        cost: [n, m] real, finite, n ≤ m.

    Returns:
        perm: [n] int64, ``perm[i]`` = column given to row i.

    Raises:
        ValueError: naming ``cost`` if it is not 2-D, not finite or n > m.

    Example:
        >>> bottleneck_assign([[0.0, 6.0], [6.0, 7.0]]).tolist()  # max 6; sum-optimal [0, 1] has 7
        [1, 0]
    """
    c = _as_matrix(cost, "cost")
    _check_wide(c.shape, "cost")
    values = np.unique(c)  # sorted
    lo, hi = 0, values.size - 1  # values[hi] (every edge present) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if _has_perfect_matching(c <= values[mid]):
            hi = mid
        else:
            lo = mid + 1
    t_star = values[lo]
    masked = np.where(c <= t_star, c, np.inf)
    rows, cols = _sp_optimize.linear_sum_assignment(masked)
    perm = np.empty(c.shape[0], np.int64)
    perm[rows] = cols
    return perm


def crossbar_cost(C, D, row_perm, col_perm) -> float:
    """Placement cost Σ_ij C[i, j]·D[row_perm[i], col_perm[j]].

    Args:
        C: [n, m] logical weight factors (criticality × reads per inference).
        D: [P, Q] physical disturb rates 1/N_D (1/reads), P ≥ n, Q ≥ m.
        row_perm: [n] distinct physical rows; col_perm: [m] distinct physical columns.

    Returns:
        The cost (Python float; expected failures per inference for the units above).
    """
    c = _as_matrix(C, "C")
    d = _as_matrix(D, "D")
    _check_crossbar_shapes(c.shape, d.shape)
    r = _as_injection(row_perm, c.shape[0], d.shape[0], "row_perm")
    q = _as_injection(col_perm, c.shape[1], d.shape[1], "col_perm")
    return float(np.sum(c * d[np.ix_(r, q)]))


def _check_crossbar_shapes(c_shape, d_shape) -> None:
    if d_shape[0] < c_shape[0] or d_shape[1] < c_shape[1]:
        raise ValueError(f"D: the physical grid must be at least as large as C {c_shape} in both "
                         f"dimensions, got shape {d_shape}")


def _alternate(c, d, row_perm, col_perm, max_rounds):
    """Alternating exact row/column assignments from a start; returns perms and cost history."""
    cost = float(np.sum(c * d[np.ix_(row_perm, col_perm)]))
    history = [cost]
    for _ in range(max_rounds):
        improved = False
        for axis in (0, 1):
            if axis == 0:  # rows, columns fixed: M[i, p] = Σ_j C[i, j]·D[p, col_perm[j]]
                m_cost = c @ d[:, col_perm].T
            else:          # columns, rows fixed: N[j, q] = Σ_i C[i, j]·D[row_perm[i], q]
                m_cost = c.T @ d[row_perm, :]
            rows, cols = _sp_optimize.linear_sum_assignment(m_cost)
            new = np.empty(m_cost.shape[0], np.int64)
            new[rows] = cols
            cand_r, cand_c = (new, col_perm) if axis == 0 else (row_perm, new)
            new_cost = float(np.sum(c * d[np.ix_(cand_r, cand_c)]))
            # Accept strict improvements only (beyond rounding), so ties cannot cycle and the
            # history is non-increasing even in floating point.
            if new_cost < cost - 1e-12 * max(abs(cost), 1e-300):
                row_perm, col_perm, cost = cand_r, cand_c, new_cost
                improved = True
            history.append(cost)
        if not improved:
            break
    return row_perm, col_perm, np.asarray(history)


def crossbar_assign(C, D, *, max_rounds: int = 50,
                    starts: Sequence[Any] = ("sorted", "identity")):
    """Crossbar placement by alternating exact row and column assignments.

    Places logical matrix ``C`` [n, m] on the physical grid ``D`` [P, Q] (P ≥ n, Q ≥ m: the grid
    of all tiles a layer may use, so tile choice is included by letting rows and columns move
    anywhere in it), minimizing Σ_ij C[i, j]·D[row_perm[i], col_perm[j]]. With the columns fixed
    the problem in the rows is a linear assignment with cost M[i, p] = Σ_j C[i, j]·D[p, col_perm[j]]
    (solved exactly); then the columns with the rows fixed; repeated until a round brings no
    improvement or ``max_rounds`` rounds. Each half-step is exact given the other map, so the cost
    never increases (only strict improvements are accepted). The result is a local optimum
    (exact when, e.g., C is rank one and D separable, D[p, q] = a_p·b_q, C, D ≥ 0).

    Starts (the best final result is returned; ties go to the earlier start):

    * ``"sorted"`` — rows of C by row sum, descending, paired with physical rows by row sum of D,
      ascending (the rearrangement pairing of :func:`sort_and_pair`), likewise for columns;
    * ``"identity"`` — logical row i on physical row i, column j on column j;
    * a pair ``(row_perm, col_perm)`` — e.g. the output of :func:`relaxed_crossbar_assign`.

    With the default starts the result is never worse than the sorted or the identity placement.

    Args:
        C: [n, m] real, finite weight factors (criticality × reads per inference).
        D: [P, Q] real, finite disturb rates 1/N_D(V) (1/reads), P ≥ n, Q ≥ m.
        max_rounds: maximum number of (row, column) rounds per start, ≥ 0.
        starts: non-empty sequence of the starts above.

    Returns:
        (row_perm [n] int64, col_perm [m] int64, cost_history [1 + 2·rounds] float64): the cost
        of the chosen start, then after every half-step (rows, columns, rows, …); non-increasing.

    Raises:
        ValueError: naming ``C``, ``D``, ``max_rounds`` or ``starts`` on bad input.

    Example:
        >>> C = np.array([[1.0, 2.0], [3.0, 4.0]]); D = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> r, c, h = crossbar_assign(C, D)
        >>> r.tolist(), c.tolist(), float(h[-1])
        ([1, 0], [1, 0], 20.0)
    """
    c = _as_matrix(C, "C")
    d = _as_matrix(D, "D")
    _check_crossbar_shapes(c.shape, d.shape)
    max_rounds = _check_int(max_rounds, "max_rounds", 0)
    if isinstance(starts, str) or not isinstance(starts, Sequence) or len(starts) == 0:
        raise ValueError(f"starts: expected a non-empty sequence of 'sorted', 'identity' or "
                         f"(row_perm, col_perm) pairs, got {starts!r}")
    n, m = c.shape
    best = None
    for k, start in enumerate(starts):
        if isinstance(start, str) and start == "sorted":
            r0 = _pair_sorted(c.sum(axis=1), d.sum(axis=1))
            q0 = _pair_sorted(c.sum(axis=0), d.sum(axis=0))
        elif isinstance(start, str) and start == "identity":
            r0, q0 = np.arange(n), np.arange(m)
        elif not isinstance(start, str) and isinstance(start, Sequence) and len(start) == 2:
            r0 = _as_injection(start[0], n, d.shape[0], f"starts[{k}][0] (row_perm)")
            q0 = _as_injection(start[1], m, d.shape[1], f"starts[{k}][1] (col_perm)")
        else:
            raise ValueError(f"starts[{k}]: expected 'sorted', 'identity' or a (row_perm, "
                             f"col_perm) pair, got {start!r}")
        result = _alternate(c, d, r0, q0, max_rounds)
        if best is None or result[2][-1] < best[2][-1]:
            best = result
    return best


# ---------------------------------------------------------------------------------------------
# Relaxed search (JAX + optax)
# ---------------------------------------------------------------------------------------------

def _sinkhorn_potentials(log_alpha, g0, num_iters: int):
    """Log-domain Sinkhorn from column potential ``g0``: returns (log P, g).

    log P = log_alpha − f[..., :, None] − g[..., None, :]. Each of the ``num_iters`` (≥ 1)
    iterations makes the rows sum to one, then projects the columns: onto column sums = 1 for a
    square matrix; onto column sums ≤ 1 (KL projection, g = max(lse, 0): only over-full columns
    are scaled down) for a wide one, n < m. The columns end exactly feasible, the rows up to the
    balancing error.
    """
    capped = log_alpha.shape[-2] < log_alpha.shape[-1]

    def body(carry, _):
        _, g = carry
        f = jax.nn.logsumexp(log_alpha - g[..., None, :], axis=-1)
        g = jax.nn.logsumexp(log_alpha - f[..., :, None], axis=-2)
        if capped:
            g = jnp.maximum(g, 0.0)
        return (f, g), None

    f0 = jnp.zeros(log_alpha.shape[:-1], log_alpha.dtype)
    (f, g), _ = jax.lax.scan(body, (f0, g0), None, length=num_iters)
    return log_alpha - f[..., :, None] - g[..., None, :], g


def _check_wide_logits(log_alpha, name: str) -> None:
    shape = jnp.shape(log_alpha)
    if len(shape) < 2 or shape[-2] > shape[-1] or shape[-2] == 0:
        raise ValueError(f"{name}: expected a matrix [..., n, m] with 1 ≤ n ≤ m (square: doubly "
                         f"stochastic), got shape {shape}")


def log_sinkhorn(log_alpha, num_iters: int = 20) -> jax.Array:
    """Log of :func:`sinkhorn` (finite even where P underflows; use it for projections).

    Args:
        log_alpha: [..., n, m] real scores (logits / temperature), n ≤ m.
        num_iters: Sinkhorn iterations (static int ≥ 1).

    Returns:
        log P, [..., n, m], same dtype as ``log_alpha`` (float for integer input).
    """
    _check_wide_logits(log_alpha, "log_alpha")
    num_iters = _check_int(num_iters, "num_iters", 1)
    la = jnp.asarray(log_alpha)
    if not jnp.issubdtype(la.dtype, jnp.floating):
        la = la.astype(jnp.result_type(float))
    g0 = jnp.zeros(la.shape[:-2] + la.shape[-1:], la.dtype)
    log_p, _ = _sinkhorn_potentials(la, g0, num_iters)
    return log_p


def sinkhorn(log_alpha, num_iters: int = 20) -> jax.Array:
    """Doubly-stochastic relaxation of a permutation by log-domain Sinkhorn normalization.

    Alternately normalizes the rows and the columns of exp(log_alpha) in log space (Sinkhorn
    1964; Mena et al., "Learning latent permutations with Gumbel-Sinkhorn networks", ICLR 2018),
    ``num_iters`` times, ending with the columns: the result's columns sum to one exactly and its
    rows up to the (geometrically shrinking) balancing error. As log_alpha/τ with τ → 0 the limit
    is the permutation matrix maximizing Σ log_alpha·P. A wide matrix (n < m, the relaxation of an
    injective map of n items into m places) is balanced to row sums 1 and column sums ≤ 1 instead
    (only over-full columns are scaled down). Differentiable (unrolled), vmappable, jittable
    (``num_iters`` static).

    Args:
        log_alpha: [..., n, m] real scores (logits / temperature), n ≤ m (usually n = m).
        num_iters: Sinkhorn iterations (static int ≥ 1).

    Returns:
        P, [..., n, m], entries in [0, 1]; rows sum to one, columns to one (n = m) or at most one.

    Example:
        >>> P = sinkhorn(jnp.array([[2.0, 0.0], [0.0, 2.0]]), 20)
        >>> bool(jnp.allclose(P.sum(0), 1.0) and jnp.allclose(P.sum(1), 1.0, atol=1e-5))
        True
    """
    return jnp.exp(log_sinkhorn(log_alpha, num_iters))


class RelaxedInfo(NamedTuple):
    """Diagnostics of :func:`relaxed_permutations`.

    Attributes:
        loss_history: [steps] objective at each step's (noisy, current-temperature) soft matrices,
            before that step's update.
        soft: tuple of [n_k, m_k] final relaxed matrices (temperature ``tau_end``, no noise).
        logits: tuple of [n_k, m_k] final logits.
    """
    loss_history: jax.Array
    soft: tuple
    logits: tuple


@dataclasses.dataclass(frozen=True)
class _UserObjective:
    """Hashable adapter ``(key, mats, args) -> fn(mats)`` or ``fn(key, mats)`` (jit cache key)."""
    fn: Callable
    stochastic: bool

    def __call__(self, key, mats, args):
        del args
        return self.fn(key, mats) if self.stochastic else self.fn(mats)


def _search_impl(key, logits0, args, lr, tau_start, tau_end, gumbel_scale, *, objective,
                 steps, sinkhorn_iters):
    """The optimization loop: one ``lax.scan`` over ``steps`` Adam steps."""
    num = len(logits0)
    dtype = logits0[0].dtype
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    ratio = tau_end / tau_start
    denom = max(steps - 1, 1)

    def loss_fn(logits, g0s, tau, noises, key_obj):
        outs = [_sinkhorn_potentials((lg + nz) / tau, g0, sinkhorn_iters)
                for lg, nz, g0 in zip(logits, noises, g0s)]
        value = objective(key_obj, tuple(jnp.exp(lp) for lp, _ in outs), args)
        return value, tuple(g for _, g in outs)

    def step(carry, xs):
        logits, opt_state, g0s = carry
        t, key_t = xs
        tau = tau_start * ratio ** (t.astype(dtype) / denom)
        key_noise, key_obj = jax.random.split(key_t)
        scale = gumbel_scale * tau / tau_start
        noises = tuple(scale * jax.random.gumbel(k, lg.shape, dtype)
                       for k, lg in zip(jax.random.split(key_noise, num), logits))
        (value, g_new), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            logits, jax.lax.stop_gradient(g0s), tau, noises, key_obj)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        logits = optax.apply_updates(logits, updates)
        return (logits, opt_state, jax.lax.stop_gradient(g_new)), value

    g0s = tuple(jnp.zeros(lg.shape[-1], dtype) for lg in logits0)
    xs = (jnp.arange(steps), jax.random.split(key, steps))
    (logits, _, g_fin), history = jax.lax.scan(step, (logits0, optimizer.init(logits0), g0s), xs)
    final = tuple(_sinkhorn_potentials(lg / tau_end, g, 10 * sinkhorn_iters)[0]
                  for lg, g in zip(logits, g_fin))
    return history, final, logits


#: Compiled at LLVM optimization level 1 (:data:`nvjax._xla.FAST_COMPILE_OPTIONS`): the same run
#: time as XLA's default level on the 1000-step search (64×64 assignment: 1.1 s), a faster compile,
#: and it keeps that run time where a process asks XLA for level 0 (the test suite: 11 s there).
_search = jax.jit(_search_impl, static_argnames=("objective", "steps", "sinkhorn_iters"),
                  compiler_options=FAST_COMPILE_OPTIONS)


def _check_shape_entry(entry, k: int) -> tuple:
    """An entry of ``sizes``: n (square) or (n, m) with 1 ≤ n ≤ m."""
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        n = _check_int(entry, f"sizes[{k}]", 1)
        return (n, n)
    if isinstance(entry, Sequence) and len(entry) == 2:
        n = _check_int(entry[0], f"sizes[{k}][0]", 1)
        m = _check_int(entry[1], f"sizes[{k}][1]", 1)
        if n > m:
            raise ValueError(f"sizes[{k}]: expected (n, m) with n ≤ m, got {tuple(entry)}")
        return (n, m)
    raise ValueError(f"sizes[{k}]: expected an int n ≥ 1 or a pair (n, m) with 1 ≤ n ≤ m, got "
                     f"{entry!r}")


def _relaxed(key, objective, args, sizes, *, steps, learning_rate, tau_start, tau_end,
             gumbel_scale, sinkhorn_iters, init_logits):
    """Validated driver shared by the public relaxed solvers."""
    if isinstance(sizes, (numbers.Integral, str)) or not isinstance(sizes, Sequence) \
            or len(sizes) == 0:
        raise ValueError(f"sizes: expected a non-empty sequence of ints n or pairs (n, m), got "
                         f"{sizes!r}")
    shapes = tuple(_check_shape_entry(s, k) for k, s in enumerate(sizes))
    steps = _check_int(steps, "steps", 1)
    sinkhorn_iters = _check_int(sinkhorn_iters, "sinkhorn_iters", 1)
    lr = _check_float(learning_rate, "learning_rate", positive=True)
    t0 = _check_float(tau_start, "tau_start", positive=True)
    t1 = _check_float(tau_end, "tau_end", positive=True)
    gs = _check_float(gumbel_scale, "gumbel_scale", positive=False)
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise ValueError(f"key: expected a jax.random key (jax.random.key(seed)), got {key!r}")
    dtype = jnp.result_type(float)
    if init_logits is None:
        logits0 = tuple(jnp.zeros(shape, dtype) for shape in shapes)
    else:
        if not isinstance(init_logits, Sequence) or len(init_logits) != len(shapes):
            raise ValueError(f"init_logits: expected a sequence of {len(shapes)} arrays (one per "
                             f"entry of sizes), got {type(init_logits).__name__}")
        logits0 = []
        for k, (lg, shape) in enumerate(zip(init_logits, shapes)):
            lg = jnp.asarray(lg, dtype)
            if lg.shape != shape:
                raise ValueError(f"init_logits[{k}]: expected shape {shape}, got {lg.shape}")
            if not bool(jnp.all(jnp.isfinite(lg))):
                raise ValueError(f"init_logits[{k}]: all entries must be finite")
            logits0.append(lg)
        logits0 = tuple(logits0)
    # The objective must return a real scalar: check by abstract evaluation before compiling.
    mats_spec = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape in shapes)
    try:
        out = jax.eval_shape(objective, key, mats_spec, args)
    except Exception as err:
        raise ValueError(f"objective: calling it on relaxed matrices of shapes {list(shapes)} "
                         f"failed: {type(err).__name__}: {err}") from err
    if getattr(out, "shape", None) != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"objective: must return a real scalar, got "
                         f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}")
    history, final_log, logits = _search(
        key, logits0, args, jnp.asarray(lr, dtype), jnp.asarray(t0, dtype), jnp.asarray(t1, dtype),
        jnp.asarray(gs, dtype), objective=objective, steps=steps, sinkhorn_iters=sinkhorn_iters)
    perms = tuple(assign(-np.asarray(lp, np.float64)) for lp in final_log)
    info = RelaxedInfo(loss_history=history, soft=tuple(jnp.exp(lp) for lp in final_log),
                       logits=logits)
    return perms, info


_DEFAULTS = dict(steps=1000, learning_rate=0.05, tau_start=1.0, tau_end=0.1, gumbel_scale=0.0,
                 sinkhorn_iters=50, init_logits=None)


def relaxed_permutations(key, objective: Callable, sizes: Sequence[Any], *,
                         steps: int = 1000, learning_rate: float = 0.05, tau_start: float = 1.0,
                         tau_end: float = 0.1, gumbel_scale: float = 0.0,
                         sinkhorn_iters: int = 50, init_logits=None,
                         stochastic_objective: bool = False):
    """Search permutations minimizing any differentiable objective through a Sinkhorn relaxation.

    Each permutation k is relaxed to the doubly-stochastic matrix
    P_k = sinkhorn((logits_k + g·ε_k)/τ), ε_k ~ Gumbel (Gumbel-Sinkhorn, Mena et al., ICLR 2018),
    and ``objective((P_1, …, P_K))`` is minimized over the logits with ``optax.adam`` (learning
    rate decaying from ``learning_rate`` to 0 on a cosine schedule). The temperature τ falls
    geometrically from ``tau_start`` to ``tau_end`` over the steps; the noise scale g falls in
    proportion, g = gumbel_scale·τ/tau_start. Each step's Sinkhorn (``sinkhorn_iters`` log-domain
    iterations) is warm-started from the previous step's column potentials (held constant for
    differentiation), so the balancing error keeps shrinking across steps and the objective cannot
    profit from unbalanced matrices even at large logits/τ. The whole search is one jitted
    ``lax.scan`` (compiled once per objective, sizes, ``steps`` and ``sinkhorn_iters``; the numeric
    hyper-parameters are traced). At the end each P_k (at ``tau_end``, no noise) is projected to
    the permutation maximizing Σ log P_k over it (exact assignment on −log P_k).

    An entry (n, m) of ``sizes`` with n < m relaxes an *injective* map of n items into m places
    (e.g. a layer's rows into the physical rows of several tiles): P_k is [n, m] with rows summing
    to one and columns to at most one (see :func:`sinkhorn`); this is better conditioned than
    padding with dummy rows, whose many equivalent fillings stall the search.

    Args:
        key: jax.random key (Gumbel noise; per-step objective keys).
        objective: ``objective(mats) -> scalar`` (or ``objective(key, mats)`` with
            ``stochastic_objective=True``, key fresh each step), mats a tuple of [n_k, m_k]
            relaxed matrices, ``mats[k][i, p]`` = weight of logical i on physical p.
            Any differentiable, possibly non-linear JAX function; it is minimized.
        sizes: [K] entries n_k (an n×n permutation) or (n_k, m_k), 1 ≤ n_k ≤ m_k.
        steps: optimization steps (static).
        learning_rate: initial Adam learning rate (logit units per step).
        tau_start, tau_end: temperatures at the first and last step, > 0.
        gumbel_scale: Gumbel noise scale at the first step, ≥ 0 (0: deterministic search).
        sinkhorn_iters: Sinkhorn iterations per step (static).
        init_logits: optional tuple of K [n_k, m_k] starting logits (default zeros: uniform P).
        stochastic_objective: whether ``objective`` takes a key first.

    Returns:
        (perms, info): perms a tuple of K [n_k] int64 NumPy arrays (``perm[i]`` = physical index
        of logical i, distinct); info a :class:`RelaxedInfo`.

    Raises:
        ValueError: naming the offending argument (sizes, steps, learning_rate, tau_start,
            tau_end, gumbel_scale, sinkhorn_iters, init_logits, key, objective).

    Example:
        >>> cost = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        >>> (p,), info = relaxed_permutations(jax.random.key(0), lambda m: jnp.sum(m[0] * cost),
        ...                                   [2], steps=50)
        >>> p.tolist()
        [0, 1]
    """
    if not callable(objective):
        raise ValueError(f"objective: expected a callable, got {type(objective).__name__}")
    return _relaxed(key, _UserObjective(objective, bool(stochastic_objective)), (), sizes,
                    steps=steps, learning_rate=learning_rate, tau_start=tau_start,
                    tau_end=tau_end, gumbel_scale=gumbel_scale, sinkhorn_iters=sinkhorn_iters,
                    init_logits=init_logits)


def _linear_objective(key, mats, cost):
    del key
    return jnp.sum(mats[0] * cost)


def _bilinear_objective(key, mats, args):
    del key
    c, d = args
    p_r, p_c = mats  # [n, P], [m, Q]
    return jnp.sum((p_r.T @ c @ p_c) * d)


def _standardize(x: np.ndarray):
    mean = float(np.mean(x))
    std = float(np.std(x))
    return mean, (std if std > 0 else 1.0)


def _check_opts(opts, where: str) -> dict:
    unknown = sorted(set(opts) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"opts: unknown option(s) {unknown} for {where}; expected a subset of "
                         f"{sorted(_DEFAULTS)}")
    return {**_DEFAULTS, **opts}


def relaxed_assign(key, cost, **opts) -> np.ndarray:
    """Linear assignment by the relaxed search (a check of :func:`relaxed_permutations`).

    Minimizes Σ P·cost over relaxed P (doubly stochastic; rows 1, columns ≤ 1 when n < m), then
    projects to an assignment. The cost is standardized internally ((cost − mean)/std, which
    leaves the optimal assignment unchanged), so the defaults work at any cost scale. With the
    defaults, random 64×64 uniform costs come out at the exact optimum of :func:`assign` or within
    a small fraction of a percent of it (≈ 1 s on 2 CPU cores). For linear costs :func:`assign` is
    exact and faster; this exists to validate the relaxation that non-linear objectives use.

    Args:
        key: jax.random key.
        cost: [n, m] real, finite, n ≤ m.
        **opts: keyword options of :func:`relaxed_permutations` (steps, learning_rate, tau_start,
            tau_end, gumbel_scale, sinkhorn_iters, init_logits as a 1-tuple of an [n, m] array).

    Returns:
        perm: [n] int64, ``perm[i]`` = column given to row i.

    Raises:
        ValueError: naming ``cost``, ``opts`` or the offending option.
    """
    c = _as_matrix(cost, "cost")
    _check_wide(c.shape, "cost")
    opts = _check_opts(opts, "relaxed_assign")
    mean, std = _standardize(c)
    cn = jnp.asarray((c - mean) / std, jnp.result_type(float))
    (perm,), _ = _relaxed(key, _linear_objective, cn, [c.shape], **opts)
    return perm


def relaxed_crossbar_assign(key, C, D, **opts):
    """Crossbar placement by the relaxed search over a row and a column map.

    Minimizes Σ_pq (P_rᵀ C P_c)[p, q]·D[p, q] over relaxed P_r [n, P] and P_c [m, Q] (rows sum to
    one, columns to at most one — doubly stochastic when square), the relaxation of
    Σ_ij C[i, j]·D[row_perm[i], col_perm[j]]. The objective is bilinear (non-convex), so the
    result is a good placement, not a certified optimum; pass it as a start to
    :func:`crossbar_assign` to polish it. C is scaled by its RMS and D standardized internally
    (neither changes the minimizer).

    Args:
        key: jax.random key.
        C: [n, m] real, finite weight factors.
        D: [P, Q] real, finite disturb rates, P ≥ n, Q ≥ m.
        **opts: keyword options of :func:`relaxed_permutations`.

    Returns:
        (row_perm [n] int64, col_perm [m] int64).

    Raises:
        ValueError: naming ``C``, ``D``, ``opts`` or the offending option.
    """
    c = _as_matrix(C, "C")
    d = _as_matrix(D, "D")
    _check_crossbar_shapes(c.shape, d.shape)
    opts = _check_opts(opts, "relaxed_crossbar_assign")
    c_rms = float(np.sqrt(np.mean(c ** 2))) or 1.0
    d_mean, d_std = _standardize(d)
    dtype = jnp.result_type(float)
    args = (jnp.asarray(c / c_rms, dtype), jnp.asarray((d - d_mean) / d_std, dtype))
    (rows, cols), _ = _relaxed(key, _bilinear_objective, args,
                               [(c.shape[0], d.shape[0]), (c.shape[1], d.shape[1])], **opts)
    return rows, cols
