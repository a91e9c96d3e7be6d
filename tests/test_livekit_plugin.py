"""The LiveKit plugin: `livekit.plugins.chroma.RealtimeModel` inside a real `livekit.agents.AgentSession`.

No LiveKit server can run here, so the room is replaced by the session's own I/O hooks: `session.input.audio`
is fed the golden user clip (user1.wav, 16 kHz) and `session.output.audio` is a sink that plays frames back in
real time (it holds capture like a room's audio source does, and reports what was heard when cleared). Turns
are committed explicitly (`turn_detection="manual"`, `session.commit_user_turn()`), which is what a VAD or
turn detector does when the user stops. Everything else (speech scheduling, interruption, truncation, chat
context, metrics) is AgentSession's own code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np
import pytest
from conftest import EngineState
from livekit import rtc
from livekit.agents import Agent, AgentSession, llm, utils
from livekit.agents.metrics import RealtimeModelMetrics
from livekit.agents.voice.io import AudioInput, AudioOutput, AudioOutputCapabilities, TextOutput
from livekit.plugins import chroma

GOLDEN_FRAMES = 32  # the golden reply is 32 frames long (stopped by max_new_frames)
GOLDEN_SECONDS = GOLDEN_FRAMES * 0.08


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def as_pcm16(x: np.ndarray) -> np.ndarray:
    """What 16-bit PCM can carry of a float waveform (the tiny random model overshoots [-1, 1])."""
    return np.clip(x, -1.0, 32767 / 32768)


def pcm_frames(samples: np.ndarray, rate: int, ms: int = 10) -> list[rtc.AudioFrame]:
    """int16 samples ([n] or [n, channels]) as LiveKit frames of `ms` milliseconds."""
    x = samples if samples.ndim == 2 else samples[:, None]
    step = rate * ms // 1000
    chunks = [np.ascontiguousarray(x[i : i + step]) for i in range(0, len(x), step)]
    return [rtc.AudioFrame(c.tobytes(), rate, x.shape[1], len(c)) for c in chunks]


class FeedInput(AudioInput):
    """Audio the test pushes, read by AgentSession like a room participant's track."""

    def __init__(self) -> None:
        super().__init__(label="test-input")
        self.ch = utils.aio.Chan[rtc.AudioFrame]()

    async def __anext__(self) -> rtc.AudioFrame:
        return await self.ch.__anext__()


