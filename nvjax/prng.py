"""Counter-based random-number generators for the Monte Carlo engine: Philox4x32-10 and threefry.

On CPU a large Monte Carlo sweep spends most of its time making random numbers. This module adds
Philox4x32-10 (Salmon et al. 2011) as a JAX PRNG implementation, :data:`PHILOX`, and one
function, :func:`key`, that makes a typed key of either generator from an int seed. Every
``jax.random`` function (``split``, ``fold_in``, ``bits``, ``uniform``, ``normal``, ...) works
with these keys, eagerly and under ``jit`` and ``vmap``. Runs choose with ``RunConfig.prng``.

**Which one to use.** ``"threefry"`` (JAX's ``threefry2x32``) is the default: it is JAX's own,
reviewed generator, its streams are those of other JAX code and of results published with it,
and on GPU/TPU, or whenever random numbers are not the bottleneck, switching gains nothing.
``"philox"`` is for CPU Monte Carlo jobs bound by random-number generation: Philox4x32-10 passes
TestU01's BigCrush with a margin of three rounds (7 suffice; Salmon et al. 2011) and runs
2.3-3.5x faster than threefry on XLA:CPU (normals to uniforms), but it is slower to compile
(2026-12-01, same machine: the quickstart's two sweep chunks compile in 9.0 s instead of 5.5 s,
so its 1000-instance sweep takes 15.3 s instead of 8.8 s; the lifetime loop's test program in
50 s instead of 14 s), so it pays off only on runs long enough to amortise that. The two generators give
different numbers from the same seed, so their results agree only statistically. JAX's ``rbg``
and ``unsafe_rbg`` are not offered: their batched (``vmap``) samples differ from unbatched ones,
which breaks "instance i alone equals row i of the sweep" (DESIGN §9).

**Throughput** (2026-11-23, the 2-core development machine, XLA:CPU, JAX 0.10.2; best of
several hundred runs each, over 4 minutes, of a jitted call making 10**7 values while other jobs
loaded the machine (load average 6-8), so the ratios are firmer than the absolute numbers):

=====================  ================  ===============  ===============
generator              32-bit words/s    uniforms/s       normals/s
=====================  ================  ===============  ===============
threefry               61 M              49 M             54 M
philox                 173 M             173 M            125 M
=====================  ================  ===============  ===============

Normals cost more than words because ``jax.random.normal`` applies ``erf_inv`` to a uniform.

**Stream.** A key is 4 uint32 words ``(k0, k1, c2, c3)``: the 64-bit Philox key and the upper
half of the 128-bit counter. Word ``w`` of ``random_bits`` is lane ``w % 4`` of
``Philox_k(w // 4, 0, c2, c3)``: the Random123 stream, so ``key(s, "philox")`` (for
``0 <= s < 2**32``) gives the same words as C++26's ``std::philox4x32`` seeded with ``s``. A value
depends only on its index (a shorter request is a prefix of a longer one, whatever the batch);
8/16-bit draws are the low bits of the 32-bit words, and a 64-bit value ``e`` is
``word(2e) << 32 | word(2e + 1)``. At most 2**32 - 1 values are drawn per call.

**Key derivation.** ``split`` and ``fold_in`` hash: a child key is the whole 128-bit block
``Philox_k(j, D, c2, c3)``, with the child index or folded-in value ``j`` and a domain tag ``D``
in counter word 1 (``0x80000000`` for ``split``, ``0x40000000`` for ``fold_in``) that
``random_bits`` never uses. As ``Philox_k`` is a bijection, no child key equals a block of its
parent's stream or another child of the same parent, and ``fold_in(k, i)`` differs from
``split(k, n)[i]`` (with threefry the two are the same key). The seed is used as is:
``key(s, "philox")`` is ``(low word of s, high word of s, 0, 0)`` for any
``-2**63 <= s < 2**64`` (modulo 2**64) in 32- and 64-bit JAX modes alike; a traced 32-bit seed
is sign-extended, giving the key of the same Python int.

**Implementation notes.** XLA:CPU fuses the ten rounds into one loop but writes one output
element per loop iteration and has no multi-output fusion, so the 4 words of a Philox call
cannot be kept: each 32-bit word costs one call (taking one lane of it). Every way tried to
keep all 4 lanes (stacking them; a loop over rounds or over cache-sized chunks) measured slower,
by 20% to 5x. The high word of each 32x32-bit product comes from a uint64 product made in a
local 64-bit-mode scope: as fast as ``lax.mulhi``, which cannot be lowered in sharded
(multi-device) programs, and about 1.5x faster than the 16-bit-halves emulation kept as a
fallback.

References:
    J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as easy as
    1, 2, 3", Proc. SC'11, 2011, doi:10.1145/2063384.2063405 (Philox-4x32 round function;
    multipliers 0xD2511F53, 0xCD9E8D57; Weyl key increments 0x9E3779B9, 0xBB67AE85; the
    Random123 known-answer vectors used in the tests).
    ISO/IEC 14882:2026 (C++26) [rand.eng.philox], [rand.predef]: ``std::philox4x32``.

This module imports only JAX and NumPy.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["IMPLS", "key", "impl_name", "PHILOX", "philox4x32", "mulhi32", "mulhi32_halves"]

#: Generator names accepted by :func:`key` (and by ``RunConfig.prng``).
IMPLS: Tuple[str, ...] = ("threefry", "philox")

_M0 = np.uint32(0xD2511F53)   # Philox-4x32 multipliers (Salmon et al. 2011)
_M1 = np.uint32(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)   # Weyl increments of the key schedule (golden ratio, sqrt(3) - 1)
_W1 = np.uint32(0xBB67AE85)
_ROUNDS = 10
_SPLIT_TAG = np.uint32(0x80000000)   # counter word 1 of split / fold_in hashes; random_bits
_FOLD_TAG = np.uint32(0x40000000)    # keeps word 1 = 0 (it allows < 2**32 values per call)
_MAX_VALUES = 2 ** 32 - 1


def mulhi32_halves(x, m):
    """High 32 bits of the 64-bit product ``x * m`` of uint32 arrays, from 16-bit halves."""
    mask = np.uint32(0xFFFF)
    sh = np.uint32(16)
    x_lo, x_hi = x & mask, x >> sh
    m_lo, m_hi = m & mask, m >> sh
    lo_lo = x_lo * m_lo
    cross1 = x_hi * m_lo + (lo_lo >> sh)        # < 2**32: (2**16 - 1)**2 + 2**16 - 1
    cross2 = x_lo * m_hi + (cross1 & mask)      # < 2**32 likewise
    return x_hi * m_hi + (cross1 >> sh) + (cross2 >> sh)


def _x64_scope():
    """A context in which uint64 exists (JAX's 64-bit mode), or None if this JAX has none."""
    scope = getattr(jax, "enable_x64", None)
    if scope is None:
        try:
            from jax.experimental import enable_x64 as scope
        except ImportError:
            return None
    return scope(True)


def mulhi32(x, m):
    """High 32 bits of ``x * m`` (uint32), from a uint64 product.

    ``lax.mulhi`` would be as fast but cannot be lowered in a multi-device (sharded) program
    (JAX 0.10); the 16-bit-halves emulation is the fallback where uint64 cannot be had.
    """
    scope = _x64_scope()
    if scope is None:
        return mulhi32_halves(x, jnp.asarray(m, np.uint32))
    with scope:
        prod = (lax.convert_element_type(x, np.uint64)
                * lax.convert_element_type(jnp.asarray(m, np.uint32), np.uint64))
        hi = lax.shift_right_logical(prod, np.uint64(32))
        return lax.convert_element_type(hi, np.uint32)


def philox4x32(k0, k1, x0, x1, x2, x3):
    """The Philox4x32-10 block function: 4 uint32 counter words → 4 uint32 output words.

    Args:
        k0, k1: the 64-bit key as two uint32 values (scalars or arrays broadcastable to the
            counter words).
        x0, x1, x2, x3: counter words, uint32 arrays of one shape ``[...]``.

    Returns:
        A tuple of 4 uint32 arrays ``[...]``, the output block.

    References:
        Salmon et al. 2011 (round: ``(x0, x1, x2, x3) → (hi(M1 x2) ^ x1 ^ k0, lo(M1 x2),
        hi(M0 x0) ^ x3 ^ k1, lo(M0 x0))``; the key is bumped by the Weyl constants between
        rounds).
    """
    for r in range(_ROUNDS):
        if r:
            k0 = k0 + _W0
            k1 = k1 + _W1
        hi0, lo0 = mulhi32(x0, _M0), x0 * _M0
        hi1, lo1 = mulhi32(x2, _M1), x2 * _M1
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _u32(x):
    return lax.convert_element_type(x, np.uint32)


@jax.jit
def _seed(seed):
    """Key words ``(lo32(seed), hi32(seed), 0, 0)``; 32-bit signed seeds are sign-extended."""
    if jnp.shape(seed):
        raise TypeError(f"PRNG key seed must be a scalar, got shape {jnp.shape(seed)}")
    dtype = jnp.result_type(seed)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"PRNG key seed must be an integer, got dtype {dtype}")
    if jnp.iinfo(dtype).bits == 64:  # the low and the high word
        lo = _u32(seed)
        hi = _u32(lax.shift_right_logical(seed, jnp.asarray(32, dtype)))
    elif jnp.issubdtype(dtype, jnp.signedinteger):  # sign-extend as a 64-bit seed would be
        wide = lax.convert_element_type(seed, np.int32)
        lo = _u32(wide)
        hi = _u32(lax.shift_right_arithmetic(wide, np.int32(31)))
    else:
        lo = _u32(seed)
        hi = jnp.zeros((), np.uint32)
    zero = jnp.zeros((), np.uint32)
    return jnp.stack([lo, hi, zero, zero])


