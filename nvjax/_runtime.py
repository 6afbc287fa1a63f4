"""Process-level set-up of a Monte Carlo run: multi-process JAX, malloc arenas, heap trimming,
the memory a chunk may use.

These act on the process (environment variables, glibc's allocator, ``jax.distributed``), not on
arrays, so they live apart from the pure Monte Carlo engine (:mod:`nvjax.sweep`, which re-exports
:func:`init_distributed` and :func:`limit_malloc_arenas`).

A multi-process run starts with a rendezvous of its own before ``jax.distributed.initialize``
(:func:`init_distributed`): process 0 listens on the coordinator's port, every other process
connects and says who it is, and only when all have arrived, and have all confirmed that they
are still there (a two-phase commit, :func:`rendezvous`), does JAX join them. A missing,
misconfigured or departed process then gives an error that names the coordinator address within
the start-up timeout on every process that is there, instead of JAX's abort of the whole
process. Once
joined, :func:`gather_text` and :func:`first_error` let the processes compare what they were
given and fail together, with the same message, rather than one of them failing alone and the
others waiting for it.

This module imports ``_checks`` (for :class:`~nvjax._checks.UserError`), jax, numpy and the
standard library.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import socket
import sys
import time
from typing import Callable, List, Optional, Tuple

import jax
import numpy as np

from ._checks import UserError

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ENV_STARTUP_TIMEOUT",
           "DEFAULT_STARTUP_TIMEOUT_S", "init_distributed", "rendezvous", "limit_malloc_arenas", "heap_trimmer",
           "rss_and_peak_mb", "TRIM_INTERVAL_S", "TRIM_MARGIN_MB", "gather_text", "first_error",
           "available_host_memory", "available_device_memory"]


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
#: Environment variable of the start-up timeout of a multi-process run, s.
ENV_STARTUP_TIMEOUT = "NVJAX_STARTUP_TIMEOUT_S"
#: How long the processes of a multi-process run wait for each other at start-up, s.
DEFAULT_STARTUP_TIMEOUT_S = 300.0


def limit_malloc_arenas(n: int = 4) -> bool:
    """Cap glibc malloc at ``n`` arenas (``mallopt(M_ARENA_MAX, n)``) for this process.

    Why: glibc allows up to 8 arenas per core, and XLA:CPU's worker threads allocate and free
    every chunk's temporaries across them, each arena keeping its own free memory, so over very
    long sweeps (~10⁵ chunks) the resident set creeps up although nothing leaks. A few arenas
    keep it flat, together with the heap trimming of :func:`nvjax.sweep.run_instances`.
    Why not one: threads that allocate at the same time (the job's main thread training while
    :func:`nvjax.sweep.compile_ahead` compiles, and XLA's own threads) then queue on one lock;
    the quickstart took 8.4-9.3 s with one arena against 6.5-7.9 s with 4 and 6.5-7.1 s with
    glibc's default (2-core machine, 4 runs each), while a 10 M-weight sweep's peak resident
    memory was the same with 1, 4 and 16 arenas (1602, 1635, 1603 MB, 100 instances,
    ``experiments/bench_memory.py``). ``nvjax`` (the command line) calls this at start; in your
    own scripts call it before JAX's first computation (arenas already handed to running
    threads stay).

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
        raise UserError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _startup_timeout(value) -> float:
    """The start-up timeout: the argument, else $NVJAX_STARTUP_TIMEOUT_S, else the default."""
    where = "initialization_timeout_s"
    if value is None:
        raw = os.environ.get(ENV_STARTUP_TIMEOUT)
        if raw is None or raw.strip() == "":
            return DEFAULT_STARTUP_TIMEOUT_S
        where = f"environment variable {ENV_STARTUP_TIMEOUT}"
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{where} must be a number of seconds, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where} (the start-up timeout of a multi-process run) must be a finite "
                        f"number of seconds > 0, got {value!r}")
    return float(value)


