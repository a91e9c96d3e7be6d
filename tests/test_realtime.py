"""`/v1/realtime` against a real uvicorn server: the official openai SDK, livekit-plugins-openai, and abuse."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
import websockets
from conftest import engine_sessions
from fastapi import FastAPI

from chroma_agent.audio import load_audio, pcm16_to_float, resample, to_pcm16
from chroma_agent.engine.events import AudioChunk, ResponseDone
from chroma_agent.realtime_protocol import (
    FRAME_BYTES,
    ClientEvents,
    ErrorCode,
    ProtocolError,
    ServerEvents,
    b64_to_pcm,
    beta_name,
    ga_name,
    parse_client_event,
)
from chroma_agent.server.app import create_app
from chroma_agent.server.settings import ServerSettings

KEY = "test-key-0123456789"
INSTRUCTIONS = "You are Chroma, a helpful voice assistant."
STEP_TIMEOUT = 30.0  # any single wait for a server event


# --- a real server in a thread -----------------------------------------------------------------------------


class ThreadedServer:
    """uvicorn in a thread with its default frame limit (16 MiB), so the app's own message limit is what shows."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture()
def serve(make_engine, golden_voice):
    servers: list[ThreadedServer] = []

    def start(engine=None, **settings) -> ThreadedServer:
        engine = engine or make_engine(golden_default_voice=golden_voice, max_sessions=4)
        settings.setdefault("api_key", KEY)
        srv = ThreadedServer(create_app(engine, ServerSettings(**settings))).start()  # the whole app
        srv.engine = engine
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def user_pcm(golden_dir: Path) -> bytes:
    """The golden user turn (16 kHz speech) as the protocol wants it: PCM16 mono 24 kHz."""
    return to_pcm16(load_audio(golden_dir / "user1.wav", 24000))


def chunks(pcm: bytes, ms: int = 100) -> list[bytes]:
    step = 24000 * 2 * ms // 1000
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- raw websocket client helpers --------------------------------------------------------------------------


async def connect_raw(srv: ThreadedServer, path: str = "/v1/realtime", key: str | None = KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("additional_headers", {}))
    return await websockets.connect(f"ws://127.0.0.1:{srv.port}{path}?model=chroma-4b", additional_headers=headers,
                                    open_timeout=STEP_TIMEOUT, **kwargs)


async def recv_json(ws, timeout: float = STEP_TIMEOUT) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws, kind: str, timeout: float = STEP_TIMEOUT, seen: list | None = None,
                     after: int | None = None) -> dict:
    """The next event of type `kind`; with `after`, an event already in `seen` past that index counts too."""
    if after is not None:
        for event in seen[after:]:
            if event["type"] == kind:
                return event
    deadline = time.monotonic() + timeout
    while True:
        event = await recv_json(ws, max(0.01, deadline - time.monotonic()))
        if seen is not None:
            seen.append(event)
        if event["type"] == kind:
            return event


async def send(ws, event: dict | str) -> None:
    await ws.send(event if isinstance(event, str) else json.dumps(event))


async def expect_error(ws, code: str, event_id: str | None = None) -> dict:
    event = await recv_until(ws, "error")
    assert event["error"]["code"] == code, event
    assert event["error"]["event_id"] == event_id, event
    assert event["error"]["message"]
    return event["error"]


# --- (a) the official openai SDK ---------------------------------------------------------------------------


@functools.cache
def _adapter(dialect: str):
    from pydantic import TypeAdapter

    if dialect == "ga":
        from openai.types.realtime import RealtimeServerEvent
    else:
        from openai.types.beta.realtime import RealtimeServerEvent
    return TypeAdapter(RealtimeServerEvent)


def strict_event(raw: str | bytes, dialect: str = "ga"):
    """A server event validated by the openai SDK's own models (every declared field has its declared type)."""
    if dialect == "beta":  # the beta session model only allows OpenAI's model names; ours is "chroma-4b"
        data = json.loads(raw)
        if isinstance(data.get("session"), dict) and data["session"].get("model") == "chroma-4b":
            data["session"]["model"] = "gpt-realtime"
        raw = json.dumps(data)
    return _adapter(dialect).validate_json(raw)


async def sdk_next(conn, kind: str, seen: list, *, look_back: bool = False) -> object:
    if look_back:
        for event in seen:
            if event.type == kind:
                return event
    while True:
        raw = await asyncio.wait_for(conn.recv_bytes(), STEP_TIMEOUT)
        event = strict_event(raw)
        seen.append(event)
        if event.type == "error":
            raise AssertionError(f"server error: {event.error}")
        if event.type == kind:
            return event


