"""Throughput on realistic workloads: the ResNet-20-style CNN and the transformer, nvjax vs aihwkit.

    python experiments/bench_workloads.py [--aihwkit-python PATH] [--instances N] [--out FILE]

Workloads (``<model>-pcm-<periphery>``): ``models.ResNet()`` on a batch of 256 32x32x3 inputs
and ``models.Transformer()`` on a batch of 256 sequences of 16 one-hot tokens (vocabulary 12),
random weights (fixed seed), D1 PCM (g_max 25 µS) on differential pairs; one chip instance =
programming + drift to one day + read noise + global drift compensation + one forward pass,
run as the library's sweeps run it (:func:`nvjax.bench.workload_instance` under
:func:`nvjax.sweep.run_instances`). Periphery: ``ideal-io`` (the device model alone) and
``default-io`` (:data:`nvjax.bench.WORKLOADS` ``'pcm-default-io'``: 7-bit DAC scaled per input
vector, 9-bit ADC, output noise 0.06, 256-row tiles).

Reported per workload: nvjax instances/s (compile excluded), the time of one chip forward pass
on a programmed chip against the same network's software forward pass in JAX (both jitted), the
machine's matmul limit for the forward pass (its multiply-adds at the measured XLA:CPU matmul
rate), and, with ``--aihwkit-python``, aihwkit's fastest back-end on torch networks of the same
shapes (``experiments/aihwkit_workloads.py``, 1 and 2 torch threads) in the same run. Prints a
table and writes one JSON file (default ``experiments/results/bench_workloads.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from nvjax import bench, chip, devices, models, prng, sweep

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 256
T_READ = 86400.0
CHUNK = {"resnet": 1, "transformer": 32}


def workload(name, seed=0):
    """(model, variables, inputs) of a workload's network."""
    key = jax.random.key(seed)
    if name == "resnet":
        model = models.ResNet()
        x = jax.random.uniform(jax.random.fold_in(key, 1), (BATCH, 32, 32, 3))
    else:
        model = models.Transformer()
        tokens = jax.random.randint(jax.random.fold_in(key, 1), (BATCH, 16), 0, 12)
        x = jax.nn.one_hot(tokens, 12)
    return model, model.init(key, x), x


def _best(f, *args, repeat=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def forward_flops(model, variables, x) -> float:
    """Multiply-adds ×2 of one forward pass, from XLA's cost analysis of the software model."""
    cost = jax.jit(lambda v, a: model.apply(v, a)).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def measure(name, io, instances):
    model, v, x = workload(name)
    config = bench.WORKLOADS["pcm-" + io]
    software = _best(jax.jit(lambda v_, a: model.apply(v_, a)), v, x)
    prog = jax.jit(lambda k: chip.deploy(k, model, v, devices.pcm(), config=config))
    c = prog(jax.random.key(1))
    fwd = jax.jit(lambda k, c_, a: chip.apply(k, c_, a, T_READ))
    chip_fwd = _best(fwd, jax.random.key(2), c, x, repeat=3)
    fn = bench.workload_instance(model, config)
    compiled = sweep.compile_chunk(fn, vmap_width=None)
    key = prng.key(0, "threefry")
    t = time.perf_counter()
    sweep.run_instances(fn, key, CHUNK[name], v, x, chunk_size=CHUNK[name], compiled=compiled)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    sweep.run_instances(fn, key, instances, v, x, chunk_size=CHUNK[name], compiled=compiled)
    run_s = time.perf_counter() - t
    flops = forward_flops(model, v, x)
    matmul_s = flops / _matmul_rate()
    return {"instances_per_s": instances / run_s, "compile_s": compile_s,
            "chip_forward_s": chip_fwd, "software_forward_s": software,
            "chip_over_software": chip_fwd / software, "forward_gflop": flops / 1e9,
            "forward_matmul_limit_s": matmul_s,
            "weights": int(sum(a.size for a in jax.tree.leaves(v["params"])))}


_RATE = {}


def _matmul_rate() -> float:
    """The machine's XLA:CPU float32 matmul rate, FLOP/s (2048² × 2048 product, best of 5)."""
    if "r" not in _RATE:
        a = jnp.ones((2048, 2048), jnp.float32)
        _RATE["r"] = 2 * 2048 ** 3 / _best(jax.jit(lambda p, q: p @ q), a, a)
    return _RATE["r"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aihwkit-python", help="a Python with aihwkit installed")
    ap.add_argument("--instances", type=int, default=8, help="chip instances timed per workload")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_workloads.json"))
    args = ap.parse_args(argv)
    res = {"jax": jax.__version__, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
           "matmul_gflops": _matmul_rate() / 1e9, "workloads": {}}
    for name in ("resnet", "transformer"):
        for io in ("ideal-io", "default-io"):
            wl = f"{name}-pcm-{io}"
            print(f"{wl} ...", file=sys.stderr, flush=True)
            res["workloads"][wl] = measure(name, io, args.instances)
    if args.aihwkit_python:
        print("aihwkit ...", file=sys.stderr, flush=True)
        aih = bench.aihwkit_rates(args.aihwkit_python,
                                  script=os.path.join(HERE, "aihwkit_workloads.py"))
        res["aihwkit"] = aih
        for wl, r in res["workloads"].items():
            if aih and wl in aih:
                r["aihwkit_instances_per_s"] = aih[wl]["instances_per_s"]
                r["speedup_vs_aihwkit"] = r["instances_per_s"] / aih[wl]["instances_per_s"]
    print(f"{'workload':28s} {'nvjax inst/s':>12s} {'aihwkit':>9s} {'×':>6s} "
          f"{'chip fwd s':>10s} {'sw fwd s':>9s} {'chip/sw':>7s} {'matmul s':>9s}")
    for wl, r in res["workloads"].items():
        print(f"{wl:28s} {r['instances_per_s']:12.2f} "
              f"{r.get('aihwkit_instances_per_s', float('nan')):9.2f} "
              f"{r.get('speedup_vs_aihwkit', float('nan')):6.1f} {r['chip_forward_s']:10.3f} "
              f"{r['software_forward_s']:9.3f} {r['chip_over_software']:7.2f} "
              f"{r['forward_matmul_limit_s']:9.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