def init_distributed(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None, *,
                     initialization_timeout_s: Optional[float] = None) -> bool:
    """Join a multi-process (multi-host) run with ``jax.distributed.initialize``.

    Each argument left None is read from the environment: ``NVJAX_COORDINATOR`` (``host:port``
    of process 0's coordinator service), ``NVJAX_NUM_PROCESSES``, ``NVJAX_PROCESS_ID``,
    ``NVJAX_STARTUP_TIMEOUT_S``. With no coordinator and no process count anywhere, or a single
    process, nothing is initialized (a plain single-process run). Must be called before any JAX
    computation of the process. On CPU, the cross-process collectives use gloo.

    Before JAX is asked to join the processes, they meet in a rendezvous of their own on the
    coordinator's port (:func:`rendezvous`): process 0 listens there (it must be free) and the
    others connect, retrying until the start-up timeout; when all have arrived, each confirms
    that it is still there before any goes on. So a process that is missing, started with
    another process count or a duplicate id, or gone before the others arrived, gives a
    :class:`~nvjax._checks.UserError` naming the coordinator address within the timeout, on
    every process that is there (JAX itself would abort the process after its own timeout). A peer that dies *after* the start is beyond this:
    JAX's coordination service then terminates the other processes ("another task died").

    After it, :func:`nvjax.sweep.run_instances` (and :func:`nvjax.jobs.reliability`) shard every
    chunk over the devices of all processes; all processes must make the same calls in the same
    order.

    Args:
        coordinator_address: ``'host:port'`` reachable by every process, e.g. ``'10.0.0.1:1234'``.
        num_processes: number of processes, >= 1.
        process_id: this process's id in [0, num_processes); process 0 writes the outputs.
        initialization_timeout_s: how long the processes wait for each other at start-up, s
            (None: ``$NVJAX_STARTUP_TIMEOUT_S``, else :data:`DEFAULT_STARTUP_TIMEOUT_S`).

    Returns:
        True if the process is part of a multi-process run (now or already), else False.

    Raises:
        UserError: an incomplete or inconsistent setting (the message names the argument and its
            environment variable), or the processes did not all meet within the timeout (the
            message names the coordinator address and the missing processes).
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
        raise UserError(f"num_processes ({ENV_NUM_PROCESSES}) must be >= 1, got {n}")
    if n == 1 and pid in (None, 0):
        return jax.distributed.is_initialized()
    missing = [f"{a} ({e})" for a, e, v in (("coordinator_address", ENV_COORDINATOR, addr),
                                             ("num_processes", ENV_NUM_PROCESSES, n),
                                             ("process_id", ENV_PROCESS_ID, pid)) if v is None]
    if missing:
        raise UserError("init_distributed: a multi-process run needs coordinator_address, "
                        f"num_processes and process_id; missing: {', '.join(missing)}")
    if not 0 <= pid < n:
        raise UserError(f"process_id ({ENV_PROCESS_ID}) must be in [0, {n}), got {pid}")
    host, port = _split_address(addr)
    timeout_s = _startup_timeout(initialization_timeout_s)
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (n, pid):
            raise RuntimeError(
                f"init_distributed: JAX is already initialized as process "
                f"{jax.process_index()} of {jax.process_count()}, not {pid} of {n}")
        return True
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _rendezvous(addr, host, port, n, pid, timeout_s)
    try:
        jax.distributed.initialize(addr, num_processes=n, process_id=pid,
                                   initialization_timeout=max(1, math.ceil(timeout_s)))
    except RuntimeError as e:
        raise RuntimeError(f"init_distributed: {e} (it must run before any JAX computation)") from e
    return True


def _split_address(addr: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        port_num = int(port)
    except ValueError:
        port_num = -1
    if not sep or not host or not 0 < port_num < 65536:
        raise UserError(f"coordinator_address ({ENV_COORDINATOR}) must be 'host:port' with a port "
                        f"in 1..65535, got {addr!r}")
    return host, port_num


# ----------------------------------------------------------------------------------------------
# The start-up rendezvous (plain TCP on the coordinator's port, before JAX binds it)

_HELLO = "nvjax-rendezvous/1"
_TIMEOUT_HINT = ("raise the start-up timeout (distributed.startup_timeout_s in the config, or "
                 f"${ENV_STARTUP_TIMEOUT}) if they are merely slow to start")


#: Seconds process 0 waits for every peer's "ack" once it has told them all "ready" (they answer
#: at once; a peer that does not has given up, died or lost its connection).
_ACK_S = 10.0


def _reply_margin(timeout_s: float) -> float:
    """How long past the coordinator's deadline a peer waits for its answer (network delay)."""
    return min(5.0, 0.25 * timeout_s)


def _send(conn: socket.socket, obj) -> bool:
    """Send one JSON line; False when the connection is gone."""
    try:
        conn.sendall((json.dumps(obj) + "\n").encode())
        return True
    except OSError:
        return False


class _Lines:
    """JSON lines from one connection, kept in a buffer (several may arrive in one packet)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buf = conn, b""

    def next(self, deadline: float) -> Optional[dict]:
        """The next JSON object before ``deadline`` (monotonic), or None (timeout, closed
        connection, or not a JSON object)."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(self.buf) > 65536:
                return None
            self.conn.settimeout(left)
            try:
                part = self.conn.recv(4096)
            except OSError:
                return None
            if not part:
                return None
            self.buf += part
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            obj = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None


