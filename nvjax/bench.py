"""Monte Carlo throughput on the two standard workloads of DESIGN.md §11.

Workload: MLP 784-256-128-10 (random weights, fixed seed; each layer scaled so that max|W| maps to
g_max), a batch of 1000 inputs uniform in [0, 1), D1 PCM on differential pairs; one chip instance
= programming + drift to 1 day + read noise + global drift compensation + the forward pass, run
exactly as the library's own sweeps run it: ``chip.deploy`` then ``chip.apply`` as the two stages
of a :class:`nvjax.sweep.Staged` instance function under :func:`nvjax.sweep.run_instances`.

* ``pcm-ideal-io``: the device model alone.
* ``pcm-default-io``: adds a 7-bit DAC (absmax), a 9-bit ADC (bound 12) and output noise
  σ = 0.06 (units of input-max × weight-max), per 512-row tile, and iterative bound management
  (a vector whose output saturates a tile's ADC is read again at twice the DAC full scale, up
  to 5 reads), like aihwkit's default periphery and mapping. Bound management matters here: at
  full scale every input vector saturates the first layer's 512-row tile and 77 % its 272-row
  tile (sums of hundreds of inputs in [0, 1) against a bound of 12 × input-max × weight-max;
  counted noise-free on the workload's weights); clipped instead, the first layer's outputs
  would be cut at the bound. (Until 2026-12-08 nvjax's side clipped, on 256-row tiles.)

Both workloads use 512 × 512 tiles (:data:`TILE`), aihwkit's default mapping.

Each workload is timed with every generator of :mod:`nvjax.prng` and reported next to

* the machine's limit for the same work with the same generator: the measured time of the
  workload's matmuls plus the time to draw the same number of normal random numbers
  (``jax.random.normal``); the headline limit uses the fastest generator nvjax offers;
* a straightforward NumPy implementation of the same computation, timed in the same run;
* aihwkit, when a Python with aihwkit is given (``../shared/tools/aihwkit_mc.py``, run in a
  subprocess in the same run, at 1 and 2 torch threads, keeping its fastest back-end);
* instances/s and peak resident memory against the instance count (each count in a fresh
  process, so the peak is that run's; the child caps malloc arenas as ``nvjax`` does, see
  :func:`nvjax.sweep.limit_malloc_arenas`), and against the number of devices (forced host devices,
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, in subprocesses).

Network workloads (:data:`NETWORK_WORKLOADS`, ``<network>-pcm-<periphery>``): the ResNet-20-style
CNN (:class:`nvjax.models.ResNet`, batch 256 of 32×32×3 inputs) and the transformer encoder
(:class:`nvjax.models.Transformer`, batch 256 of 16 one-hot tokens, vocabulary 12), random
weights (fixed seed), the same device and peripheries; one instance = programming + drift to one
day + read noise + drift compensation + one forward pass. Each is reported with the time of one
chip forward pass against the same network's software forward pass (both jitted), the machine's
limit (the forward's FLOPs at the measured matmul rate plus the instance's normal draws), and
aihwkit on torch networks of the same shapes (``experiments/aihwkit_workloads.py`` of the
repository) when a Python with aihwkit is given.

``python -m nvjax.bench --child SPEC`` (:func:`main`) is the subprocess entry point (one JSON line
out).
This module imports ``chip``, ``crossbar``, ``devices``, ``layers``, ``models``, ``prng`` and
``sweep``.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import chip as chip_mod
from . import crossbar as xb
from . import devices as dev_mod
from . import layers
from . import models as models_mod
from . import prng
from . import sweep

__all__ = ["WORKLOADS", "NETWORK_WORKLOADS", "GENERATORS", "run", "network_workload",
           "network_rate", "format_report", "numpy_instance", "workload_model",
           "workload_instance", "normals_per_instance", "draw_shapes", "machine_limit",
           "nvjax_rate", "numpy_rate", "aihwkit_rates", "measure_in_subprocess", "rate_vs_count",
           "device_scaling", "main"]

LAYERS = (784, 256, 128, 10)
BATCH = 1000
T_READ = 86400.0
#: Tile size of the workloads: aihwkit's default mapping (``MappingParameter.max_input_size =
#: max_output_size = 512``, aihwkit 1.2), so that both tools give every layer as many tiles
#: (until 2026-12-08 nvjax's side used its own default, 256 × 256: twice the row tiles, ADCs
#: and output-noise draws on the 784-row layer). The split still differs: aihwkit divides a
#: layer evenly (``TileModuleArray``: 784 rows as 392 + 392, a 576-row conv as 288 + 288),
#: nvjax fills full tiles first (512 + 272, 512 + 64).
TILE = 512
WORKLOADS = {
    "pcm-ideal-io": xb.TileConfig(rows=TILE, cols=TILE),
    "pcm-default-io": xb.TileConfig(rows=TILE, cols=TILE, dac_bits=7, adc_bits=9,
                                    adc_range="fixed", adc_bound=12.0, out_noise=0.06,
                                    bound_management="iterative"),
}
#: Network workloads: name -> (network, periphery of :data:`WORKLOADS`).
NETWORK_WORKLOADS = {f"{net}-{io}": (net, io) for net in ("resnet", "transformer")
                     for io in WORKLOADS}
#: Batch of the network workloads, and instances per compiled chunk (the ResNet one at a time:
#: its activations, not random numbers, fill the cache; the transformer four at a time, about 2×
#: the rate of 32 at a time on 2 cores, 187 against 83 /s on pcm-ideal-io, 2026-12-08).
NETWORK_BATCH = 256
NETWORK_CHUNK_SIZES = {"resnet": 1, "transformer": 4}
#: Timed instances per network workload in ``nvjax bench`` (the transformer's: 32 chunks, so
#: that its chunk size is the one timed and the run lasts about a second).
NETWORK_INSTANCES = {"resnet": 8, "transformer": 128}
#: Generators timed (names of :data:`nvjax.prng.IMPLS`).
GENERATORS = tuple(prng.IMPLS)
#: Instances per compiled chunk for each workload (the fastest on the 2-core development CPU:
#: pcm-default-io's per-tile output-noise arrays stay in cache at 2), and the vmap width (None:
#: the whole chunk vmapped); see README "Benchmark".
CHUNK_SIZES = {"pcm-ideal-io": 4, "pcm-default-io": 2}
CHUNK_SIZE = 4
VMAP_WIDTH = None


class _BenchMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, n in enumerate(LAYERS[1:]):
            x = nn.Dense(n)(x)
            if i < len(LAYERS) - 2:
                x = nn.relu(x)
        return x


def workload_model(seed: int = 0):
    """(model, params, inputs [1000, 784]) of the standard workload."""
    model = _BenchMLP()
    x = jax.random.uniform(jax.random.key(seed + 1), (BATCH, LAYERS[0]))
    params = model.init(jax.random.key(seed), x)["params"]
    return model, params, x


def normals_per_instance(config: xb.TileConfig) -> int:
    """Normal draws of one instance of the workload (:func:`workload_instance`): 2 devices ×
    (programming + drift exponent + read) per weight, plus output noise per row tile and column
    when the periphery has it, for one read of every vector. Bound management's re-reads (as
    many as the data need) draw the output noise again; they are left out, so the limit of
    :func:`machine_limit` is generous where they happen. The random-number part of that limit."""
    n = sum(6 * a * b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
    if config.out_noise > 0:
        n += sum(BATCH * xb.num_row_tiles(a, config) * b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
    return n


def _timeit(f, *args, repeat=5):
    jax.block_until_ready(f(*args))
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MB: ``VmHWM`` of /proc/self/status where there is one
    (``ru_maxrss`` of a child started from a large parent can report the parent's size, kept
    through ``exec`` on Linux), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    per_mb = 2.0 ** 20 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def draw_shapes(config: xb.TileConfig) -> list:
    """The shapes of one instance's normal draws in the library (their sizes sum to
    :func:`normals_per_instance`): per layer (programming, drift exponent, read) arrays
    [n_in, n_out], one per device of the pair, and output noise [B, Ti, n_out]."""
    shapes = []
    for a, b in zip(LAYERS[:-1], LAYERS[1:]):
        shapes += [(a, b)] * 6
        if config.out_noise > 0:
            shapes.append((BATCH, xb.num_row_tiles(a, config), b))
    return shapes


LIMIT_CHUNKS = (2, 8)


def normals_time(n: int, generator: str = "threefry", chunks: Sequence[int] = LIMIT_CHUNKS,
                 shapes: Optional[Sequence[tuple]] = None) -> float:
    """Seconds per instance to draw ``n`` standard normals (``jax.random.normal``) with a generator.

    The best of several layouts, so that the result bounds what any code can reach: one array of
    ``n`` per instance or the arrays ``shapes`` (the library's own draws), for a chunk of instances
    vmapped or one instance after another under ``lax.map``, at each chunk size of ``chunks``.
    """
    layouts = [lambda k: jnp.sum(jax.random.normal(k, (n,)))]
    if shapes:
        def per_shape(k):
            ks = jax.random.split(k, len(shapes))
            return sum(jnp.sum(jax.random.normal(ki, s)) for ki, s in zip(ks, shapes))
        layouts.append(per_shape)
    best = np.inf
    for chunk in chunks:
        keys = jax.random.split(prng.key(0, generator), chunk)
        for draw in layouts:
            best = min(best, _timeit(jax.jit(jax.vmap(draw)), keys) / chunk,
                       _timeit(jax.jit(lambda ks, d=draw: jax.lax.map(d, ks)), keys) / chunk)
    return best


def matmul_time(chunks: Sequence[int] = LIMIT_CHUNKS) -> float:
    """Seconds per instance of the workload's matmuls (batch 1000 through 784-256-128-10), with
    per-instance weights; the best of the vmapped and the ``lax.map`` layout at each chunk size."""
    x = jax.random.uniform(jax.random.key(9), (BATCH, LAYERS[0]))

    def one(x, w):
        h = x
        for wi in w:
            h = h @ wi
        return jnp.sum(h)
    best = np.inf
    for chunk in chunks:
        ws = [jax.random.normal(jax.random.key(i), (chunk, a, b)) for i, (a, b) in
              enumerate(zip(LAYERS[:-1], LAYERS[1:]))]
        best = min(best,
                   _timeit(jax.jit(lambda x, ws: jax.vmap(lambda *w: one(x, w))(*ws)), x, ws) / chunk,
                   _timeit(jax.jit(lambda x, ws: jax.lax.map(lambda w: one(x, w), ws)), x, ws) / chunk)
    return best


def machine_limit(config: xb.TileConfig, *, generator: str = "threefry",
                  chunks: Sequence[int] = LIMIT_CHUNKS,
                  t_matmul: Optional[float] = None) -> Dict[str, float]:
    """The machine's limit for one instance: time of its matmuls + time of its normal draws.

    Both are the best over layouts and chunk sizes (:func:`normals_time`, :func:`matmul_time`), so
    the limit is an upper bound for the workload with that generator.

    Args:
        config: the workload's tile options (decide the number of normals).
        generator: a name of :data:`nvjax.prng.IMPLS`.
        chunks: chunk sizes tried.
        t_matmul: a matmul time (s per instance) measured before, to reuse.

    Returns:
        normals and FLOPs per instance, their measured rates and times, and
        ``limit_instances_per_s = 1 / (t_normals + t_matmul)``.
    """
    n_norm = normals_per_instance(config)
    shapes = draw_shapes(config)
    assert sum(int(np.prod(s)) for s in shapes) == n_norm
    t_rng = normals_time(n_norm, generator, chunks, shapes)
    t_mm = matmul_time(chunks) if t_matmul is None else t_matmul
    flops = 2 * BATCH * sum(a * b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
    return {"normals_per_instance": n_norm, "normals_per_s": n_norm / t_rng,
            "matmul_flops_per_instance": flops, "matmul_flops_per_s": flops / t_mm,
            "t_normals_s": t_rng, "t_matmul_s": t_mm,
            "limit_instances_per_s": 1.0 / (t_rng + t_mm)}


def workload_instance(model, config: xb.TileConfig) -> sweep.Staged:
    """The workload's instance function, as the library's sweeps run it (and as
    :func:`nvjax_rate` times it): ``fn(key, params, x) -> mean logits [10]`` in two stages
    (:class:`nvjax.sweep.Staged`), programming (``chip.deploy``) then the read at one day
    (``chip.apply``). Parameters and inputs are arguments, not compile-time constants.

    Args:
        model: the Flax model of :func:`workload_model`.
        config: the tile options of a workload (a value of :data:`WORKLOADS`).
    """
    device = dev_mod.pcm()

    def prepare(key, params, x):
        k_prog, _ = jax.random.split(key)
        return chip_mod.deploy(k_prog, model, params, device, config=config).tiles

    def finish(key, tiles, params, x):
        _, k_read = jax.random.split(key)
        chip = chip_mod.with_tiles(model, params, device, config, tiles)
        logits = chip_mod.apply(k_read, chip, x, T_READ)
        return jnp.mean(logits, axis=0)  # a small output that depends on every logit
    return sweep.Staged(prepare, finish)


def nvjax_rate(config: xb.TileConfig, instances: int, chunk_size: int = CHUNK_SIZE, *,
               vmap_width: Optional[int] = VMAP_WIDTH, generator: str = "threefry",
               repeat: int = 1) -> Dict[str, float]:
    """Chip instances per second of nvjax on a workload (compile time excluded).

    The sweep runs through :func:`nvjax.sweep.run_instances` with a sweep key of ``generator``,
    on every visible device (sharded when there are several); the best of ``repeat`` timed runs
    is kept.
    """
    model, params, x = workload_model()
    fn = workload_instance(model, config)
    compile_s, best, rss_warm = _time_sweep(fn, prng.key(0, generator), instances,
                                            (params, x), chunk_size, vmap_width, repeat)
    return {"instances_per_s": instances / best, "compile_s": compile_s, "run_s": best,
            "rss_after_compile_mb": rss_warm, "peak_rss_mb": _peak_rss_mb(),
            "num_devices": jax.device_count()}


def _time_sweep(fn, key, instances: int, args, chunk_size: int, vmap_width, repeat: int):
    """Compile ``fn``'s chunk (one chunk run, timed as the compile) and time ``repeat`` sweeps
    of ``instances`` through :func:`nvjax.sweep.run_instances`.

    Returns:
        ``(compile_s, best run_s, peak RSS in MB after compiling)``.
    """
    compiled = sweep.compile_chunk(fn, vmap_width=vmap_width)
    t = time.perf_counter()
    sweep.run_instances(fn, key, chunk_size, *args, chunk_size=chunk_size, compiled=compiled)
    compile_s = time.perf_counter() - t
    rss_warm = _peak_rss_mb()
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        sweep.run_instances(fn, key, instances, *args, chunk_size=chunk_size, compiled=compiled)
        best = min(best, time.perf_counter() - t)
    return compile_s, best, rss_warm


# ---------------------------------------------------------------------------------------------
# Network workloads: the ResNet-style CNN and the transformer
# ---------------------------------------------------------------------------------------------
def network_workload(network: str, seed: int = 0):
    """``(model, variables, inputs)`` of a network workload: ``'resnet'`` (``models.ResNet()``,
    inputs [256, 32, 32, 3] uniform in [0, 1)) or ``'transformer'`` (``models.Transformer()``,
    256 sequences of 16 one-hot tokens of a vocabulary of 12); random weights from ``seed``."""
    key = jax.random.key(seed)
    if network == "resnet":
        model = models_mod.ResNet()
        x = jax.random.uniform(jax.random.fold_in(key, 1), (NETWORK_BATCH, 32, 32, 3))
    elif network == "transformer":
        model = models_mod.Transformer()
        tokens = jax.random.randint(jax.random.fold_in(key, 1), (NETWORK_BATCH, 16), 0, 12)
        x = jax.nn.one_hot(tokens, 12)
    else:
        raise ValueError(f"network must be 'resnet' or 'transformer', got {network!r}")
    return model, model.init(key, x), x


def _forward_flops(model, variables, x) -> float:
    """FLOPs of one software forward pass (XLA's cost analysis; multiply-adds count 2)."""
    cost = jax.jit(lambda v, a: model.apply(v, a)).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def network_rate(name: str, instances: int, *, chunk_size: Optional[int] = None,
                 generator: str = "threefry", repeat: int = 1,
                 t_matmul: Optional[float] = None) -> Dict[str, float]:
    """A network workload (a key of :data:`NETWORK_WORKLOADS`): nvjax instances/s (compile
    excluded, best of ``repeat``), one chip forward pass against the software forward pass, and
    the machine's limit.

    Returns:
        ``instances_per_s``, ``compile_s``, ``chip_forward_s``, ``software_forward_s``,
        ``chip_over_software``, ``forward_flops``, ``weights``, ``normals_per_instance``,
        ``t_matmul_s`` (the forward's FLOPs at the measured matmul rate), ``t_normals_s``
        (the weights' normal draws; output-noise draws are left out, so the limit is generous),
        ``limit_instances_per_s`` = 1 / (t_matmul + t_normals), ``fraction_of_limit``.
    """
    if name not in NETWORK_WORKLOADS:
        raise ValueError(f"unknown network workload {name!r}; valid: {sorted(NETWORK_WORKLOADS)}")
    network, io = NETWORK_WORKLOADS[name]
    config = WORKLOADS[io]
    chunk = min(chunk_size or NETWORK_CHUNK_SIZES[network], instances)
    model, v, x = network_workload(network)
    device = dev_mod.pcm()
    software = _timeit(jax.jit(lambda v_, a: model.apply(v_, a)), v, x)
    prog = jax.jit(lambda k: chip_mod.deploy(k, model, v, device, config=config))
    c = prog(prng.key(1, generator))
    fwd = jax.jit(lambda k, c_, a: chip_mod.apply(k, c_, a, T_READ))
    # the forward's own draws (read and output noise) from the sweep's generator
    chip_fwd = _timeit(fwd, prng.key(2, generator), c, x, repeat=3)
    fn = workload_instance(model, config)
    compile_s, best, _ = _time_sweep(fn, prng.key(0, generator), instances, (v, x), chunk,
                                     None, repeat)
    flops = _forward_flops(model, v, x)
    if t_matmul is None:
        t_matmul = matmul_time()
    # the MLP workload's matmul rate, applied to this network's FLOPs
    mlp_flops = 2 * BATCH * sum(a * b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
    t_mm = flops * t_matmul / mlp_flops
    # crossbar weights (every kernel; biases and BatchNorm are digital): 2 devices × (programming,
    # drift exponent, read) normals each
    weights = sum(int(np.prod(k.shape))
                  for k in layers.kernels(layers.strip_params(v)).values())
    n_norm = 6 * weights
    t_rng = normals_time(n_norm, generator, chunks=(chunk,))
    limit = 1.0 / (t_mm + t_rng)
    rate = instances / best
    return {"instances_per_s": rate, "compile_s": compile_s, "run_s": best,
            "chunk_size": chunk, "chip_forward_s": chip_fwd, "software_forward_s": software,
            "chip_over_software": chip_fwd / software, "forward_flops": flops,
            "weights": weights, "normals_per_instance": n_norm, "t_matmul_s": t_mm,
            "t_normals_s": t_rng, "limit_instances_per_s": limit,
            "fraction_of_limit": rate / limit, "generator": generator}


# ---------------------------------------------------------------------------------------------
# NumPy baseline: the same computation, written straightforwardly.
# ---------------------------------------------------------------------------------------------
def numpy_instance(rng: np.random.Generator, weights: Sequence[np.ndarray], biases, x: np.ndarray,
                   config: xb.TileConfig) -> np.ndarray:
    """One chip instance of the workload in NumPy (same physics as nvjax.devices.pcm)."""
    d = dev_mod.PCM()
    g_max, t0, t_r = d.g_max, d.t0, d.t_read
    h = x
    for li, (w, b) in enumerate(zip(weights, biases)):
        kappa = g_max / np.abs(w).max()
        g_t = np.stack([np.clip(w * kappa, 0, g_max), np.clip(-w * kappa, 0, g_max)])
        gh = g_t / g_max
        sig = (-1.1731 * gh ** 2 + 1.9650 * gh + 0.26348) * (g_max / 25.0)
        g_prog = np.maximum(g_t + sig * rng.standard_normal(g_t.shape, np.float32), 0.0)
        lg = np.log(np.maximum(gh, 1e-7))
        mu = np.clip(-0.0155 * lg + 0.0244, 0.049, 0.1)
        sd = np.clip(-0.0125 * lg - 0.0059, 0.008, 0.045)
        nu = np.abs(mu + sd * rng.standard_normal(g_t.shape, np.float32))
        g = g_prog * ((T_READ + t0) / t0) ** (-nu)
        q = np.minimum(0.0088 / np.maximum((g_prog / g_max) ** 0.65, 1e-3), 0.2)
        g = np.maximum(g + np.abs(g) * q * np.sqrt(np.log((T_READ + t_r) / (2 * t_r)))
                       * rng.standard_normal(g.shape, np.float32), 0.0)
        ref0 = np.abs((g_prog[0] - g_prog[1]).sum(0)).sum()
        diff = g[0] - g[1]
        alpha = ref0 / np.abs(diff.sum(0)).sum()
        w_eff = diff / kappa
        if config.ideal_periphery:
            y = h @ w_eff
        else:
            s_x = np.abs(h).max(1, keepdims=True)
            s_x[s_x == 0] = 1.0
            n_in = 2 ** (config.dac_bits - 1) - 1
            n_out = 2 ** (config.adc_bits - 1) - 1
            passes = xb.bound_management_passes(config)
            y = np.zeros((h.shape[0], w.shape[1]), np.float32)
            for r0 in range(0, w.shape[0], config.rows):
                for c0 in range(0, w.shape[1], config.cols):
                    w_t = w_eff[r0:r0 + config.rows, c0:c0 + config.cols]
                    out = np.zeros((h.shape[0], w_t.shape[1]), np.float32)
                    todo = np.arange(h.shape[0])      # vectors read (again) on this tile
                    for j in range(passes):           # bound management: full scale × 2^j
                        s = s_x[todo] * np.float32(2 ** j)
                        hq = np.clip(np.round(h[todo, r0:r0 + config.rows] / s * n_in),
                                     -n_in, n_in) * s / n_in
                        unit = s * (g_max / kappa)
                        part = hq @ w_t + config.out_noise * unit * rng.standard_normal(
                            (todo.size, w_t.shape[1]), np.float32)
                        code = part / (config.adc_bound * unit) * n_out
                        out[todo] = (np.clip(np.round(code), -n_out, n_out)
                                     * config.adc_bound * unit / n_out)
                        todo = todo[np.any(np.abs(code) >= n_out + 0.5, axis=1)]
                        if not todo.size:
                            break
                    y[:, c0:c0 + config.cols] += out
        h = y * alpha + b
        if li < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h.mean(0)


def numpy_rate(config: xb.TileConfig, instances: int = 6) -> float:
    """Instances per second of :func:`numpy_instance` (one warm-up instance first)."""
    _, params, x = workload_model()
    ws = [np.asarray(params[f"Dense_{i}"]["kernel"]) for i in range(len(LAYERS) - 1)]
    bs = [np.asarray(params[f"Dense_{i}"]["bias"]) for i in range(len(LAYERS) - 1)]
    x = np.asarray(x)
    rng = np.random.default_rng(0)
    numpy_instance(rng, ws, bs, x, config)
    t = time.perf_counter()
    for _ in range(instances):
        numpy_instance(rng, ws, bs, x, config)
    return instances / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# aihwkit, in another Python
# ---------------------------------------------------------------------------------------------
def _aihwkit_script() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "shared", "tools", "aihwkit_mc.py"))


def _aihwkit_network_script() -> str:
    """The aihwkit side of the network workloads: ``experiments/aihwkit_workloads.py`` of the
    repository this package was installed from (editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "experiments", "aihwkit_workloads.py"))


def aihwkit_rates(python: str, threads: Sequence[int] = (1, 2), *,
                  script: Optional[str] = None) -> Optional[dict]:
    """Run the aihwkit side of the benchmark with the given Python at each torch thread count.

    Args:
        python: a Python executable with aihwkit installed.
        threads: torch thread counts; the script gets the count as its one argument and prints,
            as its last stdout line, ``{workload: {"instances_per_s", "backend"[, "all"]}}``.
        script: the script to run (default ``../shared/tools/aihwkit_mc.py`` beside the
            repository).

    Returns:
        ``{workload: {"instances_per_s", "backend", "threads", "all": {"<backend>@<n>t": rate}}}``
        with the fastest back-end and thread count per workload; ``{"error": [one message per
        thread count]}`` if every run failed; None if the script is missing.
    """
    script = _aihwkit_script() if script is None else script
    if not os.path.exists(script):
        return None
    best: dict = {}
    errors = []
    for n in threads:
        try:
            out = subprocess.run([python, script, str(int(n))], capture_output=True, text=True)
        except OSError as e:
            errors.append(f"{n} threads: {e}")
            continue
        if out.returncode != 0:
            errors.append(f"{n} threads: " + " ".join(out.stderr.strip().splitlines()[-1:]))
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        for name, r in res.items():
            entry = best.setdefault(name, {"instances_per_s": 0.0, "all": {}})
            for backend, rate in r.get("all", {r["backend"]: r["instances_per_s"]}).items():
                entry["all"][f"{backend}@{n}t"] = rate
                if rate > entry["instances_per_s"]:
                    entry.update(instances_per_s=rate, backend=backend, threads=int(n))
    if not best:
        return {"error": errors}
    return best


# ---------------------------------------------------------------------------------------------
# Measurements in fresh processes: rate and peak memory vs instance count, device scaling
# ---------------------------------------------------------------------------------------------
def _child_main(spec: dict) -> dict:
    """The subprocess side: one :func:`nvjax_rate` measurement described by ``spec``."""
    r = nvjax_rate(WORKLOADS[spec["workload"]], int(spec["instances"]), int(spec["chunk_size"]),
                   vmap_width=spec.get("vmap_width"), generator=spec.get("generator", "threefry"),
                   repeat=int(spec.get("repeat", 1)))
    r["instances"] = int(spec["instances"])
    return r


def _force_devices_flags(flags: str, n: int) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", flags).strip()
    return f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


def measure_in_subprocess(spec: dict, *, num_devices: Optional[int] = None,
                          timeout: Optional[float] = None) -> dict:
    """Run one measurement (see :func:`_child_main`) in a fresh Python; its JSON result.

    Args:
        spec: workload, instances, chunk_size, vmap_width, generator, repeat.
        num_devices: force this many host (CPU) devices in the child; None keeps the parent's
            ``XLA_FLAGS``.
        timeout: seconds before the child is stopped.
    """
    env = dict(os.environ)
    if num_devices is not None:
        env["XLA_FLAGS"] = _force_devices_flags(env.get("XLA_FLAGS", ""), num_devices)
    cmd = [sys.executable, "-m", "nvjax.bench", "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        return {"error": " ".join(out.stderr.strip().splitlines()[-2:])}
    return json.loads(out.stdout.strip().splitlines()[-1])


def rate_vs_count(workload: str, counts: Sequence[int], *, chunk_size: int = CHUNK_SIZE,
                  vmap_width: Optional[int] = VMAP_WIDTH, generator: str = "threefry",
                  log=print) -> list:
    """Instances/s and peak RSS for each instance count, each in a fresh process.

    Returns:
        One dict per count: instances, instances_per_s (compile excluded), compile_s,
        rss_after_compile_mb and peak_rss_mb of that process.
    """
    rows = []
    for n in counts:
        log(f"[{workload}] {n} instances in a fresh process ({generator}) ...")
        r = measure_in_subprocess({"workload": workload, "instances": int(n),
                                   "chunk_size": chunk_size, "vmap_width": vmap_width,
                                   "generator": generator})
        r.setdefault("instances", int(n))
        rows.append(r)
    return rows


def device_scaling(workload: str, num_devices: Sequence[int] = (1, 2, 4), *, instances: int = 64,
                   chunk_size: int = CHUNK_SIZE, vmap_width: Optional[int] = VMAP_WIDTH,
                   generator: str = "threefry", repeat: int = 2, log=print) -> list:
    """Instances/s on N forced host devices (a subprocess each), sharding each chunk over them.

    The chunk grows with the device count (``chunk_size`` per device) and the instance count is
    rounded up to whole chunks. On a CPU the forced devices share the machine's cores, so the
    scaling is bounded by the core count.
    """
    rows = []
    for d in num_devices:
        chunk = chunk_size * int(d)
        n = -(-max(instances, chunk) // chunk) * chunk
        log(f"[{workload}] {d} forced host device(s), {n} instances, chunk {chunk} ...")
        r = measure_in_subprocess({"workload": workload, "instances": n, "chunk_size": chunk,
                                   "vmap_width": vmap_width, "generator": generator,
                                   "repeat": repeat}, num_devices=int(d))
        r["num_devices"] = int(d)
        rows.append(r)
    base = rows[0].get("instances_per_s") if rows else None
    for r in rows:
        if base and "instances_per_s" in r:
            r["speedup"] = r["instances_per_s"] / base
    return rows


def _peak_growth(rows, lo=1000) -> Optional[float]:
    """Relative growth of peak RSS from the smallest count >= ``lo`` to the largest count."""
    ok = [r for r in rows if "peak_rss_mb" in r and r["instances"] >= lo]
    if len(ok) < 2:
        return None
    ok.sort(key=lambda r: r["instances"])
    return ok[-1]["peak_rss_mb"] / ok[0]["peak_rss_mb"] - 1.0


# ---------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------
def run(*, instances: int = 64, chunk_size: Optional[int] = None,
        vmap_width: Optional[int] = VMAP_WIDTH, workloads=("pcm-ideal-io", "pcm-default-io"),
        generators: Sequence[str] = GENERATORS, repeat: int = 3, counts: Sequence[int] = (),
        num_devices: Sequence[int] = (), numpy_baseline: bool = True,
        aihwkit_python: Optional[str] = None, aihwkit_threads: Sequence[int] = (1, 2),
        network_instances: Optional[int] = None, log=print) -> dict:
    """Benchmark the workloads; returns ``{workload: {...}}`` (the JSON printed by ``nvjax bench``).

    Args:
        instances: timed instances per workload and generator (best of ``repeat`` runs).
        chunk_size: instances per compiled chunk (None: :data:`CHUNK_SIZES` of the workload).
        vmap_width: the chunked execution (:func:`nvjax.sweep.compile_chunk`).
        workloads: names of :data:`WORKLOADS` (the MLP) and of :data:`NETWORK_WORKLOADS`
            (timed by :func:`network_rate` with each generator, the one with the most
            instances/s kept, ``network_instances`` instances, one timed run; no NumPy
            baseline, counts or device scaling).
        generators: generators to time (:data:`nvjax.prng.IMPLS`); the headline numbers use the
            one with the highest measured normal throughput.
        counts: instance counts for rate and peak memory vs count (fresh processes); () skips.
        num_devices: forced host device counts for the scaling runs; () skips.
        numpy_baseline: time the NumPy implementation.
        aihwkit_python: a Python with aihwkit to run beside (same run), or None.
        aihwkit_threads: torch thread counts tried for aihwkit (its fastest is kept).
        network_instances: timed instances per network workload (None:
            :data:`NETWORK_INSTANCES` of the network).

    Returns:
        Per workload: ``instances_per_s``, ``limit_instances_per_s``, ``fraction_of_limit`` and
        ``generator`` (the fastest generator), ``generators`` (the same per generator), machine
        rates, ``numpy_instances_per_s``, ``aihwkit_instances_per_s`` and the speedups, and
        ``vs_count`` / ``devices`` rows when asked for.
    """
    for name in workloads:
        if name not in WORKLOADS and name not in NETWORK_WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; valid: "
                             f"{sorted(WORKLOADS) + sorted(NETWORK_WORKLOADS)}")
    networks = [w for w in workloads if w in NETWORK_WORKLOADS]
    workloads = [w for w in workloads if w in WORKLOADS]
    for g in generators:
        if g not in prng.IMPLS:
            raise ValueError(f"unknown generator {g!r}; valid: {list(prng.IMPLS)}")
    if not generators:
        raise ValueError("generators: name at least one generator")
    aihw = None
    if aihwkit_python:
        log(f"aihwkit ({aihwkit_python}, torch threads {list(aihwkit_threads)}) ...")
        aihw = aihwkit_rates(aihwkit_python, aihwkit_threads) if workloads else {}
        if networks:
            net = aihwkit_rates(aihwkit_python, aihwkit_threads,
                                script=_aihwkit_network_script())
            if net and "error" not in net:
                aihw = {**(aihw or {}), **net}
            elif net:
                aihw = {**(aihw or {}), "network_error": net["error"]}
    log("machine: matmul time ...")
    t_mm = matmul_time()
    res = {}
    for name in workloads:
        cfg = WORKLOADS[name]
        chunk = chunk_size or CHUNK_SIZES.get(name, CHUNK_SIZE)
        per_gen = {}
        for g in generators:
            log(f"[{name}] nvjax ({g}): {instances} instances, chunk {chunk}, "
                f"vmap_width {vmap_width} ...")
            r = nvjax_rate(cfg, instances, chunk, vmap_width=vmap_width, generator=g,
                           repeat=repeat)
            log(f"[{name}] machine limit ({g}) ...")
            lim = machine_limit(cfg, generator=g, t_matmul=t_mm)
            r.update(lim)
            r["fraction_of_limit"] = r["instances_per_s"] / lim["limit_instances_per_s"]
            per_gen[g] = r
        fastest = max(per_gen, key=lambda g: per_gen[g]["normals_per_s"])
        r = dict(per_gen[fastest])
        r["generator"] = fastest
        r["generators"] = {g: {k: v[k] for k in ("instances_per_s", "limit_instances_per_s",
                                                 "fraction_of_limit", "normals_per_s",
                                                 "t_normals_s", "compile_s")}
                           for g, v in per_gen.items()}
        r.update(instances=instances, chunk_size=chunk, vmap_width=vmap_width,
                 repeat=repeat, backend=jax.default_backend(), cpu_count=os.cpu_count())
        if numpy_baseline:
            log(f"[{name}] NumPy baseline ...")
            r["numpy_instances_per_s"] = numpy_rate(cfg)
            r["speedup_vs_numpy"] = r["instances_per_s"] / r["numpy_instances_per_s"]
        if aihw and name in aihw:
            a = aihw[name]
            r["aihwkit_instances_per_s"] = a["instances_per_s"]
            r["aihwkit_backend"] = a.get("backend")
            r["aihwkit_threads"] = a.get("threads")
            r["aihwkit_all"] = a.get("all")
            r["speedup_vs_aihwkit"] = r["instances_per_s"] / a["instances_per_s"]
        elif aihw and "error" in aihw:
            r["aihwkit_error"] = aihw["error"]
        if counts:
            r["vs_count"] = rate_vs_count(name, counts, chunk_size=chunk,
                                          vmap_width=vmap_width, generator=fastest, log=log)
            r["peak_rss_growth_from_1e3"] = _peak_growth(r["vs_count"])
        if num_devices:
            r["devices"] = device_scaling(name, num_devices, instances=instances,
                                          chunk_size=chunk, vmap_width=vmap_width,
                                          generator=fastest, log=log)
        res[name] = r
    for name in networks:
        n_net = network_instances or NETWORK_INSTANCES[NETWORK_WORKLOADS[name][0]]
        per_gen = {}
        for g in generators:
            log(f"[{name}] nvjax ({g}): {n_net} instances ...")
            per_gen[g] = network_rate(name, n_net, generator=g, t_matmul=t_mm)
        # a network's draws are few next to its arithmetic: the generator with the most
        # instances/s gives the headline (the normals' throughput does not decide it)
        fastest = max(per_gen, key=lambda g: per_gen[g]["instances_per_s"])
        r = dict(per_gen[fastest])
        r["generators"] = {g: {k: v[k] for k in ("instances_per_s", "chip_forward_s",
                                                 "chip_over_software", "fraction_of_limit",
                                                 "compile_s")}
                           for g, v in per_gen.items()}
        r.update(instances=n_net, backend=jax.default_backend(),
                 cpu_count=os.cpu_count())
        if aihw and name in aihw:
            a = aihw[name]
            r.update(aihwkit_instances_per_s=a["instances_per_s"],
                     aihwkit_backend=a.get("backend"), aihwkit_threads=a.get("threads"),
                     aihwkit_all=a.get("all"),
                     speedup_vs_aihwkit=r["instances_per_s"] / a["instances_per_s"])
        elif aihw and "network_error" in aihw:
            r["aihwkit_error"] = aihw["network_error"]
        res[name] = r
    return res


def _f(v, fmt=".1f"):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def format_report(res: dict) -> str:
    """A plain-text report of :func:`run`'s result."""
    mlp = {k: v for k, v in res.items() if k in WORKLOADS}
    nets = {k: v for k, v in res.items() if k in NETWORK_WORKLOADS}
    lines = []
    if nets:
        lines.append(f"{'network workload':<26} {'gen':<8} {'inst/s':>8} {'limit':>8} {'frac':>6} "
                     f"{'aihwkit':>8} {'x aihw':>7} {'chip fwd s':>10} {'sw fwd s':>9} "
                     f"{'chip/sw':>7}")
        for name, r in nets.items():
            lines.append(
                f"{name:<26} {r['generator']:<8} {r['instances_per_s']:>8.2f} "
                f"{r['limit_instances_per_s']:>8.2f} "
                f"{r['fraction_of_limit']:>6.0%} {_f(r.get('aihwkit_instances_per_s'), '.2f'):>8} "
                f"{_f(r.get('speedup_vs_aihwkit'), '.2f'):>7} {r['chip_forward_s']:>10.3f} "
                f"{r['software_forward_s']:>9.3f} {r['chip_over_software']:>7.2f}")
            if r.get("aihwkit_error"):
                lines.append(f"  aihwkit error: {r['aihwkit_error']}")
        if not mlp:
            return "\n".join(lines)
    res = mlp
    lines.append(f"{'workload':<16} {'generator':<9} {'inst/s':>8} {'limit':>8} {'frac':>6} "
                 f"{'numpy':>7} {'aihwkit':>8} {'x aihw':>7}")
    for name, r in res.items():
        for g, rg in r["generators"].items():
            head = g == r["generator"]
            lines.append(
                f"{name:<16} {g + ('*' if head else ''):<9} {rg['instances_per_s']:>8.1f} "
                f"{rg['limit_instances_per_s']:>8.1f} {rg['fraction_of_limit']:>6.0%} "
                f"{_f(r.get('numpy_instances_per_s')) if head else '':>7} "
                f"{_f(r.get('aihwkit_instances_per_s')) if head else '':>8} "
                f"{_f(rg['instances_per_s'] / r['aihwkit_instances_per_s'], '.2f') if r.get('aihwkit_instances_per_s') else '-':>7}")
    r = next(iter(res.values()))
    rates = ", ".join(f"{g} {v['normals_per_s'] / 1e6:.0f} M/s" for g, v in r["generators"].items())
    lines.append(f"machine: matmul {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s; normals {rates} "
                 f"(* fastest generator, used for the headline numbers)")
    for name, r in res.items():
        if r.get("aihwkit_backend"):
            lines.append(f"aihwkit on {name}: {r['aihwkit_backend']}, {r['aihwkit_threads']} torch "
                         f"thread(s)")
        if r.get("vs_count"):
            lines.append(f"{name}: instances/s and peak RSS vs instance count (fresh processes)")
            for c in r["vs_count"]:
                if "error" in c:
                    lines.append(f"  {c['instances']:>8}  error: {c['error']}")
                    continue
                lines.append(f"  {c['instances']:>8} {c['instances_per_s']:>8.1f} inst/s "
                             f"{c['peak_rss_mb']:>8.0f} MB peak ({c['rss_after_compile_mb']:.0f} MB "
                             f"after compile)")
            if r.get("peak_rss_growth_from_1e3") is not None:
                lines.append(f"  peak RSS growth from 10^3 to {r['vs_count'][-1]['instances']}: "
                             f"{r['peak_rss_growth_from_1e3']:+.1%}")
        if r.get("devices"):
            lines.append(f"{name}: forced host devices (this machine has {r['cpu_count']} cores)")
            for d in r["devices"]:
                if "error" in d:
                    lines.append(f"  {d['num_devices']:>3} devices  error: {d['error']}")
                    continue
                lines.append(f"  {d['num_devices']:>3} devices {d['instances_per_s']:>8.1f} inst/s "
                             f"(x{d.get('speedup', float('nan')):.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The subprocess entry point, ``python -m nvjax.bench --child SPEC``: one
    :func:`nvjax_rate` measurement described by the JSON ``SPEC`` (workload, instances,
    chunk_size, and optionally vmap_width, generator, repeat), printed as one JSON line."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m nvjax.bench",
                                description="subprocess entry of the benchmark (use `nvjax bench`)")
    p.add_argument("--child", required=True, help="JSON measurement spec")
    args = p.parse_args(argv)
    sweep.limit_malloc_arenas()  # as `nvjax` does, before the first computation
    print(json.dumps(_child_main(json.loads(args.child))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
