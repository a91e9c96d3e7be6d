"""Slots come back (issue 12.3): streams whose client stops reading, realtime sessions that idle or last too long,
and waiting for a slot without a thread, first come first served. Real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import websockets
import websockets.sync.client as ws_client
from abuse import chat, no_vad, pcm24_noise_b64, recv_type, text_item, wait_until, ws_url
from websockets.exceptions import ConnectionClosed

from chroma_agent.server.settings import ServerSettings

LONG_STREAM = {"model": "chroma", "stream": True, "return_audio": True, "max_tokens": 750,
               "messages": [{"role": "user", "content": "Tell me a long story."}]}



def _post_and_never_read(url: str, payload: dict) -> socket.socket:
    """Send a request over a raw socket whose receive buffer is small, and never read the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = json.dumps(payload).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


# --- HTTP streams --------------------------------------------------------------------------------------------


def test_streams_whose_client_stops_reading_are_cancelled_and_free_their_slot(start_server, caplog):
    """Before: four such streams held all four slots for as long as watched (90 s) and every other request got
    503. Now each is cancelled once its client is `stream_stall_s` behind what the buffers hold."""
    running = start_server(stream_stall_s=1.0)
    engine = running.engine
    caplog.set_level(logging.WARNING, logger="chroma_agent.server.chat")
    socks = [_post_and_never_read(running.url, LONG_STREAM) for _ in range(2)]
    try:
        assert wait_until(lambda: engine.free_slots == 0, 10)
        t0 = time.monotonic()
        assert wait_until(lambda: engine.free_slots == 2, 30), "the stalled streams kept their slots"
        freed_after = time.monotonic() - t0
        assert chat(running.url).status_code == 200
        for sock in socks:  # dropped, not left waiting on a buffer that never drains
            _assert_dropped(sock)
    finally:
        for sock in socks:
            sock.close()
    assert freed_after < 20, freed_after  # the socket buffers hold ~4 s of audio, the engine 1.5 s more
    assert sum("the client stopped reading" in r.getMessage() for r in caplog.records) == 2
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'chroma_errors_total{kind="client_stalled"} 2.0' in metrics


def _assert_dropped(sock: socket.socket) -> None:
    """Reading what the server had sent ends in a reset or EOF instead of hanging: it dropped the connection."""
    sock.settimeout(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 16):
                return
        except (ConnectionResetError, BrokenPipeError):
            return
    raise AssertionError("the stalled connection is still open")


def test_a_listener_reading_in_real_time_is_never_cut_off(start_server):
    """The stall guard counts waiting against the audio taken: a client that plays the stream as it comes (one
    frame per 80 ms) gets the whole reply even with a 0.5 s stall budget."""
    running = start_server(stream_stall_s=0.5)
    payload = {**LONG_STREAM, "max_tokens": 100, "audio_format": "pcm16"}
    frames = 0
    with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        start = time.monotonic()
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if '"data":"' in line and '"audio"' in line:
                frames += 1
                time.sleep(max(0.0, start + 0.08 * frames - time.monotonic()))
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines[-3:]
    assert frames == 100


def test_a_slow_server_never_counts_against_the_client(start_server):
    """A reply made slower than real time (the engine's pacing cannot fill any buffer) is never cancelled."""
    running = start_server(stream_stall_s=0.2)
    payload = {**LONG_STREAM, "max_tokens": 40, "return_audio": False, "modalities": ["text"]}
    with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=payload, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


# --- realtime: idle, maximum duration, stalled clients --------------------------------------------------------


def test_an_idle_realtime_session_ends_as_openai_ends_an_expired_one(start_server):
    """Before: four idle connections held every slot for over 70 s. Now: error session_expired, close 1001."""
    running = start_server(realtime_idle_timeout_s=1.0)
    with ws_client.connect(ws_url(running.url)) as ws:
        recv_type(ws, "session.created")
        # activity keeps it alive: a client event every 0.4 s for 2.5 s
        for _ in range(6):
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert recv_type(ws, "input_audio_buffer.cleared")["type"] == "input_audio_buffer.cleared"
            time.sleep(0.4)
        t0 = time.monotonic()
        error = recv_type(ws, "error", timeout=5)["error"]
        idle_for = time.monotonic() - t0
        assert error["code"] == "session_expired" and error["type"] == "invalid_request_error", error
        assert "idle" in error["message"] and "realtime_idle_timeout_s" in error["message"], error
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1001, closed.value
    assert 0.5 < idle_for < 2.5, idle_for
    assert wait_until(lambda: running.engine.free_slots == 2, 5)


