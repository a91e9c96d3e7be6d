"""Lesser limits from the hardening pass: error messages that name the real limit, request fields that are not
coerced, memory given back after a spike. Real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets.sync.client as ws_client

from chroma_agent.server.memory import MemoryTrimmer, limit_heap_growth

SECOND = 24000 * 2  # bytes of PCM16 24 kHz mono



def _recv_type(ws, kind: str) -> dict:
    for _ in range(50):
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == kind:
            return event
    raise AssertionError(f"no {kind} event")


def test_a_full_realtime_buffer_names_its_real_limit(start_server):
    running = start_server(max_audio_seconds=1)
    with ws_client.connect(running.url.replace("http://", "ws://") + "/v1/realtime") as ws:
        _recv_type(ws, "session.created")
        # without server VAD the buffer keeps everything appended (VAD keeps only the padding between turns)
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "audio": {
            "input": {"turn_detection": None}}}}))
        _recv_type(ws, "session.updated")
        silence = base64.b64encode(bytes(SECOND // 2)).decode()
        for _ in range(2):  # exactly full: 1 s of silence
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))
        for event_id, size in (("full", SECOND // 10), ("huge", 10 * SECOND)):
            ws.send(json.dumps({"type": "input_audio_buffer.append", "event_id": event_id,
                                "audio": base64.b64encode(bytes(size)).decode()}))
            error = _recv_type(ws, "error")["error"]
            assert error["code"] == "input_audio_buffer_too_large" and error["event_id"] == event_id, error
            assert "at most 1 s" in error["message"] and "max_audio_seconds" in error["message"], error
            assert "bytes" not in error["message"], error  # it said "holds more than 4 bytes"
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        _recv_type(ws, "input_audio_buffer.cleared")
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": silence}))  # room again
        ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "after"}))
        assert _recv_type(ws, "input_audio_buffer.cleared")


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", True), ("max_tokens", "4"), ("max_tokens", 4.0), ("max_completion_tokens", False),
    ("stream", "yes"), ("stream", 1), ("stream", "true"),
])
def test_numbers_and_flags_are_not_coerced(start_server, field, value):
    running = start_server()
    payload = {"model": "chroma", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, field: value}
    r = httpx.post(f"{running.url}/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == field, r.json()


# --- memory given back after spikes -------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    # Linux's view of another process's resident memory (the server runs on Linux: Docker image, CI).
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_memory_taken_by_spikes_goes_back_to_the_system(tiny_dir, golden_voice, tmp_path):
    """Four concurrent 30 s float-WAV requests, twice, on `chroma-agent serve`: RSS grew +200 MB and stayed."""
    golden_voice.save(tmp_path / "voices")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chroma_agent.cli", "serve", "--model", str(tiny_dir), "--port", str(port),
         "--voices-dir", str(tmp_path / "voices"), "--default-voice", "golden", "--max-sessions", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    short = {"model": "chroma", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    rng = np.random.default_rng(0)
    clip = base64.b64encode(_float_wav(0.1 * rng.standard_normal(16000 * 30), 16000)).decode()
    big = {"model": "chroma", "max_tokens": 2,
           "messages": [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]}
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(url, json=short, timeout=30).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        before = _rss_mb(proc.pid)
        with ThreadPoolExecutor(4) as pool:
            for _ in range(2):
                statuses = list(pool.map(lambda _: httpx.post(url, json=big, timeout=120).status_code, range(4)))
                assert statuses == [200] * 4
        time.sleep(1.5)  # the trim after the last request runs in its own thread
        growth = _rss_mb(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert growth < 110, f"RSS grew {growth:.0f} MB and stayed (it was +200 MB before the fix, +35 MB after)"


def _float_wav(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_the_heap_is_trimmed_after_large_requests_and_websocket_sessions(start_server):
    running = start_server()
    trimmer = running.server.config.app.state.memory_trimmer
    assert trimmer.available  # glibc
    trimmer.min_interval_s = 0.0

    def trims_after(action) -> int:
        start = trimmer.trims
        action()
        time.sleep(0.3)
        return trimmer.trims - start

    url = f"{running.url}/v1/chat/completions"
    small = {"model": "chroma", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    large = {**small, "user": "x" * (2 * 1024 * 1024)}  # a 2 MB body
    assert trims_after(lambda: httpx.post(url, json=small, timeout=30)) == 0
    assert trims_after(lambda: httpx.post(url, json=large, timeout=30)) == 1
    ws_url = running.url.replace("http://", "ws://") + "/v1/realtime"

    def one_session() -> None:
        with ws_client.connect(ws_url) as ws:
            _recv_type(ws, "session.created")

    assert trims_after(one_session) == 1


def test_trims_are_rate_limited():
    trimmer = MemoryTrimmer(min_interval_s=60.0)
    assert trimmer.request() is trimmer.available
    assert trimmer.request() is False  # within the interval: skipped, not queued
    assert limit_heap_growth() is trimmer.available  # both need glibc; the threshold call is idempotent
