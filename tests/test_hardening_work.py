"""Bounded work per request (issue 12.1): messages, text and audio per turn and per request, items per realtime
conversation, turns that cannot fit the context, and a context whose bookkeeping stays linear and bounded.
Real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import subprocess
import sys
import time

import pytest
import websockets.sync.client as ws_client
from abuse import (
    b64,
    chat,
    error_of,
    no_vad,
    noise,
    pcm24_noise_b64,
    recv_type,
    text_item,
    wait_until,
    wav,
    ws_url,
)
from conftest import engine_sessions

from chroma_agent.engine.context import ContextError, ThinkerContext, Turn
from chroma_agent.server.settings import ServerSettings


def _context_error(response, param: str) -> str:
    error = error_of(response, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == param, error
    assert "thinker_context" in error["message"], error
    return error["message"]


# --- chat: messages, text, audio ---------------------------------------------------------------------------


def test_messages_per_request_are_capped_by_max_messages(start_server):
    running = start_server()
    many = [{"role": "user", "content": "hi"}] * 2049  # one beyond the default
    error = error_of(chat(running.url, messages=many), 400)
    assert error["code"] == "too_many_messages" and error["param"] == "messages", error
    assert "2049 messages" in error["message"] and "max_messages" in error["message"], error
    small = start_server(max_messages=3)
    assert "at most 3" in error_of(chat(small.url, messages=many[:4]), 400)["message"]
    assert chat(small.url, messages=many[:3]).status_code == 200


def test_a_chat_request_with_2048_short_messages_is_served_quickly(start_server):
    """2,048 turns are built in one pass each on the server and in the engine; the context keeps what fits."""
    running = start_server()
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(2047)]
    t0 = time.perf_counter()
    r = chat(running.url, messages=[*messages, {"role": "user", "content": "last"}])
    assert r.status_code == 200, r.text[:300]
    assert time.perf_counter() - t0 < 15
    assert r.json()["usage"]["prompt_tokens"] <= running.engine.config.thinker_context


def test_text_is_capped_per_message_and_per_request_before_it_is_tokenized(start_server):
    running = start_server()
    t0 = time.perf_counter()
    error = error_of(chat(running.url, messages=[{"role": "user", "content": "word " * 400_000}]), 400)  # 2 MB
    assert time.perf_counter() - t0 < 2  # refused from its length: nothing was tokenized
    assert error["code"] == "text_too_long" and error["param"] == "messages[0].content", error
    assert "32768" in error["message"] and "max_turn_chars" in error["message"], error

    small = start_server(max_turn_chars=1000, max_request_chars=2500)
    parts = [{"type": "text", "text": "a" * 400}] * 3  # a message's text parts count together
    error = error_of(chat(small.url, messages=[{"role": "user", "content": parts}]), 400)
    assert error["param"] == "messages[0].content[2]" and "max_turn_chars" in error["message"], error
    messages = [{"role": "user", "content": "b" * 900}] * 3  # each fits, the request does not
    error = error_of(chat(small.url, messages=messages), 400)
    assert error["param"] == "messages[2].content" and "max_request_chars" in error["message"], error
    system = [{"role": "system", "content": "c" * 1001}, {"role": "user", "content": "hi"}]
    assert error_of(chat(small.url, messages=system), 400)["param"] == "messages[0].content"
    assert chat(small.url, messages=messages[:2]).status_code == 200


def test_audio_is_capped_per_message_and_per_request(start_server):
    running = start_server(max_audio_seconds=10, max_request_audio_seconds=15)
    clip = {"type": "audio", "audio": b64(wav(noise(6), 16000))}
    error = error_of(chat(running.url, messages=[{"role": "user", "content": [clip, clip]}]), 400)
    assert error["code"] == "invalid_audio" and error["param"] == "messages[0].content[1]", error
    assert "12.0 s long in all" in error["message"] and "max_audio_seconds" in error["message"], error
    three = [{"role": "user", "content": [clip]}] * 3
    error = error_of(chat(running.url, messages=three), 400)
    assert error["param"] == "messages[2].content[0]" and "max_request_audio_seconds" in error["message"], error
    assert chat(running.url, messages=three[:2]).status_code == 200


def test_turns_that_cannot_fit_the_context_are_400s_that_say_so(start_server):
    """The issue's 500s (IndexError): 2 MB of text, 200-299 s of audio, ten 30 s parts. Each is a 400 naming
    the context, and the server answers the next request."""
    # let 2 MB of text reach the context check
    running = start_server(max_turn_chars=4 * 1024 * 1024, max_request_chars=4 * 1024 * 1024)
    url = running.url
    _context_error(chat(url, messages=[{"role": "user", "content": "word " * 400_000}]), "messages[0].content")
    _context_error(chat(url, messages=[{"role": "user", "content": "word " * 6_000}]), "messages[0].content")
    for seconds in (200, 250, 299):
        clip = {"type": "audio", "audio": b64(wav(noise(seconds, seed=seconds), 16000))}
        _context_error(chat(url, messages=[{"role": "user", "content": [clip]}]), "messages[0].content")
    part = {"type": "audio", "audio": b64(wav(noise(30), 16000))}
    _context_error(chat(url, messages=[{"role": "user", "content": [part] * 10}]), "messages[0].content")
    # A turn that fits alone but leaves no room for the reply is refused when the reply starts.
    tight = start_server(engine_config={"thinker_context": 256})
    message = _context_error(chat(tight.url, max_tokens=200, return_audio=True,
                                  messages=[{"role": "user", "content": "word " * 60}]), "messages")
    assert "room for the reply" in message
    for url in (running.url, tight.url):
        assert chat(url).status_code == 200


# --- realtime: items and turns that cannot fit -------------------------------------------------------------


def test_realtime_turns_that_cannot_fit_are_errors_that_say_so(start_server):
    running = start_server(max_turn_chars=4 * 1024 * 1024, max_request_chars=4 * 1024 * 1024)
    default = start_server()
    with ws_client.connect(ws_url(default.url), max_size=None) as ws:
        recv_type(ws, "session.created")
        ws.send(text_item("word " * 245_000, event_id="big"))  # 1.2 MB
        error = recv_type(ws, "conversation.item.done")["error"]
        assert error["code"] == "text_too_long" and error["event_id"] == "big", error
        assert "max_turn_chars" in error["message"] and error["param"] == "item.content.0.text", error
    with ws_client.connect(ws_url(running.url), max_size=None) as ws:
        recv_type(ws, "session.created")
        no_vad(ws)
        ws.send(text_item("word " * 245_000, event_id="big"))
        error = recv_type(ws, "conversation.item.done", timeout=60)["error"]
        assert error["code"] == "context_length_exceeded" and error["event_id"] == "big", error
        assert "thinker_context" in error["message"], error
        chunk = pcm24_noise_b64(10)
        for _ in range(30):  # 300 s appended, then committed
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "long"}))
        error = recv_type(ws, "input_audio_buffer.committed", timeout=60)["error"]
        assert error["code"] == "context_length_exceeded" and error["event_id"] == "long", error
        # The conversation goes on.
        ws.send(text_item("Hello"))
        assert recv_type(ws, "conversation.item.done")["type"] == "conversation.item.done"
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
        assert recv_type(ws, "response.done", timeout=60)["response"]["status"] in ("completed", "incomplete")


def test_a_realtime_reply_without_room_fails_alone_and_keeps_the_history(start_server):
    running = start_server(engine_config={"thinker_context": 256})
    with ws_client.connect(ws_url(running.url)) as ws:
        recv_type(ws, "session.created")
        no_vad(ws)
        ws.send(text_item("First question."))
        recv_type(ws, "conversation.item.done")
        ws.send(text_item("word " * 60))  # fits alone (~180 tokens), leaves no room for a spoken reply
        recv_type(ws, "conversation.item.done")
        (state,) = engine_sessions(running.engine)
        before = [t.id for t in state.turns]
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 200}}))
        done = recv_type(ws, "response.done", timeout=60)["response"]
        assert done["status"] == "failed", done
        error = done["status_details"]["error"]
        assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error", error
        assert [t.id for t in state.turns] == before  # nothing was dropped for a reply that could not start


def test_items_per_realtime_conversation_are_capped_by_max_items(start_server):
    running = start_server(max_items=3)
    with ws_client.connect(ws_url(running.url)) as ws:
        recv_type(ws, "session.created")
        no_vad(ws)
        for i in range(3):
            ws.send(text_item(f"item {i}"))
            recv_type(ws, "conversation.item.done")
        ws.send(text_item("one too many", event_id="full"))
        error = recv_type(ws, "conversation.item.done")["error"]
        assert error["code"] == "too_many_items" and error["event_id"] == "full", error
        assert "max_items" in error["message"], error
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm24_noise_b64(0.5)}))
        ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "commit"}))
        assert recv_type(ws, "input_audio_buffer.committed")["error"]["code"] == "too_many_items"
        ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "none"}))
        recv_type(ws, "conversation.item.retrieved")


def test_max_items_never_stops_a_long_conversation(start_server):
    """Items whose turns the context dropped are forgotten after each reply, so a long call never hits the cap."""
    running = start_server(max_items=10, engine_config={"thinker_context": 256})
    with ws_client.connect(ws_url(running.url)) as ws:
        recv_type(ws, "session.created")
        no_vad(ws)
        for turn in range(12):
            ws.send(text_item(f"Turn {turn}: " + "tell me more about the weather " * 4))
            assert recv_type(ws, "conversation.item.done")["type"] == "conversation.item.done", turn
            ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 4}}))
            assert recv_type(ws, "response.done", timeout=60)["response"]["status"] != "failed", turn


# --- the thinker context: linear, refusals change nothing, bounded growth ------------------------------------


def _reference_fit(ctx: ThinkerContext, reserve: int) -> int:
    """The context's fitting rule as first written (quadratic): the new one must do exactly this."""
    if len(ctx) + reserve <= ctx.capacity:
        return 0
    target = max(0, ctx.capacity - reserve - ctx.capacity // 4)
    first = 1 if ctx.turns and ctx.turns[0].instructions else 0
    start = ctx.offset(ctx.turns[first]) if len(ctx.turns) > first else len(ctx)
    dropped = 0
    while len(ctx) > target and len(ctx.turns) > first + 1:
        del ctx.turns[first]
        dropped += 1
    if len(ctx) + reserve > ctx.capacity:
        raise ContextError("does not fit")
    if dropped:
        ctx._invalidate_from(0 if first == 0 else start)
    return dropped


def test_fitting_the_context_keeps_its_rule_refuses_without_change_and_is_linear(tiny_parts):
    pieces = tiny_parts[1].pieces
    rng = random.Random(12)
    refused = fitted = 0
    for _ in range(1500):
        ctx = ThinkerContext(pieces, 10**9)
        if rng.random() < 0.5:
            ctx.set_instructions(Turn("system", [1] * rng.randint(1, 30)))
        for _ in range(rng.randint(1, 30)):
            ctx.turns.append(Turn(rng.choice(["user", "assistant", "system"]), [2] * rng.randint(1, 40)))
        ctx.capacity = rng.choice([64, 100, 256])
        ctx.cached = len(ctx)
        old, new = copy.deepcopy(ctx), copy.deepcopy(ctx)
        reserve = rng.randint(0, 60)
        try:
            expected = _reference_fit(old, reserve)
        except ContextError:
            with pytest.raises(ContextError):
                new.fit(reserve)
            # the reference dropped the history and left `cached` stale before raising; nothing changes now
            assert [t.id for t in new.turns] == [t.id for t in ctx.turns] and new.cached == ctx.cached
            refused += 1
            continue
        assert new.fit(reserve) == expected
        assert [t.id for t in new.turns] == [t.id for t in old.turns] and new.cached == old.cached
        fitted += 1
    assert refused > 100 and fitted > 100

    ctx = ThinkerContext(pieces, 4096)
    ctx.turns.extend(Turn("user", [2] * 6) for _ in range(2048))
    t0 = time.perf_counter()
    ctx.open_reply(400)
    assert time.perf_counter() - t0 < 0.02  # was 164 ms of engine thread (quadratic)


def test_turns_added_without_a_reply_never_pile_up(tiny_parts):
    ctx = ThinkerContext(tiny_parts[1].pieces, 1024)
    ctx.set_instructions(Turn("system", [1] * 10))
    for _ in range(5000):
        ctx.append(Turn("user", [2] * 50))
    assert len(ctx) <= 2 * 1024 and ctx.turns[0].instructions  # the instructions stay


def test_the_realtime_reader_keeps_every_message_in_order(start_server):
    """Messages queued by the reader are handled in the order they came, errors included."""
    running = start_server()

    async def go() -> list[str]:
        import websockets

        async with websockets.connect(ws_url(running.url)) as ws:
            await ws.recv()
            for i in range(40):
                await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": f"missing-{i}",
                                          "event_id": f"e{i}"}))
            ids = []
            while len(ids) < 40:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if event["type"] == "error":
                    ids.append(event["error"]["event_id"])
            return ids

    assert asyncio.run(go()) == [f"e{i}" for i in range(40)]
    assert wait_until(lambda: running.engine.free_slots == 2, 5)


def test_limits_are_validated_settings():
    for bad in ({"max_messages": 0}, {"max_turn_chars": 0}, {"max_request_chars": 0}, {"max_items": 0},
                {"max_request_audio_seconds": 0}, {"stream_stall_s": 0}, {"realtime_idle_timeout_s": 0},
                {"realtime_max_session_s": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerSettings(**bad)
    unlimited = ServerSettings(realtime_idle_timeout_s=None, realtime_max_session_s=None)
    assert unlimited.realtime_idle_timeout_s is None and unlimited.realtime_max_session_s is None


def test_serve_refuses_bad_limits_before_loading_the_model(tiny_dir):
    for flag, value in (("--max-messages", "0"), ("--stream-stall-s", "-1"), ("--max-items", "0"),
                        ("--realtime-max-session-s", "-5")):
        done = subprocess.run([sys.executable, "-m", "chroma_agent.cli", "serve", "--model", str(tiny_dir),
                               "--port", "1", flag, value], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and flag in done.stderr, (flag, done.returncode, done.stderr[-500:])