def test_a_realtime_session_ends_at_its_maximum_duration_even_mid_reply(start_server):
    running = start_server(realtime_max_session_s=2.0, realtime_idle_timeout_s=None)
    with ws_client.connect(ws_url(running.url), max_size=None) as ws:
        t0 = time.monotonic()
        recv_type(ws, "session.created")
        no_vad(ws)
        ws.send(text_item("Tell me a long story."))
        recv_type(ws, "conversation.item.done")
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 750}}))
        after_error = []
        error = None
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                event = json.loads(ws.recv(timeout=10))
                if error is not None:
                    after_error.append(event["type"])
                if event["type"] == "error":
                    error = event["error"]
                    ended_at = time.monotonic() - t0
    assert error is not None and error["code"] == "session_expired", error
    assert error["message"] == "Your session hit the maximum duration of 2 s (realtime_max_session_s).", error
    assert closed.value.rcvd.code == 1001 and "maximum duration" in closed.value.rcvd.reason
    assert after_error == []  # nothing of the reply after the error
    assert 1.8 < ended_at < 4, ended_at
    assert wait_until(lambda: running.engine.free_slots == 2 and running.engine.live_sessions == 0, 5)


def test_the_maximum_duration_defaults_to_openais_hour():
    settings = ServerSettings()
    assert settings.realtime_max_session_s == 3600 and settings.realtime_idle_timeout_s == 120
    from chroma_agent.server.realtime.connection import _duration

    assert _duration(3600) == "60 minutes" and _duration(60) == "1 minute" and _duration(90) == "90 s"


def _realtime_and_never_read(url: str, *events: str) -> socket.socket:
    """Open a realtime session over a raw socket with a small receive buffer, send `events`, and read no more
    than the handshake (a client library would keep reading into its own buffers)."""
    from websockets.client import ClientProtocol
    from websockets.protocol import State
    from websockets.uri import parse_uri

    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    protocol = ClientProtocol(parse_uri(ws_url(url)))
    protocol.send_request(protocol.connect())
    sock.sendall(b"".join(protocol.data_to_send()))
    sock.settimeout(10)
    while protocol.state is State.CONNECTING:
        protocol.receive_data(sock.recv(4096))
    assert protocol.state is State.OPEN, protocol.handshake_exc
    for event in events:
        protocol.send_text(event.encode())
    sock.sendall(b"".join(protocol.data_to_send()))
    return sock


def test_a_realtime_client_that_stops_reading_mid_reply_loses_its_session(start_server, caplog):
    running = start_server(stream_stall_s=1.0)
    caplog.set_level(logging.WARNING, logger="chroma_agent.server.realtime")
    sock = _realtime_and_never_read(running.url, text_item("Tell me a long story."),
                                    json.dumps({"type": "response.create", "response": {"max_output_tokens": 750}}))
    try:
        assert wait_until(lambda: running.engine.free_slots == 1, 10)
        t0 = time.monotonic()
        assert wait_until(lambda: running.engine.free_slots == 2, 30), "the stalled session kept its slot"
        freed_after = time.monotonic() - t0
        _assert_dropped(sock)
    finally:
        sock.close()
    assert freed_after < 15, freed_after
    assert any("the client stopped reading" in r.getMessage() for r in caplog.records)
    assert chat(running.url).status_code == 200


# --- waiting for a slot ---------------------------------------------------------------------------------------


def test_waiting_for_a_slot_holds_no_thread_and_is_first_come_first_served(start_server):
    """Before: 12 waiters each held a thread of the default executor; a live session's commit took 9.5 s instead
    of 4 ms, and slots freed at 8.0 s were handed out only when the waiters timed out at 10.0 s."""
    running = start_server(slots=2, session_wait_s=20.0)
    url = ws_url(running.url)
    order: list[int] = []
    created_at: dict[int, float] = {}
    threads_before = threading.active_count()

    async def go() -> float:
        holder = await websockets.connect(url)
        live = await websockets.connect(url)
        await holder.recv()
        await live.recv()
        await live.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"turn_detection": None}}}}))
        await live.recv()

        async def wait_for_slot(i: int) -> None:
            async with websockets.connect(url, open_timeout=30) as ws:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert event["type"] == "session.created", event
                created_at[i] = time.monotonic()
                order.append(i)

        waiters = []
        for i in range(12):
            waiters.append(asyncio.create_task(wait_for_slot(i)))
            await asyncio.sleep(0.05)  # a defined arrival order
        await asyncio.sleep(0.5)
        assert not order  # all wait
        threads_waiting = threading.active_count()
        t0 = time.monotonic()
        await live.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm24_noise_b64(1.0)}))
        await live.send(json.dumps({"type": "input_audio_buffer.commit"}))
        while json.loads(await asyncio.wait_for(live.recv(), 30))["type"] != "input_audio_buffer.committed":
            pass
        commit_s = time.monotonic() - t0
        freed = time.monotonic()
        await holder.close()  # one slot: each waiter leaves once it has its session, the next one comes in
        await asyncio.gather(*waiters)
        await live.close()
        assert threads_waiting - threads_before <= 2, (threads_before, threads_waiting)
        assert created_at[0] - freed < 1.0, created_at[0] - freed  # at once, not when a wait times out
        return commit_s

    commit_s = asyncio.run(go())
    assert commit_s < 1.0, commit_s
    assert order == list(range(12))
    assert wait_until(lambda: running.engine.free_slots == 2, 5)
