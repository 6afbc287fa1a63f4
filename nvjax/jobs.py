"""The jobs behind the command line: config -> model -> Monte Carlo engine -> files and figures.

* ``nvjax run`` — :func:`reliability`: the accuracy distribution of a trained network over chip
  instances, device points and read times (``summary.json``, ``results.csv``,
  ``accuracy_vs_time.png``; resumable, sharded over devices and processes);
* ``nvjax lifetime`` — :func:`run_lifetime`: the lifetime loop with read disturb and
  reprogramming (``summary.json``, ``results.csv``, ``events.csv``, ``lifetime.png``).

Everything here sits above the kernels: it reads a :mod:`nvjax.config` run configuration, trains
or loads the model (:func:`get_model`), runs the engine (:mod:`nvjax.sweep`,
:mod:`nvjax.lifetime`) and writes results. Nothing below imports this module.

This module imports ``config``, ``data``, ``layers``, ``models``, ``chip``, ``lifetime``, ``sweep``,
``prng``, ``_io``, ``_runtime`` and matplotlib (lazily, for figures).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import chip as chip_mod
from . import config as cfg_mod
from . import data as data_mod
from . import layers
from . import lifetime as lifetime_mod
from . import models as models_mod
from . import prng as prng_mod
from . import sweep
from ._io import RESUME_VERSIONS, versions, write_csv, write_json
from ._runtime import init_distributed

__all__ = ["accuracy_instance", "reliability", "make_model", "get_model", "write_results",
           "plot_accuracy_vs_time", "format_table", "run_lifetime", "write_lifetime",
           "plot_lifetime", "format_lifetime_report", "params_sha256", "versions",
           "init_distributed"]


def accuracy_instance(model) -> sweep.Staged:
    """The instance function of a reliability sweep of ``model`` (cached per model).

    ``fn(key, device, params, config, x, y, times) -> accuracy [T]``: programs the network with
    key ``split(key)[0]``, then for each read time ``times[j]`` (s) reads it with key
    ``fold_in(split(key)[1], j)`` and evaluates classification accuracy on ``(x, y)``. Two
    stages (:class:`nvjax.sweep.Staged`): programming returns the chip's tiles, the reads rebuild
    the chip. Everything but the model is an argument, so the compiled chunk
    (:func:`nvjax.sweep.compile_chunk`) is reused for new parameters, data, device points and
    tile physics of the same shapes.

    Example:
        >>> model = models.MLP(features=(8, 10))
        >>> x, y = jnp.ones((4, 64)), jnp.zeros((4,), jnp.int32)
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> acc = sweep.run_instances(accuracy_instance(model), jax.random.key(0), 8,
        ...                           devices.pcm(), params, crossbar.TileConfig(), x, y,
        ...                           jnp.array([1.0, 86400.0]), chunk_size=4)
        >>> acc.shape
        (8, 2)
    """
    return _accuracy_staged(model)


@functools.lru_cache(maxsize=64)
def _accuracy_staged(model) -> sweep.Staged:
    def prepare(key, device, params, config, x, y, times):
        k_prog, _ = jax.random.split(key)
        return chip_mod.deploy(k_prog, model, params, device, config=config).tiles

    def finish(key, tiles, device, params, config, x, y, times):
        _, k_read = jax.random.split(key)
        chip = chip_mod.with_tiles(model, params, device, config, tiles)

        def one(j):
            logits = chip_mod.apply(jax.random.fold_in(k_read, j), chip, x, times[j])
            return jnp.mean(jnp.argmax(logits, -1) == y)
        return jax.lax.map(one, jnp.arange(times.shape[0]))
    return sweep.Staged(prepare, finish)


def params_sha256(params) -> str:
    """SHA-256 of a parameter tree (paths, dtypes, shapes and bytes of every leaf)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _reliability_manifest(cfg, params) -> Dict[str, Any]:
    resolved = cfg_mod.to_dict(cfg)
    for k in ("progress", "distributed"):  # do not change the results
        resolved.pop(k, None)
    text = json.dumps(resolved, sort_keys=True)
    v = versions()
    return {"job": "nvjax run (reliability)", "format": 1, "config": json.loads(text),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "params_sha256": params_sha256(params),
            "versions": {k: v[k] for k in RESUME_VERSIONS},
            "chunk_files": "chunks/p<point>-<first instance>-<end instance>.npz"}


