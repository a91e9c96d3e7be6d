"""The engine with its step compiled by inductor (`step_mode="compile"`): the same frames as eager.

Compiling the text and audio steps takes a minute or two on a small CPU (cached on disk afterwards), so one
engine serves the whole module and only the exactness tests run here: the golden reply, batched == alone,
and KV reuse == a fresh prefill. (CUDA graphs need a GPU: bench/gpu_check.py checks eager == captured there.)
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_engine import _three_turns, codes_of, collect

from chroma_agent.engine.engine import Engine, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.voices import VoiceStore


@pytest.fixture(scope="module")
def engine(tiny_parts, tmp_path_factory):
    model, processor = tiny_parts
    eng = Engine(model, processor, EngineConfig(max_sessions=3, step_mode="compile"),
                 voices=VoiceStore(tmp_path_factory.mktemp("voices")), sampling=SamplingParams())
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def voice(engine, golden_dir, case):
    return engine.create_voice(golden_dir / "voice.wav", case["voice_text"], name="golden").result()


def test_compiled_step_gives_the_golden_reply(engine, voice, case, user_pcm16, golden_outputs):
    async def run():
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(user_pcm16, 16000)
        events, done = await collect(conv, max_frames=32)
        await conv.close()
        return events, done

    events, done = asyncio.run(run())
    assert engine.runner.mode == "compile" and isinstance(done, ResponseDone)
    np.testing.assert_array_equal(codes_of(events), golden_outputs["frames"])
    assert done.text == case["thinker_text"].replace("<|im_end|>", "")
    assert len([e for e in events if isinstance(e, AudioChunk)]) == 32


def test_compiled_batched_equals_alone(engine, voice, case, user_pcm16):
    prompts = [user_pcm16, user_pcm16[: len(user_pcm16) * 2 // 3], user_pcm16[: len(user_pcm16) // 2]]

    async def one(clip):
        conv = await engine.open_conversation(voice, case["system_prompt"])
        await conv.add_user_audio(clip, 16000)
        events, _ = await collect(conv, max_frames=12)
        await conv.close()
        return codes_of(events)

    async def alone():
        return [await one(clip) for clip in prompts]

    async def together():
        return await asyncio.gather(*(one(clip) for clip in prompts))

    for a, b in zip(asyncio.run(alone()), asyncio.run(together()), strict=True):
        np.testing.assert_array_equal(a, b)


def test_compiled_kv_reuse_equals_a_fresh_full_prefill(engine, voice, case, user_pcm16):
    audio = (user_pcm16, 16000)
    _, reused, dones, _ = _three_turns(engine, voice, case, audio, fresh_last=False)
    _, fresh, fresh_dones, _ = _three_turns(engine, voice, case, audio, fresh_last=True)
    np.testing.assert_array_equal(codes_of(reused), codes_of(fresh))
    assert dones[2].usage.cached_tokens > 0 and fresh_dones[2].usage.cached_tokens == 0