def test_openai_sdk_two_turns_with_barge_in(serve, user_pcm, golden_voice):
    from openai import AsyncOpenAI

    srv = serve()
    frames = 24

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="chroma-4b") as conn:
            seen: list = []
            created = await sdk_next(conn, "session.created", seen)
            assert created.session.audio.output.voice == "golden"
            assert created.session.audio.input.format.rate == 24000
            await conn.session.update(session={
                "type": "realtime", "instructions": INSTRUCTIONS, "max_output_tokens": frames,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "golden"}},
            })
            updated = await sdk_next(conn, "session.updated", seen)
            assert updated.session.instructions == INSTRUCTIONS
            assert updated.session.audio.input.turn_detection is None
            assert updated.session.max_output_tokens == frames

            # turn 1: audio in 100 ms chunks, commit, respond
            for piece in chunks(user_pcm):
                await conn.input_audio_buffer.append(audio=b64(piece))
            await conn.input_audio_buffer.commit()
            committed = await sdk_next(conn, "input_audio_buffer.committed", seen)
            user_item = await sdk_next(conn, "conversation.item.added", seen)
            assert user_item.item.id == committed.item_id and user_item.item.role == "user"
            await sdk_next(conn, "conversation.item.done", seen)
            await conn.response.create(response={"metadata": {"turn": "1"}})
            seen.clear()
            done1 = await sdk_next(conn, "response.done", seen)
            kinds = [e.type for e in seen]
            assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                                 "response.content_part.added"]
            assert kinds[-6:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                                  "response.content_part.done", "response.output_item.done",
                                  "conversation.item.done", "response.done"]
            assert seen[0].response.metadata == {"turn": "1"}
            audio1 = [base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta"]
            text1 = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta")
            assert len(audio1) == frames and all(len(a) == FRAME_BYTES for a in audio1)
            assert text1 and text1 == next(e for e in seen
                                           if e.type == "response.output_audio_transcript.done").transcript
            assert done1.response.status == "incomplete"  # the 24-frame limit ended it
            assert done1.response.status_details.reason == "max_output_tokens"
            usage = done1.response.usage
            assert usage.output_token_details.audio_tokens == frames
            assert usage.input_token_details.audio_tokens > 0 and usage.total_tokens == (
                usage.input_tokens + usage.output_tokens)
            assert done1.response.output[0].content[0].transcript == text1

            # turn 2: barge-in after two frames, truncated at 160 ms
            for piece in chunks(user_pcm):
                await conn.input_audio_buffer.append(audio=b64(piece))
            await conn.input_audio_buffer.commit()
            await sdk_next(conn, "conversation.item.done", seen)
            await conn.response.create()
            seen.clear()
            await sdk_next(conn, "response.output_audio.delta", seen)
            await sdk_next(conn, "response.output_audio.delta", seen)
            item_id = seen[-1].item_id
            await conn.response.cancel()
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=160)
            done2 = await sdk_next(conn, "response.done", seen)
            assert done2.response.status == "cancelled"
            assert done2.response.status_details.reason == "client_cancelled"
            truncated = await sdk_next(conn, "conversation.item.truncated", seen, look_back=True)
            assert (truncated.item_id, truncated.audio_end_ms) == (item_id, 160)
            streamed2 = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta")
            await conn.send({"type": "conversation.item.retrieve", "item_id": item_id})
            retrieved = await sdk_next(conn, "conversation.item.retrieved", seen)
            kept = retrieved.item.content[0].transcript

            # turn 3 (text) still works after the barge-in
            await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": "And tomorrow?"}]})
            await sdk_next(conn, "conversation.item.done", seen)
            await conn.response.create(response={"max_output_tokens": 6})
            seen.clear()
            done3 = await sdk_next(conn, "response.done", seen)
            assert sum(e.type == "response.output_audio.delta" for e in seen) == 6
            assert done3.response.status == "incomplete"
            return b"".join(audio1), text1, streamed2, kept

    audio1, text1, streamed2, kept = asyncio.run(asyncio.wait_for(run(), 120))

    assert kept and streamed2.startswith(kept)  # the kept transcript was spoken in the first 160 ms
    assert wait_until(lambda: srv.engine.free_slots == 4 and srv.engine.live_sessions == 0, 5)

    # The same conversation run on the engine directly: the server streamed exactly what the engine produces
    # (sample for sample), and kept exactly what the engine keeps when the listener heard 160 ms of turn 2.
    async def reference():
        conv = await srv.engine.open_conversation(golden_voice, INSTRUCTIONS)
        clip = resample(pcm16_to_float(user_pcm), 24000, 16000)
        await conv.add_user_audio(clip, 16000)
        turn1 = [ev async for ev in conv.respond(max_frames=frames)]
        await conv.add_user_audio(clip, 16000)
        [ev async for ev in conv.respond(max_frames=frames)]
        kept_ref = await conv.truncate(160)
        await conv.close()
        return turn1, kept_ref

    turn1, kept_ref = asyncio.run(reference())
    assert b"".join(e.pcm16() for e in turn1 if isinstance(e, AudioChunk)) == audio1
    assert isinstance(turn1[-1], ResponseDone) and turn1[-1].text == text1
    assert kept == kept_ref


# --- (b) livekit-plugins-openai ----------------------------------------------------------------------------


def test_livekit_plugin_two_turns_with_barge_in(serve, golden_dir):
    from livekit import rtc
    from livekit.agents.utils import http_context
    from livekit.plugins.openai.realtime import RealtimeModel

    srv = serve()
    audio16, rate = load_audio(golden_dir / "user1.wav", 16000), 16000
    pcm16 = np.frombuffer(to_pcm16(audio16), dtype=np.int16)
    frame_len = rate // 100  # 10 ms frames at the caller's own rate; the plugin resamples to 24 kHz

    def push_turn(session) -> None:
        for i in range(0, len(pcm16), frame_len):
            piece = pcm16[i:i + frame_len]
            session.push_audio(rtc.AudioFrame(piece.tobytes(), rate, 1, len(piece)))
        session.commit_audio()

    async def consume(gen, stop_after_frames: int | None = None):
        """(message_id, audio bytes, transcript) of a generation; stops reading after `stop_after_frames`."""
        msg = await asyncio.wait_for(anext(aiter(gen.message_stream)), STEP_TIMEOUT)
        assert await asyncio.wait_for(msg.modalities, STEP_TIMEOUT) == ["audio", "text"]
        text_parts: list[str] = []

        async def read_text():
            async for delta in msg.text_stream:
                text_parts.append(str(delta))

        text_task = asyncio.create_task(read_text())
        audio = bytearray()
        n = 0
        async for frame in msg.audio_stream:
            assert frame.sample_rate == 24000 and frame.num_channels == 1
            audio.extend(bytes(frame.data))
            n += 1
            if stop_after_frames is not None and n == stop_after_frames:
                break
        return msg, audio, text_parts, text_task

    async def run():
        async with http_context.open():
            model = RealtimeModel(base_url=srv.http, api_key=KEY, model="chroma-4b", turn_detection=None,
                                  input_audio_transcription=None)
            session = model.session()
            errors = []
            session.on("error", errors.append)
            try:
                session.update_options(max_response_output_tokens=20)
                await session.update_instructions(INSTRUCTIONS)

                # turn 1: a whole reply
                push_turn(session)
                gen = await asyncio.wait_for(session.generate_reply(), STEP_TIMEOUT)
                msg1, audio1, text1, text_task = await consume(gen)
                await asyncio.wait_for(text_task, STEP_TIMEOUT)
                assert len(audio1) == 20 * FRAME_BYTES and "".join(text1)

                # turn 2: barge in after two frames, truncate to what was "played"
                push_turn(session)
                gen = await asyncio.wait_for(session.generate_reply(), STEP_TIMEOUT)
                msg2, audio2, text2, text_task = await consume(gen, stop_after_frames=2)
                session.interrupt()
                session.truncate(message_id=msg2.message_id, modalities=["audio", "text"], audio_end_ms=160)
                async for _ in msg2.audio_stream:  # the stream ends with response.done (cancelled)
                    pass
                await asyncio.wait_for(text_task, STEP_TIMEOUT)

                # turn 3: the session still answers
                gen = await asyncio.wait_for(session.generate_reply(), STEP_TIMEOUT)
                msg3, audio3, _, text_task = await consume(gen)
                await asyncio.wait_for(text_task, STEP_TIMEOUT)
                assert len(audio3) == 20 * FRAME_BYTES

                # what the server kept: the plugin's mirror of the conversation and the engine's context
                ids = [item.id for item in session.chat_ctx.items]
                assert msg1.message_id in ids and msg2.message_id in ids and msg3.message_id in ids
                (conv,) = engine_sessions(srv.engine)
                assistant = [t for t in conv.turns if t.role == "assistant"]
                assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant",
                                                        "assistant"]
                streamed2 = "".join(text2)
                return assistant[1].text, streamed2, errors
            finally:
                await session.aclose()
                await model.aclose()

    kept, streamed2, errors = asyncio.run(asyncio.wait_for(run(), 120))
    assert not errors, errors
    assert kept and streamed2.startswith(kept)
    assert wait_until(lambda: srv.engine.free_slots == 4, 5)


