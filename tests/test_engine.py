"""The conversation engine on the reference tiny checkpoint: exactness, KV reuse, batching, barge-in."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest
import torch

from chroma_agent.engine import engine as engine_module
from chroma_agent.engine.conversation import ConversationError
from chroma_agent.engine.engine import Engine, EngineBusyError, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.voices import VoiceStore

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def parts(tiny_parts):
    return tiny_parts


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
    return engine.create_voice(golden_dir / "voice.wav", case["voice_text"], name="golden").result()


async def collect(conv, **kwargs) -> tuple[list, ResponseDone | ResponseError]:
    events = [ev async for ev in conv.respond(**kwargs)]
    return events, events[-1]


def codes_of(events) -> np.ndarray:
    return np.stack([e.codes for e in events if isinstance(e, AudioChunk)])


def on_engine_thread(engine: Engine, fn):
    """Run fn() on the engine thread between steps (tests reach into engine state only this way)."""
    return engine.post(None, None, lambda *_: fn()).result(timeout=30)


def as_pcm16(x: np.ndarray) -> np.ndarray:
    """What 16-bit PCM can carry of a float waveform (the tiny random model overshoots [-1, 1])."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 32768), -32768, 32767) / 32768


def test_single_turn_matches_the_golden_reply(engine, voice, case, user_audio, golden_outputs):
    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        return await collect(conv, max_frames=32)

    events, done = asyncio.run(run())
    assert isinstance(done, ResponseDone) and done.reason == "max_frames"
    np.testing.assert_array_equal(codes_of(events), golden_outputs["frames"])
    # The step decodes audio on the device and hands out PCM16: compare at that resolution.
    audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_allclose(audio, as_pcm16(golden_outputs["waveform"]), atol=1e-3 + 1 / 32768)
    assert np.abs(audio).max() > 0.5  # the comparison above is not between two silences
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == done.text == case["thinker_text"].replace("<|im_end|>", "")
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.frame_index for c in chunks] == list(range(32))
    assert all(c.pcm.shape == (1920,) and c.pcm.dtype == np.float32 for c in chunks)
    assert chunks[5].timestamp_ms == 400.0 and len(chunks[0].pcm16()) == 3840
    assert chunks[0].pcm16() == np.rint(chunks[0].pcm * 32768).astype("<i2").tobytes()
    assert done.usage.prompt_tokens == 114 and done.usage.cached_tokens == 0 and done.usage.audio_frames == 32
    assert done.timings.time_to_first_audio_ms is not None and done.timings.real_time_factor > 0


