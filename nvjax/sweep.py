"""Monte Carlo driver: instance keys, chunked compiled execution, results and summaries.

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
  file, then ``os.replace``) and a rerun loads it instead of recomputing it. :func:`reliability`
  guards its folder with a ``manifest.json`` (:func:`open_checkpoint`).

This module imports ``chip``, ``config``, ``models``, ``data`` and plotting libraries lazily.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import chip as chip_mod

__all__ = ["instance_keys", "run_instances", "compile_chunk", "Staged", "limit_malloc_arenas",
           "instance_mesh", "init_distributed",
           "open_checkpoint", "accuracy_instance", "summarize", "reliability", "write_results",
           "plot_accuracy_vs_time", "versions", "format_table", "ENV_COORDINATOR",
           "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]

#: Environment variable of the coordinator's ``host:port`` (read by :func:`init_distributed`).
ENV_COORDINATOR = "NVJAX_COORDINATOR"
#: Environment variable of the number of processes.
ENV_NUM_PROCESSES = "NVJAX_NUM_PROCESSES"
#: Environment variable of this process's id, in [0, number of processes).
ENV_PROCESS_ID = "NVJAX_PROCESS_ID"

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


def limit_malloc_arenas(n: int = 1) -> bool:
    """Cap glibc malloc at ``n`` arenas (``mallopt(M_ARENA_MAX, n)``) for this process.

    Why: XLA:CPU's worker threads allocate and free every chunk's temporaries; with glibc's
    default of up to 8 arenas per core these spread over several arenas, each keeping its own
    free memory. One arena lowers a sweep's resident set (benchmark workload, with the heap
    trimming of :func:`run_instances`: peak ≈ 470 MB instead of ≈ 495 MB) at the same speed
    (measured on the 2-core development machine). ``nvjax`` (the command line) calls this at
    start; in your own scripts call it before JAX's first computation (arenas already handed to
    running threads stay).

    A ``MALLOC_ARENA_MAX`` set in the environment wins (nothing is changed).

    Returns:
        True if the cap was set; False where it does not apply (not Linux/glibc, or the
        environment variable is set).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"limit_malloc_arenas: n must be an int >= 1, got {n!r}")
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    m_arena_max = -8  # M_ARENA_MAX in glibc's malloc.h
    return bool(mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(n)))


#: Seconds between two checks of a sweep's resident memory (see :func:`run_instances`).
TRIM_INTERVAL_S = 0.1
#: A check trims the C heap when the resident set is within this many MB of its peak.
TRIM_MARGIN_MB = 24.0


