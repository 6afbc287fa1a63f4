"""Monte Carlo driver: instance keys, chunked compiled execution, results and summaries.

Instance ``i`` of a sweep uses ``fold_in(sweep_key, i)`` and nothing else, so an instance is
reproducible alone and independent of the chunk size. Chunks of instances run through one
compiled, ``vmap``-ed function (the last chunk is padded to the chunk size, so nothing
recompiles); a progress bar advances per chunk; memory is bounded by the chunk size.

This module imports ``chip``, ``config``, ``models``, ``data`` and plotting libraries lazily.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import chip as chip_mod

__all__ = ["instance_keys", "run_instances", "accuracy_instance", "summarize", "reliability",
           "write_results", "plot_accuracy_vs_time", "versions", "format_table"]


def instance_keys(sweep_key, indices) -> jax.Array:
    """Keys of instances ``indices``: ``fold_in(sweep_key, i)`` for each i."""
    return jax.vmap(lambda i: jax.random.fold_in(sweep_key, i))(jnp.asarray(indices, jnp.uint32))


def run_instances(instance_fn: Callable, sweep_key, num_instances: int, *args,
                  chunk_size: int = 256, progress: bool = False, desc: str = "instances",
                  start: int = 0, compiled: Optional[Callable] = None):
    """Evaluate ``instance_fn(key_i, *args)`` for i in [start, start + num_instances).

    Args:
        instance_fn: pure function of one instance key (and ``args``, shared by all instances)
            returning a pytree of arrays.
        sweep_key: the sweep's root key; instance i uses ``fold_in(sweep_key, i)``.
        num_instances: number of instances.
        *args: extra arguments (pytrees of arrays), passed unbatched.
        chunk_size: instances per compiled call; the results do not depend on it.
        progress: show a tqdm progress bar over instances.
        compiled: a function made by :func:`compile_chunk` to reuse (avoids re-tracing).

    Returns:
        The pytree of results with a leading instance axis [num_instances, ...] (NumPy arrays).
    """
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = min(chunk_size, num_instances)
    f = compiled or compile_chunk(instance_fn)
    outs = []
    bar = _progress(num_instances, desc) if progress else None
    for lo in range(0, num_instances, chunk):
        n = min(chunk, num_instances - lo)
        idx = np.arange(start + lo, start + lo + chunk, dtype=np.uint32)  # padded to `chunk`
        res = jax.device_get(f(sweep_key, idx, *args))
        outs.append(jax.tree_util.tree_map(lambda a: a[:n], res))
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *outs)


def compile_chunk(instance_fn: Callable, *, vmap_width: Optional[int] = None) -> Callable:
    """One compiled function for a chunk of instances: ``f(sweep_key, indices, *args)``.

    Args:
        instance_fn: ``instance_fn(key, *args)`` for one instance.
        vmap_width: None vmaps the whole chunk (best for small networks); an int runs the chunk
            as a ``lax.map`` over groups of ``vmap_width`` vmapped instances, which keeps one
            instance's working set in cache (best for large networks on CPU; 1 = sequential).
    """
    def chunk_fn(sweep_key, idx, *args):
        keys = instance_keys(sweep_key, idx)
        one = lambda k: instance_fn(k, *args)  # noqa: E731
        if vmap_width is None:
            return jax.vmap(one)(keys)
        return jax.lax.map(one, keys, batch_size=vmap_width if vmap_width > 1 else None)
    return jax.jit(chunk_fn)


def _progress(total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="inst", file=sys.stderr, dynamic_ncols=True)


def accuracy_instance(model, params, config, x, y, times: Sequence[float]):
    """The instance function of a reliability sweep.

    Programs the network (key ``split(key)[0]``), then for each read time ``t_j`` reads it with key
    ``fold_in(split(key)[1], j)`` and evaluates classification accuracy on ``(x, y)``.

    Returns:
        ``fn(key, device) -> accuracy [T]``.
    """
    times = jnp.asarray(times, jnp.float32)
    x = jnp.asarray(x)
    y = jnp.asarray(y)

    def fn(key, device):
        k_prog, k_read = jax.random.split(key)
        chip = chip_mod.deploy(k_prog, model, params, device, config)

        def one(j):
            logits = chip_mod.apply(jax.random.fold_in(k_read, j), chip, x, times[j])
            return jnp.mean(jnp.argmax(logits, -1) == y)
        return jax.lax.map(one, jnp.arange(times.shape[0]))
    return fn


def summarize(acc: np.ndarray) -> Dict[str, float]:
    """Mean, std, min, max and the 1st, 5th, 50th, 95th, 99th percentiles of a sample."""
    a = np.asarray(acc, np.float64)
    q = np.percentile(a, [1, 5, 50, 95, 99])
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "p1": float(q[0]), "p5": float(q[1]), "p50": float(q[2]),
            "p95": float(q[3]), "p99": float(q[4]), "max": float(a.max()), "n": int(a.size)}


def versions() -> Dict[str, str]:
    """Versions of nvjax and its main dependencies, Python, the platform and the JAX backend."""
    import flax
    import jaxlib
    from . import __version__
    return {"nvjax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "backend": jax.default_backend(),
            "devices": str(jax.devices())}


def reliability(cfg, out_dir: Optional[str] = None, *, log=print) -> Dict[str, Any]:
    """The main job: accuracy distribution of a trained network on NVM chips over read times.

    Trains (or loads) the model of ``cfg.model``, programs ``cfg.sweep.num_instances`` chip
    instances per device point of ``cfg.sweep.device_grid``, and reads each at every time of
    ``cfg.sweep.t_read_s``. Writes ``summary.json``, ``results.csv`` and
    ``accuracy_vs_time.png`` into ``out_dir`` when given.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    from . import config as cfg_mod
    from . import data as data_mod
    from . import models as models_mod

    timings = {}
    t0 = time.perf_counter()
    ds = data_mod.digits(seed=cfg.seed, flatten=cfg.model.name == "mlp")
    model, params, trained = _get_model(cfg, ds, out_dir, models_mod)
    timings["model_s"] = time.perf_counter() - t0
    x, y = ds.x_test, ds.y_test
    if cfg.sweep.eval_samples is not None:
        x, y = x[: cfg.sweep.eval_samples], y[: cfg.sweep.eval_samples]
    ideal_acc = float(models_mod.accuracy(model, params, x, y))
    log(f"model {cfg.model.name}: software test accuracy {ideal_acc:.4f} "
        f"({'trained' if trained else 'loaded'} in {timings['model_s']:.1f} s)")

    points = cfg_mod.device_points(cfg)
    fn = accuracy_instance(model, params, cfg.tile, x, y, cfg.sweep.t_read_s)
    compiled = compile_chunk(fn)
    key = jax.random.key(cfg.seed)
    results = []
    t_run = time.perf_counter()
    for p_idx, (point, device) in enumerate(points):
        desc = "chips" + (f" {point}" if point else "")
        acc = run_instances(fn, key, cfg.sweep.num_instances, device,
                            chunk_size=cfg.sweep.chunk_size, progress=cfg.progress, desc=desc,
                            compiled=compiled)
        results.append(acc)
    timings["sweep_s"] = time.perf_counter() - t_run
    n_total = cfg.sweep.num_instances * len(points)
    timings["instances_per_s"] = n_total / timings["sweep_s"]

    summary = {
        "config": cfg_mod.to_dict(cfg),
        "versions": versions(),
        "seed": cfg.seed,
        "software_accuracy": ideal_acc,
        "timings": timings,
        "points": [],
    }
    for p_idx, (point, _) in enumerate(points):
        for j, t in enumerate(cfg.sweep.t_read_s):
            s = summarize(results[p_idx][:, j])
            summary["points"].append({"device": point, "t_read_s": float(t), **s})
    if out_dir is not None:
        write_results(out_dir, summary, points, cfg.sweep.t_read_s, results)
        plot_accuracy_vs_time(os.path.join(out_dir, "accuracy_vs_time.png"), points,
                              cfg.sweep.t_read_s, results, ideal_acc,
                              title=f"{cfg.model.name} on {cfg.device.kind}, "
                                    f"{cfg.sweep.num_instances} chips")
    return summary