def _three_turns(engine, voice, case, user_audio, *, fresh_last: bool):
    """Turn 1 audio, turn 2 text (reply cut by a barge-in), turn 3 audio. Returns the last reply's events."""

    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        _, d1 = await collect(conv, max_frames=10)
        await conv.add_user_text("And what about tomorrow morning?")
        _, d2 = await collect(conv, max_frames=12)
        kept = await conv.truncate(5 * 80.0)
        await conv.add_user_audio(user_audio[0][: len(user_audio[0]) // 2], user_audio[1])
        if fresh_last:
            # The same conversation, prefilled from scratch in another row: no cached tokens.
            other = await engine.open_conversation(voice)

            def copy_context():
                source = engine._sessions[conv.id].context
                target = engine._sessions[other.id].context
                target.turns = copy.deepcopy(source.turns)
                target.cached = 0

            on_engine_thread(engine, copy_context)
            await conv.close()
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
    view = conv.inspect().result()
    assert [t.role for t in view.turns] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]


def test_truncate_keeps_only_the_heard_text(engine, voice, case, user_audio):
    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        events, done = await collect(conv, max_frames=20)
        return conv, events, done

    conv, events, done = asyncio.run(run())
    full_ids = [e.token_id for e in events if isinstance(e, TextDelta)]
    assert len(full_ids) == 9  # tokens at steps 0, 2, ..., 16; the one at step 18 is <|im_end|>
    heard = conv.truncate(3 * 80.0).result()  # frames 0, 1, 2 were heard: tokens of steps 0 and 2
    expected = engine.processor.decode_text(full_ids[:2], skip_special_tokens=True)
    assert heard == expected
    view = conv.inspect().result()
    header = len(engine.processor.pieces.assistant_header)
    turn_ids = view.ids[len(view.ids) - view.turns[-1].tokens:]
    assert turn_ids[header:] == full_ids[:2] + engine.processor.pieces.turn_end
    assert view.turns[-1].text == expected
    assert view.cached <= len(view.ids)
    assert conv.truncate(0.0).result() == ""  # nothing heard: an empty, closed assistant turn
    view = conv.inspect().result()
    assert view.ids[len(view.ids) - view.turns[-1].tokens + header:] == engine.processor.pieces.turn_end
    with pytest.raises(ValueError):
        conv.truncate(float("nan"))


def test_truncate_before_any_reply_is_a_clear_error(engine, voice):
    conv = engine.open_conversation(voice).result()
    with pytest.raises(ConversationError, match="nothing to truncate"):
        conv.truncate(100).result()


def test_batched_sessions_equal_sessions_run_alone(engine, voice, case, user_audio):
    prompts = [
        ("audio", user_audio),
        ("text", "Tell me a story about the park."),
        ("audio", (user_audio[0][: len(user_audio[0]) * 2 // 3], user_audio[1])),
    ]

    async def open_with(kind, value):
        conv = await engine.open_conversation(voice, case["system_prompt"])
        if kind == "audio":
            await conv.add_user_audio(*value)
        else:
            await conv.add_user_text(value)
        return conv

    async def alone():
        results = []
        for kind, value in prompts:
            conv = await open_with(kind, value)
            results.append(codes_of((await collect(conv, max_frames=16))[0]))
            await conv.close()
        return results

    async def together():
        convs = [await open_with(kind, value) for kind, value in prompts]
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
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        events = []
        async for ev in conv.respond(max_frames=200):
            events.append(ev)
            if isinstance(ev, AudioChunk) and ev.frame_index == 2:
                conv.cancel()
        return conv, events

    conv, events = asyncio.run(run())
    done = events[-1]
    assert isinstance(done, ResponseDone) and done.reason == "cancelled"
    # nothing of a cancelled reply is handed out after the cancel
    assert [e.frame_index for e in events if isinstance(e, AudioChunk)] == [0, 1, 2]
    lookahead = round(engine.config.lookahead_s * 1000 / 80)
    assert done.usage.audio_frames <= 3 + lookahead + 2
    conv.add_user_text("again").result()  # the conversation takes the next turn


def test_generation_is_paced_by_the_consumer(parts, tmp_path, voice, case, user_audio):
    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=1, lookahead_s=0.4), voices=VoiceStore(tmp_path),
                 sampling=GREEDY)
    try:
        async def run():
            conv = await eng.open_conversation(voice, case["system_prompt"])
            await conv.add_user_audio(*user_audio)
            stream = conv.respond(max_frames=60)
            events = aiter(stream)
            first = await anext(events)
            assert isinstance(first, TextDelta | AudioChunk)
            await asyncio.sleep(1.0)  # the consumer stalls: generation must stop ~5 frames ahead
            produced = stream.frames_produced
            rest = [ev async for ev in events]
            return produced, rest[-1]

        produced, done = asyncio.run(run())
        assert produced <= 7  # 5 frames of lookahead, decided per pair of steps
        assert isinstance(done, ResponseDone) and done.usage.audio_frames == 60
    finally:
        eng.close()


def test_slots_are_limited_and_freed_on_close(engine, voice, case, user_audio):
    convs = [engine.open_conversation(voice).result() for _ in range(3)]
    assert engine.free_slots == 0
    with pytest.raises(EngineBusyError, match="3 conversation slots"):
        engine.open_conversation(voice).result()
    t0 = time.monotonic()
    with pytest.raises(EngineBusyError):
        engine.open_conversation(voice, wait_s=0.2).result()
    assert time.monotonic() - t0 >= 0.2

    async def close_mid_reply():
        conv = convs[0]
        await conv.add_user_audio(*user_audio)
        async for ev in conv.respond(max_frames=100):
            if isinstance(ev, AudioChunk):
                conv.close()
            if isinstance(ev, ResponseDone):
                return ev

    done = asyncio.run(close_mid_reply())
    assert done.reason == "cancelled"
    on_engine_thread(engine, lambda: None)  # the close has been applied
    assert engine.free_slots == 1
    again = engine.open_conversation(voice).result()
    assert again.row == convs[0].row
    with pytest.raises(ConversationError, match="closed"):
        convs[0].add_user_text("hello?")


def test_slot_waiters_are_served_first_come_first_served(engine, voice):
    convs = [engine.open_conversation(voice).result() for _ in range(3)]
    waiting = [engine.open_conversation(voice, wait_s=10) for _ in range(2)]
    time.sleep(0.1)
    assert not any(w.done() for w in waiting)
    t0 = time.monotonic()
    convs[1].close()
    first = waiting[0].result(timeout=5)
    assert time.monotonic() - t0 < 1.0  # the freed slot went to the first waiter at once
    assert first.row == convs[1].row and not waiting[1].done()
    convs[2].close()
    assert waiting[1].result(timeout=5).row == convs[2].row


def test_a_non_finite_reply_fails_alone_and_leaves_clean_rows(engine, voice, case, user_audio, golden_outputs):
    """NaN in one conversation's row (here planted in its KV cache) fails that reply only; its row is scrubbed,
    the conversation answers again, and the golden reply is still exact on the same engine afterwards."""
    async def run():
        good = await engine.open_conversation(voice, case["system_prompt"])
        bad = await engine.open_conversation(voice, case["system_prompt"])
        for conv in (good, bad):
            await conv.add_user_audio(*user_audio)
        poisoned = {}

        def poison():
            session = engine._sessions[bad.id]
            session.context.cached = 0
            engine.batch.backbone_cache.k[:, bad.row, -2] = float("nan")  # a slot no query should ever see
            engine.batch.thinker_cache.v[:, bad.row, 3] = float("nan")
            poisoned["row"] = bad.row

        on_engine_thread(engine, poison)
        (good_events, good_done), (_, bad_done) = await asyncio.gather(
            collect(good, max_frames=12), collect(bad, max_frames=12))
        _, retry = await collect(bad, max_frames=4)
        await good.close()
        await bad.close()
        fresh = await engine.open_conversation(voice, case["system_prompt"])
        await fresh.add_user_audio(*user_audio)
        golden_events, _ = await collect(fresh, max_frames=32)
        return good_done, bad_done, retry, golden_events, poisoned["row"]

    good_done, bad_done, retry, golden_events, row = asyncio.run(run())
    assert isinstance(bad_done, ResponseError) and "non-finite" in bad_done.message
    assert isinstance(good_done, ResponseDone) and good_done.usage.audio_frames == 12
    assert isinstance(retry, ResponseDone) and retry.usage.audio_frames == 4
    assert engine.stats["errors"] == 1
    assert bool(torch.isfinite(engine.batch.backbone_cache.k[:, row]).all())
    np.testing.assert_array_equal(codes_of(golden_events), golden_outputs["frames"])


def test_voice_prefix_is_computed_once(engine, voice, case, monkeypatch):
    calls = []
    real = engine_module.prefill_voice
    monkeypatch.setattr(engine_module, "prefill_voice", lambda *a: calls.append(1) or real(*a))

    async def run():
        for _ in range(2):
            conv = await engine.open_conversation(voice)
            for _ in range(2):
                await conv.add_user_text("Hi!")
                await collect(conv, max_frames=2)
            await conv.close()

    asyncio.run(run())
    assert len(calls) == 1


def test_voice_clones_are_cached_by_clip_and_transcript(engine, golden_dir, case, monkeypatch):
    calls = []
    real = engine.model.encode_voice_codes
    monkeypatch.setattr(engine.model, "encode_voice_codes", lambda w: calls.append(1) or real(w))
    a = engine.create_voice(golden_dir / "voice.wav", case["voice_text"]).result()
    b = engine.create_voice(golden_dir / "voice.wav", case["voice_text"], name="again").result()
    c = engine.create_voice(golden_dir / "voice.wav", case["voice_text"] + " Yes.").result()
    assert len(calls) == 2  # the repeat cost no encode; another transcript is another voice
    assert b.name == "again" and torch.equal(a.codes, b.codes) and a.id == b.id and c.id != a.id


def test_memory_stays_flat_over_1000_short_turns(parts, tmp_path, voice):
    import resource

    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=1, thinker_context=256), voices=VoiceStore(tmp_path),
                 sampling=GREEDY)
    try:
        async def run() -> list[int]:
            conv = await eng.open_conversation(voice, "Be brief.")
            rss = []
            for i in range(1000):
                await conv.add_user_text(f"Turn {i}, hello.")
                _, done = await collect(conv, max_frames=1)
                assert isinstance(done, ResponseDone)
                if i in (200, 999):
                    rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            view = await conv.inspect()
            assert len(view.ids) <= 256  # old turns were dropped, the instructions kept
            assert view.turns[0].role == "system" and view.turns[0].text == "Be brief."
            return rss

        rss = asyncio.run(run())
        assert rss[1] - rss[0] < 50 * 1024  # KiB: no growth beyond noise after warm-up
    finally:
        eng.close()


