"""Giving memory back to the operating system after request spikes.

A request carrying 40 MB of base64 audio allocates its body, the decoded JSON string, the decoded bytes, the
samples and the features, and frees them when it ends; glibc keeps most of that freed memory in its heaps
(its mmap threshold rises to the largest block freed, up to 32 MB, so later large blocks come from the heaps
too, and several threads fragment several arenas). Measured with four concurrent 60 s float-WAV requests on the
tiny model, RSS grew 420 -> 664 -> 768 MB over two rounds and stayed there. Two remedies, both no-ops where
the C library is not glibc:

* :func:`limit_heap_growth` (at server start) fixes glibc's mmap threshold at 256 KiB: every larger block is
  its own mapping, returned to the system when freed, and the threshold no longer climbs;
* :class:`MemoryTrimmer` calls ``malloc_trim(0)`` after a large request or a WebSocket session ends, at most
  once a second and in its own thread, to hand back what the heaps still hold free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc()


def limit_heap_growth(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (process-wide); True when it was set. Call once, before serving."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    log.debug("glibc mmap threshold %s at %d bytes", "fixed" if ok else "not set", threshold)
    return ok


class MemoryTrimmer:
    """Rate-limited ``malloc_trim(0)`` in a background thread."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self._trim = getattr(_LIBC, "malloc_trim", None)
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._running = False
        self._last = -float("inf")
        self.trims = 0  # how many trims ran (tests and metrics read it)

    @property
    def available(self) -> bool:
        return self._trim is not None

    def request(self) -> bool:
        """Start a trim unless one is running or one ran within ``min_interval_s``; True when one starts."""
        if self._trim is None:
            return False
        with self._lock:
            now = time.monotonic()
            if self._running or now - self._last < self.min_interval_s:
                return False
            self._running, self._last = True, now
        threading.Thread(target=self._run, name="malloc-trim", daemon=True).start()
        return True

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._trim(0)
        finally:
            with self._lock:
                self._running = False
                self.trims += 1
        log.debug("malloc_trim took %.1f ms", (time.perf_counter() - t0) * 1000)