class RealTimeSink(AudioOutput):
    """Plays frames in real time (capture blocks once `ahead_s` is queued, as a room's audio source does)."""

    def __init__(self, ahead_s: float = 0.3) -> None:
        super().__init__(label="test-sink", capabilities=AudioOutputCapabilities(pause=False))
        self.ahead_s = ahead_s
        self.stall_at = math.inf  # playback stops advancing here (a deterministic point to barge in at)
        self.frames: list[rtc.AudioFrame] = []
        self.segments: list[list[rtc.AudioFrame]] = []
        self._segment: list[rtc.AudioFrame] = []
        self._start = 0.0
        self._pushed = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def played(self) -> float:
        return min(self._pushed, time.time() - self._start, self.stall_at) if self._pushed else 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._pushed:
            self._start = time.time()
            self.on_playback_started(created_at=self._start)
        self.frames.append(frame)
        self._segment.append(frame)
        self._pushed += frame.duration
        while self._pushed - self.played() > self.ahead_s:
            await asyncio.sleep(0.01)

    def flush(self) -> None:
        super().flush()
        self.segments.append(self._segment)
        self._segment = []
        if not self._pushed:
            return
        if self.stall_at < math.inf:
            return  # stalled: only clear_buffer ends this segment
        delay = max(0.0, self._pushed - (time.time() - self._start))
        self._timer = asyncio.get_running_loop().call_later(delay, self._finish, False)

    def _finish(self, interrupted: bool) -> None:
        position = self.played() if interrupted else self._pushed
        self._pushed = 0.0
        self.on_playback_finished(playback_position=position, interrupted=interrupted)

    def clear_buffer(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self._segment:
            self.segments.append(self._segment)
            self._segment = []
        if self._pushed:
            self._finish(True)


class CollectText(TextOutput):
    def __init__(self) -> None:
        super().__init__(label="test-text", next_in_chain=None)
        self.text = ""

    async def capture_text(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


class RecordingAgent(Agent):
    """Records the transcript exactly as the model streams it (before the playback synchroniser)."""

    def __init__(self, instructions: str) -> None:
        super().__init__(instructions=instructions)
        self.streamed: list[str] = []

    async def transcription_node(self, text, model_settings):
        self.streamed.append("")
        async for delta in text:
            self.streamed[-1] += delta
            yield delta


@pytest.fixture(scope="module")
def user_audio(user_pcm16) -> np.ndarray:
    return user_pcm16


@pytest.fixture()
def engine(make_engine, golden_voice):
    return make_engine(golden_default_voice=golden_voice, max_sessions=2)


def make_model(engine, **kwargs) -> chroma.RealtimeModel:
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_reply_seconds", GOLDEN_SECONDS)
    return chroma.RealtimeModel(engine=engine, **kwargs)


def engine_conversation(rt: chroma.RealtimeSession) -> EngineState:
    conv = rt.conversation.conversation
    return EngineState(conv.engine, conv.id)


# --- a real AgentSession ------------------------------------------------------------------------------------


def test_agent_session_speaks_is_interrupted_and_goes_on(engine, case, user_audio, golden_outputs):
    async def main():
        session = AgentSession(
            llm=make_model(engine),
            vad=None,
            turn_handling={"turn_detection": "manual"},
            user_away_timeout=None,
            aec_warmup_duration=None,
        )
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

        async def user_turn() -> None:
            for frame in pcm_frames(user_audio, 16000):
                audio_in.ch.send_nowait(frame)
            await until(lambda: abs(rt.pending_audio_seconds - len(user_audio) / 16000) < 1e-9,
                        what="the user's audio to reach the model")
            session.commit_user_turn()

        def replies() -> list[llm.ChatMessage]:
            return [m for m in session.history.messages() if m.role == "assistant"]

        # Turn 1 is the golden case: same system prompt, voice, user audio and greedy decoding.
        await user_turn()
        await until(lambda: len(replies()) == 1 and session.agent_state == "listening", 15, "the first reply")
        assert len(sink.frames) == GOLDEN_FRAMES
        assert all(f.sample_rate == 24000 and f.num_channels == 1 and f.samples_per_channel == 1920
                   for f in sink.frames)
        audio = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in sink.frames]) / 32768.0
        np.testing.assert_allclose(audio, as_pcm16(golden_outputs["waveform"]), atol=1e-3 + 1 / 32768)
        golden_text = case["thinker_text"].replace("<|im_end|>", "")
        assert agent.streamed[0] == golden_text
        assert replies()[0].text_content == golden_text and not replies()[0].interrupted
        assert len(metrics) == 1 and not metrics[0].cancelled
        m = metrics[0]
        assert 0 < m.ttft < m.duration < 15 and m.output_token_details.audio_tokens == GOLDEN_FRAMES
        assert m.input_tokens > 0 and m.metadata.model_provider == "chroma"

        # Turn 2: the user interrupts 160 ms into the reply; only what was heard stays in Chroma's context.
        first = len(sink.frames)
        sink.stall_at = 0.16
        await user_turn()
        # playback stalls at 160 ms and the sink takes 0.3 s more: 6 frames, then the reply is held back
        await until(lambda: sink.played() == 0.16 and len(sink.frames) - first >= 6, 15, "the reply to play")
        words = rt._generations[-1].text  # what the model has said so far (the plugin's own record)
        await session.interrupt()
        sink.stall_at = math.inf
        await until(lambda: len(metrics) == 2 and session.agent_state == "listening", 10, "the interruption")
        await until(lambda: any(m.interrupted for m in replies()), 5, "the interrupted message")
        conv = engine_conversation(rt)
        kept = conv.history[-1]["text"]
        assert words.startswith(kept) and len(kept) < len(words), (kept, words)
        mirror = [m for m in rt.chat_ctx.messages() if m.role == "assistant"]
        assert (mirror[-1].text_content or "") == kept
        # pacing held the reply back while the caller listened, so the interruption cancelled it early
        assert len(sink.segments[-1]) <= 8 and metrics[1].cancelled
        assert metrics[1].output_token_details.audio_tokens < GOLDEN_FRAMES

        # Turn 3: the conversation goes on after the barge-in.
        third = len(sink.frames)
        await user_turn()
        await until(lambda: len(metrics) == 3 and session.agent_state == "listening", 15, "the third reply")
        assert len(sink.frames) - third == GOLDEN_FRAMES
        assert [t["role"] for t in conv.history] == ["user", "assistant"] * 3
        assert conv.instructions == case["system_prompt"]

        # A typed turn goes through update_chat_ctx as text.
        fourth = len(sink.frames)
        await session.generate_reply(user_input="Thank you!")
        await until(lambda: len(metrics) == 4 and session.agent_state == "listening", 15, "the fourth reply")
        assert len(sink.frames) - fourth == GOLDEN_FRAMES
        assert conv.history[-2] == {"role": "user", "text": "Thank you!", "audio_seconds": 0.0}
        assert conv.history[-1]["text"] == agent.streamed[3]  # (the tiny model may say no words at all)
        assert "Thank you!" in [m.text_content for m in session.history.messages() if m.role == "user"]
        assert not errors

        await session.aclose()
        assert engine.live_sessions == 0

    run(main(), timeout=90)