# --- (c) abuse and limits ----------------------------------------------------------------------------------


def test_malformed_events_get_errors_and_the_connection_stays_usable(serve):
    srv = serve(max_ws_message_bytes=64 * 1024)

    async def run():
        async with await connect_raw(srv) as ws:
            await recv_until(ws, "session.created")
            await send(ws, "{not json")
            await expect_error(ws, ErrorCode.INVALID_JSON)
            await send(ws, "[1, 2]")
            await expect_error(ws, ErrorCode.INVALID_EVENT)
            await send(ws, {"event_id": "e1", "type": "nope.nope"})
            await expect_error(ws, ErrorCode.UNKNOWN_EVENT, "e1")
            await send(ws, {"event_id": "e2", "type": "conversation.item.truncate"})
            err = await expect_error(ws, ErrorCode.MISSING_PARAMETER, "e2")
            assert err["param"] == "item_id"
            await send(ws, {"event_id": "e3", "type": "input_audio_buffer.append", "audio": "@@not base64@@"})
            assert (await expect_error(ws, ErrorCode.INVALID_AUDIO, "e3"))["param"] == "audio"
            await send(ws, {"event_id": "e4", "type": "input_audio_buffer.append", "audio": b64(b"\x00\x01\x02")})
            assert "even number of bytes" in (await expect_error(ws, ErrorCode.INVALID_AUDIO, "e4"))["message"]
            await send(ws, {"event_id": "e5", "type": "input_audio_buffer.commit"})
            await expect_error(ws, ErrorCode.COMMIT_EMPTY, "e5")
            big = {"event_id": "e6", "type": "input_audio_buffer.append", "audio": b64(bytes(96 * 1024))}
            await send(ws, big)
            await expect_error(ws, ErrorCode.MESSAGE_TOO_LARGE, "e6")
            await ws.send(b"\x00binary")
            await expect_error(ws, ErrorCode.BINARY_NOT_SUPPORTED)
            await send(ws, {"event_id": "e7", "type": "session.update",
                            "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
            err = await expect_error(ws, ErrorCode.UNSUPPORTED_AUDIO_FORMAT, "e7")
            assert err["param"] == "session.audio.input.format"
            await send(ws, {"event_id": "e8", "type": "session.update", "session": {"input_audio_format": "g711_ulaw"}})
            await expect_error(ws, ErrorCode.UNSUPPORTED_AUDIO_FORMAT, "e8")
            await send(ws, {"event_id": "e9", "type": "session.update",
                            "session": {"audio": {"output": {"voice": "no-such-voice"}}}})
            assert "no-such-voice" in (await expect_error(ws, ErrorCode.UNKNOWN_VOICE, "e9"))["message"]
            await send(ws, {"event_id": "e10", "type": "session.update", "session": {"temperature": 9}})
            assert (await expect_error(ws, ErrorCode.INVALID_VALUE, "e10"))["param"] == "session.temperature"
            await send(ws, {"event_id": "e11", "type": "session.update", "session": {"output_modalities": ["video"]}})
            assert (await expect_error(ws, ErrorCode.INVALID_VALUE, "e11"))["param"] == "session.output_modalities"
            await send(ws, {"event_id": "e12", "type": "response.cancel"})
            err = await expect_error(ws, ErrorCode.CANCEL_NOT_ACTIVE, "e12")
            assert err["message"].startswith("Cancellation failed")  # livekit-plugins-openai ignores these
            await send(ws, {"event_id": "e13", "type": "conversation.item.truncate", "item_id": "item_x",
                            "content_index": 0, "audio_end_ms": 10})
            await expect_error(ws, ErrorCode.ITEM_TRUNCATE_INVALID_ID, "e13")
            await send(ws, {"event_id": "e14", "type": "conversation.item.create",
                            "item": {"type": "function_call", "name": "f"}})
            await expect_error(ws, ErrorCode.UNSUPPORTED, "e14")
            await send(ws, {"event_id": "e15", "type": "conversation.item.create",
                            "item": {"type": "message", "role": "user", "content": [{"type": "input_text"}]}})
            await expect_error(ws, ErrorCode.MISSING_PARAMETER, "e15")
            await send(ws, {"event_id": "e16", "type": "output_audio_buffer.clear"})
            await expect_error(ws, ErrorCode.UNSUPPORTED, "e16")
            await send(ws, {"event_id": "e17", "type": "session.update",
                            "session": {"audio": {"input": {"turn_detection": {"type": "magic_vad"}}}}})
            await expect_error(ws, ErrorCode.UNSUPPORTED, "e17")
            # a refused session.update changed nothing
            await send(ws, {"event_id": "ok1", "type": "session.update", "session": {"instructions": "Be brief."}})
            updated = await recv_until(ws, "session.updated")
            session = updated["session"]
            assert session["instructions"] == "Be brief." and session["audio"]["output"]["voice"] == "golden"
            assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            # ... and the connection still serves a whole turn
            await send(ws, ClientEvents.conversation_item_create("user", text="Hello there!", item_id="u1"))
            added = await recv_until(ws, "conversation.item.added")
            assert added["item"]["id"] == "u1" and added["previous_item_id"] is None
            await send(ws, ClientEvents.conversation_item_create("user", text="again", item_id="u1", event_id="dup"))
            await expect_error(ws, ErrorCode.DUPLICATE_ITEM_ID, "dup")
            await send(ws, ClientEvents.response_create(max_output_tokens=3, event_id="r1"))
            seen: list = []
            done = await recv_until(ws, "response.done", seen=seen)
            assert sum(e["type"] == "response.output_audio.delta" for e in seen) == 3
            assert done["response"]["status"] == "incomplete"
            assert not [e for e in seen if e["type"] == "error"]

    asyncio.run(asyncio.wait_for(run(), 60))


def test_response_create_while_active_and_item_delete(serve):
    srv = serve()

    async def run():
        async with await connect_raw(srv) as ws:
            await recv_until(ws, "session.created")
            await send(ws, ClientEvents.conversation_item_create("system", text="Speak slowly.", item_id="s1"))
            await recv_until(ws, "conversation.item.done")
            await send(ws, ClientEvents.conversation_item_create("user", text="Hi!", item_id="u1"))
            await recv_until(ws, "conversation.item.done")
            await send(ws, ClientEvents.response_create(max_output_tokens=400, metadata={"client_event_id": "c1"}))
            created = await recv_until(ws, "response.created")
            assert created["response"]["metadata"] == {"client_event_id": "c1"}
            await send(ws, ClientEvents.response_create(event_id="again"))
            await expect_error(ws, ErrorCode.ACTIVE_RESPONSE, "again")
            await recv_until(ws, "response.output_audio.delta")
            # deleting the item being spoken cancels its response; the context loses the turn
            item_id = created["response"]["id"] and (await recv_until(ws, "response.output_audio.delta"))["item_id"]
            await send(ws, ClientEvents.conversation_item_delete(item_id, event_id="d1"))
            seen: list = []
            done = await recv_until(ws, "response.done", seen=seen)
            assert done["response"]["status"] == "cancelled"
            assert any(e["type"] == "conversation.item.deleted" and e["item_id"] == item_id for e in seen)
            (conv,) = engine_sessions(srv.engine)
            assert [t.role for t in conv.turns] == ["system", "user"]
            # delete a past item: the context drops it, and a new reply works on what is left
            await send(ws, ClientEvents.conversation_item_delete("s1"))
            assert (await recv_until(ws, "conversation.item.deleted"))["item_id"] == "s1"
            assert [t.role for t in conv.turns] == ["user"]
            await send(ws, ClientEvents.conversation_item_retrieve("s1", event_id="gone"))
            await expect_error(ws, ErrorCode.ITEM_RETRIEVE_INVALID_ID, "gone")
            await send(ws, ClientEvents.response_create(max_output_tokens=2))
            done = await recv_until(ws, "response.done")
            assert done["response"]["status"] == "incomplete"
            assert [t.role for t in conv.turns] == ["user", "assistant"]
            # a response.create right behind a response.cancel waits for the cancelled reply instead of failing
            await send(ws, ClientEvents.response_create(max_output_tokens=400))
            first = (await recv_until(ws, "response.created"))["response"]["id"]
            await send(ws, ClientEvents.response_cancel(first))
            await send(ws, ClientEvents.response_create(max_output_tokens=2))
            seen = []
            done1 = await recv_until(ws, "response.done", seen=seen)
            done2 = await recv_until(ws, "response.done", seen=seen)
            assert (done1["response"]["id"], done1["response"]["status"]) == (first, "cancelled")
            assert done2["response"]["status"] == "incomplete"
            assert not [e for e in seen if e["type"] == "error"]

    asyncio.run(asyncio.wait_for(run(), 60))


def test_auth_is_refused_before_accept(serve):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        for key in (None, "wrong-key-123456"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                await connect_raw(srv, key=key)
            assert info.value.response.status_code == 401
            assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with AsyncOpenAI(base_url=srv.http, api_key="wrong-key-123456").realtime.connect(model="chroma-4b"):
                pass
        # the key may also come as a query parameter or as a browser's subprotocol
        async with websockets.connect(f"{srv.ws}?model=chroma-4b&api-key={KEY}") as ws:
            assert (await recv_json(ws))["type"] == "session.created"
        async with websockets.connect(srv.ws, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
            assert ws.subprotocol == "realtime"
            assert (await recv_json(ws))["type"] == "session.created"
        assert wait_until(lambda: srv.engine.free_slots == 4, 5)

    asyncio.run(asyncio.wait_for(run(), 60))


def test_slots_full_gets_an_error_and_close_1013(serve):
    srv = serve(session_wait_s=0.2)

    async def run():
        held = [await connect_raw(srv) for _ in range(4)]
        for ws in held:
            assert (await recv_json(ws))["type"] == "session.created"
        assert srv.engine.free_slots == 0
        ws = await connect_raw(srv)
        event = await recv_json(ws)
        assert event["type"] == "error" and event["error"]["code"] == ErrorCode.SERVER_BUSY
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1013 and "try again" in ws.close_reason
        await held[0].close()
        assert await asyncio.to_thread(wait_until, lambda: srv.engine.free_slots == 1, 5)
        async with await connect_raw(srv) as ws:  # a freed slot is usable at once
            assert (await recv_json(ws))["type"] == "session.created"
        for ws in held[1:]:
            await ws.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_disconnect_mid_reply_frees_the_slot(serve):
    srv = serve()
    metrics = None

    async def run():
        ws = await connect_raw(srv)
        await recv_until(ws, "session.created")
        await send(ws, ClientEvents.conversation_item_create("user", text="Tell me a long story."))
        await send(ws, ClientEvents.response_create(max_output_tokens="inf"))
        await recv_until(ws, "response.output_audio.delta")
        await recv_until(ws, "response.output_audio.delta")
        assert srv.engine.free_slots == 3
        ws.transport.abort()  # no close handshake: the client just vanishes

    asyncio.run(asyncio.wait_for(run(), 60))
    t0 = time.monotonic()
    assert wait_until(lambda: srv.engine.free_slots == 4 and srv.engine.live_sessions == 0, 2.0)
    assert wait_until(lambda: srv.engine.queued_replies == 0 and srv.engine.stats["replies"] == 1, 2.0)
    metrics = srv.app.state.metrics
    assert wait_until(lambda: metrics.websockets._value.get() == 0, 2.0)
    assert time.monotonic() - t0 < 2.0


def test_rate_limit_then_flood_closes_1008(serve):
    srv = serve(ws_messages_per_second=20)

    async def run():
        async with await connect_raw(srv) as ws:
            await recv_until(ws, "session.created")
            for i in range(40):
                await send(ws, {"event_id": f"c{i}", "type": "input_audio_buffer.clear"})
            events = []
            with pytest.raises(asyncio.TimeoutError):
                while True:
                    events.append(await recv_json(ws, timeout=1.0))
            cleared = sum(e["type"] == "input_audio_buffer.cleared" for e in events)
            errors = [e["error"] for e in events if e["type"] == "error"]
            assert 20 <= cleared < 40
            assert errors and all(e["code"] == ErrorCode.RATE_LIMITED for e in errors)
            assert errors[0]["event_id"] and errors[0]["event_id"].startswith("c")
            # after a pause the connection works normally
            await asyncio.sleep(1.0)
            await send(ws, {"event_id": "after", "type": "input_audio_buffer.clear"})
            assert (await recv_until(ws, "input_audio_buffer.cleared"))["type"]
            # sustained flooding ends the connection with a policy violation, after saying why
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                for i in range(500):
                    await send(ws, {"event_id": f"f{i}", "type": "input_audio_buffer.clear"})
            last_error = None
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                while True:
                    event = await recv_json(ws, timeout=5)
                    if event["type"] == "error":
                        last_error = event["error"]
            assert ws.close_code == 1008
            assert last_error["code"] == ErrorCode.RATE_LIMITED and "closing" in last_error["message"]

    asyncio.run(asyncio.wait_for(run(), 60))


# --- server-side turn detection, the beta dialect ----------------------------------------------------------


def test_server_vad_commits_responds_and_barge_in_cancels(serve, user_pcm):
    srv = serve()
    silence = bytes(24000 * 2 // 2)  # 0.5 s
    speech_then_pause = silence + user_pcm + silence + silence

    async def run():
        async with await connect_raw(srv) as ws:
            await recv_until(ws, "session.created")
            await send(ws, ClientEvents.session_update(
                instructions=INSTRUCTIONS, max_output_tokens="inf",
                turn_detection={"type": "server_vad", "silence_duration_ms": 400, "prefix_padding_ms": 200}))
            updated = await recv_until(ws, "session.updated", timeout=60)  # the first use loads Silero
            assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            for piece in chunks(speech_then_pause):
                await send(ws, ClientEvents.input_audio_buffer_append(piece))
            seen: list = []
            started = await recv_until(ws, "input_audio_buffer.speech_started", seen=seen)
            stopped = await recv_until(ws, "input_audio_buffer.speech_stopped", seen=seen)
            committed = await recv_until(ws, "input_audio_buffer.committed", seen=seen)
            assert started["item_id"] == stopped["item_id"] == committed["item_id"]
            speech_ms = len(user_pcm) * 1000 // 48000
            assert 300 <= started["audio_start_ms"] <= 900  # the speech starts after 0.5 s of silence
            assert 500 + speech_ms - 300 <= stopped["audio_end_ms"] <= 500 + speech_ms + 1000
            await recv_until(ws, "response.created", seen=seen)  # create_response defaults to true
            await recv_until(ws, "response.output_audio.delta", seen=seen)
            # the user speaks again: the running response is cancelled as a detected turn
            for piece in chunks(speech_then_pause):
                await send(ws, ClientEvents.input_audio_buffer_append(piece))
            mark = len(seen)
            done = await recv_until(ws, "response.done", seen=seen)
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "turn_detected"
            assert (await recv_until(ws, "input_audio_buffer.speech_started", seen=seen, after=mark))
            await recv_until(ws, "input_audio_buffer.speech_stopped", seen=seen, after=mark)
            await recv_until(ws, "input_audio_buffer.committed", seen=seen, after=mark)
            created = await recv_until(ws, "response.created", seen=seen, after=mark)
            assert created["response"]["id"] != done["response"]["id"]
            await send(ws, ClientEvents.response_cancel())
            done = await recv_until(ws, "response.done", seen=seen)
            assert done["response"]["status"] == "cancelled"
            assert not [e for e in seen if e["type"] == "error"]
            (conv,) = engine_sessions(srv.engine)
            assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]

    asyncio.run(asyncio.wait_for(run(), 90))


@pytest.mark.parametrize("how", ["header", "path"])
def test_beta_dialect(serve, how):
    srv = serve()

    async def run():
        if how == "header":
            ws = await connect_raw(srv, additional_headers={"OpenAI-Beta": "realtime=v1"})
        else:
            ws = await connect_raw(srv, path="/v1/beta/realtime")
        async with ws:
            created = strict_event(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT), "beta")
            assert created.type == "session.created" and created.session.input_audio_format == "pcm16"
            await send(ws, {"type": "session.update", "session": {
                "modalities": ["text", "audio"], "voice": "golden", "input_audio_format": "pcm16",
                "output_audio_format": "pcm16", "turn_detection": None, "temperature": 0.8,
                "max_response_output_tokens": 4}})
            await send(ws, {"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}})
            await send(ws, {"type": "response.create", "response": {"modalities": ["audio", "text"]}})
            kinds = []
            while not kinds or kinds[-1] != "response.done":
                event = strict_event(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT), "beta")
                kinds.append(event.type)
                if event.type == "session.updated":
                    assert event.session.temperature == 0.8 and event.session.max_response_output_tokens == 4
                    assert event.session.turn_detection is None
            assert kinds.count("response.audio.delta") == 4
            assert not {"response.output_audio.delta", "response.output_audio_transcript.delta"} & set(kinds)
            assert kinds.count("conversation.item.created") == 2 and "conversation.item.added" not in kinds
            assert "conversation.item.done" not in kinds
            assert kinds[-5:] == ["response.audio.done", "response.audio_transcript.done",
                                  "response.content_part.done", "response.output_item.done", "response.done"]

    asyncio.run(asyncio.wait_for(run(), 60))


# --- the protocol module on its own ------------------------------------------------------------------------


def test_protocol_parse_and_builders():
    from openai.types.realtime import RealtimeClientEvent
    from pydantic import TypeAdapter

    client_events = TypeAdapter(RealtimeClientEvent)
    built = [
        ClientEvents.session_update(instructions="x", voice="golden", turn_detection=None, max_output_tokens=10),
        ClientEvents.input_audio_buffer_append(b"\x00\x01" * 10),
        ClientEvents.input_audio_buffer_commit(),
        ClientEvents.input_audio_buffer_clear(),
        ClientEvents.conversation_item_create("user", text="hi", item_id="u1"),
        ClientEvents.conversation_item_create("user", pcm=b"\x00\x00" * 2400),
        ClientEvents.conversation_item_create("assistant", text="hello"),
        ClientEvents.conversation_item_create("system", text="be brief"),
        ClientEvents.conversation_item_truncate("a1", 160),
        ClientEvents.conversation_item_delete("a1"),
        ClientEvents.conversation_item_retrieve("a1"),
        ClientEvents.response_create(instructions="go", metadata={"client_event_id": "c"}, max_output_tokens="inf"),
        ClientEvents.response_cancel("resp_1"),
    ]
    for event in built:
        client_events.validate_python(event)  # what the official SDK would accept
        assert parse_client_event(json.dumps(event)).type == event["type"]  # and what this server accepts

    for raw, code in [("nope", ErrorCode.INVALID_JSON), ("3", ErrorCode.INVALID_EVENT),
                      ('{"event_id": 5}', ErrorCode.MISSING_PARAMETER), ('{"type": 5}', ErrorCode.INVALID_TYPE),
                      ('{"type": "x.y"}', ErrorCode.UNKNOWN_EVENT),
                      ('{"type": "response.create", "response": {"metadata": {"k": 5}}}', ErrorCode.INVALID_TYPE),
                      ('{"type": "conversation.item.truncate", "item_id": "a", "content_index": 0, '
                       '"audio_end_ms": -1}', ErrorCode.INVALID_VALUE)]:
        with pytest.raises(ProtocolError) as info:
            parse_client_event(raw)
        assert info.value.code == code, (raw, info.value)
    with pytest.raises(ProtocolError) as info:
        parse_client_event('{"type": "input_audio_buffer.append", "event_id": "e"}')
    assert (info.value.code, info.value.param, info.value.event_id) == (ErrorCode.MISSING_PARAMETER, "audio", "e")

    assert b64_to_pcm(b64(b"\x01\x02\x03\x04")) == b"\x01\x02\x03\x04"
    for bad in ("abc", "ab!=", b64(b"\x01")):
        with pytest.raises(ProtocolError):
            b64_to_pcm(bad)
    with pytest.raises(ProtocolError) as info:
        b64_to_pcm(b64(bytes(1000)), max_bytes=100)
    assert info.value.code == ErrorCode.AUDIO_TOO_LARGE

    ga, beta = ServerEvents("ga"), ServerEvents("beta")
    for name in ("response.output_audio.delta", "response.output_audio_transcript.done", "conversation.item.added"):
        assert ga_name(beta_name(name)) == name
    assert beta.audio_delta("r", "i", b"\x00\x00")["type"] == "response.audio.delta"
    assert beta.item_done({}, None) is None and ga.item_done({}, None)["type"] == "conversation.item.done"
    assert ga.assistant_audio_content("t")["type"] == "output_audio" and beta.assistant_audio_content("t")[
        "type"] == "audio"
    assert strict_event(json.dumps(ga.error("m", code="c", event_id="e"))).error.event_id == "e"


def test_slow_reader_is_bounded_by_the_engines_pacing(serve, user_pcm):
    srv = serve()
    # small socket buffers on both ends, so that what the kernel can absorb does not hide the server's behaviour
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    frames = 300

    async def run():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        async with websockets.connect(srv.ws, sock=sock, max_queue=2, open_timeout=STEP_TIMEOUT,
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await recv_until(ws, "session.created")
            await send(ws, ClientEvents.conversation_item_create("user", pcm=user_pcm))
            await send(ws, ClientEvents.response_create(max_output_tokens=frames))
            await recv_until(ws, "response.output_audio.delta")
            (conv,) = engine_sessions(srv.engine)
            reply = conv.response
            produced, stalled = -1, False  # the client stops reading: generation must come to a halt
            deadline = time.monotonic() + 20
            while not stalled and not reply.finished and time.monotonic() < deadline:
                before = reply.frames_produced
                await asyncio.sleep(0.7)
                produced, taken = reply.frames_produced, reply.frames_consumed
                stalled = produced == before and not reply.finished
            assert produced - taken <= round(srv.engine.config.lookahead_s * 1000 / 80)
            seen: list = []
            done = await recv_until(ws, "response.done", seen=seen)
            return produced, stalled, sum(e["type"] == "response.output_audio.delta" for e in seen) + 1, done

    produced, stalled, received, done = asyncio.run(asyncio.wait_for(run(), 60))
    # ... and generation stalls a lookahead (1.5 s = 19 frames) plus the socket buffers ahead of the reader
    assert stalled and produced < frames // 2, produced
    # ... and nothing was lost
    assert received == frames and done["response"]["status"] == "incomplete"


def test_a_reply_that_ends_by_itself_is_completed(serve):
    srv = serve()

    async def run():
        async with await connect_raw(srv) as ws:
            await recv_until(ws, "session.created")
            await send(ws, ClientEvents.conversation_item_create("user", text="Talk to me."))
            await send(ws, ClientEvents.response_create(max_output_tokens=300))
            seen: list = []
            done = await recv_until(ws, "response.done", seen=seen)
            frames = sum(e["type"] == "response.output_audio.delta" for e in seen)
            return done["response"], frames

    response, frames = asyncio.run(asyncio.wait_for(run(), 60))
    # the tiny checkpoint ends this (greedy) reply with its end-of-audio frame well before the limit
    assert response["status"] == "completed" and response["status_details"] is None
    assert 0 < frames < 300 and response["usage"]["output_token_details"]["audio_tokens"] == frames
    assert response["output"][0]["status"] == "completed"


# --- OpenAI's defaults and interruption semantics, with the official SDK ----------------------------------------

SILENCE_S = bytes(24000 * 2 // 2)  # 0.5 s of PCM16 24 kHz silence


def spoken_turn(user_pcm: bytes) -> bytes:
    """Half a second of silence, the question, then a second of silence: one turn for server VAD."""
    return SILENCE_S + user_pcm + SILENCE_S + SILENCE_S


async def sdk_events_until(conn, kind: str, seen: list, timeout: float = STEP_TIMEOUT):
    """Like sdk_next, but error events are collected rather than raised; returns the event of type `kind`."""
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(conn.recv_bytes(), max(0.01, deadline - time.monotonic()))
        event = strict_event(raw)
        seen.append((time.monotonic(), event))
        if event.type == kind:
            return event


def test_sessions_start_with_server_vad_and_null_turns_it_off(serve, user_pcm):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            seen: list = []
            created = await sdk_next(conn, "session.created", seen)
            td = created.session.audio.input.turn_detection
            assert td.type == "server_vad"  # as OpenAI sessions start
            assert (td.threshold, td.prefix_padding_ms, td.silence_duration_ms) == (0.5, 300, 500)
            assert td.create_response is True and td.interrupt_response is True
            await conn.session.update(session={"type": "realtime", "max_output_tokens": 4})
            updated = await sdk_next(conn, "session.updated", seen)
            assert updated.session.audio.input.turn_detection.type == "server_vad"  # untouched by the update
            # a client that relies on the default gets its spoken turn answered without committing anything
            for piece in chunks(spoken_turn(user_pcm)):
                await conn.input_audio_buffer.append(audio=b64(piece))
            await sdk_next(conn, "input_audio_buffer.speech_started", seen)
            await sdk_next(conn, "input_audio_buffer.committed", seen)
            done = await sdk_next(conn, "response.done", seen)
            assert done.response.status == "incomplete" and done.response.usage.output_token_details.audio_tokens == 4
            # an explicit null is honoured: no VAD, the client commits
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            updated = await sdk_next(conn, "session.updated", seen)
            assert updated.session.audio.input.turn_detection is None
            for piece in chunks(spoken_turn(user_pcm)):
                await conn.input_audio_buffer.append(audio=b64(piece))
            await conn.input_audio_buffer.commit()
            seen.clear()
            await sdk_next(conn, "input_audio_buffer.committed", seen)
            assert [e.type for e in seen] == ["input_audio_buffer.committed"]  # no speech_started before it

    asyncio.run(asyncio.wait_for(run(), 90))


def test_cancel_sends_no_audio_after_it_and_a_long_truncate_is_clamped(serve):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            seen: list = []
            await sdk_next(conn, "session.created", seen)
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story."}]})
            await sdk_next(conn, "conversation.item.done", seen)
            await conn.response.create()
            seen.clear()
            for _ in range(3):
                delta = await sdk_next(conn, "response.output_audio.delta", seen)
            item_id = delta.item_id
            await conn.response.cancel()
            await conn.input_audio_buffer.clear()  # a marker: handled after the cancel, acknowledged at once
            events: list = []
            await sdk_events_until(conn, "response.done", events)
            kinds = [e.type for _, e in events]
            marker = kinds.index("input_audio_buffer.cleared")
            assert "response.output_audio.delta" not in kinds[marker:]  # nothing of it after the cancel
            done = events[-1][1]
            assert done.response.status == "cancelled" and done.response.status_details.reason == "client_cancelled"
            sent = sum(e.type == "response.output_audio.delta" for e in seen) + kinds.count("response.output_audio.delta")
            assert done.response.usage.output_token_details.audio_tokens == sent  # only what was sent counts
            streamed = "".join(e.delta for e in seen if e.type == "response.output_audio_transcript.delta") + "".join(
                e.delta for _, e in events if e.type == "response.output_audio_transcript.delta")
            # a truncate past the audio sent is clamped to it, not refused
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=10**6)
            truncated = await sdk_next(conn, "conversation.item.truncated", seen)
            assert truncated.audio_end_ms == sent * 80
            await conn.conversation.item.retrieve(item_id=item_id)
            kept = (await sdk_next(conn, "conversation.item.retrieved", seen)).item.content[0].transcript
            assert streamed.startswith(kept)
            (conv,) = engine_sessions(srv.engine)
            assert conv.turns[-1].role == "assistant" and conv.turns[-1].text == kept
            return sent, round(conv.turns[-1].audio_seconds / 0.08)  # the frames the engine made

    sent, produced = asyncio.run(asyncio.wait_for(run(), 60))
    assert 3 <= sent <= produced


def test_server_vad_barge_in_truncates_to_what_was_played(serve, user_pcm):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            seen: list = []
            await sdk_next(conn, "session.created", seen)  # server VAD by default
            await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS,
                                               "max_output_tokens": "inf"})
            await sdk_next(conn, "session.updated", seen)
            for piece in chunks(spoken_turn(user_pcm)):
                await conn.input_audio_buffer.append(audio=b64(piece))
            created = await sdk_next(conn, "response.created", seen)
            seen.clear()  # from here: the reply's events
            first = await sdk_next(conn, "response.output_audio.delta", seen)
            first_at = time.monotonic()
            item_id = first.item_id
            events: list = []
            while time.monotonic() - first_at < 0.6:  # "play" 0.6 s while the server streams ahead
                await sdk_events_until(conn, "response.output_audio.delta", events)
            # the user talks over the reply
            for piece in chunks(user_pcm):
                await conn.input_audio_buffer.append(audio=b64(piece))
            await sdk_events_until(conn, "input_audio_buffer.speech_started", events)
            await sdk_events_until(conn, "response.done", events)
            kinds = [e.type for _, e in events]
            started = kinds.index("input_audio_buffer.speech_started")
            assert not [e for _, e in events[started:] if e.type == "response.output_audio.delta"
                        and e.response_id == created.response.id]  # cancelled before speech_started went out
            truncated = [(t, e) for t, e in events if e.type == "conversation.item.truncated"]
            assert len(truncated) == 1
            at, truncated = truncated[0]
            sent = 1 + sum(e.type == "response.output_audio.delta" for _, e in events)
            assert truncated.item_id == item_id and truncated.content_index == 0
            # what was sent, and no more than real time allowed to play since the first delta
            assert 0 < truncated.audio_end_ms <= sent * 80
            assert truncated.audio_end_ms <= (at - first_at) * 1000 + 100
            done = events[-1][1]
            assert done.response.status == "cancelled" and done.response.status_details.reason == "turn_detected"
            streamed = "".join(e.delta for e in seen + [e for _, e in events]
                               if e.type == "response.output_audio_transcript.delta")
            await conn.conversation.item.retrieve(item_id=item_id)
            kept = (await sdk_next(conn, "conversation.item.retrieved", seen)).item.content[0].transcript
            assert streamed.startswith(kept)
            (conv,) = engine_sessions(srv.engine)
            assistant = [t for t in conv.turns if t.role == "assistant"]
            assert assistant[0].text == kept
            # a later client truncate past the server's cut is clamped to it
            await conn.send({"type": "response.cancel"})  # the VAD started a new reply for the new turn
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=10**6)
            seen.clear()
            errors: list = []
            again = await sdk_events_until(conn, "conversation.item.truncated", errors)
            assert again.audio_end_ms == truncated.audio_end_ms
            return sent, truncated.audio_end_ms

    sent, heard = asyncio.run(asyncio.wait_for(run(), 90))
    assert heard < sent * 80  # the server streamed ahead of playback; the context keeps what was played


def test_unknown_item_ids_get_openais_error_codes(serve):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            events: list = []
            await sdk_events_until(conn, "session.created", events)
            await conn.conversation.item.retrieve(item_id="item_nope", event_id="r")
            await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=0, event_id="t")
            await conn.conversation.item.delete(item_id="item_nope", event_id="d")
            codes = []
            for _ in range(3):
                error = (await sdk_events_until(conn, "error", events)).error
                assert error.param == "item_id" and "item_nope" in error.message
                codes.append((error.event_id, error.code))
            assert codes == [("r", "item_retrieve_invalid_item_id"), ("t", "item_truncate_invalid_item_id"),
                             ("d", "item_delete_invalid_item_id")]
            await conn.input_audio_buffer.clear()  # the connection goes on
            await sdk_events_until(conn, "input_audio_buffer.cleared", events)

    asyncio.run(asyncio.wait_for(run(), 60))


def test_text_only_replies(serve, user_pcm):
    from openai import AsyncOpenAI

    srv = serve()

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            seen: list = []
            await sdk_next(conn, "session.created", seen)
            await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS,
                                               "output_modalities": ["text"], "max_output_tokens": 40})
            updated = await sdk_next(conn, "session.updated", seen)
            assert updated.session.output_modalities == ["text"]
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_audio", "audio": b64(user_pcm)}]})
            await sdk_next(conn, "conversation.item.done", seen)
            await conn.response.create()
            seen.clear()
            done = await sdk_next(conn, "response.done", seen)
            kinds = [e.type for e in seen]
            assert kinds[:4] == ["response.created", "response.output_item.added", "conversation.item.added",
                                 "response.content_part.added"]
            assert kinds[-5:] == ["response.output_text.done", "response.content_part.done",
                                  "response.output_item.done", "conversation.item.done", "response.done"]
            assert not [k for k in kinds if "audio" in k]
            assert seen[0].response.output_modalities == ["text"] and seen[3].part.type == "text"
            text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
            assert text and text == next(e for e in seen if e.type == "response.output_text.done").text
            assert done.response.output[0].content[0].type == "output_text"
            assert done.response.output[0].content[0].text == text
            assert done.response.usage.output_token_details.audio_tokens == 0
            # a text session can still ask one reply for audio, and an audio session one reply for text
            await conn.response.create(response={"output_modalities": ["audio"], "max_output_tokens": 3})
            seen.clear()
            await sdk_next(conn, "response.done", seen)
            assert sum(e.type == "response.output_audio.delta" for e in seen) == 3
            await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"]})
            await sdk_next(conn, "session.updated", seen)
            await conn.response.create(response={"output_modalities": ["text"]})
            seen.clear()
            done = await sdk_next(conn, "response.done", seen)
            assert done.response.output_modalities == ["text"]
            assert not [e for e in seen if e.type.startswith("response.output_audio")]
            # a text item cannot be truncated: there is no audio in it
            await conn.conversation.item.truncate(item_id=done.response.output[0].id, content_index=0,
                                                  audio_end_ms=0)
            events: list = []
            error = (await sdk_events_until(conn, "error", events)).error
            assert error.code == ErrorCode.INVALID_VALUE

    asyncio.run(asyncio.wait_for(run(), 90))