def test_mixed_user_message_is_one_turn_like_the_reference(engine, voice, user_audio):
    """Text and audio parts of one message stay one user turn: the same ids the processor gives the whole."""
    conv = engine.open_conversation(voice, "You are Chroma.").result()
    conv.add_user_message(["Listen to this: ", user_audio, " What did I say?"]).result()
    view = conv.inspect().result()
    assert [t.role for t in view.turns] == ["system", "user"]
    messages = [
        {"role": "system", "content": "You are Chroma."},
        {"role": "user", "content": [
            {"type": "text", "text": "Listen to this: "},
            {"type": "audio", "audio": user_audio[0], "sample_rate": user_audio[1]},
            {"type": "text", "text": " What did I say?"},
        ]},
    ]
    expected = engine.processor.encode_messages(messages)
    assert view.ids + engine.processor.pieces.assistant_header == expected.input_ids[0].tolist()
    assert view.turns[-1].text == "Listen to this:  What did I say?"
    with pytest.raises(ValueError, match="empty"):
        conv.add_user_message(["   "]).result()


def test_a_text_reply_runs_the_thinker_alone_and_says_what_the_spoken_reply_says(engine, voice, case,
                                                                                 user_audio):
    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        steps = engine.stats["steps"]
        events, done = await collect(conv, output_audio=False)
        decode_steps = engine.stats["steps"] - steps
        spoken, spoken_done = await collect(conv, max_frames=32)  # the same turn answered again, with audio
        await conv.close()
        return events, done, decode_steps, spoken_done

    events, done, decode_steps, spoken_done = asyncio.run(run())
    assert isinstance(done, ResponseDone) and done.reason == "completed"  # the thinker's end of turn
    assert not [e for e in events if isinstance(e, AudioChunk)] and done.usage.audio_frames == 0
    assert decode_steps == 0  # no backbone, depth decoder or codec step ran for it
    golden_text = case["thinker_text"].replace("<|im_end|>", "")
    assert done.text == "".join(e.text for e in events if isinstance(e, TextDelta)) == golden_text
    assert done.usage.text_tokens == 9
    assert spoken_done.text != "" and isinstance(spoken_done, ResponseDone)