def reliability(cfg, out_dir: Optional[str] = None, *, log=print,
                mesh: Optional[Mesh] = None) -> Dict[str, Any]:
    """The main job: accuracy distribution of a trained network on NVM chips over read times.

    Trains (or loads) the model of ``cfg.model``, programs ``cfg.sweep.num_instances`` chip
    instances per device point of ``cfg.sweep.device_grid``, and reads each at every time of
    ``cfg.sweep.t_read_s``. Writes ``summary.json``, ``results.csv`` and
    ``accuracy_vs_time.png`` into ``out_dir`` when given.

    Scaling (results are bit-identical in every case):

    * chunks are sharded over all devices (or ``mesh``), see :func:`nvjax.sweep.compile_chunk`;
    * ``cfg.distributed`` (or the ``NVJAX_*`` environment variables) starts a multi-process run
      with :func:`nvjax.sweep.init_distributed`; every process runs this function with the same config,
      process 0 trains or loads the weights (broadcast to the others) and writes the files;
    * with ``out_dir``, the run is resumable: ``out_dir/manifest.json`` identifies it (resolved
      config without ``progress``/``distributed``, a hash of the weights, nvjax/jax/jaxlib
      versions and backend) and every finished chunk is written atomically to
      ``out_dir/chunks/p<point>-<lo>-<hi>.npz``. A rerun with the same config skips the chunks
      found there; a rerun with another config raises ``ValueError`` (see
      :func:`nvjax.sweep.open_checkpoint`). The chunk files are kept after the run.

    Args:
        cfg: a :class:`nvjax.config.RunConfig`.
        out_dir: output folder (None: nothing is written and nothing resumed).
        log: progress messages (silent on processes other than 0).
        mesh: the device mesh for the chunks (None: all devices).

    Returns:
        The summary dict (also written to ``summary.json``), on every process.
    """
    dist = getattr(cfg, "distributed", None)
    if dist is not None:
        init_distributed(dist.coordinator_address, dist.num_processes, dist.process_id)
    main = jax.process_index() == 0
    if not main:
        log = lambda s: None  # noqa: E731
    timings = {}
    t0 = time.perf_counter()
    ds = data_mod.digits(seed=cfg.seed, flatten=cfg.model.name == "mlp")
    if jax.process_count() == 1:
        model, params, trained = get_model(cfg, ds, out_dir)
    else:  # process 0 trains or loads; the others receive its weights
        if main:
            model, params, trained = get_model(cfg, ds, out_dir)
        else:
            model, trained = make_model(cfg.model), False
            shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ds.x_train[:1]))
            params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        params = sweep.broadcast(jax.tree_util.tree_map(np.asarray, params))
    timings["model_s"] = time.perf_counter() - t0
    x, y = ds.x_test, ds.y_test
    if cfg.sweep.eval_samples is not None:
        x, y = x[: cfg.sweep.eval_samples], y[: cfg.sweep.eval_samples]
    ideal_acc = float(models_mod.accuracy(model, params, x, y))
    log(f"model {cfg.model.name}: software test accuracy {ideal_acc:.4f} "
        f"({'trained' if trained else 'loaded'} in {timings['model_s']:.1f} s)")

    chunk_dir = None
    if out_dir is not None:
        chunk_dir = os.path.join(out_dir, "chunks")
        status, err = 0, None
        if main:
            try:
                status = int(sweep.open_checkpoint(out_dir, _reliability_manifest(cfg, params)))
            except ValueError as e:
                status, err = 2, e
        status = int(sweep.broadcast(np.array(status, np.int32)))
        if err is not None:
            raise err
        if status == 2:
            raise ValueError(f"process 0 refused the output folder {out_dir} "
                             "(it holds a different run); see process 0's error")
        if status == 1:
            log(f"resuming the run in {out_dir}: finished chunks are loaded from {chunk_dir}")

    points = cfg_mod.device_points(cfg)
    fn = accuracy_instance(model)
    data = (layers.strip_params(params), cfg.tile, jnp.asarray(x), jnp.asarray(y),
            jnp.asarray(cfg.sweep.t_read_s, jnp.float32))
    n_all = cfg.sweep.num_instances * len(points)
    optimize = (cfg.sweep.compile == "optimized" or
                (cfg.sweep.compile == "auto" and n_all >= cfg_mod.AUTO_OPTIMIZE_INSTANCES))
    compiled = sweep.compile_chunk(fn, mesh=mesh, optimize=optimize)
    key = prng_mod.key(cfg.seed, cfg.prng)          # the sweep's generator (config 'prng')
    results = []
    n_loaded = 0
    t_run = time.perf_counter()
    for p_idx, (point, device) in enumerate(points):
        desc = "chips" + (f" {point}" if point else "")
        acc, k = sweep.run_instances(fn, key, cfg.sweep.num_instances, device, *data,
                                     chunk_size=cfg.sweep.chunk_size, progress=cfg.progress,
                                     desc=desc, start=0, compiled=compiled, mesh=None,
                                     checkpoint_dir=chunk_dir, checkpoint_name=f"p{p_idx}",
                                     return_loaded=True)
        results.append(acc)
        n_loaded += k
    timings["sweep_s"] = time.perf_counter() - t_run
    n_total = cfg.sweep.num_instances * len(points)
    timings["instances_per_s"] = n_total / timings["sweep_s"]
    n_chunks = len(points) * math.ceil(cfg.sweep.num_instances
                                       / min(cfg.sweep.chunk_size, cfg.sweep.num_instances))
    if n_loaded:
        log(f"{n_loaded} of {n_chunks} chunks loaded from {chunk_dir}")

    summary = {
        "config": cfg_mod.to_dict(cfg),
        "versions": versions(),
        "seed": cfg.seed,
        "software_accuracy": ideal_acc,
        "timings": timings,
        "chunks": {"total": n_chunks, "loaded": n_loaded,
                   "devices": compiled.mesh.size if compiled.mesh is not None else 1,
                   "processes": jax.process_count()},
        "points": [],
    }
    for p_idx, (point, _) in enumerate(points):
        for j, t in enumerate(cfg.sweep.t_read_s):
            s = sweep.summarize(results[p_idx][:, j])
            summary["points"].append({"device": point, "t_read_s": float(t), **s})
    if out_dir is not None and main:
        write_results(out_dir, summary, points, cfg.sweep.t_read_s, results)
        plot_accuracy_vs_time(os.path.join(out_dir, "accuracy_vs_time.png"), points,
                              cfg.sweep.t_read_s, results, ideal_acc,
                              title=f"{cfg.model.name} on {cfg.device.kind}, "
                                    f"{cfg.sweep.num_instances} chips")
    return summary