def _derive(key_words, index, tag):
    """Child key words ``Philox_k(index, tag, c2, c3)``: ``[..., 4]`` for uint32 ``index[...]``."""
    k0, k1, c2, c3 = (key_words[i] for i in range(4))
    shape = jnp.shape(index)
    out = philox4x32(k0, k1, index, jnp.full(shape, tag, np.uint32),
                      jnp.broadcast_to(c2, shape), jnp.broadcast_to(c3, shape))
    return jnp.stack(out, axis=-1)


@functools.partial(jax.jit, static_argnums=1)
def _split_jit(key_words, shape):
    num = math.prod(shape)
    if num > _MAX_VALUES:
        raise NotImplementedError(f"split into {num} keys: at most {_MAX_VALUES} per call")
    children = _derive(key_words, lax.iota(np.uint32, num), _SPLIT_TAG)
    return children.reshape((*shape, 4))


def _split(key_words, shape):
    return _split_jit(key_words, tuple(int(d) for d in shape))


@jax.jit
def _fold_in(key_words, data):
    return _derive(key_words, _u32(data), _FOLD_TAG)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_bits_jit(key_words, bit_width, shape):
    num = math.prod(shape)
    if num > _MAX_VALUES:
        raise NotImplementedError(f"{num} random values in one call: at most {_MAX_VALUES}; "
                                  f"split the key and draw in parts")
    k0, k1, c2, c3 = (key_words[i] for i in range(4))
    idx = lax.iota(np.uint32, num)
    zero = jnp.zeros((num,), np.uint32)
    c2, c3 = jnp.broadcast_to(c2, (num,)), jnp.broadcast_to(c3, (num,))
    if bit_width == 64:
        pair = (idx & np.uint32(1)).astype(np.int32)
        o = philox4x32(k0, k1, idx >> np.uint32(1), zero, c2, c3)
        hi = lax.select_n(pair, o[0], o[2])
        lo = lax.select_n(pair, o[1], o[3])
        hi, lo = (lax.convert_element_type(v, np.uint64) for v in (hi, lo))
        out = lax.shift_left(hi, jnp.asarray(32, np.uint64)) | lo
    else:
        lane = (idx & np.uint32(3)).astype(np.int32)
        o = philox4x32(k0, k1, idx >> np.uint32(2), zero, c2, c3)
        out = lax.select_n(lane, *o)
        if bit_width < 32:
            out = lax.convert_element_type(out, {8: np.uint8, 16: np.uint16}[bit_width])
    return out.reshape(shape)