# --- the RealtimeSession on its own ---------------------------------------------------------------------


async def drain(event: llm.GenerationCreatedEvent) -> tuple[list[rtc.AudioFrame], str]:
    frames, text = [], ""
    async for message in event.message_stream:
        async def read_text(stream=message.text_stream):
            nonlocal text
            async for delta in stream:
                text += delta

        text_task = asyncio.create_task(read_text())
        async for frame in message.audio_stream:
            frames.append(frame)
        await text_task
    async for _ in event.function_stream:
        pass
    return frames, text


def test_generate_reply_resolves_at_once_streams_close_and_reports_metrics(engine, user_audio, case):
    async def main():
        model = make_model(engine, instructions=case["system_prompt"], max_reply_seconds=0.8)
        rt = model.session()
        metrics, errors = [], []
        rt.on("metrics_collected", metrics.append)
        rt.on("error", errors.append)
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()
        t0 = time.perf_counter()
        fut = rt.generate_reply()
        event = await asyncio.wait_for(fut, 2.0)
        assert time.perf_counter() - t0 < 2.0 and event.user_initiated and event.response_id
        frames, text = await asyncio.wait_for(drain(event), 20)
        assert len(frames) == 10 and text
        await until(lambda: metrics, what="metrics")
        m = metrics[0]
        assert m.request_id == event.response_id and not m.cancelled
        assert 0 < m.ttft <= m.duration and m.output_token_details.audio_tokens == 10
        assert m.output_token_details.text_tokens > 0 and m.tokens_per_second > 0
        assert m.input_tokens > m.input_token_details.cached_tokens >= 0
        assert not errors
        roles = [(m.role, bool(m.content)) for m in rt.chat_ctx.messages()]
        assert roles == [("user", False), ("assistant", True)]
        await rt.aclose()
        assert engine.live_sessions == 0

    run(main())


