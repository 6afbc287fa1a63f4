"""The jobs behind the command line: config -> model -> Monte Carlo engine -> files and figures.

* ``nvjax run`` — :func:`reliability`: the accuracy distribution of a trained network over chip
  instances, device points and read times (``summary.json``, ``results.csv``,
  ``accuracy_vs_time.png``; resumable, sharded over devices and processes);
* ``nvjax lifetime`` — :func:`run_lifetime`: the lifetime loop with read disturb and
  reprogramming (``summary.json``, ``results.csv``, ``events.csv``, ``lifetime.png``).

Everything here sits above the kernels: it reads a :mod:`nvjax.config` run configuration, trains
or loads the model (:func:`get_model`), runs the engine (:mod:`nvjax.sweep`,
:mod:`nvjax.lifetime`) and writes results. Nothing below imports this module.

Runs cannot mix or lie: an output folder is tied to one run by its ``manifest.json`` (another
config there is refused, naming the keys that changed), trained weights are tied to the model
config that produced them by ``<weights>.manifest.json`` (:func:`get_model`), and the
processes of a multi-process run check that they were given the same settings before any work.

Numbers that cannot be trusted are not reported as results: a chip instance (or lifetime
evaluation point) whose IR-drop solve failed has accuracy NaN, is counted in ``summary.json``
(``ir_unconverged_instances``, ``ir_unconverged_points``), is never written to a resume file,
and the job ends with a :class:`~nvjax._checks.UserError` saying what to change; where the
first-order IR-drop form is used (``tile.ir_drop: first_order`` or ``tile.ir_predistort``),
its estimated error on the layers' ideal target conductances is checked before the sweep and a
``RuntimeWarning`` gives the numbers when it is not a valid model of the tiles.

This module imports ``config``, ``data``, ``layers``, ``models``, ``chip``, ``crossbar``,
``irdrop``, ``lifetime``, ``sweep``, ``prng``, ``_checks``, ``_io``, ``_runtime`` and matplotlib
(lazily, for figures).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import warnings
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from . import chip as chip_mod
from . import config as cfg_mod
from . import crossbar as xb
from . import data as data_mod
from . import irdrop
from . import layers
from . import lifetime as lifetime_mod
from . import models as models_mod
from . import prng as prng_mod
from . import sweep
from ._checks import UserError
from ._io import RESUME_VERSIONS, flatten_dotted, versions, write_csv, write_json
from ._runtime import first_error, gather_text, init_distributed

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
            acc = jnp.mean(jnp.argmax(logits, -1) == y)
            # a failed IR-drop solve gives NaN logits: NaN accuracy, never argmax's guess
            return jnp.where(jnp.all(jnp.isfinite(logits)), acc, jnp.nan)
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


#: Training settings of :func:`get_model` (``nvjax.models.train``'s defaults, written out so that
#: the parameters' manifest records them).
_TRAINING = {"optimizer": "adam", "batch_size": 64, "learning_rate": 1e-3, "weight_decay": 0.0}


def _differences(old: Dict[str, Any], new: Dict[str, Any], limit: int = 8) -> str:
    """``'key: old -> new; ...'`` over the flattened keys of two dicts that differ."""
    a, b = flatten_dotted(old), flatten_dotted(new)
    diff = [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    return "; ".join(diff[:limit]) + (f"; ... ({len(diff)} keys)" if len(diff) > limit else "")


def _resolved(cfg, drop=("progress", "distributed")) -> Dict[str, Any]:
    """The resolved config as plain JSON types, without the keys that do not change results."""
    resolved = json.loads(json.dumps(cfg_mod.to_dict(cfg)))
    for k in drop:
        resolved.pop(k, None)
    return resolved


def _resume_manifest(job: str, resolved: Dict[str, Any], params=None) -> Dict[str, Any]:
    text = json.dumps(resolved, sort_keys=True)
    v = versions()
    manifest = {"job": job, "format": 2, "config": resolved,
                "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "versions": {k: v[k] for k in RESUME_VERSIONS}}
    if params is not None:
        manifest["params_sha256"] = params_sha256(params)
    return manifest


def _reliability_manifest(cfg, params=None) -> Dict[str, Any]:
    resolved = _resolved(cfg)
    resolved["sweep"].pop("chunk_size", None)  # results do not depend on it: resume may change it
    m = _resume_manifest("nvjax run (reliability)", resolved, params)
    m["chunk_files"] = "chunks/p<point>-<first instance>-<end instance>.npz (any chunk size)"
    return m


def _lifetime_manifest(cfg, params=None) -> Dict[str, Any]:
    resolved = _resolved(cfg)
    resolved.pop("chunk_size", None)  # results do not depend on it
    return _resume_manifest("nvjax lifetime", resolved, params)


def _claim(out_dir: str, manifest: Dict[str, Any], *, final: bool) -> bool:
    """Check (``final=False``: before the weights are known, nothing written) or claim the
    output folder for the run of ``manifest`` (see :func:`nvjax.sweep.open_checkpoint`)."""
    ignore = ("config_sha256",) if final else ("config_sha256", "params_sha256")
    return sweep.open_checkpoint(out_dir, manifest, ignore=ignore, create=final)


def _on_process0(fn):
    """``fn()`` on process 0 only (its result there, None elsewhere); an error there is raised
    on every process (a :class:`~nvjax._checks.UserError` with the same message), so that no
    process waits for one that has given up."""
    if jax.process_count() == 1:
        return fn()
    result, exc = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others are told)
            exc = e
    message = None if exc is None else (
        str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
    problem = first_error(message)
    if exc is not None and not isinstance(exc, UserError):
        raise exc
    if problem:
        raise UserError(problem) from exc
    return result


def _agree_on_config(cfg) -> None:
    """All processes of a multi-process run must run the same computation: compare their
    resolved configs (all but ``progress``, ``distributed`` and ``model.params_path``, which
    only process 0 reads) and nvjax/JAX versions, and raise the same error on every process
    if they differ, naming the keys."""
    resolved = _resolved(cfg)
    resolved.get("model", {}).pop("params_path", None)
    v = versions()
    ident = {"config": resolved, "versions": {k: v[k] for k in RESUME_VERSIONS}}
    texts = gather_text(json.dumps(ident, sort_keys=True))
    first = json.loads(texts[0])
    parts = [f"process {i} differs from process 0 in {_differences(first, json.loads(t))}"
             for i, t in enumerate(texts) if t != texts[0]]
    if parts:
        raise UserError("the processes of this multi-process run were started with different "
                        "settings, so their results cannot be combined: " + "; ".join(parts)
                        + ". Start every process with the same config file and options (only "
                          "the process id may differ)")


#: Largest acceptable estimated error of the first-order IR-drop form (fraction of the cell
#: voltages, :func:`nvjax.irdrop.first_order_error`), as in :func:`nvjax.irdrop.check_first_order`.
_FIRST_ORDER_LIMIT = 0.05


def _ideal_grids(params, device, tile_cfg) -> Dict[str, Any]:
    """Layer name -> the ideal target conductances (G⁺ and G⁻, µS) of its kernel as tiled,
    [2, Ti, Tj, R, C] (before any IR pre-distortion)."""
    plain = tile_cfg.replace(ir_predistort=0)
    out = {}
    for name, w in layers.kernels(params).items():
        gp, gm, _ = xb.tile(w, device, config=plain)
        out[name] = jnp.stack([xb.tile_grid(gp, plain), xb.tile_grid(gm, plain)])
    return out


def _first_order_uses(tile_cfg) -> list:
    """Where a run uses the first-order IR-drop form (empty: nowhere)."""
    uses = []
    if tile_cfg.ir_drop == "first_order":
        uses.append("tile.ir_drop: first_order (the simulated IR drop)")
    if tile_cfg.ir_drop != "none" and tile_cfg.ir_predistort > 0:
        uses.append(f"tile.ir_predistort: {tile_cfg.ir_predistort} (the pre-distortion model)")
    return uses


def _check_first_order(params, devices, tile_cfg, where: str) -> Optional[str]:
    """Warn (``RuntimeWarning``) when the first-order IR-drop form the run uses is not a valid
    model of its tiles: estimated error (:func:`nvjax.irdrop.first_order_error`) of the cell
    voltages above :data:`_FIRST_ORDER_LIMIT` on the ideal target conductances of some layer,
    for some device point. Called eagerly, once, before the sweep (inside the jitted sweep the
    estimate cannot be made). Returns the warning's text, or None."""
    uses = _first_order_uses(tile_cfg)
    r = float(tile_cfg.r_wire)
    if not uses or r == 0.0:
        return None
    worst = {}  # layer -> (error, g max, g mean)
    for device in devices:
        for name, g in _ideal_grids(params, device, tile_cfg).items():
            err = float(np.max(np.asarray(irdrop.first_order_error(g, r))))
            if name not in worst or not err <= worst[name][0]:
                gn = np.asarray(g)
                worst[name] = (err, float(gn.max()), float(gn.mean()))
    bad = {k: v for k, v in worst.items() if not v[0] <= _FIRST_ORDER_LIMIT}
    if not bad:
        return None
    layers_txt = "; ".join(f"{k}: about {100 * e:.0f} % (conductances up to {gmax:.3g} µS, "
                           f"mean {gmean:.3g} µS)" for k, (e, gmax, gmean) in bad.items())
    msg = (f"{where}: the first-order IR-drop form, used by {' and '.join(uses)}, is not a valid "
           f"model of these tiles ({tile_cfg.rows}×{tile_cfg.cols}, r_wire = {r:g} Ω): its "
           f"estimated error of the cell voltages is {layers_txt}, above "
           f"{100 * _FIRST_ORDER_LIMIT:.0f} % (see nvjax.irdrop.first_order_error). Use "
           "tile.ir_drop: solver (and tile.ir_predistort: 0), smaller tiles (tile.rows, "
           "tile.cols) or a lower tile.r_wire")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg


