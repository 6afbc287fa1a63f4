"""Process-level set-up of a Monte Carlo run: multi-process JAX, malloc arenas, heap trimming.

These act on the process (environment variables, glibc's allocator, ``jax.distributed``), not on
arrays, so they live apart from the pure Monte Carlo engine (:mod:`nvjax.sweep`, which re-exports
:func:`init_distributed` and :func:`limit_malloc_arenas`).

This module imports only jax and the standard library.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Callable, Optional

import jax

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "init_distributed",
           "limit_malloc_arenas", "heap_trimmer", "rss_and_peak_mb", "TRIM_INTERVAL_S",
           "TRIM_MARGIN_MB"]


def _libc_function(name: str):
    """glibc's function ``name`` (via ctypes), or None where it is missing (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # e.g. musl has no mallopt / malloc_trim
        return None


#: Environment variable of the coordinator's ``host:port`` (read by :func:`init_distributed`).
ENV_COORDINATOR = "NVJAX_COORDINATOR"
#: Environment variable of the number of processes.
ENV_NUM_PROCESSES = "NVJAX_NUM_PROCESSES"
#: Environment variable of this process's id, in [0, number of processes).
ENV_PROCESS_ID = "NVJAX_PROCESS_ID"


def limit_malloc_arenas(n: int = 1) -> bool:
    """Cap glibc malloc at ``n`` arenas (``mallopt(M_ARENA_MAX, n)``) for this process.

    Why: XLA:CPU's worker threads allocate and free every chunk's temporaries; with glibc's
    default of up to 8 arenas per core these spread over several arenas, each keeping its own
    free memory. One arena lowers a sweep's resident set (benchmark workload, with the heap
    trimming of :func:`nvjax.sweep.run_instances`: peak ≈ 470 MB instead of ≈ 495 MB) at the same speed
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
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    m_arena_max = -8  # M_ARENA_MAX in glibc's malloc.h
    return bool(mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(n)))


#: Seconds between two checks of a sweep's resident memory (see :func:`nvjax.sweep.run_instances`).
TRIM_INTERVAL_S = 0.1
#: A check trims the C heap when the resident set is within this many MB of its peak.
TRIM_MARGIN_MB = 24.0


def rss_and_peak_mb():
    """(VmRSS, VmHWM) of this process in MB from /proc/self/status, or None."""
    try:
        with open("/proc/self/status") as f:
            text = f.read()
        return (int(text.split("VmRSS:")[1].split()[0]) / 1024.0,
                int(text.split("VmHWM:")[1].split()[0]) / 1024.0)
    except (OSError, IndexError, ValueError):
        return None


def heap_trimmer(interval_s: float = TRIM_INTERVAL_S,
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
    trim = _libc_function("malloc_trim") if rss_and_peak_mb() is not None else None
    if trim is None:
        return lambda: None
    last = [time.perf_counter()]

    def maybe_trim():
        now = time.perf_counter()
        if now - last[0] < interval_s:
            return
        last[0] = now
        mem = rss_and_peak_mb()
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

    After it, :func:`nvjax.sweep.run_instances` (and :func:`reliability`) shard every chunk over the devices
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
