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
  file, then ``os.replace``) as ``<name>-<lo>-<hi>.npz``, keyed by the instance range
  ``[lo, hi)`` it holds. A rerun loads whatever ranges it finds there (whatever chunk size wrote
  them) and computes the rest, so a resumed run may use another chunk size; the results are
  the same. :func:`open_checkpoint` guards a run's folder with a ``manifest.json`` (used by
  :func:`nvjax.jobs.reliability`, the ``nvjax run`` job).
* **Memory.** Before the first chunk runs, its compiled stages are asked how much memory they
  need (XLA's ``memory_analysis()`` of the compiled chunk: arguments, results, temporaries),
  and a chunk size that would not fit in the memory available (host memory on CPU, the device's
  on accelerators) is refused with the numbers and the largest chunk size that fits.

Every problem a user can fix (a corrupt chunk file, a chunk size too large, a folder holding
another run) raises :class:`~nvjax._checks.UserError` naming the file or setting and what to
do; in a multi-process run every process raises the same one.

This module imports only ``_checks``, ``_io``, ``_runtime``, ``_xla``, jax, numpy and tqdm: it
knows nothing of chips, models or configs (the jobs that use it live in :mod:`nvjax.jobs`).
:func:`init_distributed` and :func:`limit_malloc_arenas` are re-exported from
:mod:`nvjax._runtime`.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ._checks import UserError
from ._io import atomic_write, atomic_write_with, flatten_dotted
from ._xla import FAST_COMPILE_OPTIONS
from ._runtime import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID,
                       available_device_memory, available_host_memory, first_error,
                       heap_trimmer, init_distributed, limit_malloc_arenas)

__all__ = ["instance_keys", "run_instances", "compile_chunk", "compile_ahead", "Staged", "limit_malloc_arenas",
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
        self._lock = threading.Lock()
        self._ahead: Dict[Any, Future] = {}  # signature -> Future of an _Executable
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

    def _inputs(self, sweep_key, indices, args):
        """``inputs(state) -> (positional args, static keyword args)`` of each stage's jit
        (``state``: None for the first stage, the first stage's result for the second)."""
        if self.mesh is None:
            def plain(state):
                head = (sweep_key, indices) if state is None else (sweep_key, indices, state)
                return head + tuple(args), {}
            return plain
        idx = np.asarray(indices, np.uint32)
        if idx.ndim != 1 or idx.shape[0] % self.mesh.size:
            raise ValueError(f"indices must be 1-D with a length that is a multiple of the "
                             f"{self.mesh.size} mesh devices, got shape {idx.shape}")
        g_idx = jax.make_array_from_callback(idx.shape, self._inst, lambda s: idx[s])
        leaves, treedef = jax.tree_util.tree_flatten((sweep_key, args))
        impls = tuple(jax.random.key_impl(l) if _is_key(l) else None for l in leaves)
        leaves = [self._unsharded(jax.random.key_data(l) if i is not None else l)
                  for l, i in zip(leaves, impls)]

        def sharded(state):
            return (g_idx, state, leaves), {"treedef": treedef, "impls": impls}
        return sharded

    def __call__(self, sweep_key, indices, *args):
        inputs = self._inputs(sweep_key, indices, args)
        out = None
        for f in self._jits:
            pos, static = inputs(out)
            out = f(*pos, **static)
        return out

    def executable(self, sweep_key, indices, *args) -> "_Executable":
        """The chunk compiled ahead of time for these argument shapes (JAX caches the lowering
        and the executable, so asking again is cheap), with XLA's memory analysis of it.

        When :meth:`compile_ahead` was called for the same shapes, its result is used (waiting
        for it if it is still compiling; if it failed, the chunk is compiled here)."""
        fut = self._ahead.get(_signature(sweep_key, indices, args))
        if fut is not None:
            try:
                return fut.result()
            except Exception:  # noqa: BLE001 (compiled again here, where the error surfaces)
                pass
        return self._compile(sweep_key, indices, args)

    def compile_ahead(self, sweep_key, indices, *args) -> Future:
        """Start compiling the chunk for these argument shapes in a background thread.

        Arguments may be ``jax.ShapeDtypeStruct`` where only the shape is known yet (e.g. the
        parameters of a network still training); the sweep key must be a key array. A later
        :meth:`executable` (hence :func:`run_instances`) with arguments of the same shapes,
        dtypes, weak types and static structure uses the result. XLA compiles without Python's
        GIL, so the caller's own work (training, data loading) goes on meanwhile. The thread
        compiles under JAX's global configuration: context managers of the calling thread
        (``jax.default_device``, ``jax.default_matmul_precision``, ...) do not reach it. The
        compiled chunk is kept as long as ``compiled`` is.

        Returns:
            A ``concurrent.futures.Future`` of the compiled chunk (the same one for a repeated
            call with the same shapes).
        """
        if isinstance(sweep_key, jax.ShapeDtypeStruct):
            raise TypeError("compile_ahead: sweep_key must be a key array (e.g. "
                            "jax.random.key(seed)), not a ShapeDtypeStruct")
        sig = _signature(sweep_key, indices, args)
        with self._lock:
            fut = self._ahead.get(sig)
            if fut is not None:
                return fut
            fut = self._ahead[sig] = Future()

        def work():
            try:
                fut.set_result(self._compile(sweep_key, indices, args))
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits)
                fut.set_exception(e)
        threading.Thread(target=work, name="nvjax-compile-ahead", daemon=True).start()
        return fut

    def _compile(self, sweep_key, indices, args) -> "_Executable":
        inputs = self._inputs(sweep_key, indices, args)
        compiled, state = [], None
        for f in self._jits:
            pos, static = inputs(state)
            c = f.lower(*pos, **static).compile()
            compiled.append(c)
            state = c.out_info  # the next stage is lowered on the result's shapes
        return _Executable(self, compiled)

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