def _ir_advice(tile_cfg, rho: float) -> str:
    """What to change when the IR-drop solver does not converge (the advice of
    :func:`nvjax.crossbar.mvm`'s error, in config keys)."""
    return (f"{tile_cfg.rows}×{tile_cfg.cols} tiles, r_wire = {float(tile_cfg.r_wire):g} Ω, "
            f"coupling ρ̄ = {rho:.3g} on the ideal target conductances (read disturb raises it); "
            f"at most tile.ir_max_iter = {tile_cfg.ir_max_iter} iterations. About "
            f"{8 * np.sqrt(1 + rho):.0f} iterations are needed: raise tile.ir_max_iter, or use "
            "smaller tiles (tile.rows, tile.cols) or a lower tile.r_wire; a NaN or negative "
            "conductance never converges")


def _coupling(params, devices, tile_cfg) -> float:
    """The largest IR-drop coupling :func:`nvjax.irdrop.coupling` over the layers' ideal tiles."""
    rho = 0.0
    for device in devices:
        for g in _ideal_grids(params, device, tile_cfg).values():
            rho = max(rho, float(np.max(np.asarray(irdrop.coupling(g, float(tile_cfg.r_wire))))))
    return rho


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(a)))) for a in jax.tree_util.tree_leaves(tree))


