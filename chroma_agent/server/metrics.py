"""Prometheus metrics of one server (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chroma_agent.engine.engine import Engine
from chroma_agent.engine.events import ResponseDone


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chroma_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.errors = Counter("chroma_errors", "Errors by kind", ["kind"], registry=r)
        self.replies = Counter("chroma_replies", "Finished replies by reason", ["reason"], registry=r)
        self.ttfa = Histogram(
            "chroma_time_to_first_audio_seconds", "Time from a reply request to its first audio frame",
            buckets=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4), registry=r,
        )
        self.rtf = Histogram(
            "chroma_real_time_factor", "Generation time per second of reply audio",
            buckets=(0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 5.0), registry=r,
        )
        self.audio_seconds = Counter("chroma_audio_seconds", "Seconds of reply audio generated", registry=r)
        sessions = Gauge("chroma_sessions", "Live conversations holding an engine slot", registry=r)
        sessions.set_function(lambda: engine.live_sessions)
        free = Gauge("chroma_free_slots", "Engine slots free", registry=r)
        free.set_function(lambda: engine.free_slots)
        queue = Gauge("chroma_queue", "Replies waiting to start in the step loop", registry=r)
        queue.set_function(lambda: engine.queued_replies)
        websockets = Gauge("chroma_websockets", "Open realtime WebSocket connections", registry=r)
        self.websockets = websockets

    def reply_done(self, done: ResponseDone) -> None:
        self.replies.labels(done.reason).inc()
        if done.timings.time_to_first_audio_ms is not None:
            self.ttfa.observe(done.timings.time_to_first_audio_ms / 1000)
        rtf = done.timings.real_time_factor
        if rtf is not None:
            self.rtf.observe(rtf)
        self.audio_seconds.inc(done.timings.audio_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