def test_a_conversation_without_a_voice_replies_with_text_only(engine, case):
    async def run():
        conv = await engine.open_conversation(None, case["system_prompt"])  # the engine has no default voice
        await conv.add_user_text("What should I wear today?")
        _, text_done = await collect(conv, output_audio=False, max_tokens=3)
        with pytest.raises(ConversationError, match="no voice"):
            await collect(conv)
        return conv.voice, text_done

    voice, done = asyncio.run(run())
    assert voice is None
    assert isinstance(done, ResponseDone) and done.usage.text_tokens <= 3 and done.usage.audio_frames == 0


def test_chunked_prefill_gives_the_same_reply_as_one_piece(parts, tmp_path, voice, case, user_audio,
                                                          golden_outputs):
    """The golden prompt prefilled 16 tokens and one 2 s audio window at a time, between decode steps."""
    model, processor = parts
    eng = Engine(model, processor, EngineConfig(max_sessions=2, prefill_chunk_tokens=16, prefill_audio_windows=1),
                 voices=VoiceStore(tmp_path), sampling=GREEDY)
    try:
        async def run():
            conv = await eng.open_conversation(voice, case["system_prompt"])
            await conv.add_user_audio(*user_audio)
            return await collect(conv, max_frames=32)

        events, done = asyncio.run(run())
        np.testing.assert_array_equal(codes_of(events), golden_outputs["frames"])
        assert eng.stats["prefill_pieces"] >= 114 // 16 + 2  # 8 token chunks and the clip's 2 windows
    finally:
        eng.close()