def _random_bits(key_words, bit_width, shape):
    if bit_width not in (8, 16, 32, 64):
        raise TypeError(f"bit_width must be 8, 16, 32 or 64, got {bit_width}")
    return _random_bits_jit(key_words, int(bit_width), tuple(int(d) for d in shape))


#: The Philox4x32-10 implementation, usable directly as ``jax.random.key(seed, impl=PHILOX)``.
PHILOX = jex_random.define_prng_impl(
    key_shape=(4,), seed=_seed, split=_split, random_bits=_random_bits, fold_in=_fold_in,
    name="nvjax_philox4x32", tag="nvphx")

_JAX_IMPLS = {"threefry": "threefry2x32", "philox": PHILOX}


def key(seed, impl: str = "threefry") -> jax.Array:
    """A typed PRNG key of the named generator.

    Args:
        seed: an int (or integer scalar array) seed.
        impl: one of :data:`IMPLS`: ``"threefry"`` (JAX's threefry2x32, the default) or
            ``"philox"`` (Philox4x32-10, faster on CPU).

    Returns:
        A scalar typed key (``jax.random.key``), usable with every ``jax.random`` function.

    Raises:
        ValueError: ``impl`` is not one of :data:`IMPLS`; a philox seed outside
            ``[-2**63, 2**64)``.
        TypeError: ``seed`` is not an integer.

    Example:
        >>> import jax
        >>> from nvjax import prng
        >>> k = prng.key(0, "philox")
        >>> jax.random.normal(jax.random.fold_in(k, 3), (2,)).shape
        (2,)
    """
    if impl not in _JAX_IMPLS:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")
    if isinstance(seed, bool) or not (
            isinstance(seed, (int, np.integer))
            or jnp.issubdtype(getattr(seed, "dtype", np.float64), jnp.integer)):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    if impl == "philox" and isinstance(seed, (int, np.integer)):
        # The words of the 64-bit seed, made here: jax.random.key would first cast a Python int
        # to int32 when 64-bit mode is off, folding seeds >= 2**31 onto negative ones.
        s = int(seed)
        if not -2 ** 63 <= s < 2 ** 64:
            raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {s}")
        s %= 2 ** 64
        words = np.array([s & 0xFFFFFFFF, s >> 32, 0, 0], np.uint32)
        return jax.random.wrap_key_data(words, impl=PHILOX)
    return jax.random.key(seed, impl=_JAX_IMPLS[impl])


@functools.lru_cache(maxsize=None)
def _key_dtypes():
    return {name: jax.eval_shape(lambda n=name: key(0, n)).dtype for name in IMPLS}


def impl_name(k) -> str:
    """The :data:`IMPLS` name of the generator of a typed key (or array of keys).

    Args:
        k: a typed key array, e.g. from :func:`key`, ``split`` or ``fold_in``.

    Returns:
        ``"threefry"`` or ``"philox"``.

    Raises:
        TypeError: ``k`` is not a typed key (raw ``uint32`` key data carries no generator).
        ValueError: ``k`` is a typed key of another generator.

    Example:
        >>> impl_name(key(0, "philox"))
        'philox'
    """
    dtype = getattr(k, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError(f"k: expected a typed PRNG key (jax.random.key or prng.key), got {k!r}")
    for name, d in _key_dtypes().items():
        if d == dtype:
            return name
    raise ValueError(f"k: a key of generator {jax.random.key_impl(k)}, which is not one of "
                     f"{list(IMPLS)}")
