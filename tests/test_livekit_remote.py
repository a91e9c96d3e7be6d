"""The LiveKit plugin's remote mode: `chroma.RealtimeModel(base_url=...)` against a real server app.

Every test runs the whole server app (`create_app`) under uvicorn on 127.0.0.1 (`ServerThread`) over the tiny
engine, and the plugin talks to it over `/v1/realtime` exactly as it would to a remote machine. The room-less
AgentSession I/O (a fed audio input, a real-time sink) is the one of tests/test_livekit_plugin.py.

The served engine's default sampling is NOT greedy (temperature 1, top-k 50): the golden reply only comes out
when the plugin's ``temperature=0`` reaches the server and the server decodes greedily.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time

import numpy as np
import pytest
from conftest import EngineState, engine_sessions
from livekit import rtc
from livekit.agents import AgentSession, APIConnectionError, APIStatusError, llm
from livekit.agents.metrics import RealtimeModelMetrics
from livekit.plugins import chroma
from livekit.plugins.chroma.realtime.backend import SamplingOverrides, VoiceSpec
from livekit.plugins.chroma.realtime.remote import RemoteBackend, RemoteConversation, ServerBusyError
from livekit.plugins.chroma.realtime.session import MAX_AHEAD_FRAMES
from test_livekit_plugin import (  # one definition of the room-less I/O
    GOLDEN_FRAMES,
    GOLDEN_SECONDS,
    CollectText,
    FeedInput,
    RealTimeSink,
    RecordingAgent,
    drain,
    pcm_frames,
    run,
    until,
)

from chroma_agent.audio import load_audio, pcm16_to_float, resample, to_pcm16
from chroma_agent.engine.events import AudioChunk, ResponseDone, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.realtime_client import INBOX_EVENTS, realtime_url
from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

KEY = "test-key-0123456789"
NOT_GREEDY = SamplingParams(temperature=1.0, top_k=50)


@pytest.fixture(scope="module")
def user_audio(user_pcm16) -> np.ndarray:
    return user_pcm16


@pytest.fixture()
def engine_factory(make_engine, golden_voice):
    """Engines of one config: the golden voice by default, two slots, a non-greedy default sampling."""

    def make(max_sessions: int = 2):
        engine = make_engine(golden_default_voice=golden_voice, max_sessions=max_sessions)
        engine.sampling = NOT_GREEDY
        return engine

    return make


@pytest.fixture()
def serve(engine_factory):
    servers: list[ServerThread] = []

    def start(engine=None, port: int = 0, **settings) -> ServerThread:
        engine = engine or engine_factory()
        settings.setdefault("api_key", KEY)
        settings.setdefault("session_wait_s", 0.2)  # a full server answers 1013 quickly
        srv = ServerThread(create_app(engine, ServerSettings(**settings)), port=port).start()
        srv.engine = engine
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv.thread.is_alive():
            srv.stop()


def remote_model(srv: ServerThread, **kwargs) -> chroma.RealtimeModel:
    kwargs.setdefault("api_key", KEY)
    kwargs.setdefault("voice", "golden")
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_reply_seconds", GOLDEN_SECONDS)
    return chroma.RealtimeModel(base_url=srv.url, **kwargs)


def server_conversation(srv: ServerThread) -> EngineState:
    """The server engine's only open conversation (the plugin session's server side)."""
    convs = engine_sessions(srv.engine)
    assert len(convs) == 1, convs
    return convs[0]


def pcm_bytes(frames: list[rtc.AudioFrame]) -> bytes:
    return b"".join(bytes(f.data) for f in frames)


async def settled(rt: chroma.RealtimeSession, seconds: float) -> None:
    """Wait until the session holds (about) `seconds` of pushed audio and nothing more arrives."""
    last = -1.0
    deadline = time.monotonic() + 10
    while True:
        now = rt.pending_audio_seconds
        if now == last and now > seconds - 0.1:
            return
        assert time.monotonic() < deadline, f"only {now:.3f} s of {seconds:.3f} s reached the session"
        last = now
        await asyncio.sleep(0.05)


# --- (1) a real AgentSession over the server ----------------------------------------------------------------


def test_agent_session_over_the_server_speaks_is_interrupted_and_goes_on(serve, case, user_audio):
    srv = serve()

    async def main():
        session = AgentSession(llm=remote_model(srv), vad=None, turn_handling={"turn_detection": "manual"},
                               user_away_timeout=None, aec_warmup_duration=None)
        errors: list = []
        session.on("error", errors.append)
        audio_in, sink, text_out = FeedInput(), RealTimeSink(), CollectText()
        session.input.audio = audio_in
        session.output.audio = sink
        session.output.transcription = text_out
        agent = RecordingAgent(case["system_prompt"])
        await session.start(agent)
        rt = session._activity.realtime_llm_session
        assert isinstance(rt, chroma.RealtimeSession)
        metrics: list[RealtimeModelMetrics] = []
        rt.on("metrics_collected", metrics.append)
        await until(lambda: rt.conversation is not None, 10, "the connection")
        assert isinstance(rt.conversation, RemoteConversation) and rt.conversation.connected
        conv = server_conversation(srv)
        await until(lambda: conv.instructions == case["system_prompt"], what="the agent's instructions")

        seconds = len(user_audio) / 16000

        async def user_turn() -> None:
            for frame in pcm_frames(user_audio, 16000):
                audio_in.ch.send_nowait(frame)
            await settled(rt, seconds)
            session.commit_user_turn()

        def replies() -> list[llm.ChatMessage]:
            return [m for m in session.history.messages() if m.role == "assistant"]

        # Turn 1: the golden user clip, greedy -> the golden words, 32 frames of 24 kHz audio.
        await user_turn()
        await until(lambda: len(replies()) == 1 and session.agent_state == "listening", 20, "the first reply")
        # the whole turn reached the server, resampled once (16 -> 24 kHz here, 24 -> 16 kHz there)
        assert abs(conv.history[0]["audio_seconds"] - seconds) < 0.005
        assert len(sink.frames) == GOLDEN_FRAMES
        assert all(f.sample_rate == 24000 and f.num_channels == 1 and f.samples_per_channel == 1920
                   for f in sink.frames)
        golden_text = case["thinker_text"].replace("<|im_end|>", "")
        assert agent.streamed[0] == golden_text
        assert replies()[0].text_content == golden_text and not replies()[0].interrupted
        assert conv.history[1] == {"role": "assistant", "text": golden_text, "audio_seconds": GOLDEN_SECONDS}
        assert len(metrics) == 1 and not metrics[0].cancelled
        m = metrics[0]
        assert 0 < m.ttft < m.duration < 15 and m.output_token_details.audio_tokens == GOLDEN_FRAMES
        assert m.output_token_details.text_tokens > 0 and m.metadata.model_provider == "chroma"
        assert m.input_tokens > m.input_token_details.cached_tokens >= 0  # usage as the server reported it

        # Turn 2: the user barges in 160 ms into the reply; the server keeps only what was heard.
        first = len(sink.frames)
        sink.stall_at = 0.16
        await user_turn()
        await until(lambda: sink.played() == 0.16 and len(sink.frames) - first >= 6, 20, "the reply to play")
        words = rt._generations[-1].text  # what the reply has said so far
        await session.interrupt()
        sink.stall_at = math.inf
        await until(lambda: len(metrics) == 2 and session.agent_state == "listening", 15, "the interruption")
        await until(lambda: any(m.interrupted for m in replies()), 5, "the interrupted message")
        await until(lambda: len(conv.history[-1]["text"]) < len(words), 5, "the truncation to reach the server")
        kept = conv.history[-1]["text"]
        assert words.startswith(kept) and len(kept) < len(words), (kept, words)
        assert len(sink.segments[-1]) <= 8  # the session stopped playing at once

        # Turn 3: the conversation goes on after the barge-in.
        third = len(sink.frames)
        await user_turn()
        await until(lambda: len(metrics) == 3 and session.agent_state == "listening", 20, "the third reply")
        assert len(sink.frames) - third == GOLDEN_FRAMES and not metrics[2].cancelled
        assert [t["role"] for t in conv.history] == ["user", "assistant"] * 3
        assert [t.role for t in conv.turns] == ["system"] + ["user", "assistant"] * 3
        assert conv.turns[0].instructions
        assert conv.history[-1]["text"] == agent.streamed[2]

        # A typed turn becomes a conversation.item.create.
        fourth = len(sink.frames)
        await session.generate_reply(user_input="Thank you!")
        await until(lambda: len(metrics) == 4 and session.agent_state == "listening", 20, "the fourth reply")
        assert len(sink.frames) - fourth == GOLDEN_FRAMES
        assert conv.history[-2] == {"role": "user", "text": "Thank you!", "audio_seconds": 0.0}
        assert conv.history[-1]["text"] == agent.streamed[3]
        assert not errors, errors
        assert rt.conversation.connections == 1  # one WebSocket for the whole session

        await session.aclose()
        await until(lambda: srv.engine.live_sessions == 0, 5, "the server to free the slot")

    run(main(), timeout=80)


# --- (2) remote == in-process, byte for byte ----------------------------------------------------------------


def test_remote_audio_equals_in_process_audio(serve, engine_factory, case, golden_dir):
    srv = serve()
    local = engine_factory()  # the same engine config, in this process
    pcm24 = to_pcm16(load_audio(golden_dir / "user1.wav", 24000))  # what a 24 kHz caller sends

    async def reply(rt) -> tuple[list[rtc.AudioFrame], str]:
        return await asyncio.wait_for(drain(await rt.generate_reply()), 20)

    async def main():
        remote = remote_model(srv, instructions=case["system_prompt"]).session()
        in_process = chroma.RealtimeModel(engine=local, instructions=case["system_prompt"], temperature=0.0,
                                          max_reply_seconds=GOLDEN_SECONDS).session()
        errors: list = []
        remote.on("error", errors.append)
        in_process.on("error", errors.append)

        # A typed turn: the same context on both sides, then the same greedy reply.
        for rt in (remote, in_process):
            ctx = llm.ChatContext.empty()
            ctx.add_message(role="user", content="What should I wear today?")
            await rt.update_chat_ctx(ctx)
        (r_frames, r_text), (l_frames, l_text) = await reply(remote), await reply(in_process)
        assert len(r_frames) == len(l_frames) == GOLDEN_FRAMES
        assert [pcm_bytes([f]) for f in r_frames] == [pcm_bytes([f]) for f in l_frames]
        assert r_text == l_text

        # An audio turn: 24 kHz PCM16 goes over the wire untouched; the server resamples it as below.
        for frame in pcm_frames(np.frombuffer(pcm24, dtype="<i2"), 24000, ms=20):
            remote.push_audio(frame)
        remote.commit_audio()
        heard = resample(pcm16_to_float(pcm24), 24000, 16000)
        await in_process.conversation.add_user_audio(heard, 16000)
        (r_frames, r_text), (l_frames, l_text) = await reply(remote), await reply(in_process)
        assert len(r_frames) == len(l_frames) == GOLDEN_FRAMES
        assert pcm_bytes(r_frames) == pcm_bytes(l_frames) and r_text == l_text
        server_history = server_conversation(srv).history
        mirror = in_process.conversation.conversation
        local_history = EngineState(mirror.engine, mirror.id).history
        assert [t["role"] for t in local_history] == ["user", "assistant", "user", "assistant"]
        assert server_history == local_history
        assert not errors, errors
        await remote.aclose()
        await in_process.aclose()

    run(main(), timeout=60)


# --- (3) failures: a wrong key, a full server, a server that goes away -----------------------------------


def test_wrong_key_unknown_voice_and_no_server_are_clear_errors_and_nothing_hangs(serve, monkeypatch, caplog):
    srv = serve()
    wrong = "wrong-key-9876543210"

    async def main():
        model = chroma.RealtimeModel(base_url=srv.url, api_key=wrong, voice="golden")
        rt = model.session()
        errors: list[llm.RealtimeModelError] = []
        rt.on("error", errors.append)
        await until(lambda: errors, 10, "the error")
        error = errors[0]
        assert not error.recoverable and isinstance(error.error, APIStatusError)
        assert error.error.status_code == 401 and "refused the API key" in str(error.error)
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 5)
        assert frames == [] and len(errors) == 2
        await asyncio.wait_for(rt.aclose(), 5)
        with pytest.raises(APIStatusError, match="API key"):
            await asyncio.to_thread(model.prewarm)

        # The key from CHROMA_API_KEY works; prewarm checks it and learns the served model's name.
        monkeypatch.setenv("CHROMA_API_KEY", KEY)
        model = chroma.RealtimeModel(base_url=srv.url + "/v1", voice="golden")
        await asyncio.to_thread(model.prewarm)
        assert model.backend.model_name == "chroma-4b"
        rt = model.session()
        await until(lambda: rt.conversation is not None, 10, "the connection")
        assert srv.engine.live_sessions == 1
        await rt.aclose()
        await until(lambda: srv.engine.live_sessions == 0, 5, "the slot to be freed")

        # A voice the server does not have: unrecoverable, with the server's own words.
        rt = remote_model(srv, voice="nobody").session()
        errors = []
        rt.on("error", errors.append)
        await until(lambda: errors, 10, "the unknown voice's error")
        assert not errors[0].recoverable and "unknown voice 'nobody'" in str(errors[0].error)
        await rt.aclose()
        await until(lambda: srv.engine.live_sessions == 0, 5, "the slot to be freed")

        # Nothing listens: a recoverable connection error, at once.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rt = chroma.RealtimeModel(base_url=f"ws://127.0.0.1:{port}", api_key=KEY).session()
        errors = []
        rt.on("error", errors.append)
        await until(lambda: errors, 10, "the connection error")
        assert errors[0].recoverable and isinstance(errors[0].error, APIConnectionError)
        assert "cannot connect to the Chroma server" in str(errors[0].error)
        await rt.aclose()

    with caplog.at_level(logging.DEBUG):
        run(main(), timeout=40)
    assert wrong not in caplog.text and KEY not in caplog.text  # keys are never logged


def test_a_full_server_is_a_recoverable_error_and_the_session_gets_in_later(serve, user_audio):
    srv = serve()  # two slots

    async def main():
        model = remote_model(srv, instructions="You are Chroma.")
        first, second = model.session(), model.session()
        await until(lambda: first.conversation is not None and second.conversation is not None, 10,
                    "two conversations")
        third = model.session()
        errors: list[llm.RealtimeModelError] = []
        third.on("error", errors.append)
        await until(lambda: errors, 10, "the busy error")
        assert errors[0].recoverable and isinstance(errors[0].error, ServerBusyError)
        assert "is full" in str(errors[0].error) and third.conversation is None

        frames, text = await asyncio.wait_for(drain(await third.generate_reply()), 10)
        assert frames == [] and text == ""
        await until(lambda: len(errors) == 2, 5, "the failed reply's error")
        assert all(e.recoverable for e in errors)

        await first.aclose()  # a slot frees up: the next reply connects
        await until(lambda: srv.engine.live_sessions == 1, 5, "the slot to be freed")
        frames, _ = await asyncio.wait_for(drain(await third.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES
        await second.aclose()
        await third.aclose()
        await until(lambda: srv.engine.live_sessions == 0, 5, "every slot to be freed")

    run(main(), timeout=40)


def test_server_stopped_mid_reply_ends_it_with_an_error_and_a_later_turn_reconnects(serve, case, user_audio):
    srv = serve()
    engine = srv.engine

    async def main():
        rt = remote_model(srv, instructions=case["system_prompt"], max_reply_seconds=30).session()
        errors: list[llm.RealtimeModelError] = []
        rt.on("error", errors.append)
        rt.update_options(max_reply_seconds=GOLDEN_SECONDS)
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()
        frames, first_words = await asyncio.wait_for(drain(await rt.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES and first_words == case["thinker_text"].replace("<|im_end|>", "")
        ctx = rt.chat_ctx.copy()
        ctx.add_message(role="user", content="My order number is 42.")
        await rt.update_chat_ctx(ctx)
        rt.update_options(max_reply_seconds=30)
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()

        event = await rt.generate_reply()
        message = await event.message_stream.__anext__()
        frames = []
        async for frame in message.audio_stream:
            frames.append(frame)
            if len(frames) == 3:
                break
        await asyncio.wait_for(asyncio.to_thread(srv.stop), 20)  # the server goes away mid-reply
        async for frame in message.audio_stream:  # the reply ends: what was in flight, then nothing
            frames.append(frame)
        assert 3 <= len(frames) < 375
        await until(lambda: errors, 10, "the lost connection's error")
        assert errors[0].recoverable and "lost" in str(errors[0].error)
        assert not rt.conversation.connected
        await until(lambda: engine.live_sessions == 0, 10, "the old server to free the slot")

        # While the server is down a reply fails fast (recoverable); once it is back the next one reconnects.
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 15)
        assert frames == [] and errors[-1].recoverable
        serve(engine=engine, port=srv.port)
        rt.update_options(max_reply_seconds=GOLDEN_SECONDS)
        frames, text = await asyncio.wait_for(drain(await rt.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES and rt.conversation.connections == 2
        (conv,) = engine_sessions(engine)
        assert conv.instructions == case["system_prompt"]  # set up again ...
        # ... the text turns are replayed (a finished reply's words too, as text); audio turns and the cut
        # reply are lost
        assert conv.history[:-1] == [{"role": "assistant", "text": first_words, "audio_seconds": 0.0},
                                     {"role": "user", "text": "My order number is 42.", "audio_seconds": 0.0}]
        assert conv.history[-1]["role"] == "assistant"
        assert all(e.recoverable for e in errors)
        await rt.aclose()
        await until(lambda: engine.live_sessions == 0, 5, "the slot to be freed")

    run(main(), timeout=60)


# --- the backend on its own: cancel and truncate at awkward moments -----------------------------------------


def test_backend_cancel_and_truncate_before_the_reply_is_known_and_a_consumer_that_leaves(serve, case,
                                                                                          user_audio):
    srv = serve()
    greedy = SamplingOverrides(temperature=0.0)

    async def main():
        backend = RemoteBackend(srv.url, api_key=KEY)
        conv = await backend.open(voice=VoiceSpec(name="golden"), instructions=case["system_prompt"],
                                  sampling=greedy)
        server = server_conversation(srv)
        assert conv.id.startswith("sess_") and conv.instructions == case["system_prompt"]
        await conv.add_user_audio(user_audio.astype(np.float32) / 32768, 16000)  # resampled here, once
        assert abs(server.history[0]["audio_seconds"] - len(user_audio) / 16000) < 0.005

        # A truncation made before the reply is even sent applies as soon as the server names its item.
        stream = conv.respond(instructions=None, max_seconds=GOLDEN_SECONDS, sampling=greedy)
        assert conv.truncate(0.0) is None
        events = await asyncio.wait_for(_collect(stream), 10)
        done = events[-1]
        assert isinstance(done, ResponseDone) and done.text == "" and done.reason == "cancelled"
        assert all(isinstance(e, AudioChunk | TextDelta) for e in events[:-1])
        # The truncate can reach the server before it submitted the reply to its engine (then no assistant turn
        # is made) or after (then the turn is there, cut to nothing): either way no word of it is in the context.
        last = server.history[-1]
        assert last["role"] == "user" or (last["role"] == "assistant" and last["text"] == ""), last
        turns = len(server.history)

        # Cancelled before it was sent: nothing reaches the server.
        stream = conv.respond(instructions=None, max_seconds=GOLDEN_SECONDS, sampling=greedy)
        conv.cancel()
        events = await asyncio.wait_for(_collect(stream), 5)
        assert len(events) == 1 and events[0].reason == "cancelled" and events[0].usage.audio_frames == 0
        assert len(server.history) == turns

        # A consumer that leaves early cancels the reply and waits for its end: the next one starts at once.
        stream = conv.respond(instructions=None, max_seconds=30, sampling=greedy)
        async for event in stream:
            if isinstance(event, AudioChunk):
                break
        await asyncio.wait_for(stream.aclose(), 10)
        assert not server.replying and len(server.history) == turns + 1
        stream = conv.respond(instructions="Answer briefly.", max_seconds=GOLDEN_SECONDS, sampling=greedy)
        events = await asyncio.wait_for(_collect(stream), 20)
        chunks = [e for e in events if isinstance(e, AudioChunk)]
        assert len(chunks) == GOLDEN_FRAMES and [c.frame_index for c in chunks] == list(range(GOLDEN_FRAMES))
        assert all(c.pcm.dtype == np.float32 and c.pcm.shape == (1920,) for c in chunks)
        done = events[-1]
        assert done.reason == "max_frames" and done.usage.audio_frames == GOLDEN_FRAMES
        assert done.text == server.history[-1]["text"]  # the kept words, as the server's response.done says
        assert server.history[-2] == {"role": "system", "text": "Answer briefly.", "audio_seconds": 0.0}
        await conv.close()
        await until(lambda: srv.engine.live_sessions == 0, 5, "the slot to be freed")

    run(main(), timeout=40)


async def _collect(stream) -> list:
    return [event async for event in stream]


# --- backpressure -------------------------------------------------------------------------------------------


def test_a_stalled_consumer_stops_the_reader_and_memory_stays_bounded(serve, case, user_audio):
    srv = serve()

    async def main():
        rt = remote_model(srv, instructions=case["system_prompt"], max_reply_seconds=60).session()
        metrics: list[RealtimeModelMetrics] = []
        rt.on("metrics_collected", metrics.append)
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()
        event = await rt.generate_reply()
        message = await event.message_stream.__anext__()
        await message.audio_stream.__anext__()  # one frame, then nobody listens
        server_reply = server_conversation(srv).response
        reply = rt.conversation._latest
        await until(lambda: len(reply.inbox) == INBOX_EVENTS, 10, "the inbox to fill")
        await asyncio.sleep(0.3)
        received = reply.frames
        await asyncio.sleep(1.0)
        # the reader stopped reading, so what the plugin holds is bounded: the frame taken, the session's
        # queue and the one it waits to queue, the inbox, the one the reader waits to put
        assert reply.frames == received <= 1 + MAX_AHEAD_FRAMES + 1 + INBOX_EVENTS + 1
        assert len(reply.inbox) == INBOX_EVENTS and rt._generations[-1].audio_ch.qsize() == MAX_AHEAD_FRAMES
        # the rest waits in the sockets (TCP pushes back on the server) and was never read here
        assert not server_reply.finished and server_reply.frames_produced > received
        rt.interrupt()  # a barge-in still ends the held-back reply at once
        await until(lambda: metrics, 10, "the cancelled reply to end")
        assert metrics[0].cancelled and metrics[0].output_token_details.audio_tokens < 750
        await rt.aclose()
        await until(lambda: srv.engine.live_sessions == 0, 5, "the slot to be freed")

    run(main(), timeout=30)


# --- options ------------------------------------------------------------------------------------------------


def test_remote_options_are_validated_and_the_key_stays_private(monkeypatch):
    assert realtime_url("http://host:8000") == "ws://host:8000/v1/realtime"
    assert realtime_url("https://chroma.example.com/") == "wss://chroma.example.com/v1/realtime"
    assert realtime_url("ws://10.0.0.2:8000/v1") == "ws://10.0.0.2:8000/v1/realtime"
    url = "wss://h/proxy/v1/realtime?model=chroma-4b"
    assert realtime_url(url) == url
    for bad in ("localhost:8000", "ftp://host", "http://", ""):
        with pytest.raises(ValueError, match="remote mode"):
            chroma.RealtimeModel(base_url=bad or " ")
    url = "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="voices stored on the server"):
        chroma.RealtimeModel(base_url=url, voice_audio="anna.wav", voice_text="hi")
    with pytest.raises(ValueError, match="top_k and top_p"):
        chroma.RealtimeModel(base_url=url, top_k=5)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        chroma.RealtimeModel(base_url=url, temperature=3)
    with pytest.raises(ValueError, match="device, max_sessions"):
        chroma.RealtimeModel(base_url=url, device="cpu", max_sessions=2)
    with pytest.raises(ValueError, match="not both"):
        chroma.RealtimeModel(base_url=url, engine=object())

    monkeypatch.setenv("CHROMA_API_KEY", "secret-from-env-123")
    model = chroma.RealtimeModel(base_url=url, voice="anna")
    assert isinstance(model.backend, RemoteBackend) and model.options.api_key == "secret-from-env-123"
    assert model.backend.input_sample_rate == 24000 and model.engine is None and model.capacity() is None
    assert "secret" not in repr(model.options) and "secret" not in repr(model.backend)
    with pytest.raises(ValueError, match="top_k"):
        model.update_options(top_k=3)
    model.update_options(temperature=0.5)  # the one sampling setting the server takes
    assert model.options.temperature == 0.5