def _stats(acc) -> Dict[str, Any]:
    """:func:`nvjax.sweep.summarize` of the finite accuracies, and how many were NaN (failed
    IR-drop solves); all statistics None when none is finite."""
    a = np.asarray(acc, np.float64)
    ok = np.isfinite(a)
    if ok.any():
        s = sweep.summarize(a[ok])
    else:
        s = {k: None for k in ("mean", "std", "min", "p1", "p5", "p50", "p95", "p99", "max")}
        s["n"] = 0
    s["ir_unconverged_instances"] = int((~ok).sum())
    return s


def _import_pyplot() -> None:
    """Import matplotlib's pyplot with the Agg backend (what the figures of the jobs use)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def reliability(cfg, out_dir: Optional[str] = None, *, log=print,
                mesh: Optional[Mesh] = None) -> Dict[str, Any]:
    """The main job: accuracy distribution of a trained network on NVM chips over read times.

    Trains (or loads) the model of ``cfg.model``, programs ``cfg.sweep.num_instances`` chip
    instances per device point of ``cfg.sweep.device_grid``, and reads each at every time of
    ``cfg.sweep.t_read_s``. Writes ``summary.json``, ``results.csv`` and
    ``accuracy_vs_time.png`` into ``out_dir`` when given.

    Scaling (results are bit-identical in every case):

    * in a single-process run the sweep's chunk is compiled in a background thread from the
      parameters' shapes while the model trains or loads (:func:`nvjax.sweep.compile_ahead`);
      ``timings.compiled_during_training`` in the summary says whether the sweep used it;

    * chunks are sharded over all devices (or ``mesh``), see :func:`nvjax.sweep.compile_chunk`;
      before the first chunk, its memory is estimated and a ``sweep.chunk_size`` that would not
      fit is refused (:func:`nvjax.sweep.run_instances`);
    * ``cfg.distributed`` (or the ``NVJAX_*`` environment variables) starts a multi-process run
      with :func:`nvjax.sweep.init_distributed`; every process runs this function with the same
      config (checked before any work: processes started with different settings all stop
      with the same error, naming the keys), process 0 trains or loads the weights (broadcast
      to the others) and writes the files;
    * with ``out_dir``, the run is resumable: ``out_dir/manifest.json`` identifies it (resolved
      config without ``progress``/``distributed``/``sweep.chunk_size``, a hash of the weights,
      nvjax/jax/jaxlib versions and backend) and every finished chunk is written atomically to
      ``out_dir/chunks/p<point>-<lo>-<hi>.npz`` (instances ``[lo, hi)``). A rerun with the same
      config loads the instances found there, whatever chunk size wrote them, and computes the
      rest; a rerun with another config raises :class:`~nvjax._checks.UserError` before any
      training (see :func:`nvjax.sweep.open_checkpoint`). The chunk files are kept after the
      run.

    Args:
        cfg: a :class:`nvjax.config.RunConfig`.
        out_dir: output folder (None: nothing is written and nothing resumed).
        log: progress messages (silent on processes other than 0).
        mesh: the device mesh for the chunks (None: all devices).

    Returns:
        The summary dict (also written to ``summary.json``), on every process.

    Raises:
        UserError: the output folder holds another run, the weights file does not fit the
            model config (see :func:`get_model`), a chunk file is corrupt, the chunk size does
            not fit in memory, or the processes of a multi-process run disagree; the message
            names the file or key and says what to do. Also when the IR-drop solver failed for
            some chip instances (``tile.ir_drop: solver``): after the files are written, with
            those instances' accuracy NaN and counted in ``summary.json``
            (``ir_unconverged_instances``, per point and in all); the message says what to
            change. Their chunks are not written, so a rerun recomputes them.

    Warns:
        RuntimeWarning: the first-order IR-drop form the run uses (``tile.ir_drop:
            first_order`` or ``tile.ir_predistort``) is off by more than 5 % on some layer's
            tiles (checked once, before the sweep, on the ideal target conductances).
    """
    dist = getattr(cfg, "distributed", None)
    if dist is not None:
        init_distributed(dist.coordinator_address, dist.num_processes, dist.process_id,
                         initialization_timeout_s=dist.startup_timeout_s)
    main = jax.process_index() == 0
    if not main:
        log = lambda s: None  # noqa: E731
    if jax.process_count() > 1:
        _agree_on_config(cfg)
    if out_dir is not None:  # a folder holding another run is refused before any training
        _on_process0(lambda: _claim(out_dir, _reliability_manifest(cfg), final=False))
    timings = {}
    t0 = time.perf_counter()
    ds = data_mod.digits(seed=cfg.seed, flatten=cfg.model.name == "mlp")
    x, y = ds.x_test, ds.y_test
    if cfg.sweep.eval_samples is not None:
        x, y = x[: cfg.sweep.eval_samples], y[: cfg.sweep.eval_samples]
    x, y = jnp.asarray(x), jnp.asarray(y)
    points = cfg_mod.device_points(cfg)
    untrained = make_model(cfg.model)   # the module (equal to get_model's) and its shapes
    fn = accuracy_instance(untrained)
    n_all = cfg.sweep.num_instances * len(points)
    optimize = (cfg.sweep.compile == "optimized" or
                (cfg.sweep.compile == "auto" and n_all >= cfg_mod.AUTO_OPTIMIZE_INSTANCES))
    compiled = sweep.compile_chunk(fn, mesh=mesh, optimize=optimize)
    key = prng_mod.key(cfg.seed, cfg.prng)          # the sweep's generator (config 'prng')
    times = jnp.asarray(cfg.sweep.t_read_s, jnp.float32)
    ahead = None
    if jax.process_count() == 1:
        # The sweep's chunk compiles (it needs only the parameters' shapes) while the model
        # trains or loads: compilation dominates a short run (the quickstart: ~2.5 s of chunk
        # compilation beside ~1.8 s of training, on 2 cores). Results are the same.
        shapes = layers.strip_params(jax.eval_shape(untrained.init, jax.random.key(0), x[:1]))
        ahead = sweep.compile_ahead(compiled, key, cfg.sweep.num_instances, points[0][1],
                                    shapes, cfg.tile, x, y, times,
                                    chunk_size=cfg.sweep.chunk_size)
        if out_dir is not None:  # the figure's library loads meanwhile too (~0.4 s)
            threading.Thread(target=_import_pyplot, name="nvjax-import-pyplot",
                             daemon=True).start()
        model, params, trained = get_model(cfg, ds, out_dir, log=log)
    else:  # process 0 trains or loads; the others receive its weights
        got = _on_process0(lambda: get_model(cfg, ds, out_dir, log=log))
        if main:
            model, params, trained = got
        else:
            model, trained = make_model(cfg.model), False
            shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ds.x_train[:1]))
            params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        params = sweep.broadcast(jax.tree_util.tree_map(np.asarray, params))
    timings["model_s"] = time.perf_counter() - t0
    ideal_acc = float(models_mod.accuracy(model, params, x, y))
    log(f"model {cfg.model.name}: software test accuracy {ideal_acc:.4f} "
        f"({'trained' if trained else 'loaded'} in {timings['model_s']:.1f} s)")

    chunk_dir = None
    if out_dir is not None:
        chunk_dir = os.path.join(out_dir, "chunks")
        resumed = _on_process0(lambda: _claim(out_dir, _reliability_manifest(cfg, params),
                                              final=True))
        if resumed:
            log(f"resuming the run in {out_dir}: finished chunks are loaded from {chunk_dir}")

    if main:  # the first-order form's validity cannot be checked inside the jitted sweep
        _check_first_order(params, [d for _, d in points], cfg.tile, "nvjax run")
    data = (layers.strip_params(params), cfg.tile, x, y, times)
    # the trained parameters have the shapes compiled for: the same compilation (else this
    # starts the right one, which the sweep then waits for)
    timings["compiled_during_training"] = ahead is not None and sweep.compile_ahead(
        compiled, key, cfg.sweep.num_instances, points[0][1], *data,
        chunk_size=cfg.sweep.chunk_size) is ahead
    results = []
    n_loaded, n_chunks, memory = 0, 0, {}
    t_run = time.perf_counter()
    for p_idx, (point, device) in enumerate(points):
        desc = "chips" + (f" {point}" if point else "")
        stats = {}
        acc = sweep.run_instances(fn, key, cfg.sweep.num_instances, device, *data,
                                  chunk_size=cfg.sweep.chunk_size, progress=cfg.progress,
                                  desc=desc, start=0, compiled=compiled, mesh=None,
                                  checkpoint_dir=chunk_dir, checkpoint_name=f"p{p_idx}",
                                  chunk_size_name="sweep.chunk_size", stats=stats,
                                  save_if=_all_finite)
        results.append(acc)
        n_loaded += stats["loaded"]
        n_chunks += stats["chunks"]
        memory = memory or {k: v for k, v in stats.items() if k.startswith("memory_")}
    timings["sweep_s"] = time.perf_counter() - t_run
    n_total = cfg.sweep.num_instances * len(points)
    timings["instances_per_s"] = n_total / timings["sweep_s"]
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
                   "processes": jax.process_count(), **memory},
        "points": [],
    }
    for p_idx, (point, _) in enumerate(points):
        for j, t in enumerate(cfg.sweep.t_read_s):
            s = _stats(results[p_idx][:, j])
            summary["points"].append({"device": point, "t_read_s": float(t), **s})
    # chip instances with a failed IR-drop solve (NaN accuracy at some read time), per point
    failed = [int((~np.isfinite(np.asarray(r, np.float64))).any(axis=1).sum()) for r in results]
    summary["ir_unconverged_instances"] = sum(failed)
    if out_dir is not None and main:
        write_results(out_dir, summary, points, cfg.sweep.t_read_s, results)
        plot_accuracy_vs_time(os.path.join(out_dir, "accuracy_vs_time.png"), points,
                              cfg.sweep.t_read_s, results, ideal_acc,
                              title=f"{cfg.model.name} on {cfg.device.kind}, "
                                    f"{cfg.sweep.num_instances} chips")
    if summary["ir_unconverged_instances"]:
        where = "; ".join(f"{k} of {cfg.sweep.num_instances} at "
                          + (", ".join(f"{a}={b}" for a, b in point.items()) or "-")
                          for k, (point, _) in zip(failed, points) if k)
        where = f" ({where})" if len(points) > 1 else ""
        files = (f" (NaN in {os.path.join(out_dir, 'results.csv')}, counted as "
                 f"ir_unconverged_instances in {os.path.join(out_dir, 'summary.json')}; their "
                 "chunks are not kept for resume)") if out_dir is not None else ""
        raise UserError(
            f"the IR-drop solver did not converge for {summary['ir_unconverged_instances']} of "
            f"{n_total} chip instances{where}: their accuracy is NaN{files}, so these "
            f"results are incomplete. {_ir_advice(cfg.tile, _coupling(params, [d for _, d in points], cfg.tile))}")
    return summary


def make_model(model_cfg: cfg_mod.ModelConfig):
    """The Flax module of a run config's ``model`` section (untrained)."""
    if model_cfg.name == "mlp":
        return models_mod.MLP(features=tuple(model_cfg.hidden) + (10,))
    return models_mod.LeNet()


