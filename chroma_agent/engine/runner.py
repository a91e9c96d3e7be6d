"""Runs the step functions of a `DecodeBatch`: eagerly, compiled by inductor, or captured as CUDA graphs.

A step always covers a bucket of rows 0..n-1 (the smallest bucket holding every row in use), so a lightly
loaded engine does not pay for its full width. Each (bucket, kind) pair is one fixed-shape function:

* `eager`: plain PyTorch ops, always available; the reference every other mode must equal.
* `compile`: `torch.compile(fullgraph=True)` of the same function (inductor; on CPU this is the fast path,
  with inductor's C++ wrapper so a step is one native call). Each (bucket, kind) compiles on first use, which
  takes about a minute on a small CPU; the log says when.
* `cuda_graph`: the function captured once per bucket in a CUDA graph at startup and replayed each step, so
  a step costs one graph launch instead of ~800 kernel launches. Capture runs the function with every row
  inactive, which only writes scratch slots, so capturing at any time before the first reply is safe.
* `compile+cuda_graph`: the compiled function captured the same way (fewer, fused kernels in the graph).

Results come back through one copy per step into pinned host memory; on CUDA the copy is asynchronous and
`Pending.wait()` is where the host first waits for the device.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from chroma_agent.engine.step import BatchView, DecodeBatch, decode_step, thinker_step

log = logging.getLogger(__name__)

MODES = ("eager", "compile", "cuda_graph", "compile+cuda_graph")
# "text"/"audio": decode steps with (even) and without (odd) the thinker, greedy rows only; "+sampled": the
# same with the batched sampler; "thinker": text-only replies.
KINDS = ("text", "audio", "text+sampled", "audio+sampled", "thinker")


def default_mode(device: torch.device) -> str:
    return "cuda_graph" if device.type == "cuda" else "eager"


def default_buckets(rows: int, mode: str) -> list[int]:
    """Powers of two up to `rows`, so a lightly loaded engine runs small steps; a single bucket for a
    compiled CPU step, where every bucket is another compile of about a minute."""
    if mode == "compile" and rows > 1:
        return [rows]
    buckets, n = [], 1
    while n < rows:
        buckets.append(n)
        n *= 2
    return [*buckets, rows]


@dataclass
class Pending:
    """A step's result on its way to the host."""

    host: torch.Tensor
    event: torch.cuda.Event | None
    rows: int

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host[: self.rows].numpy()


class StepRunner:
    def __init__(self, batch: DecodeBatch, mode: str | None = None, buckets: list[int] | None = None):
        device = batch.device
        mode = mode or default_mode(device)
        if mode not in MODES:
            raise ValueError(f"step mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode.endswith("cuda_graph") and device.type != "cuda":
            raise ValueError(f"step mode {mode!r} needs a CUDA device")
        self.batch = batch
        self.mode = mode
        self.buckets = sorted(set(buckets or default_buckets(batch.rows, mode)))
        if self.buckets[-1] != batch.rows or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must be >= 1 and end at the batch size {batch.rows}")
        self._fns: dict[tuple[int, str], Callable[[], None]] = {}
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        # A ring of host buffers: an engine iteration launches up to two steps (decode, thinker) and reads
        # them while the next iteration's two run, so four copies can be in flight.
        pin = device.type == "cuda"
        self._host = [torch.empty(batch.result.shape, dtype=batch.result.dtype, pin_memory=pin) for _ in range(4)]
        self._flip = 0
        self._pool = None

    def bucket_for(self, rows_in_use: int) -> int:
        """The smallest bucket holding rows 0..rows_in_use-1."""
        for n in self.buckets:
            if n >= rows_in_use:
                return n
        return self.buckets[-1]

    def _function(self, n: int, kind: str) -> Callable[[], None]:
        key = (n, kind)
        if key not in self._fns:
            view: BatchView = self.batch.view(n)
            model = self.batch.model
            if kind == "thinker":
                def fn() -> None:
                    thinker_step(model, view)
            else:
                text, sampled = kind.startswith("text"), kind.endswith("+sampled")

                def fn() -> None:
                    decode_step(model, view, text, sampled)
            if self.mode.startswith("compile"):
                # One code object per (bucket, kind): dynamo keeps its compiled graphs per code object, and
                # closures of one `def` share theirs (its recompile limit would be hit at a few buckets).
                name = f"step_{kind.replace('+', '_')}_{n}"
                fn = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, None,
                                        fn.__closure__)
                log.info("compiling the %s step for %d rows (first use; about a minute on a small CPU)", kind, n)
                options = {"cpp_wrapper": True} if self.batch.device.type == "cpu" else None
                fn = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
            self._fns[key] = fn
        return self._fns[key]

    @torch.inference_mode()
    def warm_up(self, progress: bool = True, kinds: tuple[str, ...] = KINDS) -> float:
        """Capture every (bucket, kind) now, with no row active; returns the seconds it took. (Plain `compile`
        compiles each function on first use instead: capturing is what must happen before any row runs.)"""
        keys = [(n, kind) for n in self.buckets for kind in kinds if (n, kind) not in self._graphs]
        if not self.mode.endswith("cuda_graph") or not keys:
            return 0.0
        if self.batch.active.any() or self.batch.text_active.any():  # a sync, but only at startup
            raise RuntimeError("warm_up must run before any row is active")
        t0 = time.perf_counter()
        for i, (n, kind) in enumerate(keys, start=1):
            t1 = time.perf_counter()
            self._capture(n, kind)
            if progress:
                log.info("step capture %d/%d: bucket %d, %s step, %.1f s", i, len(keys), n, kind,
                         time.perf_counter() - t1)
        return time.perf_counter() - t0

    def _capture(self, n: int, kind: str) -> None:
        fn = self._function(n, kind)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels pick their algorithms and workspaces outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):  # one pool: graphs never run at the same time
            fn()
        self._graphs[(n, kind)] = graph

    @torch.inference_mode()
    def launch(self, n: int, kind: str) -> Pending:
        """Run one step of `kind` (see `KINDS`) over bucket `n`; its result comes later."""
        graph = self._graphs.get((n, kind))
        if graph is not None:
            graph.replay()
        else:
            self._function(n, kind)()
        host = self._host[self._flip]
        self._flip = (self._flip + 1) % len(self._host)
        result = self.batch.result[:n]
        event = None
        if result.is_cuda:
            host[:n].copy_(result, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host[:n].copy_(result)
        return Pending(host, event, n)