def _signature(sweep_key, indices, args):
    """What a compiled chunk depends on: the static structure of the arguments and each leaf's
    shape, dtype, weak type and (for an array committed to a device) sharding; concrete arrays
    and ``jax.ShapeDtypeStruct`` of the same shape and dtype agree."""
    leaves, treedef = jax.tree_util.tree_flatten((sweep_key, args))

    def leaf(x):
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
            committed = isinstance(x, jax.Array) and x.committed
            return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                    x.sharding if committed or isinstance(x, jax.ShapeDtypeStruct) else None)
        return (type(x),)  # a Python scalar: weakly typed, its value is traced
    return treedef, tuple(np.shape(indices)), tuple(leaf(x) for x in leaves)


class _Executable:
    """A chunk function compiled for one set of argument shapes (:meth:`_ChunkFn.executable`):
    called like the chunk function with arguments of those shapes."""

    def __init__(self, chunk_fn: "_ChunkFn", compiled: Sequence[Any]):
        self.mesh = chunk_fn.mesh
        self._chunk_fn = chunk_fn
        self._compiled = list(compiled)

    def __call__(self, sweep_key, indices, *args):
        inputs = self._chunk_fn._inputs(sweep_key, indices, args)
        out = None
        for c in self._compiled:
            pos, _ = inputs(out)  # static arguments are part of the executable
            out = c(*pos)
        return out

    def peak_bytes(self) -> Optional[Dict[str, int]]:
        """Memory one call needs per device, from XLA's memory analysis of the compiled stages:
        ``{'peak', 'temp', 'buffers'}`` in bytes, where a stage needs its arguments, results
        and temporaries at once and the stages run one after the other (the first stage's
        result is an argument of the second); None where the backend does not tell."""
        peak, temp, buffers = 0, 0, 0
        for c in self._compiled:
            try:
                m = c.memory_analysis()
            except Exception:  # noqa: BLE001 (not implemented on some backends)
                return None
            if m is None:
                return None
            io = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            if io + m.temp_size_in_bytes > peak:
                peak, temp, buffers = io + m.temp_size_in_bytes, m.temp_size_in_bytes, io
        return {"peak": int(peak), "temp": int(temp), "buffers": int(buffers)}


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


