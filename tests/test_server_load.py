"""20 concurrent clients against 4 engine slots: no errors, no leaked slots, flat memory; prints latency numbers."""

from __future__ import annotations

import asyncio
import base64
import gc
import statistics
import time
from dataclasses import dataclass, field

import httpx
import pytest

from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

CLIENTS = 20
SLOTS = 4
WARMUP_S = 3.0
MEASURE_S = 10.0
MAX_RSS_GROWTH_MB = 100


@dataclass
class Stats:
    ttfa_s: list[float] = field(default_factory=list)  # streamed requests: until the first audio delta
    latency_s: list[float] = field(default_factory=list)  # every request: until the whole reply arrived
    engine_ttfa_s: list[float] = field(default_factory=list)  # plain requests: the server's own, after a slot
    errors: list[str] = field(default_factory=list)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, payload: dict, stats: Stats) -> None:
    t0 = time.perf_counter()
    if not payload["stream"]:
        r = await client.post("/v1/chat/completions", json=payload)
        if r.status_code != 200 or not r.json().get("audio"):
            stats.errors.append(f"{r.status_code}: {r.text[:200]}")
            return
        stats.latency_s.append(time.perf_counter() - t0)
        stats.engine_ttfa_s.append(r.json()["timings"]["time_to_first_audio_ms"] / 1000)
        return
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            stats.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
            return
        first_audio, finished = None, False
        async for line in r.aiter_lines():
            if first_audio is None and '"audio"' in line:
                first_audio = time.perf_counter() - t0
            finished = finished or line == "data: [DONE]"
    if first_audio is None or not finished:
        stats.errors.append(f"stream without audio or [DONE] (payload {payload['max_tokens']} frames)")
        return
    stats.ttfa_s.append(first_audio)
    stats.latency_s.append(time.perf_counter() - t0)


async def load(url: str, seconds: float, question_b64: str) -> tuple[Stats, int, float]:
    """CLIENTS clients, each sending short requests back to back for `seconds`."""
    stats = Stats()
    count = 0
    stop_at = time.monotonic() + seconds

    async def client_loop(i: int) -> None:
        nonlocal count
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            k = 0
            while time.monotonic() < stop_at:
                n = i + k
                content = ([{"type": "audio", "audio": question_b64}] if n % 4 == 0
                           else f"Question {n}: what should I wear today?")
                payload = {"model": "chroma", "stream": n % 2 == 0, "max_tokens": 4 + n % 5, "seed": n, "return_audio": True,
                           "temperature": 0.8, "messages": [{"role": "user", "content": content}]}
                try:
                    await one_request(client, payload, stats)
                except httpx.HTTPError as exc:
                    stats.errors.append(f"{type(exc).__name__}: {exc}")
                count += 1
                k += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return stats, count, time.perf_counter() - t0


@pytest.fixture()
def server(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=SLOTS)
    # Every client must get a slot eventually: 20 clients queue for 4 slots.
    with ServerThread(create_app(engine, ServerSettings(session_wait_s=60.0))) as running:
        yield engine, running.url


def test_twenty_concurrent_clients(server, golden_dir):
    engine, url = server
    question = base64.b64encode((golden_dir / "user1.wav").read_bytes()).decode()
    warmup, _, _ = asyncio.run(load(url, WARMUP_S, question))
    assert not warmup.errors, warmup.errors[:5]
    gc.collect()
    rss_before = rss_mb()
    stats, count, elapsed = asyncio.run(load(url, MEASURE_S, question))
    gc.collect()
    rss_after = rss_mb()

    assert not stats.errors, stats.errors[:5]
    assert len(stats.latency_s) == count and stats.ttfa_s
    deadline = time.monotonic() + 2.0
    while engine.free_slots != SLOTS and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.free_slots == SLOTS and engine.live_sessions == 0 and engine.queued_replies == 0
    assert httpx.get(f"{url}/health").json()["slots_free"] == SLOTS
    print(
        f"\nload: {CLIENTS} clients, {SLOTS} slots, {count} requests in {elapsed:.1f} s = {count / elapsed:.1f} req/s; "
        f"time to first audio (SSE, {len(stats.ttfa_s)} streams) p50 {percentile(stats.ttfa_s, 0.5) * 1000:.0f} ms "
        f"p95 {percentile(stats.ttfa_s, 0.95) * 1000:.0f} ms, slot wait included; engine-side time to first audio "
        f"(plain replies' timings) p50 {percentile(stats.engine_ttfa_s, 0.5) * 1000:.0f} ms "
        f"p95 {percentile(stats.engine_ttfa_s, 0.95) * 1000:.0f} ms; whole request p50 "
        f"{statistics.median(stats.latency_s) * 1000:.0f} ms p95 {percentile(stats.latency_s, 0.95) * 1000:.0f} ms; "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MB"
    )
    assert rss_after - rss_before < MAX_RSS_GROWTH_MB, (rss_before, rss_after)
