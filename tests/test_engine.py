"""The conversation engine on the reference tiny checkpoint: exactness, KV reuse, batching, barge-in."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest

from chroma_agent.engine import engine as engine_module
from chroma_agent.engine.conversation import ConversationError
from chroma_agent.engine.engine import Engine, EngineBusyError, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import VoiceStore

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return ChromaModel.from_pretrained(tiny_dir, progress=False), ChromaProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def user_audio(user_pcm16) -> tuple[np.ndarray, int]:
    return user_pcm16, 16000


@pytest.fixture()
def engine(parts, tmp_path):
    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=3), voices=VoiceStore(tmp_path / "voices"),
                 sampling=GREEDY)
    yield eng
    eng.close()


@pytest.fixture()
def voice(engine, golden_dir, case):
    return engine.create_voice(golden_dir / "voice.wav", case["voice_text"], name="golden")


async def collect(conv, **kwargs) -> tuple[list, ResponseDone | ResponseError]:
    events = [ev async for ev in conv.respond(**kwargs)]
    return events, events[-1]


def codes_of(events) -> np.ndarray:
    return np.stack([e.codes for e in events if isinstance(e, AudioChunk)])


def test_single_turn_matches_the_golden_reply(engine, voice, case, user_audio, golden_outputs):
    async def run():
        conv = engine.open_conversation(voice, case["system_prompt"])
        conv.add_user_audio(*user_audio)
        return await collect(conv, max_frames=32)

    events, done = asyncio.run(run())
    assert isinstance(done, ResponseDone) and done.reason == "max_frames"
    np.testing.assert_array_equal(codes_of(events), golden_outputs["frames"])
    audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_allclose(audio, golden_outputs["waveform"], atol=1e-3)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == done.text == case["thinker_text"].replace("<|im_end|>", "")
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.frame_index for c in chunks] == list(range(32))
    assert all(c.pcm.shape == (1920,) and c.pcm.dtype == np.float32 for c in chunks)
    assert chunks[5].timestamp_ms == 400.0 and len(chunks[0].pcm16()) == 3840
    assert done.usage.prompt_tokens == 114 and done.usage.cached_tokens == 0 and done.usage.audio_frames == 32
    assert done.timings.time_to_first_audio_ms is not None and done.timings.real_time_factor > 0


def _three_turns(engine, voice, case, user_audio, *, fresh_last: bool):
    """Turn 1 audio, turn 2 text (reply cut by a barge-in), turn 3 audio. Returns the last reply's events."""

    async def run():
        conv = engine.open_conversation(voice, case["system_prompt"])
        conv.add_user_audio(*user_audio)
        _, d1 = await collect(conv, max_frames=10)
        conv.add_user_text("And what about tomorrow morning?")
        _, d2 = await collect(conv, max_frames=12)
        kept = conv.truncate(5 * 80.0)
        conv.add_user_audio(user_audio[0][: len(user_audio[0]) // 2], user_audio[1])
        if fresh_last:
            # The same conversation, prefilled from scratch in another row: no cached tokens.
            other = engine.open_conversation(voice)
            other.turns = copy.deepcopy(conv.turns)
            other.history = copy.deepcopy(conv.history)
            other.cached = 0
            conv.close()
            conv = other
        events, d3 = await collect(conv, max_frames=12)
        return conv, events, (d1, d2, d3), kept

    return asyncio.run(run())


def test_kv_reuse_equals_a_fresh_full_prefill(engine, voice, case, user_audio):
    conv, reused, dones, kept = _three_turns(engine, voice, case, user_audio, fresh_last=False)
    _, fresh, fresh_dones, _ = _three_turns(engine, voice, case, user_audio, fresh_last=True)
    assert all(isinstance(d, ResponseDone) for d in (*dones, *fresh_dones))
    np.testing.assert_array_equal(codes_of(reused), codes_of(fresh))
    assert dones[2].text == fresh_dones[2].text
    # Turn 3 prefilled only the new tokens; the fresh conversation re-read everything.
    assert dones[2].usage.cached_tokens > 0
    assert dones[2].usage.prompt_tokens + dones[2].usage.cached_tokens == fresh_dones[2].usage.prompt_tokens
    assert dones[2].usage.prompt_tokens < fresh_dones[2].usage.prompt_tokens / 2
    # The barge-in kept the text injected up to the fifth heard frame (steps 0, 2, 4: three tokens at most).
    assert kept == dones[1].text or len(kept) <= len(dones[1].text)
    roles = [h["role"] for h in conv.history]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]


def test_truncate_keeps_only_the_heard_text(engine, voice, case, user_audio):
    async def run():
        conv = engine.open_conversation(voice, case["system_prompt"])
        conv.add_user_audio(*user_audio)
        events, done = await collect(conv, max_frames=20)
        return conv, events, done

    conv, events, done = asyncio.run(run())
    full_ids = [e.token_id for e in events if isinstance(e, TextDelta)]
    assert len(full_ids) == 9  # tokens at steps 0, 2, ..., 16; the one at step 18 is <|im_end|>
    heard = conv.truncate(3 * 80.0)  # frames 0, 1, 2 were heard: tokens of steps 0 and 2
    expected = engine.processor.decode_text(full_ids[:2], skip_special_tokens=True)
    assert heard == expected
    turn = conv.turns[-1]
    assert turn.ids[turn.prompt_len :] == full_ids[:2] + engine.turn_end_ids
    assert conv.history[-1]["text"] == expected
    assert conv.cached <= len(conv.context_ids)
    assert conv.truncate(0.0) == ""  # nothing heard: an empty, closed assistant turn
    assert conv.turns[-1].ids[conv.turns[-1].prompt_len :] == engine.turn_end_ids
    with pytest.raises(ValueError):
        conv.truncate(float("nan"))


def test_truncate_before_any_reply_is_a_clear_error(engine, voice):
    conv = engine.open_conversation(voice)
    with pytest.raises(ConversationError, match="nothing to truncate"):
        conv.truncate(100)


def test_batched_sessions_equal_sessions_run_alone(engine, voice, case, user_audio):
    prompts = [
        ("audio", user_audio),
        ("text", "Tell me a story about the park."),
        ("audio", (user_audio[0][: len(user_audio[0]) * 2 // 3], user_audio[1])),
    ]

    def open_with(kind, value):
        conv = engine.open_conversation(voice, case["system_prompt"])
        if kind == "audio":
            conv.add_user_audio(*value)
        else:
            conv.add_user_text(value)
        return conv

    async def alone():
        results = []
        for kind, value in prompts:
            conv = open_with(kind, value)
            results.append(codes_of((await collect(conv, max_frames=16))[0]))
            conv.close()
        return results

    async def together():
        convs = [open_with(kind, value) for kind, value in prompts]
        outs = await asyncio.gather(*(collect(c, max_frames=16) for c in convs))
        steps = engine.stats["steps"]
        return [codes_of(events) for events, _ in outs], steps

    solo = asyncio.run(alone())
    steps_before = engine.stats["steps"]
    batched, steps_after = asyncio.run(together())
    for a, b in zip(solo, batched, strict=True):
        np.testing.assert_array_equal(a, b)
    # Three 16-frame replies shared steps: far fewer than 48 steps.
    assert steps_after - steps_before < 40


def test_cancel_stops_within_a_step(engine, voice, case, user_audio):
    async def run():
        conv = engine.open_conversation(voice, case["system_prompt"])
        conv.add_user_audio(*user_audio)
        events = []
        async for ev in conv.respond(max_frames=200):
            events.append(ev)
            if isinstance(ev, AudioChunk) and ev.frame_index == 2:
                conv.cancel()
        return conv, events

    conv, events = asyncio.run(run())
    done = events[-1]
    assert isinstance(done, ResponseDone) and done.reason == "cancelled"
    lookahead = round(engine.config.lookahead_s * 1000 / 80)
    assert done.usage.audio_frames <= 3 + lookahead + 1
    assert conv.reply is None


def test_generation_is_paced_by_the_consumer(parts, tmp_path, voice, case, user_audio):
    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=1, lookahead_s=0.4), voices=VoiceStore(tmp_path),
                 sampling=GREEDY)
    try:
        async def run():
            conv = eng.open_conversation(voice, case["system_prompt"])
            conv.add_user_audio(*user_audio)
            stream = conv.respond(max_frames=60)
            first = await anext(stream)
            assert isinstance(first, TextDelta | AudioChunk)
            await asyncio.sleep(1.0)  # the consumer stalls: generation must stop ~5 frames ahead
            produced = conv.reply.frames_produced
            rest = [ev async for ev in stream]
            return produced, rest[-1]

        produced, done = asyncio.run(run())
        assert produced <= 6
        assert isinstance(done, ResponseDone) and done.usage.audio_frames == 60
    finally:
        eng.close()


def test_slots_are_limited_and_freed_on_close(engine, voice, case, user_audio):
    convs = [engine.open_conversation(voice) for _ in range(3)]
    assert engine.free_slots == 0
    with pytest.raises(EngineBusyError, match="3 conversation slots"):
        engine.open_conversation(voice)
    t0 = time.monotonic()
    with pytest.raises(EngineBusyError):
        engine.open_conversation(voice, wait_s=0.2)
    assert time.monotonic() - t0 >= 0.2

    async def close_mid_reply():
        conv = convs[0]
        conv.add_user_audio(*user_audio)
        async for ev in conv.respond(max_frames=100):
            if isinstance(ev, AudioChunk):
                conv.close()
            if isinstance(ev, ResponseDone):
                return ev

    done = asyncio.run(close_mid_reply())
    assert done.reason == "cancelled"
    assert engine.free_slots == 1
    again = engine.open_conversation(voice)
    assert again.row == convs[0].row
    with pytest.raises(ConversationError, match="closed"):
        convs[0].add_user_text("hello?")


def test_a_failing_session_does_not_disturb_the_others(engine, voice, case, user_audio, monkeypatch):
    real_run_step = engine_module.run_step
    bad_rows: set[int] = set()

    def flaky_run_step(model, states, *args):
        if any(s.row in bad_rows for s in states):
            raise RuntimeError("simulated device fault")
        return real_run_step(model, states, *args)

    monkeypatch.setattr(engine_module, "run_step", flaky_run_step)

    async def run():
        good = engine.open_conversation(voice, case["system_prompt"])
        bad = engine.open_conversation(voice, case["system_prompt"])
        for conv in (good, bad):
            conv.add_user_audio(*user_audio)
        bad_rows.add(bad.row)
        (good_events, good_done), (_, bad_done) = await asyncio.gather(
            collect(good, max_frames=12), collect(bad, max_frames=12)
        )
        bad_rows.clear()
        _, retry = await collect(bad, max_frames=4)
        return good_events, good_done, bad_done, retry

    good_events, good_done, bad_done, retry = asyncio.run(run())
    assert isinstance(bad_done, ResponseError) and "simulated device fault" in bad_done.message
    assert isinstance(good_done, ResponseDone) and good_done.usage.audio_frames == 12
    assert isinstance(retry, ResponseDone) and retry.usage.audio_frames == 4
    assert engine.stats["errors"] == 1


def test_voice_prefix_is_computed_once(engine, voice, case, monkeypatch):
    calls = []
    real = engine_module.prefill_voice
    monkeypatch.setattr(engine_module, "prefill_voice", lambda *a: calls.append(1) or real(*a))

    async def run():
        for _ in range(2):
            conv = engine.open_conversation(voice)
            for _ in range(2):
                conv.add_user_text("Hi!")
                await collect(conv, max_frames=2)
            conv.close()

    asyncio.run(run())
    assert len(calls) == 1


def test_memory_stays_flat_over_1000_short_turns(parts, tmp_path, voice):
    import resource

    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=1, thinker_context=256), voices=VoiceStore(tmp_path),
                 sampling=GREEDY)
    try:
        async def run() -> list[int]:
            conv = eng.open_conversation(voice, "Be brief.")
            rss = []
            for i in range(1000):
                conv.add_user_text(f"Turn {i}, hello.")
                _, done = await collect(conv, max_frames=1)
                assert isinstance(done, ResponseDone)
                if i in (200, 999):
                    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            assert len(conv.context_ids) <= 256  # old turns were dropped, the instructions kept
            assert conv.turns[0].role == "system" and conv.turns[0].text == "Be brief."
            return rss

        rss = asyncio.run(run())
        assert rss[1] - rss[0] < 50 * 1024  # KiB: no growth beyond noise after warm-up
    finally:
        eng.close()


def test_mixed_user_message_is_one_turn_like_the_reference(engine, voice, user_audio):
    """Text and audio parts of one message stay one user turn: the same ids the processor gives the whole."""
    conv = engine.open_conversation(voice, "You are Chroma.")
    conv.add_user_message(["Listen to this: ", user_audio, " What did I say?"])
    assert [t.role for t in conv.turns] == ["system", "user"]
    messages = [
        {"role": "system", "content": "You are Chroma."},
        {"role": "user", "content": [
            {"type": "text", "text": "Listen to this: "},
            {"type": "audio", "audio": user_audio[0], "sample_rate": user_audio[1]},
            {"type": "text", "text": " What did I say?"},
        ]},
    ]
    expected = engine.processor.encode_messages(messages)
    rendered = conv.context_ids + engine.processor.tokenizer(
        "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert rendered == expected.input_ids[0].tolist()
    assert conv.history[-1]["text"] == "Listen to this:  What did I say?"
    with pytest.raises(ValueError, match="empty"):
        conv.add_user_message(["   "])
