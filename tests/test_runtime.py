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
