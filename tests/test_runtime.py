"""Process set-up of a run (nvjax._runtime): malloc arenas and heap trimming."""
import pytest

from nvjax import _runtime


def test_limit_malloc_arenas(monkeypatch):
    """The cap is set with glibc's mallopt on Linux, left to MALLOC_ARENA_MAX when that is set, and
    bad counts are refused."""
    import ctypes.util
    import sys
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert _runtime.limit_malloc_arenas(8) is glibc  # 8: glibc's own per-core default, harmless here
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert _runtime.limit_malloc_arenas(1) is False
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            _runtime.limit_malloc_arenas(bad)


def test_heap_trimmer_trims_near_the_peak_at_most_once_per_interval(monkeypatch):
    """The trimmer calls glibc's malloc_trim only when its interval has passed and the resident set
    is within the margin of the peak (a no-op callable elsewhere)."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad.value)
            return 1
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    t = [100.0]
    mem = [(400.0, 500.0)]
    monkeypatch.setattr(_runtime.time, "perf_counter", lambda: t[0])
    monkeypatch.setattr(_runtime, "rss_and_peak_mb", lambda: mem[0])
    trim = _runtime.heap_trimmer(0.5, 16.0)
    trim()
    assert calls == []          # 0 s since creation
    t[0] += 0.6
    trim()
    assert calls == []          # 100 MB below the peak: nothing to do
    mem[0] = (490.0, 500.0)
    trim()
    assert calls == []          # near the peak, but checked 0 s ago
    t[0] += 0.6
    trim()
    trim()
    assert calls == [0]         # near the peak after the interval: one trim, not two


def test_startup_timeout_and_address_are_checked(monkeypatch):
    """The start-up timeout comes from the argument, else $NVJAX_STARTUP_TIMEOUT_S, and must be a
    finite number of seconds > 0; the coordinator needs a port. Checked before anything starts
    (no rendezvous, no JAX initialization)."""
    for k in (_runtime.ENV_COORDINATOR, _runtime.ENV_NUM_PROCESSES, _runtime.ENV_PROCESS_ID,
              _runtime.ENV_STARTUP_TIMEOUT):
        monkeypatch.delenv(k, raising=False)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(_runtime.UserError, match="initialization_timeout_s .*> 0"):
            _runtime.init_distributed("127.0.0.1:1", 2, 0, initialization_timeout_s=bad)
    monkeypatch.setenv(_runtime.ENV_STARTUP_TIMEOUT, "soon")
    with pytest.raises(_runtime.UserError, match="NVJAX_STARTUP_TIMEOUT_S must be a number"):
        _runtime.init_distributed("127.0.0.1:1", 2, 0)
    monkeypatch.setenv(_runtime.ENV_STARTUP_TIMEOUT, "-3")
    with pytest.raises(_runtime.UserError, match="NVJAX_STARTUP_TIMEOUT_S .*got -3.0"):
        _runtime.init_distributed("127.0.0.1:1", 2, 0)
    for addr in ("127.0.0.1:", "127.0.0.1:http", ":80", "127.0.0.1:70000"):
        with pytest.raises(_runtime.UserError, match="'host:port'"):
            _runtime.init_distributed(addr, 2, 0, initialization_timeout_s=1)
    assert _runtime.DEFAULT_STARTUP_TIMEOUT_S == 300.0


def test_single_process_agreement_is_local():
    """Without other processes, gather_text and first_error are the identity (no collective)."""
    assert _runtime.gather_text("abc") == ["abc"]
    assert _runtime.first_error(None) is None
    assert _runtime.first_error("bad seed") == "bad seed"


def test_available_memory():
    """Host memory: at most /proc/meminfo's MemTotal (independent read), positive; CPU devices
    report no memory statistics of their own."""
    import jax
    got = _runtime.available_host_memory()
    try:
        with open("/proc/meminfo") as f:
            total = int([ln for ln in f if ln.startswith("MemTotal:")][0].split()[1]) * 1024
    except OSError:
            return
    free, where = got
    assert 0 < free <= total and isinstance(where, str) and where
    if jax.devices()[0].platform == "cpu":
        assert _runtime.available_device_memory(jax.devices()) is None


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_staggered(addr, n, starts, timeout_s):
    """Run the rendezvous of process i in a thread started ``starts[i]`` s from now; returns
    each process's outcome: None (went on) or its error message."""
    import threading
    import time
    out = {}

    def one(pid, delay):
        time.sleep(delay)
        try:
            _runtime.rendezvous(addr, n, pid, timeout_s)
            out[pid] = None
        except _runtime.UserError as e:
            out[pid] = str(e)
    threads = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(starts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_rendezvous_staggered_start_all_go_on():
    """Process 1 starts first, process 0 (the coordinator) 0.75 of a timeout later, process 2
    arrives after process 1's own timeout (plus its reply margin, a quarter of the timeout) has
    passed but within process 0's: process 1 keeps waiting as long as process 0 said it would,
    so all three go on (the case where a peer gives up alone is the next test)."""
    addr = f"127.0.0.1:{_free_port()}"
    got = _run_staggered(addr, 3, [0.75 * 2, 0.0, 1.4 * 2], 2.0)
    assert got == {0: None, 1: None, 2: None}


def test_rendezvous_a_peer_that_left_stops_everyone_with_one_message():
    """A peer that said hello and then went away (gave up, killed) before the last one arrived:
    process 0 gets no "ack" from it, so neither process 0 nor the peer still there goes on, and
    both stop with the same message naming the departed process and the coordinator."""
    import json
    import socket
    import threading
    import time
    port = _free_port()
    addr = f"127.0.0.1:{port}"

    def ghost():  # process 1: hello, then gone before process 2 arrives
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall((json.dumps({"hello": "nvjax-rendezvous/1", "process_id": 1,
                                   "num_processes": 3}) + "\n").encode())
            c.recv(4096)  # process 0's "wait" line
    g = threading.Thread(target=ghost)
    g.start()
    # process 1 is the ghost: only 0 and 2 run the rendezvous
    out = {}

    def one(pid, delay):
        time.sleep(delay)
        try:
            _runtime.rendezvous(addr, 3, pid, 5.0)
            out[pid] = None
        except _runtime.UserError as e:
            out[pid] = str(e)
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(0, 0.0)),
               threading.Thread(target=one, args=(2, 0.8))]
    for t in threads:
        t.start()
    for t in threads + [g]:
        t.join(60)
    assert out[0] is not None and out[0] == out[2], out
    assert "process(es) 1 of 3" in out[0] and addr in out[0] and "left before" in out[0]
    assert time.monotonic() - t0 < 5  # told at once, not after a timeout
