"""Peak memory of a Monte Carlo sweep over a model with ~10 M weights against the instance count.

    python experiments/bench_memory.py [--instances 1000] [--chunk-size 2] [--io ideal-io]

The model is an MLP 784-2048-2048-2048-10 (10.0 M weights, random, fixed seed), a batch of
256 inputs in [0, 1), D1 PCM on differential pairs; one instance = programming + drift to one
day + read noise + drift compensation + forward, as :func:`nvjax.bench.workload_instance`
under :func:`nvjax.sweep.run_instances` (chunks of ``--chunk-size`` instances: the programmed
state exists only for the chunk being run). Prints one JSON line: instances, instances/s,
compile time and the process's peak resident memory (VmHWM) after compiling and after the sweep.
Run it with several ``--instances`` (each in a fresh process) to see that the peak does not grow
with the instance count.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax

from nvjax import bench, prng, sweep

WIDTHS = (2048, 2048, 2048, 10)


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(WIDTHS):
            x = nn.Dense(w)(x)
            if i < len(WIDTHS) - 1:
                x = nn.relu(x)
        return x


def peak_rss_mb() -> float:
    """VmHWM of this process, MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--io", default="ideal-io", choices=("ideal-io", "default-io"))
    args = ap.parse_args(argv)
    sweep.limit_malloc_arenas()
    model = Wide()
    x = jax.random.uniform(jax.random.key(1), (256, 784))
    v = model.init(jax.random.key(0), x)
    weights = sum(a.size for a in jax.tree.leaves(v["params"]) if a.ndim == 2)
    fn = bench.workload_instance(model, bench.WORKLOADS["pcm-" + args.io])
    compiled = sweep.compile_chunk(fn, vmap_width=None)
    key = prng.key(0, "philox")
    t = time.perf_counter()
    sweep.run_instances(fn, key, args.chunk_size, v, x, chunk_size=args.chunk_size,
                        compiled=compiled)
    compile_s = time.perf_counter() - t
    rss_compiled = peak_rss_mb()
    t = time.perf_counter()
    out = sweep.run_instances(fn, key, args.instances, v, x, chunk_size=args.chunk_size,
                              compiled=compiled)
    run_s = time.perf_counter() - t
    res = {"weights": int(weights), "instances": args.instances, "chunk_size": args.chunk_size,
           "io": args.io, "instances_per_s": args.instances / run_s, "run_s": run_s,
           "compile_s": compile_s, "peak_rss_after_compile_mb": rss_compiled,
           "peak_rss_mb": peak_rss_mb(), "result_shape": list(jax.tree.leaves(out)[0].shape)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
