"""IR drop in one crossbar tile: the per-cell voltage map for given conductances and inputs.

Circuit (DESIGN.md §5): word line i is driven at its column-0 end with ``v_in[i]`` and is open at
the far end; bit line j is held at 0 V (virtual ground of the sense amplifier) below its last
row. Every wire segment between neighbouring cells — and between the driver / the sense amplifier
and the first cell — has resistance ``r_wire`` (Ω). Cell (i, j) of conductance G_ij (µS) carries
I_ij = G_ij·(V^row_ij − V^col_ij); the cell voltage is V^row − V^col.

Given the cell currents, each wire is a resistor ladder with closed-form node voltages (cumulative
sums of currents, :func:`wire_voltages`): V^row = v_in − r·I·A and V^col = r·B·I with the ladder
matrices A (C × C) and B (R × R) of :func:`_ladders`. Ohm's law at every cell then makes the
network one linear system in the cell currents (the formulation of Sandia CrossSim's parasitic
solver, written here from the circuit equations):

    (1 + r·G ⊙ K) I = G ⊙ v_in,    K(I) = I·A + B·I.

The coupling operator r·G ⊙ K has real eigenvalues in [0, ρ̄] (it is similar to the symmetric
positive semi-definite r·√G ⊙ K(√G ⊙ ·)), with the bound

    ρ̄ = r·max(G)·(λ_max(A) + λ_max(B)),  λ_max of an n-segment ladder = 1/(4·sin²(π/(4n + 2)))
      ≈ 0.405·r·max(G)·(R² + C²)                                             (:func:`coupling`).

The plain fixed point I ← G ⊙ V(I) (relaxation factor ω = 1) converges only while the spectral
radius is below 1 — at 256 × 256 and 1 Ω that is G ≲ 19 µS, and all cells at 25 µS diverge —
so the solver does not rely on it:

* :func:`voltages` — relaxation I ← I + α_k·(G ⊙ V(I) − I) + momentum, with the step sizes α_k of
  a Chebyshev semi-iteration on the eigenvalue interval [1, 1 + ρ̄]: it converges for every
  r_wire ≥ 0 and G ≥ 0, the residual shrinking at least by (√κ − 1)/(√κ + 1) per step,
  κ = 1 + ρ̄ (about 0.68 at 512 × 512, 5 Ω, 25 µS: ~40 steps to a 5e-6 residual). A growing or
  non-finite residual (which cannot happen in exact arithmetic for G ≥ 0: a guard against
  rounding and invalid input such as negative or NaN conductances) restarts the iteration from
  its best iterate with the relaxation factor backed off, ω ← 0.98·ω (Sandia CrossSim's remedy
  for its plain iteration). The result is checked
  against Ohm's law at every cell; a solve that does not meet ``tol`` within ``max_iter`` steps
  reports ``converged=False`` and returns NaN voltages, never a finite wrong number. A fixed
  number of steps (``num_iter``, ``fori_loop``) is reverse-mode differentiable.
* :func:`voltages_first_order` — one step from the ideal currents G·v_in (first-order form);
  :func:`first_order_transfer` — its column currents as a linear map of the drives. Its error
  is about ρ²/(1 + ρ) of the cell voltages, ρ ≤ ρ̄ the coupling's largest eigenvalue (≈ ρ̄ times
  mean(G)/max(G)); it is a valid model only for small ρ: ρ ≲ 0.1 for 1 %, ρ ≲ 0.25 for 5 %
  (:func:`first_order_error`, with the table measured against a nodal solve;
  :func:`check_first_order` warns beyond 5 %). At the default 256 × 256 tile and 1 Ω it is off
  by 25–75 %.

Units: conductance µS, voltage V, resistance Ω, current µA. This module imports only jax and
numpy.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["IRDropResult", "wire_voltages", "voltages_first_order", "first_order_transfer",
           "voltages", "coupling", "first_order_error", "check_first_order"]


class IRDropResult(NamedTuple):
    """Solver output.

    Attributes:
        v_cell: voltage across each cell, V, [R, C], of the best iterate (the one with the
            smallest residual seen); NaN where the ``while_loop`` solve did not converge (with
            ``num_iter``: the best of the ``num_iter`` iterates, whatever the flag).
        converged: whether Ohm's law holds at every cell to ``tol`` (``residual <= tol``, finite).
        num_iter: iterations taken: ``max_iter`` when the cap ended the ``while_loop``, fewer when
            the residual met the stopping level, stopped shrinking (float32 rounding) or was not
            finite.
        residual: max_ij |G_ij·V_ij − I_ij| / max_ij |G_ij·v_in,i| of the solution (NaN if it is
            not finite).
    """
    v_cell: jax.Array
    converged: jax.Array
    num_iter: jax.Array
    residual: jax.Array


def _ladders(rows: int, cols: int, dtype):
    """Resistor-ladder matrices: A[k, j] = min(k, j) + 1 (word-line segments between the driver and
    node j that carry cell k's current), B[i, k] = R − max(i, k) (bit-line segments between node i
    and the sense amplifier that carry cell k's current)."""
    kc = jnp.arange(cols)
    a = (jnp.minimum(kc[:, None], kc[None, :]) + 1).astype(dtype)
    kr = jnp.arange(rows)
    b = (rows - jnp.maximum(kr[:, None], kr[None, :])).astype(dtype)
    return a, b


def _ladder_lambda_max(n: int) -> float:
    """Largest eigenvalue of the n × n ladder matrix min(k, j) + 1 (and of R − max(i, k)).

    The ladder matrix is L·Lᵀ with L the lower-triangular matrix of ones, so its inverse is the
    tridiagonal (−1, 2, −1) with a last diagonal entry 1, whose eigenvalues are
    2 − 2·cos((2m − 1)·π/(2n + 1)), m = 1..n.
    """
    return 1.0 / (4.0 * math.sin(math.pi / (4 * n + 2)) ** 2)


_HI = jax.lax.Precision.HIGHEST


def coupling(g, r_wire):
    """ρ̄ = r·max(G)·(λ_max(A) + λ_max(B)): bound on the spectral radius of the wire coupling.

    ρ̄ ≈ 0.405·r·max(G)·(R² + C²) (r in Ω, G in µS scaled to S). The plain fixed-point iteration
    converges only for ρ̄ < 1; the first-order form's error grows like ρ̄ (:func:`first_order_error`);
    :func:`voltages` needs about √(1 + ρ̄)·ln(1/tol)/2 steps.

    Args:
        g: conductances, µS, [..., R, C] (the bound is taken over the last two axes).
        r_wire: Ω per segment.

    Returns:
        ρ̄, dimensionless, shape ``g.shape[:-2]``.

    Example:
        >>> round(float(coupling(jnp.full((256, 256), 25.0), 1.0)), 2)
        1.33
    """
    g = jnp.asarray(g)
    lam = _ladder_lambda_max(g.shape[-1]) + _ladder_lambda_max(g.shape[-2])
    return r_wire * 1e-6 * jnp.max(g, axis=(-2, -1)) * lam


def first_order_error(g, r_wire, *, num_iter: int = 30):
    """Estimated error of the first-order cell voltages, relative to the largest cell voltage.

    The first-order form takes the wire drops from the ideal currents G·v_in; the exact currents
    are (1 + T)⁻¹·G·v_in, T = r·G ⊙ K, so on the wire mode of eigenvalue ρ (T's largest, found by
    ``num_iter`` power iterations; ρ ≈ r·mean(G)·(λ_max(A) + λ_max(B)) for a tile of uniform-ish
    conductances, below the bound :func:`coupling`) the drop is overestimated by the factor
    1 + ρ, and the cell voltages (drop ≈ ρ/(1 + ρ) of the drive) are off by about ρ²/(1 + ρ) of
    the drive. Measured against the converged solver (validated against a direct nodal solve in
    the tests), random drives in [0, 0.2] V, conductances U[0, 25] µS / all 25 µS, error
    max|V₁ − V|/max|V| of the cell voltages and max_j |ΔI_j|/max_j |I_j| of the column currents:

    =====================  =========  =============  =================  ==================
    tile, r_wire            ρ          ρ²/(1 + ρ)     cell voltages      column currents
    =====================  =========  =============  =================  ==================
    64×64, 1 Ω              .04/.08    .002/.007      .002/.006          .002/.007
    64×64, 2 Ω              .08/.17    .007/.024      .006/.022          .008/.028
    64×64, 5 Ω              .21/.42    .036/.13       .036/.12           .046/.16
    64×64, 10 Ω             .42/.84    .12/.39        .12/.40            .17/.56
    128×128, 1 Ω            .17/.34    .024/.084      .025/.076          .028/.098
    256×256, 1 Ω            .67/1.3    .27/.76        .26/.70            .37/1.2
    512×512, 1 Ω            2.7/5.3    1.9/4.5        2.0/4.4            4.0/12
    =====================  =========  =============  =================  ==================

    So the first-order form is a model of the IR drop only while ρ is small: ρ ≲ 0.1 for 1 % and
    ρ ≲ 0.25 for 5 % (column currents about 1.3x worse); at the default 256 × 256 tile and
    1 Ω it is not (use the solver).

    Args:
        g: conductances, µS, [R, C] (or [..., R, C], one estimate per tile).
        r_wire: Ω per segment.
        num_iter: power iterations.

    Returns:
        ρ²/(1 + ρ), shape ``g.shape[:-2]``.
    """
    g = jnp.asarray(g)
    flat = g.reshape((-1,) + g.shape[-2:])
    return _first_order_error(flat, r_wire, num_iter).reshape(g.shape[:-2])


@functools.partial(jax.jit, static_argnums=2)
def _first_order_error(grid, r_wire, num_iter):
    """:func:`first_order_error` of every tile of [T, R, C] (compiled once per shape)."""
    return jax.vmap(lambda t: _first_order_error_tile(t, r_wire, num_iter))(grid)


def _first_order_error_tile(g, r_wire, num_iter):
    r = r_wire * 1e-6
    a_mat, b_mat = _ladders(g.shape[0], g.shape[1], g.dtype)
    s = jnp.sqrt(jnp.maximum(g, 0.0))

    def op(u):  # the symmetrized coupling √G ⊙ r·K(√G ⊙ u): T's eigenvalues, symmetric PSD
        x = s * u
        return s * (r * (jnp.matmul(x, a_mat, precision=_HI) + jnp.matmul(b_mat, x, precision=_HI)))

    def body(_, u):
        w = op(u)
        return w / jnp.maximum(jnp.sqrt(jnp.sum(w * w)), 1e-30)
    u = jax.lax.fori_loop(0, num_iter, body, s / jnp.maximum(jnp.sqrt(jnp.sum(g)), 1e-30))
    rho = jnp.sum(u * op(u)) / jnp.maximum(jnp.sum(u * u), 1e-30)   # Rayleigh quotient
    return rho * rho / (1.0 + rho)


def check_first_order(g, r_wire, *, where: str, limit: float = 0.05):
    """Warn when the first-order form is not a valid model of these tiles.

    Args:
        g: conductances, µS, of one tile [R, C] or a grid of tiles [..., R, C].
        r_wire: Ω per segment.
        where: the caller's name, for the message.
        limit: largest acceptable :func:`first_order_error` (default 5 % of the cell voltages).

    Returns:
        The largest estimate over the tiles (a float), or None when ``g`` or ``r_wire`` is traced
        (nothing is checked).

    Warns:
        RuntimeWarning: the estimate exceeds ``limit``; the message gives the tile size, r_wire,
        the conductance scale and the estimate.
    """
    if isinstance(g, jax.core.Tracer) or isinstance(r_wire, jax.core.Tracer):
        return None
    r = float(np.asarray(r_wire))
    if r == 0.0:
        return 0.0
    g = jnp.asarray(g)
    err = float(np.max(np.asarray(first_order_error(g, r))))
    if not err <= limit:
        gn = np.asarray(g)
        warnings.warn(
            f"{where}: the first-order IR-drop form is off by about {100 * err:.0f} % of the cell "
            f"voltages here ({g.shape[-2]}×{g.shape[-1]} tiles, r_wire = {r:g} Ω, conductances "
            f"up to {float(gn.max()):.3g} µS, mean {float(gn.mean()):.3g} µS; it is a valid "
            f"model below about {100 * limit:.0f} %, see nvjax.irdrop.first_order_error): use "
            "smaller tiles or a lower r_wire", RuntimeWarning, stacklevel=3)
    return err


def wire_voltages(i_cell: jax.Array, v_in: jax.Array, r_wire):
    """Word-line and bit-line node voltages (V) for given cell currents (µA).

    The ladders are summed as matrix products with :func:`_ladders` (on CPU, XLA's cumulative sums
    are quadratic reduce-windows; the products are as cheap and run at matmul speed).

    Args:
        i_cell: cell currents, µA, [R, C].
        v_in: word-line drive voltages, V, [R].
        r_wire: resistance per wire segment, Ω.

    Returns:
        (v_row, v_col), V, each [R, C].
    """
    r = r_wire * 1e-6  # Ω·µA = µV → V
    a, b = _ladders(i_cell.shape[0], i_cell.shape[1], i_cell.dtype)
    # Word line: node j drops by the currents of segments 0..j, segment s carrying cells s..C-1.
    v_row = v_in[:, None] - r * jnp.matmul(i_cell, a, precision=_HI)
    # Bit line: node i sits above segments i..R-1, segment s carrying cells 0..s.
    v_col = r * jnp.matmul(b, i_cell, precision=_HI)
    return v_row, v_col


def voltages_first_order(g: jax.Array, v_in: jax.Array, r_wire) -> jax.Array:
    """First-order cell voltages: wire drops computed from the ideal currents G·v_in.

    Valid only for a small coupling ρ̄ (:func:`coupling`, :func:`first_order_error`): the drops
    are overestimated by about ρ/(1 + ρ) of themselves.

    Args:
        g: conductances, µS, [R, C].
        v_in: word-line drive voltages, V, [R] or a batch [B, R].
        r_wire: Ω per segment.

    Returns:
        Cell voltages, V, [R, C] (or [B, R, C]).
    """
    g = jnp.asarray(g)
    v_in = jnp.asarray(v_in, g.dtype)
    r = r_wire * 1e-6
    a, b = _ladders(g.shape[0], g.shape[1], g.dtype)
    # Row drops scale with the row's own drive: (diag(v)·G)·A = diag(v)·(G·A).
    row = v_in[..., :, None] * (1.0 - r * jnp.matmul(g, a, precision=_HI))
    col = r * jnp.matmul(b * v_in[..., None, :], g, precision=_HI)
    return row - col


def first_order_transfer(g: jax.Array, r_wire) -> jax.Array:
    """Column currents per volt of row drive under first-order IR drop, [R, C] (µA/V = µS).

    The first-order network is linear in the drives: the column currents are ``v_in @ M`` with
    M = G ⊙ (1 − r·G·A − r·B·G) (:func:`_ladders`), so a batch of inputs costs one matmul. Valid
    only for a small coupling (:func:`first_order_error`).
    """
    g = jnp.asarray(g)
    r = r_wire * 1e-6
    a, b = _ladders(g.shape[0], g.shape[1], g.dtype)
    return g * (1.0 - r * jnp.matmul(g, a, precision=_HI) - r * jnp.matmul(b, g, precision=_HI))


#: The iteration stops when its residual is this fraction of ``tol`` (or stagnates: float32
#: rounding keeps it above ~1e-6 on large, strongly coupled tiles); the flag is decided on ``tol``.
_STOP_FRACTION = 0.05
#: A residual this many times above the best one so far counts as growth (the Chebyshev residual
#: is not monotone, but never grew by more than 2x in the tests' cases).
_GROWTH = 10.0
#: Relaxation back-off on growth (as Sandia CrossSim's parasitic solver).
_BACKOFF = 0.98
#: Safety margin on the eigenvalue bound against rounding.
_MARGIN = 1.02


class _State(NamedTuple):
    x: jax.Array          # cell currents, µA
    res: jax.Array        # residual G·v_in − (1 + rG⊙K)·x
    d: jax.Array          # last Chebyshev update
    rho: jax.Array        # Chebyshev recurrence scalar
    k: jax.Array          # steps since the last (re)start
    omega: jax.Array      # relaxation factor
    x_best: jax.Array
    res_best: jax.Array
    norm_best: jax.Array  # max|res_best|
    norm_ref: jax.Array   # best residual at the last halving (stagnation watch)
    since: jax.Array      # steps since the residual last halved
    n: jax.Array          # steps taken


def voltages(g: jax.Array, v_in: jax.Array, r_wire, *, omega=1.0, tol: float = 1e-4,
             max_iter: int = 1000, num_iter: Optional[int] = None) -> IRDropResult:
    """Cell voltages with IR drop: the linear network solved by Chebyshev-accelerated relaxation.

    Each step relaxes the cell currents toward Ohm's law at the present node voltages,
    I ← I + α_k·(G ⊙ V(I) − I) plus a momentum term, with the Chebyshev step sizes for the
    eigenvalue interval [1, 1 + ρ̄/ω] (:func:`coupling`), so the iteration converges for any
    r_wire ≥ 0 and G ≥ 0 in about √(1 + ρ̄)·ln(20/tol)/2 steps. The residual is watched: growth by
    more than 10x (or a non-finite value) restarts from the best iterate with ω ← 0.98·ω.

    Args:
        g: conductances, µS, [R, C] (>= 0).
        v_in: word-line drive voltages, V, [R].
        r_wire: resistance per wire segment, Ω (may be traced).
        omega: relaxation factor in (0, 1] (may be traced): the Chebyshev steps are those of the
            interval [1, 1 + ρ̄]/ω; 1 is optimal, lower values only slow the iteration down.
        tol: converged when max|G ⊙ V − I| <= tol·max|G ⊙ v_in| at the returned solution; the
            iteration runs on until the residual is 20x below ``tol`` (or stops shrinking: float32
            rounding), so the voltages are typically accurate to ~1e-6 relative.
        max_iter: iteration cap of the ``while_loop``.
        num_iter: if given, run exactly this many steps under ``fori_loop`` instead (reverse-mode
            differentiable); ``v_cell`` is then that of the best of these iterates (smallest
            residual; usually the last, but the Chebyshev residual is not monotone), whatever
            ``converged`` says. The best iterate is kept by ``where`` selects, so gradients flow
            through the iterate chosen (for a converging solve, the solution's).

    Returns:
        :class:`IRDropResult` with the voltages of the best iterate; with the ``while_loop`` a
        solve that does not converge has NaN voltages.

    Example:
        >>> res = voltages(jnp.full((256, 256), 25.0), jnp.full((256,), 0.2), 1.0)
        >>> bool(res.converged), bool(res.residual <= 1e-4)
        (True, True)
    """
    g = jnp.asarray(g)
    v_in = jnp.asarray(v_in, g.dtype)
    if g.ndim != 2 or v_in.shape != g.shape[:1]:
        raise ValueError(f"irdrop.voltages: expected g [R, C] and v_in [R], got {g.shape} and "
                         f"{v_in.shape}")
    return _voltages(g, v_in, r_wire, omega, tol, max_iter, num_iter)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _voltages(g, v_in, r_wire, omega, tol, max_iter, num_iter):
    """:func:`voltages` (compiled once per shape and static options; r_wire, omega traced)."""
    r = r_wire * 1e-6
    a_mat, b_mat = _ladders(g.shape[0], g.shape[1], g.dtype)

    def coupled(x):  # r·K(x), V
        return r * (jnp.matmul(x, a_mat, precision=_HI) + jnp.matmul(b_mat, x, precision=_HI))

    def system(x):   # (1 + r·G ⊙ K)·x, µA
        return x + g * coupled(x)

    b = g * v_in[:, None]
    scale = jnp.max(jnp.abs(b))
    scale = jnp.where(scale > 0, scale, 1.0)
    hi = 1.0 + _MARGIN * coupling(g, r_wire)   # eigenvalues of `system` lie in [1, hi]
    omega = jnp.asarray(omega, g.dtype)

    def chebyshev_step(s: _State) -> _State:
        theta = (hi + 1.0) / (2.0 * s.omega)                        # centre of [1, hi]/ω
        delta = jnp.maximum((hi - 1.0) / (2.0 * s.omega), 1e-4 * theta)  # half-width
        sigma = theta / delta
        first = s.k == 0
        rho = jnp.where(first, 1.0 / sigma, 1.0 / (2.0 * sigma - s.rho))
        d = jnp.where(first, s.res / theta, rho * s.rho * s.d + (2.0 * rho / delta) * s.res)
        x = s.x + d
        res = b - system(x)   # the true residual (a recursive update drifts by ~1e-4 at 512²)
        norm = jnp.max(jnp.abs(res))
        grew = ~(norm <= _GROWTH * s.norm_best)      # true for NaN/inf too
        better = norm < s.norm_best
        x_best = jnp.where(better, x, s.x_best)
        res_best = jnp.where(better, res, s.res_best)
        norm_best = jnp.where(better, norm, s.norm_best)
        halved = norm_best <= 0.5 * s.norm_ref
        # on growth: restart from the best iterate with a smaller relaxation factor
        return _State(x=jnp.where(grew, s.x_best, x), res=jnp.where(grew, s.res_best, res),
                      d=jnp.where(grew, jnp.zeros_like(d), d), rho=rho,
                      k=jnp.where(grew, 0, s.k + 1), omega=jnp.where(grew, _BACKOFF * s.omega,
                                                                     s.omega),
                      x_best=x_best, res_best=res_best, norm_best=norm_best,
                      norm_ref=jnp.where(halved, norm_best, s.norm_ref),
                      since=jnp.where(halved, 0, s.since + 1), n=s.n + 1)

    res0 = b - system(b)
    norm0 = jnp.max(jnp.abs(res0))
    s0 = _State(x=b, res=res0, d=jnp.zeros_like(b), rho=jnp.zeros((), g.dtype),
                k=jnp.zeros((), jnp.int32), omega=omega, x_best=b, res_best=res0, norm_best=norm0,
                norm_ref=norm0, since=jnp.zeros((), jnp.int32), n=jnp.zeros((), jnp.int32))
    if num_iter is not None:
        s = jax.lax.fori_loop(0, num_iter, lambda _, st: chebyshev_step(st), s0)
    else:
        stop = _STOP_FRACTION * tol * scale
        # the residual halves at least every ~0.35·√κ steps; far longer without halving means it
        # has reached float rounding (or the iteration is not converging): stop
        patience = 10.0 + 2.0 * jnp.sqrt(jnp.maximum(hi, 1.0) / omega)

        def cond(st):
            return ((st.n < max_iter) & ~(st.norm_best <= stop) & jnp.isfinite(st.norm_best)
                    & (st.since <= patience))
        s = jax.lax.while_loop(cond, chebyshev_step, s0)
    x = s.x_best
    v_row, v_col = wire_voltages(x, v_in, r_wire)
    v_cell = v_row - v_col
    residual = jnp.max(jnp.abs(b - system(x))) / scale   # = max|G ⊙ V − I| / max|G ⊙ v_in|
    residual = jnp.where(jnp.isfinite(residual), residual, jnp.nan)
    converged = residual <= tol                      # False for NaN
    if num_iter is None:
        v_cell = jnp.where(converged, v_cell, jnp.nan)
    return IRDropResult(v_cell, converged, s.n, residual)