def test_without_a_default_voice_sessions_have_none_and_speech_needs_one(serve, make_engine, golden_voice):
    import dataclasses

    from openai import AsyncOpenAI

    engine = make_engine(max_sessions=4)  # no default voice configured
    engine.voices.save(golden_voice)
    engine.voices.save(dataclasses.replace(golden_voice, name="0-attacker", transcript="x"))
    srv = serve(engine)
    stop = threading.Event()

    def churn():  # voices created and deleted while sessions connect must not matter to them
        racer = dataclasses.replace(golden_voice, name="00-racer")
        while not stop.is_set():
            engine.voices.save(racer, overwrite=True)
            engine.voices.delete("00-racer")

    async def connects():
        voices = []
        for _ in range(20):
            async with await connect_raw(srv) as ws:
                created = await recv_json(ws)
                assert created["type"] == "session.created", created
                voices.append(created["session"]["audio"]["output"]["voice"])
        return voices

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        voices = asyncio.run(asyncio.wait_for(connects(), 60))
    finally:
        stop.set()
        churner.join(5)
    assert voices == [None] * 20

    async def run():
        client = AsyncOpenAI(base_url=srv.http, api_key=KEY)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            events: list = []
            created = await sdk_events_until(conn, "session.created", events)
            assert created.session.audio.output.voice is None
            # a stock name still lets the update's other fields apply
            await conn.session.update(session={"type": "realtime", "instructions": INSTRUCTIONS,
                                               "audio": {"input": {"turn_detection": None},
                                                         "output": {"voice": "alloy"}}})
            updated = await sdk_events_until(conn, "session.updated", events)
            assert updated.session.instructions == INSTRUCTIONS and updated.session.audio.output.voice is None
            assert not [e for _, e in events if e.type == "error"]
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Hello!"}]})
            await sdk_events_until(conn, "conversation.item.done", events)
            await conn.response.create(event_id="speak")
            error = (await sdk_events_until(conn, "error", events)).error
            assert (error.code, error.param, error.event_id) == ("voice_required", "session.audio.output.voice",
                                                                 "speak")
            assert "--voice-audio" in error.message  # the setting that gives the server a default voice
            # text needs no voice
            await conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 4})
            done = await sdk_events_until(conn, "response.done", events)
            assert done.response.status in ("completed", "incomplete")
            # a stored voice named by the session speaks
            await conn.session.update(session={"type": "realtime", "audio": {"output": {"voice": "golden"}}})
            updated = await sdk_events_until(conn, "session.updated", events)
            assert updated.session.audio.output.voice == "golden"
            await conn.response.create(response={"max_output_tokens": 2})
            events.clear()
            done = await sdk_events_until(conn, "response.done", events)
            assert sum(e.type == "response.output_audio.delta" for _, e in events) == 2
            (conv,) = engine_sessions(srv.engine)
            assert conv.voice.name == "golden"

    asyncio.run(asyncio.wait_for(run(), 60))