def rendezvous(coordinator_address: str, num_processes: int, process_id: int,
               timeout_s: float) -> None:
    """The start-up rendezvous of a multi-process run, alone (:func:`init_distributed` runs it
    before ``jax.distributed.initialize``): every process calls it with the same coordinator
    address and process count and its own id; it returns on all of them, or raises the same
    :class:`~nvjax._checks.UserError` on every process still there.

    Process 0 listens on the coordinator's port; every other process connects (retrying until
    its ``timeout_s``), says who it is, and is told how long process 0 will wait (it waits that
    long, even past its own timeout). When all have arrived, a two-phase commit starts the run:
    process 0 sends "ready", each peer answers "ack", and only when every peer has answered
    does process 0 send "ok" to all; a peer that gave up, died or lost its connection before
    that makes process 0 send the same error to every peer still there instead. So no process
    goes on to ``jax.distributed.initialize`` while another has given up (JAX would abort them).

    Args:
        coordinator_address: ``'host:port'`` of process 0.
        num_processes: number of processes, >= 2.
        process_id: this process's id in [0, num_processes).
        timeout_s: how long this process waits for the others, s.

    Raises:
        UserError: the processes did not all meet within the timeout, disagree on the process
            count or ids, or one left before the start (the message names the coordinator).
    """
    if not 0 <= process_id < num_processes or num_processes < 2:
        raise UserError(f"rendezvous: process_id must be in [0, num_processes) with "
                        f"num_processes >= 2, got {process_id} of {num_processes}")
    host, port = _split_address(coordinator_address)
    _rendezvous(coordinator_address, host, port, num_processes, process_id,
                _startup_timeout(timeout_s))


def _rendezvous(addr: str, host: str, port: int, n: int, pid: int, timeout_s: float) -> None:
    """All ``n`` processes meet on the coordinator's port before JAX joins them (see
    :func:`rendezvous`)."""
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        _host_rendezvous(addr, port, n, deadline, timeout_s)
    else:
        _join_rendezvous(addr, host, port, n, pid, deadline, timeout_s)


def _host_rendezvous(addr, port, n, deadline, timeout_s) -> None:
    try:
        if socket.has_dualstack_ipv6():
            srv = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            srv = socket.create_server(("", port))
    except OSError as e:
        raise UserError(f"process 0 cannot listen on port {port} of the coordinator address "
                        f"{addr} ({e.strerror or e}); choose a free port for every process of "
                        "the run") from None
    peers = {}   # process id (or a placeholder >= n) -> (connection, its lines)
    error = None
    try:
        while len(peers) < n - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            srv.settimeout(left)
            try:
                conn, _ = srv.accept()
            except OSError:  # socket.timeout included
                break
            lines = _Lines(conn)
            hello = lines.next(min(deadline, time.monotonic() + 10.0))
            if hello is None or hello.get("hello") != _HELLO:
                conn.close()  # not a process of an nvjax run
                continue
            i, m = hello.get("process_id"), hello.get("num_processes")
            if m != n:
                error = (f"the processes of the run disagree on the number of processes: process "
                         f"{i} was started with {m}, process 0 with {n} (coordinator {addr}); "
                         "start every process with the same num_processes")
            elif not isinstance(i, int) or not 1 <= i < n or i in peers:
                error = (f"two processes of the run were started with process id {i} "
                         f"(coordinator {addr}); give each of the {n} processes its own id "
                         f"in 0..{n - 1}")
            peers[len(peers) + n if error else i] = (conn, lines)
            if error:
                break
            _send(conn, {"wait_s": max(deadline - time.monotonic(), 0.0)})
        if error is None and len(peers) < n - 1:
            missing = sorted(set(range(1, n)) - set(peers))
            error = (f"the multi-process run did not start: after {timeout_s:g} s, process(es) "
                     f"{', '.join(map(str, missing))} of {n} had not reached the coordinator "
                     f"{addr} (process 0 waited there; connected: process(es) "
                     f"{', '.join(map(str, [0] + sorted(peers)))}). Start every process with the "
                     f"same coordinator address and number of processes, or {_TIMEOUT_HINT}")
        live = dict(peers)
        if error is None:  # two-phase commit: every peer must still be there
            for i, (conn, _) in peers.items():
                if not _send(conn, {"ready": True}):
                    live.pop(i)
            ack_deadline = time.monotonic() + _ACK_S
            for i, (conn, lines) in list(live.items()):
                reply = lines.next(ack_deadline)
                if reply is None or reply.get("ack") != i:
                    live.pop(i)
            gone = sorted(set(peers) - set(live))
            if gone:
                error = (f"the multi-process run did not start: process(es) "
                         f"{', '.join(map(str, gone))} of {n} reached the coordinator {addr} "
                         "but left before all processes had arrived (gave up after its own "
                         "start-up timeout, was stopped, or lost its connection), so no process "
                         f"starts. Start every process within the start-up timeout of the "
                         f"others, or {_TIMEOUT_HINT}")
        for conn, _ in live.values():
            _send(conn, {"error": error} if error else {"ok": True})
        for conn, lines in live.values():  # let the peers close first (no TIME_WAIT on our port)
            lines.next(time.monotonic() + 2.0)
            conn.close()
    finally:
        for conn, _ in peers.values():
            conn.close()
        srv.close()
    if error:
        raise UserError(error)