def test_interrupt_before_the_first_frame_and_truncate_do_not_fail(engine, user_audio):
    async def main():
        rt = make_model(engine).session()
        errors = []
        rt.on("error", errors.append)
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()
        event = await rt.generate_reply()
        message = await event.message_stream.__anext__()
        rt.interrupt()  # before any frame: the reply may not even have started
        rt.truncate(message_id=message.message_id, modalities=["audio", "text"], audio_end_ms=0)
        rt.truncate(message_id=message.message_id, modalities=["audio", "text"], audio_end_ms=0)
        frames, _ = await asyncio.wait_for(drain_message(event, message), 10)
        assert len(frames) < GOLDEN_FRAMES

        # Started but not yet heard: truncating to 0 ms keeps none of its words.
        event = await rt.generate_reply()
        message = await event.message_stream.__anext__()
        await until(lambda: rt.conversation is not None and engine_conversation(rt).replying,
                    what="the reply to start")
        rt.truncate(message_id=message.message_id, modalities=["audio", "text"], audio_end_ms=0)
        rt.interrupt()
        await asyncio.wait_for(drain_message(event, message), 10)
        await until(lambda: not engine_conversation(rt).replying, what="the reply to stop")
        assert engine_conversation(rt).history[-1] == {"role": "assistant", "text": "", "audio_seconds":
                                                       engine_conversation(rt).history[-1]["audio_seconds"]}

        # An unknown message id and a truncate after the end are harmless too; the session still answers.
        rt.truncate(message_id="nope", modalities=["audio"], audio_end_ms=100)
        frames, text = await asyncio.wait_for(drain(await rt.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES
        assert not errors
        await rt.aclose()

    run(main())


async def drain_message(event, message) -> tuple[list[rtc.AudioFrame], str]:
    frames = [f async for f in message.audio_stream]
    text = "".join([t async for t in message.text_stream])
    async for _ in event.message_stream:
        pass
    async for _ in event.function_stream:
        pass
    return frames, text


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (48000, 2), (24000, 1), (16000, 2)])
def test_push_audio_resamples_any_rate_once(engine, user_audio, rate, channels):
    import soxr

    async def main():
        rt = make_model(engine).session()
        mono = soxr.resample(user_audio.astype(np.float32) / 32768, 16000, rate)
        pcm = np.clip(np.rint(mono * 32767), -32768, 32767).astype(np.int16)
        if channels == 2:
            pcm = np.stack([pcm, pcm], axis=1)
        for frame in pcm_frames(pcm, rate, ms=20):
            rt.push_audio(frame)
        rt.commit_audio()
        await until(lambda: rt.conversation is not None and len(engine_conversation(rt).history) == 1,
                    what="the user turn")
        expected = len(mono) * 16000 / rate
        assert abs(engine_conversation(rt).turns[-1].audio_seconds * 16000 - expected) <= 2
        assert rt.pending_audio_seconds == 0
        await rt.aclose()

    run(main())


def test_update_chat_ctx_adds_text_turns_and_keeps_what_it_cannot_change(engine, caplog):
    async def main():
        rt = make_model(engine, instructions="Be brief.").session()
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content="My order number is 42.")
        ctx.add_message(role="assistant", content="Thanks, I found order 42.")
        await rt.update_chat_ctx(ctx)
        ctx = rt.chat_ctx.copy()
        ctx.add_message(role="user", content="When will it arrive?")
        ctx.add_message(role="system", content="The caller is a premium customer.")
        await rt.update_chat_ctx(ctx)
        await rt.update_instructions("Be very brief.")
        await until(lambda: rt.conversation is not None and len(engine_conversation(rt).history) == 4,
                    what="the text turns")
        conv = engine_conversation(rt)
        assert [(t["role"], t["text"]) for t in conv.history] == [
            ("user", "My order number is 42."), ("assistant", "Thanks, I found order 42."),
            ("user", "When will it arrive?"), ("system", "The caller is a premium customer."),
        ]
        await until(lambda: conv.instructions == "Be very brief.", what="the new instructions")

        # Removing an earlier turn is not possible: it stays (with a warning); unchanged items add nothing.
        ctx = rt.chat_ctx.copy()
        ctx.items.pop(0)
        with caplog.at_level(logging.WARNING, logger="livekit.plugins.chroma"):
            await rt.update_chat_ctx(ctx)
        assert "cannot remove earlier turns" in caplog.text
        assert len(rt.chat_ctx.items) == 4
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES
        assert len(conv.history) == 5

        # Removing the latest reply drops its words from the context.
        ctx = rt.chat_ctx.copy()
        ctx.items.pop()
        await rt.update_chat_ctx(ctx)
        await until(lambda: conv.history[-1]["text"] == "", what="the reply to be dropped")
        await rt.aclose()

    run(main())