def test_seeded_sampled_replies_are_the_same_alone_and_batched(engine, voice, case, user_audio):
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7)

    async def reply(sampling, others: int = 0):
        async def one(params, text):
            conv = await engine.open_conversation(voice, case["system_prompt"])
            await conv.add_user_text(text)
            events, _ = await collect(conv, max_frames=16, sampling=params)
            await conv.close()
            return codes_of(events)

        background = [one(SamplingParams(temperature=0.7, seed=100 + i), f"Other {i}.") for i in range(others)]
        results = await asyncio.gather(one(sampling, "Tell me a story."), *background)
        return results[0]

    alone = asyncio.run(reply(seeded))
    again = asyncio.run(reply(seeded))
    batched = asyncio.run(reply(seeded, others=2))
    other_seed = asyncio.run(reply(SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=8)))
    np.testing.assert_array_equal(alone, again)
    np.testing.assert_array_equal(alone, batched)
    assert alone.shape != other_seed.shape or not np.array_equal(alone, other_seed)


def test_a_new_reply_may_follow_a_cancel_at_once(engine, voice, case, user_audio):
    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(*user_audio)
        first = conv.respond(max_frames=100)
        async for event in first:
            if isinstance(event, AudioChunk):
                break
        conv.cancel()  # a barge-in: the next reply is asked for before the first has wound down
        await conv.add_user_text("Stop. What about tomorrow?")
        second = [e async for e in conv.respond(max_frames=4)]
        rest = [e async for e in first]
        return rest, second

    rest, second = asyncio.run(run())
    assert isinstance(rest[-1], ResponseDone) and rest[-1].reason == "cancelled"
    assert isinstance(second[-1], ResponseDone) and second[-1].usage.audio_frames == 4


def test_streamed_text_equals_the_whole_decode_for_multi_byte_text(parts):
    from chroma_agent.engine.records import Detokenizer

    _, processor = parts
    text = "Grüße aus Köln 🎉 — naïve café, 東京 ok"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(lambda chunk: processor.decode_text(chunk, skip_special_tokens=True))
    deltas = [detok.push(t) for t in ids]
    assert "".join(deltas) == processor.decode_text(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas) and len(ids) > len(text.split())
