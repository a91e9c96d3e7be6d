"""Request preparation yields the CPU to the engine.

Decoding a request's audio, its Whisper features, the chat template and tokenizing run in worker threads, never
on the engine thread (docs: DESIGN.md, section 7). On a machine with few cores that is not enough: a chat request
with a thousand messages or minutes of audio keeps those threads busy for a second or two, and the engine's step
then waits for a core, so every live conversation's audio stalls (measured on 2 cores with the tiny model: the
longest gap between two frames of another reply went from ~50 ms to 300-800 ms). Threads that prepare requests
therefore run at a lower scheduling priority (a higher nice value) than the engine thread and the event loop:
when the CPU is short, the step goes first and the preparation waits, which only delays its own request.

Linux only (there `setpriority` with a thread id changes that thread alone); elsewhere this is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Nice value of preparation threads (the engine thread and the event loop keep the process's own, usually 0).
BACKGROUND_NICE = 10

_local = threading.local()


def lower_this_thread() -> bool:
    """Give the calling thread the background priority (once per thread); False where that is not possible."""
    if getattr(_local, "lowered", None) is not None:
        return _local.lowered
    _local.lowered = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
        _local.lowered = True
    except OSError as exc:  # a sandbox without the syscall: preparation just keeps the normal priority
        log.debug("cannot lower a worker thread's priority: %s", exc)
    return _local.lowered


#: Threads that prepare requests (decode audio, resample, encode replies, clone voices). Few: on a small machine
#: more of them at once only take cores from the engine; requests beyond them wait their turn (their own delay).
BACKGROUND_WORKERS = max(2, min(4, os.cpu_count() or 2))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _background_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(BACKGROUND_WORKERS, thread_name_prefix="chroma-server-prep",
                                       initializer=lower_this_thread)
        return _pool


async def in_background(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` in a preparation thread (background priority) without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_background_pool(), functools.partial(fn, *args, **kwargs))


def lower_pool(pool: ThreadPoolExecutor, workers: int) -> None:
    """Lower the priority of every thread of `pool` (the engine's preparation pool): one task per worker, each
    waiting for the others, so that each lands on its own thread."""
    if not sys.platform.startswith("linux") or workers < 1:
        return
    barrier = threading.Barrier(workers)

    def lower() -> None:
        lower_this_thread()
        with contextlib.suppress(threading.BrokenBarrierError):  # a pool that could not start them all
            barrier.wait(timeout=10)

    for _ in range(workers):
        pool.submit(lower)