def _get_model(cfg, ds, out_dir, models_mod):
    m = cfg.model
    model = models_mod.MLP(features=tuple(m.hidden) + (10,)) if m.name == "mlp" else models_mod.LeNet()
    path = m.params_path or (os.path.join(out_dir, "params.msgpack") if out_dir else None)
    if path and os.path.exists(path):
        params = models_mod.load_params(path)
        return model, params, False
    params, _ = models_mod.train(jax.random.key(cfg.seed), model, ds, epochs=m.epochs)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        models_mod.save_params(path, params)
    return model, params, True


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir, summary, points, times, results) -> None:
    """Write ``summary.json`` and ``results.csv`` (one row per instance, device point and time)."""
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    names = sorted({k for p, _ in points for k in p})
    tmp = os.path.join(out_dir, "results.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instance", "point"] + names + ["t_read_s", "accuracy"])
        for p_idx, (point, _) in enumerate(points):
            acc = np.asarray(results[p_idx])
            pv = [point.get(n, "") for n in names]
            for i in range(acc.shape[0]):
                for j, t in enumerate(times):
                    w.writerow([i, p_idx] + pv + [float(t), f"{acc[i, j]:.6g}"])
    os.replace(tmp, os.path.join(out_dir, "results.csv"))


def plot_accuracy_vs_time(path, points, times, results, ideal_acc=None, *, title=""):
    """Accuracy vs read time: median, 25–75 % and 1–99 % bands per device point (log time axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = np.asarray(times, float)
    t_plot = np.maximum(t, 1e-3)
    for p_idx, (point, _) in enumerate(points):
        acc = np.asarray(results[p_idx]) * 100
        q = np.percentile(acc, [1, 25, 50, 75, 99], axis=0)
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "median"
        line, = ax.plot(t_plot, q[2], "o-", label=label)
        ax.fill_between(t_plot, q[1], q[3], color=line.get_color(), alpha=0.3, lw=0)
        ax.fill_between(t_plot, q[0], q[4], color=line.get_color(), alpha=0.12, lw=0)
    if ideal_acc is not None:
        ax.axhline(ideal_acc * 100, color="k", ls="--", lw=1, label="software")
    ax.set_xscale("log")
    ax.set_xlabel("time since programming (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title + "\nmedian, 25–75 % and 1–99 % bands", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def format_table(summary) -> str:
    """A plain-text table of accuracy mean / std / 1st percentile per device point and time."""
    rows = [f"{'device point':<24} {'t_read_s':>12} {'mean %':>8} {'std %':>7} {'p1 %':>7} {'p50 %':>7}"]
    for p in summary["points"]:
        name = ", ".join(f"{k}={v}" for k, v in p["device"].items()) or "-"
        rows.append(f"{name:<24} {p['t_read_s']:>12.4g} {100 * p['mean']:>8.2f} "
                    f"{100 * p['std']:>7.2f} {100 * p['p1']:>7.2f} {100 * p['p50']:>7.2f}")
    return "\n".join(rows)