def compile_ahead(compiled: Callable, sweep_key, num_instances: int, *args,
                  chunk_size: int = 256, start: int = 0) -> Future:
    """Start compiling the chunk that :func:`run_instances` will run, in a background thread.

    Compilation, not Monte Carlo, dominates short sweeps; it needs only the shapes of the
    arguments, so it can go on while the caller computes their values (e.g. trains the network
    whose parameters are an argument). ``run_instances(..., compiled=compiled)`` with the same
    ``num_instances``, ``chunk_size``, ``start`` and argument shapes then waits for this result
    instead of compiling again. The results of the sweep do not change.

    Args:
        compiled: a function made by :func:`compile_chunk`.
        sweep_key: the sweep's root key (a key array).
        num_instances, chunk_size, start: as for :func:`run_instances` (they set the compiled
            batch).
        *args: the arguments of the instance function, or ``jax.ShapeDtypeStruct`` leaves
            where only shapes are known yet (a pytree such as
            ``jax.eval_shape(model.init, key, x)``).

    Returns:
        A ``concurrent.futures.Future`` of the compiled chunk; its exception (if compiling
        failed) is raised again by the ``run_instances`` that needs it.

    Example:
        >>> g = lambda key, w: jax.random.normal(key, (3,)) @ w
        >>> f = compile_chunk(g)
        >>> ahead = compile_ahead(f, jax.random.key(0), 10,
        ...                       jax.ShapeDtypeStruct((3, 2), jnp.float32), chunk_size=4)
        >>> run_instances(g, jax.random.key(0), 10, jnp.ones((3, 2)), chunk_size=4,
        ...               compiled=f).shape   # waits for the compilation started above
        (10, 2)
    """
    if not isinstance(compiled, _ChunkFn):
        raise TypeError(f"compiled must be a function made by compile_chunk, got "
                        f"{type(compiled).__name__}")
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    width = compiled.mesh.size if compiled.mesh is not None else 1
    batch = math.ceil(min(chunk_size, num_instances) / width) * width
    idx = np.arange(start, start + batch, dtype=np.uint32)
    return compiled.compile_ahead(sweep_key, idx, *args)


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


def _chunk_files(checkpoint_dir, name):
    """``[(lo, hi, path)]`` of the chunk files ``<name>-<lo>-<hi>.npz`` in the folder."""
    try:
        entries = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"cannot read the checkpoint folder {checkpoint_dir} "
                        f"({e.strerror or e}); fix its permissions or use another output "
                        "folder") from None
    pattern = re.compile(re.escape(name) + r"-(\d+)-(\d+)\.npz")
    found = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and int(m[1]) < int(m[2]):
            found.append((int(m[1]), int(m[2]), os.path.join(checkpoint_dir, entry)))
    return sorted(found)


def _plan(files, start, num_instances, chunk):
    """Segments ``[(lo, hi, k)]`` (instance offsets from ``start``) covering
    ``[0, num_instances)``: ``k >= 0`` takes the instances from chunk file ``files[k]`` (where
    several files hold an instance, the one reaching furthest), ``k = -1`` computes them (at
    most ``chunk`` per segment, ending where the next file begins). ``files`` are sorted by
    their first instance."""
    segments, p, j, best = [], 0, 0, (-1, -1)  # best: (hi, k) among files begun so far
    while p < num_instances:
        a = start + p
        while j < len(files) and files[j][0] <= a:
            best = max(best, (files[j][1], j))
            j += 1
        if best[0] > a:
            q, k = min(best[0] - start, num_instances), best[1]
        else:
            nxt = files[j][0] - start if j < len(files) else num_instances
            q, k = min(p + chunk, num_instances, nxt), -1
        segments.append((p, q, k))
        p = q
    return segments


def _save_chunk(path, leaves):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_with(path, lambda f: np.savez(f, **{f"leaf{i}": np.asarray(a)
                                                        for i, a in enumerate(leaves)}),
                          binary=True)
    except OSError as e:
        raise UserError(f"cannot write the chunk file {path} ({e.strerror or e}); free some "
                        "disk space or use another output folder, then rerun the same command "
                        "to resume") from None