def _trained_for(cfg) -> Dict[str, Any]:
    """What determines the weights :func:`get_model` trains: the model, the data split, the
    training settings and the seed."""
    m = cfg.model
    model = {"name": m.name, "epochs": int(m.epochs)}
    if m.name == "mlp":
        model["hidden"] = [int(h) for h in m.hidden]
    return {"model": model,
            "data": {"name": "digits", "split_seed": int(cfg.seed), "flatten": m.name == "mlp"},
            "training": {"seed": int(cfg.seed), **_TRAINING}}


def _params_manifest_path(path: str) -> str:
    return path + ".manifest.json"


def _read_params(path: str, model, ds: data_mod.Dataset, cfg) -> Any:
    """The weights in ``path``, which must be a parameter file of the configured model."""
    m = cfg.model
    try:
        params = models_mod.load_params(path)
    except OSError as e:
        raise UserError(f"cannot read the weights file {path} ({e.strerror or e}); point "
                        "model.params_path at a readable file") from None
    except Exception as e:  # noqa: BLE001 (msgpack and flax raise many kinds)
        raise UserError(f"the weights file {path} is corrupt or not a parameter file "
                        f"({type(e).__name__}: {e}); delete it to retrain, or point "
                        "model.params_path at a file written by nvjax.models.save_params") from None
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ds.x_train[:1]))
    shape_of = {jax.tree_util.keystr(p): (tuple(a.shape), str(a.dtype))
                for p, a in jax.tree_util.tree_flatten_with_path(want)[0]}
    try:
        got = {jax.tree_util.keystr(p): (tuple(np.shape(a)), str(np.asarray(a).dtype))
               for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    except Exception:  # noqa: BLE001 (leaves that are not arrays)
        got = {}
    if got != shape_of:
        missing = sorted(set(shape_of) - set(got))
        extra = sorted(set(got) - set(shape_of))
        wrong = [f"{k}: {got[k]} instead of {shape_of[k]}" for k in sorted(set(got) & set(shape_of))
                 if got[k] != shape_of[k]]
        what = "; ".join(s for s in (f"missing {missing}" if missing else "",
                                     f"unexpected {extra}" if extra else "",
                                     f"shapes/dtypes {wrong}" if wrong else "") if s)
        model_desc = f"model.name {m.name}" + (f", model.hidden {list(m.hidden)}"
                                               if m.name == "mlp" else "")
        raise UserError(f"the weights file {path} does not hold parameters of the configured "
                        f"model ({model_desc}): {what}; point model.params_path at that model's "
                        "weights, or delete the file to retrain") from None
    return params


def get_model(cfg, ds: data_mod.Dataset, out_dir: Optional[str], *, log=None):
    """The model of ``cfg.model`` and its trained parameters: loaded from ``params_path`` (or
    ``out_dir/params.msgpack``) when that file exists, else trained on ``ds`` with key
    ``cfg.seed`` and saved there.

    Weights are tied to what produced them. Beside every weights file it writes, this function
    writes ``<file>.manifest.json``: the model (name, hidden widths, epochs), the data split, the
    training settings and seed, and the SHA-256 of the weights. A file is reused only if its
    manifest matches the config now; otherwise it raises (it never retrains over, or silently
    reuses, weights of another config):

    * a manifest for another model or training setting: an error naming the keys that differ
      (use another ``params_path`` or output folder, or delete the file and its manifest to
      retrain);
    * weights that no longer match their manifest's hash, or a corrupt file: an error naming it;
    * ``out_dir/params.msgpack`` without a manifest (written by an older nvjax): an error (delete
      it to retrain);
    * a user's ``params_path`` without a manifest (weights from elsewhere): loaded, after checking
      that its parameter names and shapes are those of the configured model (it cannot be
      checked against epochs or seed; ``log`` says so).

    Args:
        cfg: a :class:`nvjax.config.RunConfig` or :class:`nvjax.config.LifetimeRunConfig`.
        ds: the data set to train on (``nvjax.data.digits(seed=cfg.seed, ...)``).
        out_dir: the run's output folder (None: only ``params_path`` is used).
        log: where to say that a file without manifest was loaded unchecked (None: nowhere).

    Returns:
        (model, params, trained) with ``trained`` False when the parameters were loaded.

    Raises:
        UserError: as above; the message names the file and says what to do.
    """
    m = cfg.model
    model = make_model(m)
    path = m.params_path or (os.path.join(out_dir, "params.msgpack") if out_dir else None)
    want = _trained_for(cfg)
    if path and os.path.exists(path):
        side = _params_manifest_path(path)
        info = None
        if os.path.exists(side):
            try:
                with open(side) as f:
                    info = json.load(f)
                if not isinstance(info, dict) or not isinstance(info.get("trained_for"), dict):
                    raise ValueError("no 'trained_for' object")
            except (OSError, ValueError) as e:
                raise UserError(f"{side} (the manifest of the weights {path}) is unreadable or "
                                f"corrupt ({e}); delete {path} and {side} to retrain") from None
            if info["trained_for"] != want:
                raise UserError(
                    f"the weights {path} were trained for another model or training setting "
                    f"than the config now asks for ({_differences(info['trained_for'], want)}; "
                    f"see {side}); use another model.params_path or output folder for this "
                    f"config, or delete {path} and {side} to retrain")
        elif not m.params_path:
            raise UserError(f"{path} has no manifest ({side}) saying which model config it was "
                            "trained for (an older nvjax wrote it, or it was copied in), so it "
                            "is not reused: delete it to retrain, or move it out of the output "
                            "folder and name it as model.params_path to use it as it is")
        params = _read_params(path, model, ds, cfg)
        if info is not None and info.get("params_sha256") != params_sha256(params):
            raise UserError(f"the weights {path} changed after they were written (their SHA-256 "
                            f"differs from the one in {side}); restore the file, or delete "
                            f"{path} and {side} to retrain")
        if info is None and log is not None:
            log(f"loaded {path} as it is: it has no manifest, so only its parameter shapes were "
                "checked against the model config (not epochs or seed)")
        return model, params, False
    params, _ = models_mod.train(jax.random.key(cfg.seed), model, ds, epochs=m.epochs,
                                 **{k: v for k, v in _TRAINING.items() if k != "optimizer"})
    if path:
        side = _params_manifest_path(path)
        v = versions()
        info = {"job": "nvjax trained parameters", "format": 1, "trained_for": want,
                "params_sha256": params_sha256(params),
                "written_by": {k: v[k] for k in RESUME_VERSIONS}}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_json(side, info)  # first: weights never sit beside another run's manifest
            models_mod.save_params(path, params)
        except OSError as e:
            raise UserError(f"cannot write the trained weights to {path} ({e.strerror or e}); "
                            "set model.params_path to a writable file (or null), or use "
                            "another output folder") from None
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
    """Accuracy vs read time: median, 25–75 % and 1–99 % bands per device point (log time axis).

    NaN accuracies (instances whose IR-drop solve failed) are left out of the bands; a read time
    without any finite accuracy is left out of its point's curve, and a figure without any says
    so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = np.asarray(times, float)
    t_plot = np.maximum(t, 1e-3)
    drawn = 0
    for p_idx, (point, _) in enumerate(points):
        acc = np.asarray(results[p_idx], np.float64) * 100
        ok = np.isfinite(acc).any(axis=0)
        if not ok.any():
            continue
        q = np.nanpercentile(acc[:, ok], [1, 25, 50, 75, 99], axis=0)
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "median"
        failed = int((~np.isfinite(acc)).any(axis=1).sum())
        if failed:
            label += f" ({failed} failed IR solves left out)"
        line, = ax.plot(t_plot[ok], q[2], "o-", label=label)
        ax.fill_between(t_plot[ok], q[1], q[3], color=line.get_color(), alpha=0.3, lw=0)
        ax.fill_between(t_plot[ok], q[0], q[4], color=line.get_color(), alpha=0.12, lw=0)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no finite accuracy\n(every IR-drop solve failed)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xlim(t_plot.min() / 2, t_plot.max() * 2)
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

    def pct(v, width):  # None: no finite accuracy (every IR-drop solve failed)
        return f"{'-':>{width}}" if v is None else f"{100 * v:>{width}.2f}"
    for p in summary["points"]:
        name = ", ".join(f"{k}={v}" for k, v in p["device"].items()) or "-"
        rows.append(f"{name:<24} {p['t_read_s']:>12.4g} {pct(p['mean'], 8)} "
                    f"{pct(p['std'], 7)} {pct(p['p1'], 7)} {pct(p['p50'], 7)}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# The `nvjax lifetime` job
# --------------------------------------------------------------------------------------------
def run_lifetime(cfg, out_dir: Optional[str] = None, *, log=print) -> Dict[str, Any]:
    """Run a :class:`nvjax.config.LifetimeRunConfig`: train/load the model, simulate the chips,
    write ``summary.json``, ``results.csv`` (one row per chip and evaluation point),
    ``events.csv`` (one row per reprogramming) and ``lifetime.png`` into ``out_dir``.

    ``out_dir/manifest.json`` ties the folder to the run, as for :func:`reliability` (resolved
    config without ``progress``/``chunk_size``, a hash of the weights, versions): a rerun with
    the same config recomputes and rewrites the results, another config there is refused
    before any training, naming the keys that changed. Weights are loaded or trained as in
    :func:`get_model`.

    Returns:
        The summary dict.

    Raises:
        UserError: the output folder holds another run, the weights do not fit the config, or
            ``chunk_size`` does not fit in memory; the message says what to do. Also when the
            IR-drop solver failed at some evaluation points (``ir_unconverged_points`` in the
            summary): after the files are written, their accuracy NaN.

    Warns:
        RuntimeWarning: as :func:`reliability`, for the first-order IR-drop form.
    """
    if out_dir is not None:  # a folder holding another run is refused before any training
        _claim(out_dir, _lifetime_manifest(cfg), final=False)
    t0 = time.perf_counter()
    timings = {}
    ds = data_mod.digits(seed=cfg.seed, flatten=cfg.model.name == "mlp")
    model, params, trained = get_model(cfg, ds, out_dir, log=log)
    if out_dir is not None:
        _claim(out_dir, _lifetime_manifest(cfg, params), final=True)
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
    # the first-order form's validity cannot be checked inside the jitted simulation
    _check_first_order(params, [device], cfg.tile, "nvjax lifetime")
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
    bad = summary["ir_unconverged_points"]
    if bad:
        files = (f" (NaN in {os.path.join(out_dir, 'results.csv')}, counted as "
                 f"ir_unconverged_points in {os.path.join(out_dir, 'summary.json')})"
                 if out_dir is not None else "")
        total = cfg.num_chips * len(summary["inferences"])
        raise UserError(
            f"the IR-drop solver did not converge at {bad} of {total} evaluation points (chip × "
            f"evaluation): their accuracy is NaN{files}, so these results are incomplete, and "
            f"reprogramming decisions after them may be too. "
            f"{_ir_advice(cfg.tile, _coupling(params, [device], cfg.tile))}")
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
    acc = np.asarray(record.accuracy, np.float64) * 100
    flags = np.asarray(record.reprogrammed)
    with warnings.catch_warnings():  # NaN (failed IR-drop solves) is left out; all-NaN -> NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanpercentile(acc, [5, 25, 50, 75, 95], axis=0)
        fresh = float(np.nanmean(np.asarray(record.fresh_accuracy, np.float64)[:, 0])) * 100
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.8, 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(n, q[2], "-", color="C0", label="median over chips")
    ax.fill_between(n, q[1], q[3], color="C0", alpha=0.3, lw=0, label="25–75 %")
    ax.fill_between(n, q[0], q[4], color="C0", alpha=0.12, lw=0, label="5–95 %")
    ax.plot(n, acc[0], "-", color="C3", lw=0.8, alpha=0.8, label="chip 0")
    ev = np.flatnonzero(flags[0])
    ax.plot(n[ev], acc[0, ev], "v", color="C3", ms=5, label="chip 0 reprogrammed")
    if config.policy == "accuracy" and np.isfinite(fresh):
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