def test_update_tools_is_accepted_and_ignored(engine, caplog):
    async def main():
        @llm.function_tool
        async def lookup(order: str) -> str:
            """Look an order up."""
            return "shipped"

        rt = make_model(engine).session()
        with caplog.at_level(logging.WARNING, logger="livekit.plugins.chroma"):
            await rt.update_tools([lookup])
            await rt.update_tools([lookup])
        assert caplog.text.count("no function calling") == 1
        assert "lookup" in rt.tools.function_tools
        rt.update_options(tool_choice="auto", temperature=0.5)
        await rt.aclose()

    run(main())


def test_engine_busy_is_a_recoverable_error_and_the_session_recovers(make_engine, golden_voice, user_audio):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)

    async def main():
        model = make_model(engine, instructions="You are Chroma.")
        first = model.session()
        await until(lambda: first.conversation is not None, what="the first conversation")
        second = model.session()
        errors: list[llm.RealtimeModelError] = []
        second.on("error", errors.append)
        await until(lambda: errors, what="the busy error")
        assert errors[0].recoverable and "slots are in use" in str(errors[0].error)

        for frame in pcm_frames(user_audio, 16000):
            second.push_audio(frame)
        second.commit_audio()
        frames, text = await asyncio.wait_for(drain(await second.generate_reply()), 10)
        assert frames == [] and text == ""
        await until(lambda: len(errors) == 2, what="the failed reply's error")
        assert all(e.recoverable for e in errors)

        await first.aclose()  # a slot frees up: the next reply opens the conversation
        frames, _ = await asyncio.wait_for(drain(await second.generate_reply()), 20)
        assert len(frames) == GOLDEN_FRAMES
        await second.aclose()
        assert engine.live_sessions == 0

    run(main())


def test_unknown_voice_is_an_unrecoverable_error(engine):
    async def main():
        rt = make_model(engine, voice="nobody").session()
        errors: list[llm.RealtimeModelError] = []
        rt.on("error", errors.append)
        await until(lambda: errors, what="the error")
        assert not errors[0].recoverable and "unknown voice 'nobody'" in str(errors[0].error)
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 5)
        assert frames == []
        await rt.aclose()

    run(main())


def test_voice_cloned_on_the_fly_speaks_like_the_stored_profile(make_engine, golden_dir, case, user_audio,
                                                                 golden_outputs):
    engine = make_engine(max_sessions=1)  # no default voice: the model clones one

    async def main():
        model = make_model(engine, voice_audio=golden_dir / "voice.wav", voice_text=case["voice_text"],
                           instructions=case["system_prompt"])
        rt = model.session()
        for frame in pcm_frames(user_audio, 16000):
            rt.push_audio(frame)
        rt.commit_audio()
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 20)
        audio = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames]) / 32768.0
        np.testing.assert_allclose(audio, as_pcm16(golden_outputs["waveform"]), atol=1e-3 + 1 / 32768)
        await rt.aclose()

    run(main())