def _load_chunk(path, template_leaves, n):
    """The leaves of chunk file ``path`` (``n`` instances), checked against the sweep's."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            leaves = [np.asarray(z[f"leaf{i}"]) if f"leaf{i}" in names else None
                      for i in range(len(template_leaves))]
    except Exception as e:  # noqa: BLE001 (zip, zlib, format and OS errors alike)
        reason = f"{type(e).__name__}: {e}"
        try:
            with open(path, "rb") as f:
                if f.read(2) != b"PK":
                    reason = "not an .npz archive"
        except OSError:
            pass
        raise UserError(f"chunk file {path} is corrupt or unreadable ({reason}); delete it and "
                        "rerun the same command: its instances are then recomputed") from None
    want = [(n,) + tuple(t.shape) for t in template_leaves]
    if len(names) != len(template_leaves) or any(
            a is None or a.shape != w or a.dtype != t.dtype
            for a, w, t in zip(leaves, want, template_leaves)):
        got = [None if a is None else a.shape for a in leaves]
        raise UserError(f"chunk file {path} does not hold this sweep's results (expected "
                        f"leaves of shapes {want}, found {got}); delete it and rerun to "
                        "recompute its instances, or use another checkpoint folder")
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


#: A chunk may use at most this fraction of the memory available when the sweep starts (the rest
#: is left to the process's other buffers and to the error of XLA's estimate, which was within
#: 3 % of the measured peak on the quickstart workload).
MEMORY_FRACTION = 0.9


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.3g} MB"


def _memory_problem(exe, *, chunk_size, batch, mesh, stats, name) -> Optional[str]:
    """None if one chunk of ``exe`` fits in the memory available to this process, else the
    message saying how much it needs, how much there is and which chunk size would fit."""
    mem = exe.peak_bytes() if hasattr(exe, "peak_bytes") else None
    if mem is None:
        return None
    mesh_devices = list(mesh.devices.flat) if mesh is not None else [jax.local_devices()[0]]
    local = [d for d in mesh_devices if d.process_index == jax.process_index()] or mesh_devices
    on_host = local[0].platform == "cpu"  # CPU devices share the host's memory
    copies = len(local) if on_host else 1
    need = mem["peak"] * copies
    avail = available_host_memory() if on_host else available_device_memory(local)
    stats.update(memory_estimate_bytes=need)
    if avail is None:
        return None
    free, where = avail
    stats.update(memory_available_bytes=free)
    if need <= MEMORY_FRACTION * free:
        return None
    local_batch = batch * copies / len(mesh_devices) if on_host else batch / len(mesh_devices)
    per_instance = need / max(local_batch, 1)
    width = len(mesh_devices)
    fits = int(MEMORY_FRACTION * free / per_instance * len(mesh_devices) / (
        copies if on_host else 1)) // width * width
    what = (f"{copies} CPU devices × " if copies > 1 else "") + (
        f"{_gb(mem['temp'])} temporaries + {_gb(mem['buffers'])} arguments and results")
    advice = (f"set {name} to at most {fits}" if fits >= 1 else
              "even one instance per chunk does not fit: free some memory or use a machine "
              "with more")
    return (f"{name} = {chunk_size}: one chunk of {batch} instances needs about {_gb(need)} "
            f"(XLA's memory analysis of the compiled chunk: {what}), more than "
            f"{MEMORY_FRACTION:.0%} of the {_gb(free)} available ({where}); {advice} "
            "(results do not depend on the chunk size)")


def run_instances(instance_fn: Callable, sweep_key, num_instances: int, *args,
                  chunk_size: int = 256, progress: bool = False, desc: str = "instances",
                  start: int = 0, compiled: Optional[Callable] = None,
                  mesh: Optional[Mesh] = None, checkpoint_dir: Optional[str] = None,
                  checkpoint_name: str = "chunk", return_loaded: bool = False,
                  check_memory: bool = True, stats: Optional[Dict[str, Any]] = None,
                  chunk_size_name: str = "chunk_size",
                  save_if: Optional[Callable[[Any], bool]] = None):
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
        checkpoint_dir: a folder for chunk files ``<checkpoint_name>-<lo>-<hi>.npz``, each
            holding the results of instances ``[lo, hi)``. Instances found in files there are
            loaded (whatever chunk size wrote them; where files overlap, the one reaching
            furthest is used), the others computed in chunks of at most ``chunk_size`` and
            written atomically by process 0. The caller makes sure the folder belongs to the
            same computation (e.g. with :func:`open_checkpoint`).
        checkpoint_name: prefix of the chunk files (e.g. the sweep point).
        return_loaded: also return how many chunk files were loaded from ``checkpoint_dir``.
        check_memory: before the first chunk is computed, compare the memory it needs (XLA's
            analysis of the compiled chunk, for a function made by :func:`compile_chunk`) with
            the memory available, and refuse a chunk size that would need more than
            :data:`MEMORY_FRACTION` of it.
        stats: a dict to fill with ``chunks`` (segments run or loaded), ``loaded``,
            ``memory_estimate_bytes`` and ``memory_available_bytes`` (where known).
        chunk_size_name: what the caller's user calls the chunk size (in error messages),
            e.g. ``'sweep.chunk_size'`` for a config key.
        save_if: with ``checkpoint_dir``, a chunk's results (the pytree, instance axis first)
            are written only when ``save_if(results)`` is True, e.g. when they are all finite:
            a chunk that failed is recomputed by a rerun instead of being resumed.

    Memory is bounded by the chunk size and flat in the number of chunks: when the resident set
    comes within :data:`nvjax._runtime.TRIM_MARGIN_MB` of its peak (checked at most every
    :data:`nvjax._runtime.TRIM_INTERVAL_S` seconds) the C heap is trimmed (glibc ``malloc_trim``), so the freed
    temporaries of past chunks do not stay resident.

    Returns:
        The pytree of results with a leading instance axis [num_instances, ...] (NumPy arrays),
        on every process; with ``return_loaded``, ``(results, number of chunk files loaded)``.

    Raises:
        UserError: a chunk size whose chunk would not fit in memory (the message has the
            estimate, the memory available and a chunk size that fits), a corrupt or foreign
            chunk file (the message names it); on every process of a multi-process run.

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
    stats = {} if stats is None else stats
    f = compiled if compiled is not None else compile_chunk(instance_fn, mesh=mesh)
    f_mesh = getattr(f, "mesh", None)
    width = f_mesh.size if f_mesh is not None else 1
    chunk = min(chunk_size, num_instances)
    batch = math.ceil(chunk / width) * width  # compiled batch, padded
    main = jax.process_index() == 0
    files = []
    if checkpoint_dir is not None and main:
        files = _chunk_files(checkpoint_dir, checkpoint_name)
    segments = _plan(files, start, num_instances, chunk)
    if checkpoint_dir is not None and jax.process_count() > 1:  # process 0 decides
        count = int(broadcast(np.array(len(segments), np.uint32)))
        table = np.array(segments if main else np.zeros((count, 3)), np.int64)
        table = broadcast(np.stack([table[:, 0], table[:, 1], table[:, 2] >= 0], 1)
                          .astype(np.uint32))
        segments = [(int(p), int(q), (segments[i][2] if main else 0) if loaded else -1)
                    for i, (p, q, loaded) in enumerate(table)]
    n_loaded = sum(k >= 0 for _, _, k in segments)
    stats.update(chunks=len(segments), loaded=n_loaded)
    bar = _progress(num_instances, desc) if progress and main else None
    result, treedef = None, None  # preallocated [num_instances, ...] per leaf
    if n_loaded:
        shapes = jax.eval_shape(lambda k: instance_fn(k, *args), jax.random.fold_in(sweep_key, 0))
        t_leaves, treedef = jax.tree_util.tree_flatten(shapes)
        result = [np.zeros((num_instances,) + tuple(t.shape), t.dtype) for t in t_leaves]
        problem = None
        if main:
            try:
                for p, q, k in segments:
                    if k >= 0:
                        lo, hi, path = files[k]
                        leaves = _load_chunk(path, t_leaves, hi - lo)
                        for r, a in zip(result, leaves):
                            r[p:q] = a[start + p - lo:start + q - lo]
            except UserError as e:
                problem = str(e)
        problem = first_error(problem)
        if problem:
            if bar is not None:
                bar.close()
            raise UserError(problem)
        if bar is not None:
            bar.update(sum(q - p for p, q, k in segments if k >= 0))
    trim_heap = heap_trimmer()
    run = None
    for p, q, k in segments:
        if k >= 0:
            continue
        n = q - p
        idx = np.arange(start + p, start + p + batch, dtype=np.uint32)
        if run is None:  # the first chunk to compute: compile it and check its memory
            run, problem = f, None
            if hasattr(f, "executable"):
                run = f.executable(sweep_key, idx, *args)
                if check_memory:
                    problem = _memory_problem(run, chunk_size=chunk_size, batch=batch,
                                              mesh=f_mesh, stats=stats, name=chunk_size_name)
            problem = first_error(problem) if check_memory else None
            if problem:
                if bar is not None:
                    bar.close()
                raise UserError(problem)
        res = _fetch(run(sweep_key, idx, *args))
        leaves, treedef = jax.tree_util.tree_flatten(res)
        leaves = [np.asarray(a)[:n] for a in leaves]
        if checkpoint_dir is not None and main and (
                save_if is None or save_if(jax.tree_util.tree_unflatten(treedef, leaves))):
            _save_chunk(_chunk_path(checkpoint_dir, checkpoint_name, start + p, start + q),
                        leaves)
        trim_heap()
        if result is None:
            result = [np.empty((num_instances,) + a.shape[1:], a.dtype) for a in leaves]
        for r, a in zip(result, leaves):
            r[p:q] = a  # a copy: no chunk buffer is kept, memory stays flat in the count
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    leaves = result
    if n_loaded:
        leaves = broadcast(leaves)  # process 0 loaded the finished chunks
    out = jax.tree_util.tree_unflatten(treedef, leaves)
    return (out, n_loaded) if return_loaded else out


def _progress(total, desc):
    return tqdm(total=total, desc=desc, unit="inst", file=sys.stderr, dynamic_ncols=True)


def summarize(acc: np.ndarray) -> Dict[str, float]:
    """Mean, std, min, max and the 1st, 5th, 50th, 95th, 99th percentiles of a sample."""
    a = np.asarray(acc, np.float64)
    q = np.percentile(a, [1, 5, 50, 95, 99])
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "p1": float(q[0]), "p5": float(q[1]), "p50": float(q[2]),
            "p95": float(q[3]), "p99": float(q[4]), "max": float(a.max()), "n": int(a.size)}


def open_checkpoint(directory: str, manifest: Dict[str, Any], *, ignore: Sequence[str] = (),
                    create: bool = True) -> bool:
    """Claim ``directory`` for a resumable run described by ``manifest`` (call on process 0).

    The first call writes ``directory/manifest.json`` atomically; a later call with an equal
    manifest means "resume": chunk files in the folder belong to this run and may be loaded.
    A different manifest is an error (nothing is deleted or overwritten).

    Args:
        directory: the run's folder (created if missing).
        manifest: a JSON-serializable dict that identifies the computation (resolved config,
            seed, instance count, versions, ...), not timings, device counts or anything else
            the results do not depend on (such as the chunk size).
        ignore: flattened keys (``'params_sha256'``, ``'config.sweep'``: a key and everything
            under it) left out of the comparison, e.g. to check a manifest before all of it
            is known.
        create: False only compares (nothing is created or written when the folder holds no
            manifest).

    Returns:
        True if the folder already held this run (resume), False if it was new.

    Raises:
        UserError: the folder holds another run (the message lists the differing keys and says
            what to do), or its manifest is unreadable.
    """
    manifest = json.loads(json.dumps(manifest))  # canonical JSON types (tuples -> lists)
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        if create:
            try:
                os.makedirs(directory, exist_ok=True)
                atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            except OSError as e:
                raise UserError(f"cannot write {path} ({e.strerror or e}); choose an output "
                                "folder you can write to") from None
        return False
    try:
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} (which identifies the run in {directory}) is unreadable or "
                        f"corrupt ({e}); use another output folder, or delete {path} and the "
                        "run's chunk files to start afresh") from None

    def kept(d):
        return {k: v for k, v in flatten_dotted(d).items()
                if not any(k == i or k.startswith(i + ".") for i in ignore)}
    a, b = kept(old), kept(manifest)
    if a == b:
        return True
    diff = [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b), key=lambda k: (k.count("."), k))  # 'job' first
            if a.get(k, "<missing>") != b.get(k, "<missing>")]
    shown = "; ".join(diff[:8]) + (f"; ... ({len(diff)} keys)" if len(diff) > 8 else "")
    hint = ""
    if "format" in old and old.get("format") != manifest.get("format"):
        hint = " (it was written by another version of nvjax)"
    raise UserError(f"{path} belongs to a different run ({shown}){hint}. The output folder "
                    f"{directory} holds that run's results: rerun with its config to resume "
                    f"it, use another output folder for this one, or delete {path} and the "
                    "run's chunk files to start afresh")