def _server_event_types(dialect: str) -> set[str]:
    from chroma_agent.realtime_protocol import GA_ONLY, ServerEventType

    names = {v for k, v in vars(ServerEventType).items() if k.isupper()}
    return names if dialect == "ga" else {beta_name(n) for n in names - GA_ONLY}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_every_server_event_validates_against_the_sdks_models(serve, user_pcm, dialect):
    """Drive a session through everything the server can send; each message must parse as the SDK's own model."""
    srv = serve()
    path = "/v1/realtime" if dialect == "ga" else "/v1/beta/realtime"
    received: list = []

    async def recv(ws, kind: str):
        while True:
            raw = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT)
            event = strict_event(raw, dialect)  # raises if any field does not match the SDK's types
            received.append(event.type)
            if event.type == kind:
                return event

    def update(**fields) -> dict:
        if dialect == "ga":
            session = {"type": "realtime", **fields}
            if "modalities" in session:
                session["output_modalities"] = session.pop("modalities")
            if "max_tokens" in session:
                session["max_output_tokens"] = session.pop("max_tokens")
        else:
            session = dict(fields)
            if "modalities" in session:
                session["modalities"] = ["text"] if session["modalities"] == ["text"] else ["audio", "text"]
            if "max_tokens" in session:
                session["max_response_output_tokens"] = session.pop("max_tokens")
        return {"type": "session.update", "session": session}

    added = "conversation.item.added" if dialect == "ga" else "conversation.item.created"

    async def spoken():
        async with await connect_raw(srv, path=path) as ws:
            await recv(ws, "session.created")
            await send(ws, update(instructions=INSTRUCTIONS, max_tokens=12))
            await recv(ws, "session.updated")
            for piece in chunks(spoken_turn(user_pcm)):  # server VAD (the default) commits and answers
                await send(ws, ClientEvents.input_audio_buffer_append(piece))
            committed = await recv(ws, "input_audio_buffer.committed")
            done = await recv(ws, "response.done")
            reply_item = done.response.output[0].id
            await send(ws, ClientEvents.input_audio_buffer_clear())
            await recv(ws, "input_audio_buffer.cleared")
            await send(ws, ClientEvents.conversation_item_retrieve(committed.item_id))
            await recv(ws, "conversation.item.retrieved")
            await send(ws, ClientEvents.conversation_item_truncate(reply_item, 80))
            await recv(ws, "conversation.item.truncated")
            await send(ws, ClientEvents.conversation_item_delete(reply_item))
            await recv(ws, "conversation.item.deleted")
            await send(ws, {"type": "no.such.event"})
            await recv(ws, "error")

    async def written():
        async with await connect_raw(srv, path=path) as ws:
            await recv(ws, "session.created")
            await send(ws, update(instructions=INSTRUCTIONS, modalities=["text"], max_tokens=40))
            await recv(ws, "session.updated")
            await send(ws, ClientEvents.conversation_item_create("user", pcm=user_pcm))
            await recv(ws, added)
            await send(ws, ClientEvents.response_create())
            await recv(ws, "response.done")

    asyncio.run(asyncio.wait_for(spoken(), 90))
    asyncio.run(asyncio.wait_for(written(), 90))
    assert set(received) == _server_event_types(dialect), set(received) ^ _server_event_types(dialect)
