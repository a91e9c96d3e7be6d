"""Conversation-engine benchmarks on the tiny reference checkpoint (CPU): ratios measured in one run.

(a) time to first audio vs the whole reply (what a non-streaming server waits before sending anything);
(b) the prefill of a new turn with the KV cache kept vs re-reading the whole conversation, after 1/4/8 turns;
(c) aggregate frames/s and per-session real-time factor with 1, 2, 4, 8, 16 concurrent sessions.

    python bench/bench_engine.py [--fixture DIR] [--repeats 3] [--frames 40]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import soundfile as sf
import torch

from chroma_agent.engine.engine import Engine, EngineConfig
from chroma_agent.engine.events import ResponseDone
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import VoiceStore, create_voice_profile

REPO = Path(__file__).resolve().parents[1]



async def reply(conv, frames: int) -> ResponseDone:
    done = None
    async for event in conv.respond(max_frames=frames):
        done = event
    assert isinstance(done, ResponseDone), done
    return done


def bench_first_audio(engine, voice, user, repeats: int, frames: int) -> dict:
    ratios, ttfa, total = [], [], []
    async def run():
        conv = await engine.open_conversation(voice, "You are a helpful voice assistant.")
        await conv.add_user_audio(*user)
        done = await reply(conv, frames)
        await conv.close()
        return done

    for _ in range(repeats):
        done = asyncio.run(run())
        ttfa.append(done.timings.time_to_first_audio_ms)
        total.append(done.timings.total_ms)
        ratios.append(done.timings.time_to_first_audio_ms / done.timings.total_ms)
    return {"ttfa_ms": statistics.median(ttfa), "whole_reply_ms": statistics.median(total),
            "ratio": statistics.median(ratios)}


def bench_prefill(engine, voice, user, turns: int, repeats: int) -> dict:
    async def run():
        conv = await engine.open_conversation(voice, "You are a helpful voice assistant.")
        for _ in range(turns):
            await conv.add_user_audio(*user)
            await reply(conv, 8)
        await conv.add_user_audio(*user)
        fresh = await engine.open_conversation(voice)

        def same_turns_uncached():  # on the engine thread, which owns the contexts
            target = engine._sessions[fresh.id].context
            target.turns = copy.deepcopy(engine._sessions[conv.id].context.turns)
            target.cached = 0

        await engine.post(None, None, lambda *_: same_turns_uncached())
        reused = await reply(conv, 2)
        full = await reply(fresh, 2)
        await conv.close()
        await fresh.close()
        return reused, full

    pairs = [asyncio.run(run()) for _ in range(repeats)]
    return {
        "turns": turns,
        "reused_tokens": pairs[0][0].usage.prompt_tokens,
        "full_tokens": pairs[0][1].usage.prompt_tokens,
        "reused_ms": statistics.median(p[0].timings.prefill_ms for p in pairs),
        "full_ms": statistics.median(p[1].timings.prefill_ms for p in pairs),
        "ratio": statistics.median(p[0].timings.prefill_ms / p[1].timings.prefill_ms for p in pairs),
    }


def bench_sessions(engine, voice, n: int, frames: int) -> dict:
    async def run():
        convs = [await engine.open_conversation(voice, "Be brief.") for _ in range(n)]
        for i, conv in enumerate(convs):
            await conv.add_user_text(f"Question number {i}: what should I wear today?")
        t0 = time.perf_counter()
        dones = await asyncio.gather(*(reply(c, frames) for c in convs))
        wall = time.perf_counter() - t0
        for conv in convs:
            await conv.close()
        return dones, wall

    steps0 = engine.stats["steps"]
    dones, wall = asyncio.run(run())
    produced = sum(d.usage.audio_frames for d in dones)
    audio_s = frames * 0.08
    return {"sessions": n, "frames": produced, "wall_s": wall, "frames_per_s": produced / wall,
            "rtf_per_session": wall / audio_s, "steps": engine.stats["steps"] - steps0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_fixture = os.environ.get("CHROMA_TINY_FIXTURE", str(REPO / "tests" / "fixtures" / "chroma-tiny"))
    parser.add_argument("--fixture", default=default_fixture)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    fixture = Path(args.fixture)
    golden = fixture / "golden" / "public_single_turn"
    case = json.loads((golden / "case.json").read_text())
    model = ChromaModel.from_pretrained(fixture, progress=False)
    processor = ChromaProcessor.from_pretrained(fixture)
    voice = create_voice_profile(model, processor, golden / "voice.wav", case["voice_text"], name="bench")
    audio, rate = sf.read(str(golden / "user1.wav"), dtype="int16")
    user = (audio, rate)
    store = VoiceStore(Path("/tmp/chroma-bench-voices"))
    engine = Engine(model, processor, EngineConfig(max_sessions=16, thinker_context=4096), voices=store,
                    sampling=SamplingParams())

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    print(f"# chroma-agent engine benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; tiny reference checkpoint, CPU fp32\n")
    try:
        async def warm_up():
            warm = await engine.open_conversation(voice)
            await warm.add_user_text("warm up")
            await reply(warm, 4)
            await warm.close()

        asyncio.run(warm_up())
        a = bench_first_audio(engine, voice, user, args.repeats, 32)
        print("## (a) time to first audio vs the whole reply (32 frames)\n")
        print("| time to first audio (ms) | whole reply (ms) | ratio |\n| --- | --- | --- |")
        print(f"| {a['ttfa_ms']:.1f} | {a['whole_reply_ms']:.1f} | {a['ratio']:.3f} |\n")

        print("## (b) new-turn prefill: KV cache kept vs re-reading the conversation\n")
        print("| earlier turns | tokens prefilled (kept / full) | prefill ms (kept / full) | ratio |")
        print("| --- | --- | --- | --- |")
        for turns in (1, 4, 8):
            b = bench_prefill(engine, voice, user, turns, args.repeats)
            print(f"| {turns} | {b['reused_tokens']} / {b['full_tokens']} | {b['reused_ms']:.1f} / "
                  f"{b['full_ms']:.1f} | {b['ratio']:.2f} |")
        print()
        print(f"## (c) concurrent sessions, {args.frames} frames each (greedy)\n")
        print("| sessions | steps | aggregate frames/s | per-session real-time factor |\n| --- | --- | --- | --- |")
        for n in (1, 2, 4, 8, 16):
            c = bench_sessions(engine, voice, n, args.frames)
            print(f"| {n} | {c['steps']} | {c['frames_per_s']:.0f} | {c['rtf_per_session']:.3f} |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