def make_model(model_cfg: cfg_mod.ModelConfig):
    """The Flax module of a run config's ``model`` section (untrained)."""
    if model_cfg.name == "mlp":
        return models_mod.MLP(features=tuple(model_cfg.hidden) + (10,))
    return models_mod.LeNet()


def get_model(cfg, ds: data_mod.Dataset, out_dir: Optional[str]):
    """The model of ``cfg.model`` and its trained parameters: loaded from ``params_path`` (or
    ``out_dir/params.msgpack``) when that file exists, else trained on ``ds`` with key
    ``cfg.seed`` and saved there.

    Returns:
        (model, params, trained) with ``trained`` False when the parameters were loaded.
    """
    m = cfg.model
    model = make_model(m)
    path = m.params_path or (os.path.join(out_dir, "params.msgpack") if out_dir else None)
    if path and os.path.exists(path):
        return model, models_mod.load_params(path), False
    params, _ = models_mod.train(jax.random.key(cfg.seed), model, ds, epochs=m.epochs)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        models_mod.save_params(path, params)
    return model, params, True


def write_results(out_dir, summary, points, times, results) -> None:
    """Write ``summary.json`` and ``results.csv`` (one row per instance, device point and time)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    names = sorted({k for p, _ in points for k in p})

    def rows():
        for p_idx, (point, _) in enumerate(points):
            acc = np.asarray(results[p_idx])
            pv = [point.get(n, "") for n in names]
            for i in range(acc.shape[0]):
                for j, t in enumerate(times):
                    yield [i, p_idx] + pv + [float(t), f"{acc[i, j]:.6g}"]
    write_csv(os.path.join(out_dir, "results.csv"),
              ["instance", "point"] + names + ["t_read_s", "accuracy"], rows())


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


# --------------------------------------------------------------------------------------------
# The `nvjax lifetime` job
# --------------------------------------------------------------------------------------------
def run_lifetime(cfg, out_dir: Optional[str] = None, *, log=print) -> Dict[str, Any]:
    """Run a :class:`nvjax.config.LifetimeRunConfig`: train/load the model, simulate the chips,
    write ``summary.json``, ``results.csv`` (one row per chip and evaluation point),
    ``events.csv`` (one row per reprogramming) and ``lifetime.png`` into ``out_dir``.

    Returns:
        The summary dict.
    """
    t0 = time.perf_counter()
    timings = {}
    ds = data_mod.digits(seed=cfg.seed, flatten=cfg.model.name == "mlp")
    model, params, trained = get_model(cfg, ds, out_dir)
    timings["model_s"] = time.perf_counter() - t0
    x, y = ds.x_test, ds.y_test
    if cfg.eval_samples is not None:
        x, y = x[: cfg.eval_samples], y[: cfg.eval_samples]
    ideal_acc = float(models_mod.accuracy(model, params, x, y))
    log(f"model {cfg.model.name}: software test accuracy {ideal_acc:.4f} "
        f"({'trained' if trained else 'loaded'} in {timings['model_s']:.1f} s)")
    device = cfg_mod.make_device(cfg.device)
    disturb = cfg_mod.make_disturb(cfg.disturb, cfg.device)
    lc = cfg.lifetime
    fns = lifetime_mod.lifetime(model, params, device, cfg.tile, disturb, x, y, config=lc)
    log(f"{cfg.num_chips} chips × {lc.num_steps} steps of {lc.inferences_per_step:.3g} inferences "
        f"({lc.num_steps * lc.inferences_per_step:.3g} in all, {lc.num_steps * lc.dt_s:.3g} s), "
        f"policy {lc.policy}")
    t1 = time.perf_counter()
    rec = lifetime_mod.run(fns, jax.random.key(cfg.seed), cfg.num_chips, chunk_size=cfg.chunk_size,
              progress=cfg.progress)
    timings["simulate_s"] = time.perf_counter() - t1
    timings["chip_steps_per_s"] = cfg.num_chips * lc.num_steps / timings["simulate_s"]
    summary = {"config": cfg_mod.to_dict(cfg), "versions": versions(), "seed": cfg.seed,
               "software_accuracy": ideal_acc, "timings": timings,
               "inferences": lifetime_mod.eval_inferences(lc).tolist(),
               **lifetime_mod.summarize(rec, lc)}
    if out_dir is not None:
        write_lifetime(out_dir, summary, rec, lc)
        plot_lifetime(os.path.join(out_dir, "lifetime.png"), rec, lc, ideal_acc,
             title=f"{cfg.model.name} on {cfg.device.kind}, {cfg.num_chips} chips, "
                   f"v_read {cfg.tile.v_read} V, IR drop {cfg.tile.ir_drop}, policy {lc.policy}")
    return summary


def write_lifetime(out_dir: str, summary: Dict[str, Any], record: lifetime_mod.LifetimeRecord,
                   config: lifetime_mod.LifetimeConfig) -> None:
    """Write ``summary.json``, ``results.csv`` and ``events.csv`` of a lifetime run (atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "summary.json"), summary)
    total = lifetime_mod.eval_inferences(config)
    cols = ("accuracy", "fresh_accuracy", "g_error", "reprogrammed", "t_s", "inferences_since",
            "max_row_reads")
    arrs = [np.asarray(getattr(record, c)) for c in cols]

    def rows():
        for c in range(arrs[0].shape[0]):
            for e in range(arrs[0].shape[1]):
                yield [c, e, f"{total[e]:.6g}"] + [
                    int(a[c, e]) if a.dtype == bool else f"{float(a[c, e]):.6g}" for a in arrs]
    write_csv(os.path.join(out_dir, "results.csv"), ("chip", "eval", "inferences") + cols, rows())
    write_csv(os.path.join(out_dir, "events.csv"),
              ("chip", "event", "inferences", "inferences_since_programming",
               "t_since_programming_s", "max_row_reads"),
              ([row[0], row[1]] + [f"{v:.6g}" for v in row[2:]]
               for row in lifetime_mod.reprogram_events(record, config)))


