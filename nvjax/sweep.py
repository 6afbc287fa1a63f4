"""The Monte Carlo engine: instance keys, chunked compiled execution, chunk files, summaries.

Instance ``i`` of a sweep uses ``fold_in(sweep_key, i)`` and nothing else, so an instance is
reproducible alone and independent of the chunk size, the device count and the process count.
Chunks of instances run through one compiled, ``vmap``-ed function (the last chunk is padded to
the chunk size, so nothing recompiles); a progress bar advances per chunk; memory is bounded by
the chunk size.

Scaling, all on JAX's own engine:

* **Devices.** With more than one device (or an explicit ``mesh=``), each chunk's instance
  indices are laid out over the 1-D mesh axis ``'instances'`` (:func:`instance_mesh`) with a
  ``NamedSharding`` and the chunk function is jitted with that output sharding, so every device
  computes its slice of the chunk. The compiled batch is the chunk rounded up to a multiple of
  the device count (padding instances are computed and dropped).
* **Hosts.** :func:`init_distributed` calls ``jax.distributed.initialize`` (arguments, or the
  environment variables ``NVJAX_COORDINATOR``, ``NVJAX_NUM_PROCESSES``, ``NVJAX_PROCESS_ID``).
  The default mesh then spans the devices of all processes: every process runs the same chunks
  in lock step, its devices compute its share of each chunk, and the results are all-gathered
  (``multihost_utils.process_allgather``); process 0 writes the output files.
* **Two stages.** An instance function given as :class:`Staged` ``(prepare, finish)`` runs each
  chunk as two compiled calls, so that the state ``prepare`` returns (a programmed chip) is
  computed once and held in memory; in one compiled function XLA:CPU would rather recompute its
  random draws inside every consumer (see :class:`Staged`).
* **Resume.** With ``checkpoint_dir=``, every finished chunk is written atomically (temporary
  file, then ``os.replace``) and a rerun loads it instead of recomputing it.
  :func:`open_checkpoint` guards a run's folder with a ``manifest.json`` (used by
  :func:`nvjax.jobs.reliability`, the ``nvjax run`` job).

This module imports only ``_io``, ``_runtime``, ``_xla``, jax, numpy and tqdm: it knows nothing of chips,
models or configs (the jobs that use it live in :mod:`nvjax.jobs`). :func:`init_distributed` and
:func:`limit_malloc_arenas` are re-exported from :mod:`nvjax._runtime`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import weakref
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ._io import atomic_write, atomic_write_with
from ._xla import FAST_COMPILE_OPTIONS
from ._runtime import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, heap_trimmer,
                       init_distributed, limit_malloc_arenas)

__all__ = ["instance_keys", "run_instances", "compile_chunk", "Staged", "limit_malloc_arenas",
           "instance_mesh", "init_distributed", "broadcast", "open_checkpoint", "summarize",
           "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

_AXIS = "instances"


def instance_keys(sweep_key, indices) -> jax.Array:
    """Keys of instances ``indices``: ``fold_in(sweep_key, i)`` for each i."""
    return jax.vmap(lambda i: jax.random.fold_in(sweep_key, i))(jnp.asarray(indices, jnp.uint32))


# ----------------------------------------------------------------------------------------------
# Devices and hosts


def instance_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A 1-D device mesh with the axis ``'instances'``, over which sweeps shard their instances.

    Args:
        devices: the devices (default: ``jax.devices()``, i.e. every device of every process
            once :func:`init_distributed` has run). One device gives an unsharded sweep.

    Returns:
        ``jax.sharding.Mesh(devices, ('instances',))``.

    Example:
        >>> mesh = instance_mesh(jax.local_devices()[:1])  # force a single-device sweep
        >>> mesh.axis_names
        ('instances',)
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("instance_mesh: devices must list at least one device, got none")
    return Mesh(np.array(devs, dtype=object), (_AXIS,))


def _resolve_mesh(mesh) -> Optional[Mesh]:
    if mesh is None:
        return instance_mesh() if jax.device_count() > 1 else None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have one axis (instances), got axes {mesh.axis_names}")
    return mesh


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Staged:
    """An instance function in two stages: ``prepare(key, *args) -> state`` then
    ``finish(key, state, *args) -> result`` (both receive the instance's key).

    Called directly, ``Staged(prepare, finish)(key, *args)`` is ``finish(key, prepare(key, *args),
    *args)``. Given to :func:`compile_chunk` / :func:`run_instances`, each chunk runs as two
    compiled calls and the chunk's states (e.g. the programmed chips) are materialized between
    them. This is a performance device, not a semantic one: the random draws are the same. It
    matters on XLA:CPU, which never materializes a value inside one compiled function when it can
    recompute it: a programmed conductance that two computations read (the drift-compensation
    reference and the read) has its Philox bits and inverse-CDF recomputed in each, and its
    expensive pieces (log, sqrt) split into extra passes over memory; two stages draw it once
    (≈ 1.5 ms per instance less on the standard benchmark workload, 2 cores). Results agree
    with the one-stage function to float rounding (the fusions differ), not bit for bit.

    ``state`` must be a pytree of arrays; with the instances vmapped it gains a leading instance
    axis, so it should hold only what differs between instances (unbatched parts, e.g. the
    model parameters, belong in ``args``).
    """

    def __init__(self, prepare: Callable, finish: Callable):
        if not (callable(prepare) and callable(finish)):
            raise TypeError("Staged(prepare, finish): both stages must be callable")
        self.prepare = prepare
        self.finish = finish

    def __call__(self, key, *args):
        return self.finish(key, self.prepare(key, *args), *args)


class _ChunkFn:
    """The compiled chunk function ``f(sweep_key, indices, *args)`` made by :func:`compile_chunk`.

    ``stages`` are one chunk function ``g(sweep_key, idx, *args)`` or two,
    ``g1(sweep_key, idx, *args) -> state`` and ``g2(sweep_key, idx, state, *args)``, each
    compiled on its own. ``mesh`` is None (one device, plain ``jit``) or the mesh whose single
    axis shards the chunk; in the latter case the chunk length must be a multiple of
    ``mesh.size``.
    """

    def __init__(self, stages: Sequence[Callable], mesh: Optional[Mesh], optimize: bool = True):
        self.mesh = mesh
        self.optimize = optimize
        opts = None if optimize else dict(FAST_COMPILE_OPTIONS)
        if mesh is None:
            self._jits = [jax.jit(g, compiler_options=opts) for g in stages]
            return
        self._inst = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))

        def wrap(g):
            def core(idx, state, leaves, treedef, impls):
                # PRNG keys travel as raw key data and are rewrapped here.
                leaves = [jax.random.wrap_key_data(l, impl=i) if i is not None else l
                          for l, i in zip(leaves, impls)]
                sweep_key, args = jax.tree_util.tree_unflatten(treedef, leaves)
                return g(sweep_key, idx, *args) if state is None else \
                    g(sweep_key, idx, state, *args)
            return jax.jit(core, static_argnames=("treedef", "impls"), out_shardings=self._inst,
                           compiler_options=opts)
        self._jits = [wrap(g) for g in stages]

    def __call__(self, sweep_key, indices, *args):
        if self.mesh is None:
            out = self._jits[0](sweep_key, indices, *args)
            for f in self._jits[1:]:
                out = f(sweep_key, indices, out, *args)
            return out
        idx = np.asarray(indices, np.uint32)
        if idx.ndim != 1 or idx.shape[0] % self.mesh.size:
            raise ValueError(f"indices must be 1-D with a length that is a multiple of the "
                             f"{self.mesh.size} mesh devices, got shape {idx.shape}")
        g_idx = jax.make_array_from_callback(idx.shape, self._inst, lambda s: idx[s])
        leaves, treedef = jax.tree_util.tree_flatten((sweep_key, args))
        impls = tuple(jax.random.key_impl(l) if _is_key(l) else None for l in leaves)
        leaves = [self._unsharded(jax.random.key_data(l) if i is not None else l)
                  for l, i in zip(leaves, impls)]
        out = None
        for f in self._jits:
            out = f(g_idx, out, leaves, treedef=treedef, impls=impls)
        return out

    def _unsharded(self, x):
        """An argument shared by all instances, as ``jit`` accepts it next to mesh arrays.

        Python scalars, NumPy and uncommitted arrays go in as they are (replicated by ``jit``,
        weak types kept, no cross-process check); an array committed to other devices is
        brought to the host first.
        """
        if (isinstance(x, jax.Array) and x.committed and x.is_fully_addressable
                and x.sharding.device_set != self._inst.device_set):
            return np.asarray(x)
        return x


#: Compiled chunk functions per instance function (weak keys: an entry lives as long as its
#: instance function), then per (vmap width, mesh).
_CHUNK_CACHE: "weakref.WeakKeyDictionary[Any, Dict[Any, _ChunkFn]]" = weakref.WeakKeyDictionary()




def compile_chunk(instance_fn: Callable, *, vmap_width: Optional[int] = None,
                  mesh: Optional[Mesh] = None, optimize: bool = True) -> Callable:
    """One compiled function for a chunk of instances: ``f(sweep_key, indices, *args)``.

    The result is cached per (``instance_fn``, ``vmap_width``, mesh): calling again with the same
    instance function returns the same compiled function, whose jit cache then holds one
    executable per argument shape (so a second sweep with the same function and shapes traces
    and compiles nothing). Pass everything that varies between sweeps (parameters, inputs,
    device and tile physics) as ``args`` rather than closing over it.

    Args:
        instance_fn: ``instance_fn(key, *args)`` for one instance, or a :class:`Staged` pair
            (then each chunk runs as two compiled calls with the states held in between).
        vmap_width: None vmaps the whole chunk (best for small networks); an int runs the chunk
            as a ``lax.map`` over groups of ``vmap_width`` vmapped instances, which keeps one
            instance's working set in cache (best for large networks on CPU; 1 = sequential).
        mesh: the device mesh (one axis) over which a chunk's instances are sharded. None:
            :func:`instance_mesh` over all devices when there is more than one, else a plain
            single-device ``jit``.
        optimize: False compiles with :data:`nvjax._xla.FAST_COMPILE_OPTIONS` (LLVM
            optimization level 1: several times faster compilation; execution measured as fast
            within noise and results identical on the quickstart): for short sweeps, where
            compilation dominates.

    Returns:
        ``f(sweep_key, indices [n] uint32, *args) -> pytree [n, ...]``; ``f.mesh`` is the mesh
        used (None for one device), and with a mesh ``n`` must be a multiple of its size.
    """
    if vmap_width is not None and (isinstance(vmap_width, bool) or not isinstance(vmap_width, int)):
        raise TypeError(f"vmap_width must be None or an int >= 1, got {vmap_width!r}")
    if vmap_width is not None and vmap_width < 1:
        raise ValueError(f"vmap_width must be None or >= 1, got {vmap_width}")
    if not callable(instance_fn):
        raise TypeError(f"instance_fn must be callable, got {type(instance_fn).__name__}")
    mesh = _resolve_mesh(mesh)
    try:
        per_fn = _CHUNK_CACHE.setdefault(instance_fn, {})
        fn_ref = weakref.ref(instance_fn)
    except TypeError:  # not weak-referenceable: compiled without caching
        per_fn, fn_ref = {}, None
    cache_key = (vmap_width, mesh, bool(optimize))
    if cache_key not in per_fn:
        per_fn[cache_key] = _build_chunk(fn_ref, instance_fn, vmap_width, mesh, bool(optimize))
    return per_fn[cache_key]


def _build_chunk(fn_ref, instance_fn, vmap_width, mesh, optimize) -> "_ChunkFn":
    # The chunk functions reach the instance function through a weak reference, so that the
    # cache entry (value) does not keep its own key alive.
    if fn_ref is not None:
        del instance_fn
        get = fn_ref
    else:
        def get():
            return instance_fn

    def batched(one, xs):
        if vmap_width is None:
            return jax.vmap(one)(xs)
        return jax.lax.map(one, xs, batch_size=vmap_width if vmap_width > 1 else None)

    if isinstance(get(), Staged):
        def chunk_prepare(sweep_key, idx, *args):
            prepare = get().prepare
            return batched(lambda k: prepare(k, *args), instance_keys(sweep_key, idx))

        def chunk_finish(sweep_key, idx, state, *args):
            finish = get().finish
            return batched(lambda ks: finish(ks[0], ks[1], *args),
                           (instance_keys(sweep_key, idx), state))
        return _ChunkFn([chunk_prepare, chunk_finish], mesh, optimize)

    def chunk_fn(sweep_key, idx, *args):
        one = get()
        return batched(lambda k: one(k, *args), instance_keys(sweep_key, idx))
    return _ChunkFn([chunk_fn], mesh, optimize)


def _fetch(tree):
    """Device results to NumPy on every process (all-gathered when they span processes)."""
    if all(getattr(l, "is_fully_addressable", True) for l in jax.tree_util.tree_leaves(tree)):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------
# Chunk files


def _chunk_path(checkpoint_dir, name, lo, hi):
    return os.path.join(checkpoint_dir, f"{name}-{lo}-{hi}.npz")


def _save_chunk(path, leaves):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_with(path, lambda f: np.savez(f, **{f"leaf{i}": np.asarray(a)
                                                    for i, a in enumerate(leaves)}),
                      binary=True)


def _load_chunk(path, template_leaves, n):
    with np.load(path) as z:
        leaves = [z[f"leaf{i}"] if f"leaf{i}" in z.files else None
                  for i in range(len(template_leaves))]
        extra = len(z.files) != len(template_leaves)
    for a, t in zip(leaves, template_leaves):
        if extra or a is None or a.shape != (n,) + tuple(t.shape) or a.dtype != t.dtype:
            want = [(n,) + tuple(t.shape) for t in template_leaves]
            raise ValueError(f"chunk file {path} does not hold this sweep's results (expected "
                             f"leaves of shapes {want}); delete it or use another checkpoint "
                             "folder")
    return leaves


def broadcast(tree):
    """Process 0's value of a pytree of NumPy arrays, on every process (bools travel as uint8);
    the tree itself in a single-process run."""
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sent = [np.asarray(a).astype(np.uint8) if np.asarray(a).dtype == bool else np.asarray(a)
            for a in leaves]
    got = multihost_utils.broadcast_one_to_all(sent)
    got = [np.asarray(g).astype(bool) if np.asarray(a).dtype == bool else np.asarray(g)
           for g, a in zip(got, leaves)]
    return jax.tree_util.tree_unflatten(treedef, got)


# ----------------------------------------------------------------------------------------------
# The driver


def run_instances(instance_fn: Callable, sweep_key, num_instances: int, *args,
                  chunk_size: int = 256, progress: bool = False, desc: str = "instances",
                  start: int = 0, compiled: Optional[Callable] = None,
                  mesh: Optional[Mesh] = None, checkpoint_dir: Optional[str] = None,
                  checkpoint_name: str = "chunk", return_loaded: bool = False):
    """Evaluate ``instance_fn(key_i, *args)`` for i in [start, start + num_instances).

    Args:
        instance_fn: pure function of one instance key (and ``args``, shared by all instances)
            returning a pytree of arrays.
        sweep_key: the sweep's root key; instance i uses ``fold_in(sweep_key, i)``.
        num_instances: number of instances.
        *args: extra arguments (pytrees of arrays), passed unbatched.
        chunk_size: instances per chunk (one compiled call and one checkpoint file); the results
            do not depend on it. With a mesh of d devices the compiled batch is the chunk rounded
            up to a multiple of d.
        progress: show a tqdm progress bar over instances (on process 0).
        desc: the progress bar's label.
        start: index of the first instance.
        compiled: a function made by :func:`compile_chunk` to reuse (avoids re-tracing); its
            mesh is used.
        mesh: the device mesh sharding each chunk (see :func:`compile_chunk`; None: all devices
            when there are several). Results do not depend on it.
        checkpoint_dir: a folder for chunk files ``<checkpoint_name>-<lo>-<hi>.npz`` (instance
            indices ``[lo, hi)``). A chunk whose file exists is loaded instead of computed; each
            computed chunk is written atomically by process 0. The caller makes sure the folder
            belongs to the same computation (e.g. with :func:`open_checkpoint`).
        checkpoint_name: prefix of the chunk files (e.g. the sweep point).
        return_loaded: also return how many chunks were loaded from ``checkpoint_dir``.

    Memory is bounded by the chunk size and flat in the number of chunks: when the resident set
    comes within :data:`nvjax._runtime.TRIM_MARGIN_MB` of its peak (checked at most every
    :data:`nvjax._runtime.TRIM_INTERVAL_S` seconds) the C heap is trimmed (glibc ``malloc_trim``), so the freed
    temporaries of past chunks do not stay resident.

    Returns:
        The pytree of results with a leading instance axis [num_instances, ...] (NumPy arrays),
        on every process; with ``return_loaded``, ``(results, number of chunks loaded)``.

    Example:
        >>> f = lambda key, w: jax.random.normal(key, (3,)) @ w
        >>> run_instances(f, jax.random.key(0), 10, jnp.ones((3, 2)), chunk_size=4).shape
        (10, 2)
    """
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if compiled is not None and mesh is not None and getattr(compiled, "mesh", None) != mesh:
        raise ValueError("mesh differs from the mesh of `compiled`; pass one of them")
    f = compiled if compiled is not None else compile_chunk(instance_fn, mesh=mesh)
    width = f.mesh.size if getattr(f, "mesh", None) is not None else 1
    chunk = min(chunk_size, num_instances)
    batch = math.ceil(chunk / width) * width  # compiled batch, padded
    spans = [(lo, min(lo + chunk, num_instances)) for lo in range(0, num_instances, chunk)]
    main = jax.process_index() == 0
    paths = [None] * len(spans)
    done = np.zeros(len(spans), bool)
    if checkpoint_dir is not None:
        paths = [_chunk_path(checkpoint_dir, checkpoint_name, start + lo, start + hi)
                 for lo, hi in spans]
        if main:
            done = np.array([os.path.exists(p) for p in paths], bool)
        done = broadcast(done)  # process 0 decides
    template = None
    if done.any():
        shapes = jax.eval_shape(lambda k: instance_fn(k, *args), jax.random.fold_in(sweep_key, 0))
        template = jax.tree_util.tree_flatten(shapes)
    bar = _progress(num_instances, desc) if progress and main else None
    trim_heap = heap_trimmer()
    result, treedef = None, None  # preallocated [num_instances, ...] per leaf
    for (lo, hi), path, is_done in zip(spans, paths, done):
        n = hi - lo
        if is_done:
            t_leaves = template[0]
            leaves = (_load_chunk(path, t_leaves, n) if main else
                      [np.zeros((n,) + tuple(t.shape), t.dtype) for t in t_leaves])
            treedef = template[1]
        else:
            idx = np.arange(start + lo, start + lo + batch, dtype=np.uint32)
            res = _fetch(f(sweep_key, idx, *args))
            leaves, treedef = jax.tree_util.tree_flatten(res)
            leaves = [np.asarray(a)[:n] for a in leaves]
            if path is not None and main:
                _save_chunk(path, leaves)
            trim_heap()
        if result is None:
            result = [np.empty((num_instances,) + a.shape[1:], a.dtype) for a in leaves]
        for r, a in zip(result, leaves):
            r[lo:hi] = a  # a copy: no chunk buffer is kept, memory stays flat in the count
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    leaves = result
    if done.any():
        leaves = broadcast(leaves)  # process 0 loaded the finished chunks
    out = jax.tree_util.tree_unflatten(treedef, leaves)
    return (out, int(done.sum())) if return_loaded else out


def _progress(total, desc):
    return tqdm(total=total, desc=desc, unit="inst", file=sys.stderr, dynamic_ncols=True)


def summarize(acc: np.ndarray) -> Dict[str, float]:
    """Mean, std, min, max and the 1st, 5th, 50th, 95th, 99th percentiles of a sample."""
    a = np.asarray(acc, np.float64)
    q = np.percentile(a, [1, 5, 50, 95, 99])
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "p1": float(q[0]), "p5": float(q[1]), "p50": float(q[2]),
            "p95": float(q[3]), "p99": float(q[4]), "max": float(a.max()), "n": int(a.size)}


def _flatten_dict(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_checkpoint(directory: str, manifest: Dict[str, Any]) -> bool:
    """Claim ``directory`` for a resumable run described by ``manifest`` (call on process 0).

    The first call writes ``directory/manifest.json`` atomically; a later call with an equal
    manifest means "resume": chunk files in the folder belong to this run and may be loaded.
    A different manifest is an error (nothing is deleted or overwritten).

    Args:
        directory: the run's folder (created if missing).
        manifest: a JSON-serializable dict that identifies the computation (resolved config,
            seed, chunk size, instance count, versions, ...), not timings or device counts.

    Returns:
        True if the folder already held this run (resume), False if it was new.

    Raises:
        ValueError: the folder holds another run; the message lists the differing keys.
    """
    manifest = json.loads(json.dumps(manifest))  # canonical JSON types (tuples -> lists)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return False
    with open(path) as f:
        old = json.load(f)
    if old == manifest:
        return True
    a, b = _flatten_dict(old), _flatten_dict(manifest)
    diff = [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    shown = "; ".join(diff[:8]) + (f"; ... ({len(diff)} keys)" if len(diff) > 8 else "")
    raise ValueError(f"{path} belongs to a different run ({shown}); use another output folder, "
                     f"or delete {path} and the chunk files to start this one afresh")
