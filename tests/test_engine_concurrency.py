"""The engine under concurrent use: commands from many threads and event loops at once.

Every test is bounded in time (a deadlock fails it instead of hanging the run) and ends by checking that no
slot leaked. The exact-equality tests (golden, batched == alone) are in test_engine.py; here the golden reply
must also come out exact while other conversations churn around it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from chroma_agent.engine.engine import Engine, EngineBusyError, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.voices import VoiceStore

ROWS = 4


@pytest.fixture()
def engine(tiny_parts, tmp_path):
    model, processor = tiny_parts
    eng = Engine(model, processor, EngineConfig(max_sessions=ROWS, lookahead_s=0.5, max_reply_s=4.0),
                 voices=VoiceStore(tmp_path / "voices"), sampling=SamplingParams())
    yield eng
    eng.close()


@pytest.fixture()
def voice(engine, golden_dir, case):
    return engine.create_voice(golden_dir / "voice.wav", case["voice_text"], name="golden").result(timeout=30)


def settled(engine: Engine) -> None:
    """Every command posted so far has been applied (commands run in order on the engine thread)."""
    engine.post(None, None, lambda *_: None).result(timeout=30)


def test_open_close_storm_from_many_threads_and_loops(engine, voice):
    """8 threads, each with its own event loop, open, talk and close at random points; nothing hangs or leaks."""
    errors: list[BaseException] = []
    outcomes: list[str] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)

        async def run() -> None:
            for _ in range(6):
                try:
                    conv = await engine.open_conversation(voice, "Be brief.", wait_s=10)
                except EngineBusyError:
                    outcomes.append("busy")
                    continue
                await conv.add_user_text(f"Question {rnd.random():.3f}?")
                point = rnd.choice(["before", "mid", "after", "cancel"])
                if point == "before":
                    conv.close()
                    outcomes.append("closed before")
                    continue
                frames = 0
                async for event in conv.respond(max_frames=rnd.randint(2, 8)):
                    if isinstance(event, AudioChunk):
                        frames += 1
                        if point == "mid" and frames == 2:
                            conv.close()
                        elif point == "cancel" and frames == 1:
                            conv.cancel()
                    elif isinstance(event, ResponseDone | ResponseError):
                        outcomes.append(f"{point}: {getattr(event, 'reason', 'error')}")
                await conv.close()

        try:
            asyncio.run(asyncio.wait_for(run(), 60))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors
    assert len(outcomes) == 8 * 6
    settled(engine)
    assert engine.free_slots == ROWS and engine.live_sessions == 0 and engine.queued_replies == 0


def test_cancel_racing_the_last_frame(engine, voice):
    """A cancel that lands around a reply's last frame ends it exactly once, as finished or as cancelled."""
    async def run() -> list[str]:
        conv = await engine.open_conversation(voice)
        reasons = []
        for i in range(24):
            await conv.add_user_text(f"Turn {i}.")
            stream = conv.respond(max_frames=3)
            events = []
            async for event in stream:
                events.append(event)
                if isinstance(event, AudioChunk) and event.frame_index == 1 + i % 2:
                    conv.cancel()  # on frame 1 or on the last frame (2)
            finals = [e for e in events if isinstance(e, ResponseDone | ResponseError)]
            assert len(finals) == 1 and events[-1] is finals[0]
            reasons.append(finals[0].reason)
        await conv.close()
        return reasons

    reasons = asyncio.run(asyncio.wait_for(run(), 60))
    assert set(reasons) <= {"cancelled", "max_frames", "completed"} and "cancelled" in reasons
    settled(engine)
    assert engine.free_slots == ROWS


def test_truncate_racing_steps_keeps_the_context_consistent(engine, voice, user_pcm16):
    """Truncations from another thread at random moments of a running reply: never an error, never a torn
    context, and the conversation goes on."""
    async def run():
        conv = await engine.open_conversation(voice, "Be brief.")
        rnd = random.Random(3)
        dones = []
        for i in range(8):
            await conv.add_user_audio(user_pcm16[: 16000 + 4000 * i], 16000)
            stream = conv.respond(max_frames=30)
            timer = threading.Timer(rnd.uniform(0.0, 0.15), lambda: conv.truncate(rnd.uniform(0, 1500)))
            timer.start()
            events = [e async for e in stream]
            timer.join()
            dones.append(events[-1])
            view = await conv.inspect()
            assert view.cached <= len(view.ids)
            assert [t.role for t in view.turns][-2:] == ["user", "assistant"]
        await conv.close()
        return dones

    dones = asyncio.run(asyncio.wait_for(run(), 90))
    assert all(isinstance(d, ResponseDone) for d in dones)
    settled(engine)
    assert engine.free_slots == ROWS


def test_close_during_a_long_prefill_frees_the_slot(engine, voice):
    long_turn = (np.random.default_rng(0).standard_normal(60 * 16000) * 0.1).astype(np.float32)

    async def run():
        conv = await engine.open_conversation(voice)
        await conv.add_user_audio(long_turn, 16000)
        stream = conv.respond(max_frames=10)
        await asyncio.sleep(0.01)  # the prefill has started (or is queued)
        await conv.close()
        events = [e async for e in stream]
        return events

    events = asyncio.run(asyncio.wait_for(run(), 60))
    assert isinstance(events[-1], ResponseDone) and events[-1].reason == "cancelled"
    settled(engine)
    assert engine.free_slots == ROWS and engine.live_sessions == 0


def test_the_golden_reply_stays_exact_while_other_conversations_churn(engine, voice, case, user_pcm16,
                                                                      golden_outputs):
    stop = threading.Event()

    def churn(seed: int) -> None:
        rnd = random.Random(seed)

        async def run():
            while not stop.is_set():
                try:
                    conv = await engine.open_conversation(voice, wait_s=1)
                except EngineBusyError:
                    continue
                await conv.add_user_text("Hello there, how are you?")
                async for event in conv.respond(max_frames=rnd.randint(1, 12)):
                    if isinstance(event, AudioChunk) and rnd.random() < 0.2:
                        conv.truncate(rnd.uniform(0, 500))
                await conv.close()

        asyncio.run(run())

    threads = [threading.Thread(target=churn, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    try:
        async def golden():
            conv = await engine.open_conversation(voice, case["system_prompt"], wait_s=10)
            await conv.add_user_audio(user_pcm16, 16000)
            events = [e async for e in conv.respond(max_frames=32)]
            await conv.close()
            return events

        time.sleep(0.3)
        events = asyncio.run(asyncio.wait_for(golden(), 60))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    codes = np.stack([e.codes for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_array_equal(codes, golden_outputs["frames"])
    settled(engine)
    assert engine.free_slots == ROWS
