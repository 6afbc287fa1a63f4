"""Tests of nvjax.prng: Philox4x32-10 known answers, statistical quality, determinism."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nvjax import prng
from nvjax.config import RunConfig
from nvjax import prng, sweep

N = 2 ** 20          # samples per statistical test
SE5 = 5.0 / np.sqrt(N)  # 5 standard errors of a correlation coefficient

# Random123 known-answer vectors (kat_vectors, "philox4x32 10"): key, counter, output.
KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _np_philox(key, ctr):
    """Independent NumPy reference of Philox4x32-10 (uint64 products); ctr: 4 arrays."""
    m = 0xFFFFFFFF
    k0, k1 = (np.uint64(k) for k in key)
    x0, x1, x2, x3 = (np.asarray(c, np.uint64) for c in ctr)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(m)
            k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(m)
        p0, p1 = x0 * np.uint64(0xD2511F53), x2 * np.uint64(0xCD9E8D57)
        x0, x1, x2, x3 = ((p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & np.uint64(m),
                          (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & np.uint64(m))
    return [x.astype(np.uint32) for x in (x0, x1, x2, x3)]


def _u32(*v):
    return tuple(jnp.uint32(x) for x in v)


# ---------------------------------------------------------------- known answers, reference

@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("k,ctr,want", KAT)
def test_block_function_known_answers(k, ctr, want, jit):
    f = jax.jit(prng.philox4x32) if jit else prng.philox4x32
    got = f(*_u32(*k), *_u32(*ctr))
    assert [int(g) for g in got] == list(want)
    assert [int(g) for g in _np_philox(k, ctr)] == list(want)  # the reference agrees too


def test_stream_matches_reference_layout():
    # key (k0, k1, c2, c3): word w is lane w % 4 of Philox_k(w // 4, 0, c2, c3)
    data = jnp.array([0xA4093822, 0x299F31D0, 0x13198A2E, 0x03707344], jnp.uint32)
    k = jax.random.wrap_key_data(data, impl=prng.PHILOX)
    got = np.asarray(jax.random.bits(k, (4 * 37 + 3,)))
    b = np.arange(38, dtype=np.uint64)
    ref = np.stack(_np_philox((0xA4093822, 0x299F31D0),
                              (b, 0 * b, 0 * b + 0x13198A2E, 0 * b + 0x03707344)), -1).ravel()
    np.testing.assert_array_equal(got, ref[:got.size])
    # key(0) starts with the first known answer
    first = jax.random.bits(prng.key(0, "philox"), (4,))
    assert [int(v) for v in first] == list(KAT[0][2])


def test_stream_is_cpp26_philox4x32():
    # ISO C++26 [rand.predef]: the 10000th value of a default-constructed std::philox4x32
    # (seed 20111115: key (20111115, 0), counter from 0, 4 words per block) is 1955073260.
    w = jax.random.bits(prng.key(20111115, "philox"), (10000,))
    assert int(w[9999]) == 1955073260


def test_block_function_matches_jax_philox_primitive():
    try:
        from jax._src.random.philox4x32 import philox4x32_p  # JAX's own, independent one
    except ImportError:
        pytest.skip("this JAX has no philox4x32 primitive")
    rng = np.random.default_rng(1)
    w = [jnp.asarray(rng.integers(0, 2 ** 32, 1000, dtype=np.uint64).astype(np.uint32))
         for _ in range(4)]
    k0, k1 = _u32(*rng.integers(0, 2 ** 32, 2, dtype=np.uint64))
    ours = prng.philox4x32(k0, k1, *w)
    theirs = philox4x32_p.bind(k0, k1, *w)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_mulhi_16bit_emulation_exact():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.integers(0, 2 ** 32, 10000, dtype=np.uint64),
                        [0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF]]).astype(np.uint32)
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 0, 1):
        want = ((x.astype(np.uint64) * np.uint64(m)) >> np.uint64(32)).astype(np.uint32)
        got = prng.mulhi32_halves(jnp.asarray(x), jnp.uint32(m))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(prng.mulhi32(jnp.asarray(x), np.uint32(m)), want)


# ---------------------------------------------------------------- statistical quality

# Statistics are tested for philox only: threefry is JAX's own, reviewed generator.

@pytest.fixture(scope="module")
def samples():
    k = prng.key(20240607, "philox")
    k_u, k_n, k_b = jax.random.split(k, 3)
    return dict(key=k,
                u=np.asarray(jax.random.uniform(k_u, (N,)), np.float64),
                n=np.asarray(jax.random.normal(k_n, (N,)), np.float64),
                bits=np.asarray(jax.random.bits(k_b, (N,))))


def test_uniform_moments(samples):
    u = samples["u"]
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / N)
    # Var[(U - 1/2)^2] = 1/80 - 1/144 = 1/180
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / N)


def test_normal_moments(samples):
    z = samples["n"]
    assert abs(z.mean()) < 5 / np.sqrt(N)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / N)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / N)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / N)


def test_kolmogorov_smirnov(samples):
    assert stats.kstest(samples["u"], "uniform").pvalue > 1e-3
    assert stats.kstest(samples["n"], "norm").pvalue > 1e-3


@pytest.mark.parametrize("which", ["u", "bits"])
def test_serial_correlation(samples, which):
    x = samples[which].astype(np.float64)
    x = (x - x.mean()) / x.std()
    for lag in range(1, 9):  # lags 1-3 pair words of one Philox block, 4-8 of the next
        r = np.mean(x[:-lag] * x[lag:])
        assert abs(r) < SE5, (lag, r)


def test_bit_balance_per_position(samples):
    ones = np.unpackbits(samples["bits"].view(np.uint8).reshape(-1, 4), axis=1).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 5 * 0.5 / np.sqrt(N)), ones


def test_consecutive_pairs_uniform_in_square(samples):
    u = samples["u"]
    h, _, _ = np.histogram2d(u[0::2], u[1::2], bins=16, range=[[0, 1], [0, 1]])
    assert stats.chisquare(h.ravel()).pvalue > 1e-3


def _corr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.corrcoef(a, b)[0, 1]


def test_derived_streams_independent():
    k = prng.key(7, "philox")
    normal = lambda kk: jax.random.normal(kk, (N,))
    f0, f1 = jax.random.fold_in(k, 0), jax.random.fold_in(k, 1)
    s0, s1 = jax.random.split(k)
    # (f0, s0) would be one stream with threefry: see test_fold_in_versus_split_children
    pairs = [(f0, f1), (s0, s1), (k, f0), (k, s0), (f0, s0),
             (prng.key(0, "philox"), prng.key(1, "philox"))]
    for a, b in pairs:
        assert abs(_corr(normal(a), normal(b))) < SE5
    # 16 folded-in streams: every pairwise correlation is small
    m = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), (N // 16,)))(
        jnp.arange(16)), np.float64)
    c = np.corrcoef(m)[np.triu_indices(16, 1)]
    assert np.all(np.abs(c) < 5 / np.sqrt(N // 16))


@pytest.mark.parametrize("derive", ["fold_in", "split"])
def test_first_values_across_streams(derive):
    # the Monte Carlo use: instance i's first draw, across many instances
    k = prng.key(11, "philox")
    num = 2 ** 16
    if derive == "fold_in":
        keys = jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(num))
    else:
        keys = jax.random.split(k, num)
    u = np.asarray(jax.vmap(lambda kk: jax.random.uniform(kk, ()))(keys), np.float64)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    x = (u - u.mean()) / u.std()
    assert abs(np.mean(x[:-1] * x[1:])) < 5 / np.sqrt(num)
    assert len(np.unique(np.asarray(jax.random.key_data(keys)), axis=0)) == num


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("impl", prng.IMPLS)
def test_same_seed_same_numbers(impl):
    a = jax.random.normal(prng.key(3, impl), (1000,))
    b = jax.random.normal(prng.key(3, impl), (1000,))
    c = jax.random.normal(prng.key(4, impl), (1000,))
    np.testing.assert_array_equal(a, b)
    assert not np.any(np.asarray(a) == np.asarray(c))


@pytest.mark.parametrize("impl", prng.IMPLS)
def test_jit_equals_eager_bit_for_bit(impl):
    k = prng.key(5, impl)

    def draw(k):
        k1, k2 = jax.random.split(k)
        k3 = jax.random.fold_in(k2, 9)
        return jax.random.bits(k1, (7, 5)), jax.random.normal(k3, (1001,)), jax.random.key_data(k3)

    for a, b in zip(draw(k), jax.jit(draw)(k)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", prng.IMPLS)
def test_fold_in_streams_independent_of_batching(impl):
    # instance i alone (unbatched) equals row i of any batch containing it
    k = prng.key(6, impl)
    f = lambda i: jax.random.normal(jax.random.fold_in(k, i), (50,))
    alone = jax.jit(f)
    looped = np.stack([alone(i) for i in range(6)])
    batched = jax.jit(jax.vmap(f))
    np.testing.assert_array_equal(batched(jnp.arange(6)), looped)
    perm = np.array([5, 0, 3, 1, 4, 2])  # another batch composition
    np.testing.assert_array_equal(batched(jnp.asarray(perm)), looped[perm])
    keys = jax.random.split(k, 5)
    g = jax.jit(lambda kk: jax.random.uniform(kk, (4, 3)))
    np.testing.assert_array_equal(jax.jit(jax.vmap(g))(keys), np.stack([g(kk) for kk in keys]))


def test_philox_value_depends_only_on_index():
    k = prng.key(8, "philox")
    long = np.asarray(jax.random.bits(k, (1000,)))
    np.testing.assert_array_equal(jax.random.bits(k, (37,)), long[:37])
    np.testing.assert_array_equal(jax.random.bits(k, (10, 100)), long.reshape(10, 100))
    # 8- and 16-bit draws are the low bits of the 32-bit words
    np.testing.assert_array_equal(jax.random.bits(k, (1000,), jnp.uint16), long & 0xFFFF)
    np.testing.assert_array_equal(jax.random.bits(k, (1000,), jnp.uint8), long & 0xFF)
    assert jax.random.bits(k, (0, 3)).shape == (0, 3)


def test_philox_small_dtypes_and_shapes():
    k = prng.key(9, "philox")
    for dt in (jnp.float16, jnp.bfloat16):  # 16-bit words
        z = jax.random.normal(k, (4096,), dt)
        assert z.dtype == dt and abs(float(jnp.mean(z.astype(jnp.float32)))) < 5 / 64
    assert jax.random.split(k, (2, 3)).shape == (2, 3)
    assert jax.vmap(lambda kk: jax.random.split(kk, 3))(jax.random.split(k, 5)).shape == (5, 3)


def test_fold_in_versus_split_children():
    # JAX's threefry (jax_threefry_partitionable, the default) gives split(k, n)[i] ==
    # fold_in(k, i); philox hashes the two into separate domains, so they differ.
    for impl, same in (("threefry", jax.config.jax_threefry_partitionable), ("philox", False)):
        k = prng.key(13, impl)
        a = jax.random.key_data(jax.random.split(k, 3)[2])
        b = jax.random.key_data(jax.random.fold_in(k, 2))
        assert bool(jnp.all(a == b)) == same, impl


def test_philox_split_and_fold_in_hash_into_separate_domains():
    k = prng.key(10, "philox")
    folded = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(k, i))) for i in range(4)])
    split = np.asarray(jax.random.key_data(jax.random.split(k, 4)))
    parent_blocks = np.asarray(jax.random.bits(k, (4 * 64,))).reshape(-1, 4)
    rows = {tuple(r) for r in np.concatenate([folded, split, parent_blocks])}
    assert len(rows) == 4 + 4 + 64  # no child key equals another or a parent stream block


def test_seed_words():
    data = lambda s: [int(v) for v in jax.random.key_data(prng.key(s, "philox"))]
    assert data(0) == [0, 0, 0, 0]
    assert data(123) == [123, 0, 0, 0]
    assert data(-1) == [0xFFFFFFFF, 0xFFFFFFFF, 0, 0]  # as the 64-bit seed -1
    assert data(np.uint32(0xFFFFFFFF)) == [0xFFFFFFFF, 0, 0, 0]
    assert data(2 ** 31) == [2 ** 31, 0, 0, 0]  # not folded onto -2**31 in 32-bit mode
    assert data(2 ** 40 + 3) == [3, 256, 0, 0]
    with pytest.raises(ValueError, match="seed"):
        prng.key(2 ** 64, "philox")
    traced = jax.jit(lambda s: prng.key(s, "philox"))
    for s in (123, -5):  # a traced int32 seed gives the key of the same Python int
        assert [int(v) for v in jax.random.key_data(traced(s))] == data(s)


@pytest.mark.slow
def test_sharded_and_64_bit_modes():
    # one fresh process: 2 CPU devices in 32-bit mode, then 64-bit mode
    code = textwrap.dedent("""
        import importlib.util, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        spec = importlib.util.spec_from_file_location("prng", {path!r})
        prng = importlib.util.module_from_spec(spec)  # this module alone: a faster start
        spec.loader.exec_module(prng)
        # sharded over 2 devices: the same numbers as on one
        k = prng.key(3, "philox")
        mesh = Mesh(np.array(jax.devices()), ("d",))
        f = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), (8,))))
        idx = jax.device_put(jnp.arange(16), NamedSharding(mesh, P("d")))
        assert np.array_equal(f(idx), f(jnp.arange(16)))
        g = jax.jit(lambda k: jax.random.uniform(k, (1024,)),
                    out_shardings=NamedSharding(mesh, P("d")))
        assert np.array_equal(g(k), jax.random.uniform(k, (1024,)))
        print(float(jax.random.normal(prng.key(4, "philox"), (), jnp.float32)))
        # 64-bit mode: the same keys, and 64-bit words made of two 32-bit ones
        jax.config.update("jax_enable_x64", True)
        for s in (0, 123, -1):
            print(*[int(v) for v in jax.random.key_data(prng.key(s, "philox"))])
            # a traced int64 seed gives the same key as the Python int
            t = jax.jit(lambda x: prng.key(x, "philox"))(jnp.int64(s))
            assert [int(v) for v in jax.random.key_data(t)] == \\
                [int(v) for v in jax.random.key_data(prng.key(s, "philox"))]
        k = prng.key(4, "philox")
        w32 = np.asarray(jax.random.bits(k, (20,), jnp.uint32)).astype(np.uint64)
        w64 = np.asarray(jax.random.bits(k, (10,), jnp.uint64))
        assert np.array_equal(w64, (w32[0::2] << np.uint64(32)) | w32[1::2])
        print(*[int(v) for v in jax.random.key_data(prng.key(2 ** 40 + 3, "philox"))])
        assert jax.random.uniform(k, (5,), jnp.float64).dtype == jnp.float64
        print(float(jax.random.normal(k, (), jnp.float32)))
    """).format(path=prng.__file__)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_ENABLE_X64", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    m = 0xFFFFFFFF
    here = float(jax.random.normal(prng.key(4, "philox"), ()))
    assert float(lines[0]) == here and float(lines[5]) == here
    assert lines[1:5] == ["0 0 0 0", "123 0 0 0", f"{m} {m} 0 0", "3 256 0 0"]


# ---------------------------------------------------------------- API and errors

def test_threefry_is_jax_default_generator():
    np.testing.assert_array_equal(
        jax.random.normal(prng.key(12), (10,)),
        jax.random.normal(jax.random.key(12, impl="threefry2x32"), (10,)))


def test_impl_name():
    for name in prng.IMPLS:
        k = prng.key(0, name)
        assert prng.impl_name(k) == name
        assert prng.impl_name(jax.random.split(k, 3)) == name
        assert prng.impl_name(jax.random.fold_in(k, 1)) == name
    with pytest.raises(TypeError, match="typed PRNG key"):
        prng.impl_name(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not one of"):
        prng.impl_name(jax.random.key(0, impl="rbg"))


def test_unknown_impl_and_bad_seed():
    with pytest.raises(ValueError, match="threefry.*philox"):
        prng.key(0, "mersenne")
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed"):
            prng.key(bad, "philox")


def test_run_config_prng_field():
    assert RunConfig().prng == "threefry"
    RunConfig(prng="philox").validate()
    with pytest.raises(ValueError, match="prng.*threefry"):
        RunConfig(prng="xorshift").validate()


def test_sweep_with_philox_independent_of_chunking():
    """A sweep keyed by the Philox generator: instance i's result does not depend on the chunk
    size, and differs from the threefry sweep (another stream)."""

    def fn(k, w):
        return jnp.sum(jax.random.normal(k, (8,)) @ w)
    w = jnp.ones((8, 2))
    key = prng.key(7, "philox")
    a = sweep.run_instances(fn, key, 10, w, chunk_size=3)
    b = sweep.run_instances(fn, key, 10, w, chunk_size=10)
    np.testing.assert_array_equal(a, b)
    one = jax.jit(fn)(jax.random.fold_in(key, 4), w)
    np.testing.assert_allclose(a[4], one, rtol=1e-6)
    c = sweep.run_instances(fn, prng.key(7, "threefry"), 10, w, chunk_size=10)
    assert not np.allclose(a, c)