def _join_rendezvous(addr, host, port, n, pid, deadline, timeout_s) -> None:
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"process {pid} could not reach the coordinator {addr} (process 0) "
                            f"within {timeout_s:g} s ({last}). Start process 0 with the same "
                            f"coordinator address, check that {addr} is reachable from here, "
                            f"or {_TIMEOUT_HINT}")
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 2.0))
            break
        except OSError as e:
            last = e.strerror or str(e) or type(e).__name__
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
    margin = _reply_margin(timeout_s)
    late = (f"process {pid} reached the coordinator {addr}, but the run did not start within "
            f"{timeout_s:g} s: not all {n} processes arrived, or {addr} is not process 0 of an "
            "nvjax run. Start every process with the same coordinator address and number of "
            f"processes, or {_TIMEOUT_HINT}")
    with conn:
        lines = _Lines(conn)
        _send(conn, {"hello": _HELLO, "process_id": pid, "num_processes": n})
        # process 0 answers when all have arrived or at its own deadline, which it tells us
        until = deadline + margin
        while True:
            reply = lines.next(until)
            if reply is None:
                raise UserError(late)
            if "wait_s" in reply:
                try:
                    wait_s = float(reply["wait_s"])
                except (TypeError, ValueError):
                    wait_s = 0.0
                if math.isfinite(wait_s):
                    until = max(until, time.monotonic() + wait_s + margin)
                continue
            break
        if "ready" in reply:
            _send(conn, {"ack": pid})
            reply = lines.next(time.monotonic() + _ACK_S + margin)
            if reply is None:
                raise UserError(f"process {pid} lost the coordinator {addr} (process 0) while "
                                "the processes were starting; start all processes again")
    if "error" in reply:
        raise UserError(str(reply["error"]))
    if not reply.get("ok"):
        raise UserError(late)


# ----------------------------------------------------------------------------------------------
# Agreement between processes (after they joined)


def gather_text(text: str) -> List[str]:
    """Every process's ``text``, in process order, on every process (``[text]`` in a
    single-process run). A collective: all processes must call it together."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils  # noqa: PLC0415 (only in multi-process runs)
    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    sizes = sizes.reshape(-1)
    width = max(256, int(math.ceil(int(sizes.max()) / 256) * 256))  # few distinct shapes
    buf = np.zeros(width, np.uint8)
    buf[:data.size] = data
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), width)
    return [bytes(got[i, :sizes[i]]).decode() for i in range(len(sizes))]


def first_error(message: Optional[str]) -> Optional[str]:
    """Each process says what went wrong on it (None: nothing); every process gets the same
    message: that of the lowest-numbered process that had one (prefixed ``process <i>:`` in a
    multi-process run), or None. A collective: all processes must call it together, so that
    they fail together with the same message instead of one failing and the others waiting."""
    if jax.process_count() == 1:
        return message
    texts = gather_text("" if message is None else "!" + message)
    for i, t in enumerate(texts):
        if t:
            return f"process {i}: {t[1:]}"
    return None


# ----------------------------------------------------------------------------------------------
# Memory


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text in ("", "max") else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def available_host_memory() -> Optional[Tuple[int, str]]:
    """Bytes of host memory this process can still use, and where the number comes from: the
    smaller of ``MemAvailable`` (/proc/meminfo) and the room left under a cgroup memory limit
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; reclaimable file cache counted as free).
    None where neither can be read (not Linux)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_f, usage_f, stat_f, key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
             "memory/memory.stat", "total_inactive_file")):
        base = "/sys/fs/cgroup/"
        limit, usage = _read_int(base + limit_f), _read_int(base + usage_f)
        if limit is not None and usage is not None and limit < (1 << 60):
            free = limit - usage + _cgroup_stat(base + stat_f, key)
            found.append((max(free, 0), f"room under the cgroup limit {base + limit_f}"))
    return min(found) if found else None


def available_device_memory(devices) -> Optional[Tuple[int, str]]:
    """Bytes free on the fullest of ``devices`` (accelerators: ``bytes_limit - bytes_in_use`` of
    ``device.memory_stats()``), or None where the backend does not report it (CPU)."""
    free = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 (backends without memory statistics)
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    if not free:
        return None
    return min(free), "free memory of the device (memory_stats)"