def test_options_are_validated():
    with pytest.raises(ValueError, match="remote mode"):
        chroma.RealtimeModel(base_url="ftp://localhost:8000")  # only http(s)/ws(s) servers
    with pytest.raises(ValueError, match="either voice"):
        chroma.RealtimeModel(voice="anna", voice_audio="anna.wav", voice_text="hi")
    with pytest.raises(ValueError, match="voice_text"):
        chroma.RealtimeModel(voice_audio="anna.wav")
    with pytest.raises(ValueError, match="temperature"):
        chroma.RealtimeModel(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        chroma.RealtimeModel(top_p=0)
    with pytest.raises(ValueError, match="max_reply_seconds"):
        chroma.RealtimeModel(max_reply_seconds=0)
    model = chroma.RealtimeModel(voice="support-anna")
    assert model.model == "FlashLabs/Chroma-4B" and model.provider == "chroma"
    caps = model.capabilities
    assert caps.audio_output and caps.message_truncation and caps.mutable_chat_context
    assert not caps.turn_detection and not caps.user_transcription and not caps.manual_function_calls


def test_engines_are_shared_per_process(tiny_dir):
    try:
        a = chroma.load_engine(tiny_dir, device="cpu", dtype="float32", max_sessions=1)
        model = chroma.RealtimeModel(model=str(tiny_dir), device="cpu", dtype="float32")
        model.prewarm()
        assert model.engine is a and chroma.load_engine(str(tiny_dir), device="cpu", dtype="auto") is a
        assert model.capacity() == (0, 1)
        assert list(chroma.loaded_engines()) == [(str(tiny_dir), "cpu", "float32")]
    finally:
        chroma.close_engines()
    assert chroma.loaded_engines() == {}


def test_plugin_lives_beside_the_other_livekit_plugins():
    from livekit.agents import Plugin
    from livekit.plugins import openai, silero

    assert openai.realtime.RealtimeModel and silero.VAD
    assert any(p.package == "livekit.plugins.chroma" for p in Plugin.registered_plugins)


def test_silero_vad_ends_the_turn_and_the_agent_answers(engine, case, user_audio):
    """The product's path: no manual commits, the session's VAD decides when the user has finished."""
    from livekit.plugins import silero

    async def main():
        session = AgentSession(llm=make_model(engine), vad=silero.VAD.load(), user_away_timeout=None,
                               aec_warmup_duration=None)
        audio_in, sink = FeedInput(), RealTimeSink()
        session.input.audio = audio_in
        session.output.audio = sink
        await session.start(Agent(instructions=case["system_prompt"]))
        speech = np.concatenate([np.zeros(8000, np.int16), user_audio, np.zeros(32000, np.int16)])
        for i, frame in enumerate(pcm_frames(speech, 16000, ms=20)):
            audio_in.ch.send_nowait(frame)
            if i % 10 == 9:
                await asyncio.sleep(0.05)  # 4x faster than real time
        await until(lambda: len(sink.frames) == GOLDEN_FRAMES and session.agent_state == "listening", 20,
                    "the reply to the spoken turn")
        conv = engine_conversation(session._activity.realtime_llm_session)
        assert [t["role"] for t in conv.history] == ["user", "assistant"]
        assert conv.instructions == case["system_prompt"]
        assert len(user_audio) / 16000 < conv.history[0]["audio_seconds"] < len(speech) / 16000 + 1
        await session.aclose()

    run(main())


def test_a_reply_to_an_empty_conversation_is_an_error_not_a_crash(engine):
    async def main():
        rt = make_model(engine).session()  # no instructions, no turns
        errors: list[llm.RealtimeModelError] = []
        rt.on("error", errors.append)
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply()), 10)
        assert frames == [] and errors[0].recoverable and "nothing to reply to" in str(errors[0].error)
        frames, _ = await asyncio.wait_for(drain(await rt.generate_reply(instructions="Say hello.")), 20)
        assert len(frames) == GOLDEN_FRAMES
        await rt.aclose()

    run(main())