def plot_lifetime(path: str, record: lifetime_mod.LifetimeRecord,
                  config: lifetime_mod.LifetimeConfig, ideal_acc=None, *,
         title: str = "") -> None:
    """Accuracy vs inferences (median, 25–75 % and 5–95 % bands over chips) with reprogramming
    events (ticks: how many chips reprogrammed at each point), and reprogrammings per chip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = lifetime_mod.eval_inferences(config)
    acc = np.asarray(record.accuracy) * 100
    flags = np.asarray(record.reprogrammed)
    q = np.percentile(acc, [5, 25, 50, 75, 95], axis=0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.8, 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(n, q[2], "-", color="C0", label="median over chips")
    ax.fill_between(n, q[1], q[3], color="C0", alpha=0.3, lw=0, label="25–75 %")
    ax.fill_between(n, q[0], q[4], color="C0", alpha=0.12, lw=0, label="5–95 %")
    ax.plot(n, acc[0], "-", color="C3", lw=0.8, alpha=0.8, label="chip 0")
    ev = np.flatnonzero(flags[0])
    ax.plot(n[ev], acc[0, ev], "v", color="C3", ms=5, label="chip 0 reprogrammed")
    fresh = float(np.asarray(record.fresh_accuracy)[:, 0].mean()) * 100
    if config.policy == "accuracy":
        ax.axhline(fresh - 100 * config.accuracy_drop, color="C2", ls=":", lw=1,
                   label=f"mean fresh − {100 * config.accuracy_drop:g} %")
    if ideal_acc is not None:
        ax.axhline(ideal_acc * 100, color="k", ls="--", lw=1, label="software")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax2.plot(n, flags.cumsum(axis=1).mean(axis=0), "-", color="C1", label="mean reprogrammings")
    ax2.bar(n, flags.mean(axis=0), width=np.diff(np.concatenate([[0], n])) * 0.8, color="C1",
            alpha=0.4, align="edge", label="fraction of chips reprogrammed here")
    ax2.set_xlabel("inferences served")
    ax2.set_ylabel("per chip")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def format_lifetime_report(summary: Dict[str, Any]) -> str:
    """A few lines on the run's outcome."""
    n = summary["inferences"]
    p50, p5 = summary["accuracy_p50"], summary["accuracy_p5"]
    marks = sorted({0, len(n) // 10, len(n) // 4, len(n) // 2, len(n) - 1})
    rows = [f"{'inferences':>12} {'p50 %':>7} {'p5 %':>7}"]
    rows += [f"{n[i]:>12.3g} {100 * p50[i]:>7.2f} {100 * p5[i]:>7.2f}" for i in marks]

    def fmt(v):
        return "-" if v is None else f"{v:.3g}"
    rows.append(f"fresh accuracy {100 * summary['fresh_accuracy_mean']:.2f} %; reprogrammings per "
                f"chip {summary['reprograms_mean']:.2f} ± {summary['reprograms_std']:.2f} "
                f"({summary['chips_reprogrammed']}/{summary['num_chips']} chips); first interval "
                f"median {fmt(summary['first_interval_median'])} inferences; mean interval "
                f"{fmt(summary['interval_mean'])}")
    return "\n".join(rows)
