"""Monte Carlo throughput on the two standard workloads of DESIGN.md §11.

Workload: MLP 784-256-128-10 (random weights, fixed seed; each layer scaled so that max|W| maps to
g_max), a batch of 1000 inputs uniform in [0, 1), D1 PCM on differential pairs; one chip instance
= programming + drift to 1 day + read noise + global drift compensation + the forward pass.

* ``pcm-ideal-io``: the device model alone.
* ``pcm-default-io``: adds a 7-bit DAC (absmax), a 9-bit ADC (bound 12) and output noise
  σ = 0.06 (units of input-max × weight-max), per 256-row tile, like aihwkit's default periphery.

Reported next to (a) the machine's limit for the same work — the measured time of the workload's
matmuls plus the time to draw the same number of normal random numbers with the generator used —
(b) a straightforward NumPy implementation of the same computation, timed in the same run, and
(c) aihwkit when a Python with aihwkit is given (``../shared/tools/aihwkit_mc.py``).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from typing import Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import chip as chip_mod
from . import crossbar as xb
from . import devices as dev_mod
from . import sweep

__all__ = ["WORKLOADS", "run", "format_report", "numpy_instance", "workload_model"]

LAYERS = (784, 256, 128, 10)
BATCH = 1000
T_READ = 86400.0
WORKLOADS = {
    "pcm-ideal-io": xb.TileConfig(),
    "pcm-default-io": xb.TileConfig(dac_bits=7, adc_bits=9, adc_range="fixed", adc_bound=12.0,
                                    out_noise=0.06),
}


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


def _normals_per_instance(config: xb.TileConfig) -> int:
    """Normal draws of one instance: 2 devices × (programming + drift exponent + read) per weight,
    plus output noise per row tile and column when the periphery has it."""
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


def machine_limit(config: xb.TileConfig, chunk: int = 8) -> Dict[str, float]:
    """Time per instance of the workload's matmuls and of its normal draws (threefry), measured.

    Each is timed in two layouts — a chunk of instances vmapped, and instances one after another
    under ``lax.map`` — and the faster is kept, so the limit is the strictest of the two.
    """
    n_norm = _normals_per_instance(config)
    keys = jax.random.split(jax.random.key(0), chunk)
    draw = lambda k: jnp.sum(jax.random.normal(k, (n_norm,)))  # noqa: E731
    t_rng = min(_timeit(jax.jit(jax.vmap(draw)), keys),
                _timeit(jax.jit(lambda ks: jax.lax.map(draw, ks)), keys)) / chunk
    ws = [jax.random.normal(jax.random.key(i), (chunk, a, b)) for i, (a, b) in
          enumerate(zip(LAYERS[:-1], LAYERS[1:]))]
    x = jax.random.uniform(jax.random.key(9), (BATCH, LAYERS[0]))

    def one(x, w):
        h = x
        for wi in w:
            h = h @ wi
        return jnp.sum(h)
    t_mm = min(_timeit(jax.jit(lambda x, ws: jax.vmap(lambda *w: one(x, w))(*ws)), x, ws),
               _timeit(jax.jit(lambda x, ws: jax.lax.map(lambda w: one(x, w), ws)), x, ws)) / chunk
    flops = 2 * BATCH * sum(a * b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
    return {"normals_per_instance": n_norm, "normals_per_s": n_norm / t_rng,
            "matmul_flops_per_instance": flops, "matmul_flops_per_s": flops / t_mm,
            "t_normals_s": t_rng, "t_matmul_s": t_mm,
            "limit_instances_per_s": 1.0 / (t_rng + t_mm)}


def _instance_fn(model, config):
    device = dev_mod.pcm()

    def fn(key, params, x):  # params and inputs are arguments, not compile-time constants
        k_prog, k_read = jax.random.split(key)
        chip = chip_mod.deploy(k_prog, model, params, device, config)
        logits = chip_mod.apply(k_read, chip, x, T_READ)
        return jnp.mean(logits, axis=0)  # a small output that depends on every logit
    return fn


def nvjax_rate(config: xb.TileConfig, instances: int, chunk_size: int,
               vmap_width: Optional[int] = 2) -> Dict[str, float]:
    """Chip instances per second of nvjax on a workload (compile time excluded)."""
    model, params, x = workload_model()
    fn = _instance_fn(model, config)
    compiled = sweep.compile_chunk(fn, vmap_width=vmap_width)
    key = jax.random.key(0)
    t = time.perf_counter()
    sweep.run_instances(fn, key, chunk_size, params, x, chunk_size=chunk_size, compiled=compiled)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    sweep.run_instances(fn, key, instances, params, x, chunk_size=chunk_size, compiled=compiled)
    dt = time.perf_counter() - t
    return {"instances_per_s": instances / dt, "compile_s": compile_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


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
            hq = np.clip(np.round(h / s_x * n_in), -n_in, n_in) * s_x / n_in
            y = np.zeros((h.shape[0], w.shape[1]), np.float32)
            unit = s_x * (g_max / kappa)
            n_out = 2 ** (config.adc_bits - 1) - 1
            for r0 in range(0, w.shape[0], config.rows):
                part = hq[:, r0:r0 + config.rows] @ w_eff[r0:r0 + config.rows]
                part = part + config.out_noise * unit * rng.standard_normal(part.shape, np.float32)
                bound = config.adc_bound * unit
                y += np.clip(np.round(part / bound * n_out), -n_out, n_out) * bound / n_out
        h = y * alpha + b
        if li < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h.mean(0)


def numpy_rate(config: xb.TileConfig, instances: int = 6) -> float:
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


def aihwkit_rates(python: str) -> Optional[dict]:
    """Run ../shared/tools/aihwkit_mc.py with the given Python; its JSON, or None on failure."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.normpath(os.path.join(here, "..", "..", "shared", "tools", "aihwkit_mc.py"))
    if not os.path.exists(script):
        return None
    out = subprocess.run([python, script, "2"], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, instances: int = 64, chunk_size: int = 8, workloads=("pcm-ideal-io", "pcm-default-io"),
        numpy_baseline: bool = True, aihwkit_python: Optional[str] = None, log=print) -> dict:
    """Benchmark the workloads; returns {workload: {...}} (the JSON printed by ``nvjax bench``)."""
    res = {}
    aihw = aihwkit_rates(aihwkit_python) if aihwkit_python else None
    for name in workloads:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; valid: {sorted(WORKLOADS)}")
        cfg = WORKLOADS[name]
        log(f"[{name}] nvjax: {instances} instances, chunk {chunk_size} ...")
        r = nvjax_rate(cfg, instances, chunk_size)
        log(f"[{name}] machine limit ...")
        lim = machine_limit(cfg, chunk_size)
        r.update(lim)
        r["fraction_of_limit"] = r["instances_per_s"] / lim["limit_instances_per_s"]
        if numpy_baseline:
            log(f"[{name}] NumPy baseline ...")
            r["numpy_instances_per_s"] = numpy_rate(cfg)
            r["speedup_vs_numpy"] = r["instances_per_s"] / r["numpy_instances_per_s"]
        if aihw and name in aihw:
            r["aihwkit_instances_per_s"] = aihw[name]["instances_per_s"]
            r["aihwkit_backend"] = aihw[name].get("backend")
            r["speedup_vs_aihwkit"] = r["instances_per_s"] / r["aihwkit_instances_per_s"]
        r["generator"] = str(jax.config.jax_default_prng_impl)
        r["instances"] = instances
        r["chunk_size"] = chunk_size
        res[name] = r
    return res


def format_report(res: dict) -> str:
    lines = [f"{'workload':<16} {'inst/s':>8} {'limit':>8} {'frac':>6} {'numpy':>8} {'aihwkit':>8}"]
    for name, r in res.items():
        lines.append(f"{name:<16} {r['instances_per_s']:>8.1f} {r['limit_instances_per_s']:>8.1f} "
                     f"{r['fraction_of_limit']:>6.0%} {r.get('numpy_instances_per_s', float('nan')):>8.1f} "
                     f"{r.get('aihwkit_instances_per_s', float('nan')):>8.1f}")
    r = next(iter(res.values()))
    lines.append(f"machine: matmul {r['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, normals "
                 f"{r['normals_per_s'] / 1e6:.0f} M/s ({r['generator']})")
    return "\n".join(lines)