def _rss_and_peak_mb():
    """(VmRSS, VmHWM) of this process in MB from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
        return (int(text.split("VmRSS:")[1].split()[0]) / 1024.0,
                int(text.split("VmHWM:")[1].split()[0]) / 1024.0)
    except (OSError, IndexError, ValueError):
        return None


def _heap_trimmer(interval_s: float = TRIM_INTERVAL_S,
                  margin_mb: float = TRIM_MARGIN_MB) -> Callable[[], None]:
    """A function to call after every chunk: at most once per ``interval_s`` seconds it reads the
    resident set and, when that is within ``margin_mb`` of the process's peak, hands the C heap's
    free pages back to the OS (glibc ``malloc_trim(0)``). A no-op where glibc or /proc is missing.

    Why: each chunk's XLA temporaries (tens of MB) are freed into the heap, and the holes they
    leave are reused in a different order chunk after chunk, so the resident set creeps up with
    the number of chunks although nothing leaks (benchmark workload: peak +28 % from 10³ to 10⁵
    instances without trimming). Trimming only near the peak keeps the peak close to where
    compilation put it; a trim costs about 6 ms and, on the benchmark workload, happens a few
    times a second (2-core development machine), a few per cent of the run time.
    """
    import ctypes
    trim = None
    if sys.platform.startswith("linux") and _rss_and_peak_mb() is not None:
        try:
            trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            trim = None
    if trim is None:
        return lambda: None
    last = [time.perf_counter()]

    def maybe_trim():
        now = time.perf_counter()
        if now - last[0] < interval_s:
            return
        last[0] = now
        mem = _rss_and_peak_mb()
        if mem is not None and mem[0] > mem[1] - margin_mb:
            trim(ctypes.c_size_t(0))
    return maybe_trim


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, *,
                     initialization_timeout_s: int = 300) -> bool:
    """Join a multi-process (multi-host) run with ``jax.distributed.initialize``.

    Each argument left None is read from the environment: ``NVJAX_COORDINATOR`` (``host:port``
    of process 0's coordinator service), ``NVJAX_NUM_PROCESSES``, ``NVJAX_PROCESS_ID``. With no
    coordinator and no process count anywhere, or a single process, nothing is initialized
    (a plain single-process run). Must be called before any JAX computation of the process.
    On CPU, the cross-process collectives use gloo.

    After it, :func:`run_instances` (and :func:`reliability`) shard every chunk over the devices
    of all processes; all processes must make the same calls in the same order.

    Args:
        coordinator_address: ``'host:port'`` reachable by every process, e.g. ``'10.0.0.1:1234'``.
        num_processes: number of processes, >= 1.
        process_id: this process's id in [0, num_processes); process 0 writes the outputs.
        initialization_timeout_s: how long to wait for all processes to connect, s.

    Returns:
        True if the process is part of a multi-process run (now or already), else False.

    Raises:
        ValueError: an incomplete or inconsistent setting (the message names the argument and
            its environment variable).
        RuntimeError: JAX already ran a computation, or the distributed system was initialized
            with other settings.
    """
    addr = coordinator_address if coordinator_address is not None else (
        os.environ.get(ENV_COORDINATOR) or None)
    n = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if addr is None and n is None and pid is None:
        return jax.distributed.is_initialized()
    if n is not None and n < 1:
        raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be >= 1, got {n}")
    if n == 1 and pid in (None, 0):
        return jax.distributed.is_initialized()
    missing = [f"{a} ({e})" for a, e, v in (("coordinator_address", ENV_COORDINATOR, addr),
                                             ("num_processes", ENV_NUM_PROCESSES, n),
                                             ("process_id", ENV_PROCESS_ID, pid)) if v is None]
    if missing:
        raise ValueError("init_distributed: a multi-process run needs coordinator_address, "
                         f"num_processes and process_id; missing: {', '.join(missing)}")
    if not 0 <= pid < n:
        raise ValueError(f"process_id ({ENV_PROCESS_ID}) must be in [0, {n}), got {pid}")
    if ":" not in addr:
        raise ValueError(f"coordinator_address ({ENV_COORDINATOR}) must be 'host:port', "
                         f"got {addr!r}")
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (n, pid):
            raise RuntimeError(
                f"init_distributed: JAX is already initialized as process "
                f"{jax.process_index()} of {jax.process_count()}, not {pid} of {n}")
        return True
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(addr, num_processes=n, process_id=pid,
                                   initialization_timeout=int(initialization_timeout_s))
    except RuntimeError as e:
        raise RuntimeError(f"init_distributed: {e} (it must run before any JAX computation)") from e
    return True


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

    def __init__(self, stages: Sequence[Callable], mesh: Optional[Mesh]):
        self.mesh = mesh
        if mesh is None:
            self._jits = [jax.jit(g) for g in stages]
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
            return jax.jit(core, static_argnames=("treedef", "impls"), out_shardings=self._inst)
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


def compile_chunk(instance_fn: Callable, *, vmap_width: Optional[int] = None,
                  mesh: Optional[Mesh] = None) -> Callable:
    """One compiled function for a chunk of instances: ``f(sweep_key, indices, *args)``.

    Args:
        instance_fn: ``instance_fn(key, *args)`` for one instance, or a :class:`Staged` pair
            (then each chunk runs as two compiled calls with the states held in between).
        vmap_width: None vmaps the whole chunk (best for small networks); an int runs the chunk
            as a ``lax.map`` over groups of ``vmap_width`` vmapped instances, which keeps one
            instance's working set in cache (best for large networks on CPU; 1 = sequential).
        mesh: the device mesh (one axis) over which a chunk's instances are sharded. None:
            :func:`instance_mesh` over all devices when there is more than one, else a plain
            single-device ``jit``.

    Returns:
        ``f(sweep_key, indices [n] uint32, *args) -> pytree [n, ...]``; ``f.mesh`` is the mesh
        used (None for one device), and with a mesh ``n`` must be a multiple of its size.
    """
    if vmap_width is not None and vmap_width < 1:
        raise ValueError(f"vmap_width must be None or >= 1, got {vmap_width}")

    def batched(one, xs):
        if vmap_width is None:
            return jax.vmap(one)(xs)
        return jax.lax.map(one, xs, batch_size=vmap_width if vmap_width > 1 else None)

    if isinstance(instance_fn, Staged):
        prepare, finish = instance_fn.prepare, instance_fn.finish

        def chunk_prepare(sweep_key, idx, *args):
            return batched(lambda k: prepare(k, *args), instance_keys(sweep_key, idx))

        def chunk_finish(sweep_key, idx, state, *args):
            return batched(lambda ks: finish(ks[0], ks[1], *args),
                           (instance_keys(sweep_key, idx), state))
        return _ChunkFn([chunk_prepare, chunk_finish], _resolve_mesh(mesh))

    def chunk_fn(sweep_key, idx, *args):
        return batched(lambda k: instance_fn(k, *args), instance_keys(sweep_key, idx))
    return _ChunkFn([chunk_fn], _resolve_mesh(mesh))


def _fetch(tree):
    """Device results to NumPy on every process (all-gathered when they span processes)."""
    if all(getattr(l, "is_fully_addressable", True) for l in jax.tree_util.tree_leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------
# Chunk files


def _chunk_path(checkpoint_dir, name, lo, hi):
    return os.path.join(checkpoint_dir, f"{name}-{lo}-{hi}.npz")


def _save_chunk(path, leaves):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{f"leaf{i}": np.asarray(a) for i, a in enumerate(leaves)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def _broadcast(tree):
    """Process 0's value of a pytree of NumPy arrays, on every process (bools as uint8)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
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
                  checkpoint_name: str = "chunk"):
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

    Memory is bounded by the chunk size and flat in the number of chunks: when the resident set
    comes within :data:`TRIM_MARGIN_MB` of its peak (checked at most every
    :data:`TRIM_INTERVAL_S` seconds) the C heap is trimmed (glibc ``malloc_trim``), so the freed
    temporaries of past chunks do not stay resident.

    Returns:
        The pytree of results with a leading instance axis [num_instances, ...] (NumPy arrays),
        on every process.

    Example:
        >>> f = lambda key, w: jax.random.normal(key, (3,)) @ w
        >>> run_instances(f, jax.random.key(0), 10, jnp.ones((3, 2)), chunk_size=4).shape
        (10, 2)
    """
    return _run_instances(instance_fn, sweep_key, num_instances, *args, chunk_size=chunk_size,
                          progress=progress, desc=desc, start=start, compiled=compiled,
                          mesh=mesh, checkpoint_dir=checkpoint_dir,
                          checkpoint_name=checkpoint_name)[0]


def _run_instances(instance_fn, sweep_key, num_instances, *args, chunk_size, progress, desc,
                   start, compiled, mesh, checkpoint_dir, checkpoint_name) -> Tuple[Any, int]:
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
        done = _broadcast(done)  # process 0 decides
    template = None
    if done.any():
        shapes = jax.eval_shape(lambda k: instance_fn(k, *args), jax.random.fold_in(sweep_key, 0))
        template = jax.tree_util.tree_flatten(shapes)
    bar = _progress(num_instances, desc) if progress and main else None
    trim_heap = _heap_trimmer()
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
        leaves = _broadcast(leaves)  # process 0 loaded the finished chunks
    return jax.tree_util.tree_unflatten(treedef, leaves), int(done.sum())


def _progress(total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="inst", file=sys.stderr, dynamic_ncols=True)


def accuracy_instance(model, params, config, x, y, times: Sequence[float]) -> Staged:
    """The instance function of a reliability sweep.

    Programs the network (key ``split(key)[0]``), then for each read time ``t_j`` reads it with key
    ``fold_in(split(key)[1], j)`` and evaluates classification accuracy on ``(x, y)``. Two
    stages (:class:`Staged`): programming returns the chip's tiles, the reads rebuild the chip.

    Returns:
        ``fn(key, device) -> accuracy [T]`` (a :class:`Staged`).
    """
    times = jnp.asarray(times, jnp.float32)
    x = jnp.asarray(x)
    y = jnp.asarray(y)

    def prepare(key, device):
        k_prog, _ = jax.random.split(key)
        return chip_mod.deploy(k_prog, model, params, device, config).tiles

    def finish(key, tiles, device):
        _, k_read = jax.random.split(key)
        chip = chip_mod.with_tiles(model, params, device, config, tiles)

        def one(j):
            logits = chip_mod.apply(jax.random.fold_in(k_read, j), chip, x, times[j])
            return jnp.mean(jnp.argmax(logits, -1) == y)
        return jax.lax.map(one, jnp.arange(times.shape[0]))
    return Staged(prepare, finish)


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
            "devices": str(jax.devices()), "process_count": str(jax.process_count())}


#: Manifest keys of :func:`versions` that must match for a run to resume (results are
#: bit-identical only on the same software and backend; device and process counts may differ).
_RESUME_VERSIONS = ("nvjax", "jax", "jaxlib", "backend")


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
        _atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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


def _params_sha256(params) -> str:
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _reliability_manifest(cfg, cfg_mod, params) -> Dict[str, Any]:
    resolved = cfg_mod.to_dict(cfg)
    for k in ("progress", "distributed"):  # do not change the results
        resolved.pop(k, None)
    text = json.dumps(resolved, sort_keys=True)
    v = versions()
    return {"job": "nvjax run (reliability)", "format": 1, "config": json.loads(text),
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "params_sha256": _params_sha256(params),
            "versions": {k: v[k] for k in _RESUME_VERSIONS},
            "chunk_files": "chunks/p<point>-<first instance>-<end instance>.npz"}


def reliability(cfg, out_dir: Optional[str] = None, *, log=print,
                mesh: Optional[Mesh] = None) -> Dict[str, Any]:
    """The main job: accuracy distribution of a trained network on NVM chips over read times.

    Trains (or loads) the model of ``cfg.model``, programs ``cfg.sweep.num_instances`` chip
    instances per device point of ``cfg.sweep.device_grid``, and reads each at every time of
    ``cfg.sweep.t_read_s``. Writes ``summary.json``, ``results.csv`` and
    ``accuracy_vs_time.png`` into ``out_dir`` when given.

    Scaling (results are bit-identical in every case):

    * chunks are sharded over all devices (or ``mesh``), see :func:`compile_chunk`;
    * ``cfg.distributed`` (or the ``NVJAX_*`` environment variables) starts a multi-process run
      with :func:`init_distributed`; every process runs this function with the same config,
      process 0 trains or loads the weights (broadcast to the others) and writes the files;
    * with ``out_dir``, the run is resumable: ``out_dir/manifest.json`` identifies it (resolved
      config without ``progress``/``distributed``, a hash of the weights, nvjax/jax/jaxlib
      versions and backend) and every finished chunk is written atomically to
      ``out_dir/chunks/p<point>-<lo>-<hi>.npz``. A rerun with the same config skips the chunks
      found there; a rerun with another config raises ``ValueError`` (see
      :func:`open_checkpoint`). The chunk files are kept after the run.

    Args:
        cfg: a :class:`nvjax.config.RunConfig`.
        out_dir: output folder (None: nothing is written and nothing resumed).
        log: progress messages (silent on processes other than 0).
        mesh: the device mesh for the chunks (None: all devices).

    Returns:
        The summary dict (also written to ``summary.json``), on every process.
    """
    from . import config as cfg_mod
    from . import data as data_mod
    from . import models as models_mod

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
        model, params, trained = _get_model(cfg, ds, out_dir, models_mod)
    else:  # process 0 trains or loads; the others receive its weights
        if main:
            model, params, trained = _get_model(cfg, ds, out_dir, models_mod)
        else:
            model, trained = _make_model(cfg, models_mod), False
            shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ds.x_train[:1]))
            params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        params = _broadcast(jax.tree_util.tree_map(np.asarray, params))
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
                status = int(open_checkpoint(out_dir, _reliability_manifest(cfg, cfg_mod, params)))
            except ValueError as e:
                status, err = 2, e
        status = int(_broadcast(np.array(status, np.int32)))
        if err is not None:
            raise err
        if status == 2:
            raise ValueError(f"process 0 refused the output folder {out_dir} "
                             "(it holds a different run); see process 0's error")
        if status == 1:
            log(f"resuming the run in {out_dir}: finished chunks are loaded from {chunk_dir}")

    points = cfg_mod.device_points(cfg)
    fn = accuracy_instance(model, params, cfg.tile, x, y, cfg.sweep.t_read_s)
    compiled = compile_chunk(fn, mesh=mesh)
    from . import prng as prng_mod
    key = prng_mod.key(cfg.seed, cfg.prng)          # the sweep's generator (config 'prng')
    results = []
    n_loaded = 0
    t_run = time.perf_counter()
    for p_idx, (point, device) in enumerate(points):
        desc = "chips" + (f" {point}" if point else "")
        acc, k = _run_instances(fn, key, cfg.sweep.num_instances, device,
                                chunk_size=cfg.sweep.chunk_size, progress=cfg.progress,
                                desc=desc, start=0, compiled=compiled, mesh=None,
                                checkpoint_dir=chunk_dir, checkpoint_name=f"p{p_idx}")
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
            s = summarize(results[p_idx][:, j])
            summary["points"].append({"device": point, "t_read_s": float(t), **s})
    if out_dir is not None and main:
        write_results(out_dir, summary, points, cfg.sweep.t_read_s, results)
        plot_accuracy_vs_time(os.path.join(out_dir, "accuracy_vs_time.png"), points,
                              cfg.sweep.t_read_s, results, ideal_acc,
                              title=f"{cfg.model.name} on {cfg.device.kind}, "
                                    f"{cfg.sweep.num_instances} chips")
    return summary


def _make_model(cfg, models_mod):
    m = cfg.model
    if m.name == "mlp":
        return models_mod.MLP(features=tuple(m.hidden) + (10,))
    return models_mod.LeNet()


def _get_model(cfg, ds, out_dir, models_mod):
    m = cfg.model
    model = _make_model(cfg, models_mod)
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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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
