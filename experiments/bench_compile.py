"""Compile-once benchmark: what a second sweep, and sweeps over tile physics and device
parameters, cost in tracing and time (issue 13's acceptance numbers).

Workload: the quickstart's digits MLP 64-64-10 (weights from ``model.init``; the timing does not
depend on training) on D1 PCM, 450 test digits read at 5 times, 256×256 tiles, chunk 250.

Measured, each in this one process:

1. ``run_instances`` of ``jobs.accuracy_instance(model)`` twice with the same shapes: the
   second call's trace count (0 expected: the compiled chunk is cached per instance function)
   and its wall time against the first;
2. the same with a fresh closure per call (how ``nvjax run`` worked before: one new compiled
   function per call);
3. a 4-point grid over ``r_wire`` (first-order IR drop) and a 4-point grid over the PCM
   read-noise amplitude ``read_q``: traces per stage over the whole grid (1 expected).

Traces are counted by wrapping the two stages. Run: ``python experiments/bench_compile.py``
(add ``--instances N`` for another count; ``--json`` prints one JSON line).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from nvjax import chip, crossbar, data, devices, jobs, models, sweep


def _counted(model, counter):
    """A two-stage accuracy function like ``jobs.accuracy_instance`` that counts its traces."""
    base = jobs.accuracy_instance(model)

    def prepare(*a):
        counter["prepare"] += 1
        return base.prepare(*a)

    def finish(*a):
        counter["finish"] += 1
        return base.finish(*a)
    return sweep.Staged(prepare, finish)


def _timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def run(instances: int = 1000, chunk_size: int = 250) -> dict:
    ds = data.digits(seed=0, flatten=True)
    model = models.MLP(features=(64, 10))
    params = model.init(jax.random.key(0), jnp.asarray(ds.x_train[:1]))["params"]
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    times = jnp.asarray((1.0, 3600.0, 86400.0, 2592000.0, 31536000.0), jnp.float32)
    key = jax.random.key(0)
    res = {"instances": instances, "chunk_size": chunk_size}

    # 1. the same function twice
    count = {"prepare": 0, "finish": 0}
    fn = _counted(model, count)
    args = (devices.pcm(), params, crossbar.TileConfig(), x, y, times)
    _, t1 = _timed(lambda: sweep.run_instances(fn, key, instances, *args, chunk_size=chunk_size))
    traces1 = dict(count)
    _, t2 = _timed(lambda: sweep.run_instances(fn, key, instances, *args, chunk_size=chunk_size))
    res["same_function"] = {"first_s": t1, "second_s": t2, "speedup": t1 / t2,
                            "traces_first": traces1,
                            "traces_second": {k: count[k] - traces1[k] for k in count}}

    # 2. a fresh closure per call (the old behaviour)
    def closure_call():
        def one(k, device):
            k_prog, k_read = jax.random.split(k)
            c = chip.deploy(k_prog, model, params, device, config=crossbar.TileConfig())
            return jax.lax.map(lambda j: jnp.mean(jnp.argmax(
                chip.apply(jax.random.fold_in(k_read, j), c, x, times[j]), -1) == y),
                jnp.arange(times.shape[0]))
        return sweep.run_instances(one, key, instances, devices.pcm(), chunk_size=chunk_size)
    _, c1 = _timed(closure_call)
    _, c2 = _timed(closure_call)
    res["fresh_closure"] = {"first_s": c1, "second_s": c2}

    # 3. grids over tile physics and a device parameter
    for name, points in (
            ("r_wire", [(devices.pcm(), crossbar.TileConfig(ir_drop="first_order", r_wire=r))
                        for r in (0.5, 1.0, 2.0, 4.0)]),
            ("read_q", [(devices.pcm(read_q=q), crossbar.TileConfig())
                        for q in (0.0044, 0.0088, 0.0176, 0.0352)])):
        count = {"prepare": 0, "finish": 0}
        fn = _counted(model, count)
        walls = []
        for dev, cfg in points:
            _, t = _timed(lambda: sweep.run_instances(fn, key, instances, dev, params, cfg, x, y,
                                                      times, chunk_size=chunk_size))
            walls.append(t)
        res[f"grid_{name}"] = {"traces": dict(count), "wall_s": walls}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=250)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = run(a.instances, a.chunk_size)
    if not a.json:
        s = res["same_function"]
        print(f"same function twice: {s['first_s']:.2f} s then {s['second_s']:.2f} s "
              f"({s['speedup']:.1f}x); traces {s['traces_first']} then {s['traces_second']}")
        f = res["fresh_closure"]
        print(f"fresh closure per call: {f['first_s']:.2f} s then {f['second_s']:.2f} s")
        for g in ("grid_r_wire", "grid_read_q"):
            print(f"{g}: traces {res[g]['traces']}, wall per point "
                  + ", ".join(f"{t:.2f}" for t in res[g]["wall_s"]) + " s")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
