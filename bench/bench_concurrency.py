"""Concurrency: does the engine keep every conversation's audio flowing, and the event loop free?

    python bench/bench_concurrency.py                 # tiny fixture, CPU: 1, 8 and 16 conversations
    python bench/bench_concurrency.py --seconds 10 --sessions 16

(a) Event-loop lag: N conversations share ONE asyncio loop (as connections share a server's loop). Each plays
    its replies in real time (one 80 ms frame per 80 ms), and barges in after 1-3 s: cancel, truncate to what
    was played, a new spoken turn, a new reply. A 10 ms ticker on the same loop records how late it wakes.
(b) Stalls: while 4 conversations play in real time, another conversation uploads and commits a 60 s spoken
    turn (then, separately, a voice is cloned from a 10 s clip). For the playing conversations it reports the
    longest gap between two frames arriving and any frame that came more than 20 ms after its playing time
    (an audible gap).

Times depend on the machine (2 shared cores here): run it when the machine is quiet, and compare with the
targets in DESIGN section 5 (p99 <= 20 ms, max <= 100 ms at 16 conversations, nothing behind real time).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

# a sibling script: Python puts this folder on the path when it runs `python bench/<script>.py`
from bench_generate import DEFAULT_TINY, machine_info

from chroma_agent.engine.engine import Engine, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.frames import FRAME_S
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import VoiceStore

# A frame later than this past its playing time is an audible gap (a player keeps at least 20 ms of jitter
# buffer; below it, this loop's own sleep jitter would count).
LATE_S = 0.02


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


class Player:
    """Plays a reply in real time: frames are due 80 ms apart from the first one."""

    def __init__(self, stats: dict):
        self.stats = stats

    async def play(self, conv, user, barge_after: float | None) -> None:
        stream = conv.respond(max_frames=400)
        start = last = None
        played = 0
        async for event in stream:
            now = time.perf_counter()
            if isinstance(event, AudioChunk):
                if start is None:
                    start = now
                else:
                    self.stats["gaps"].append(now - last)
                    due = start + event.frame_index * FRAME_S
                    if now > due + LATE_S:
                        self.stats["late"].append(now - due)
                last = now
                played = event.frame_index + 1
                wait = start + played * FRAME_S - time.perf_counter()
                if barge_after is not None and now - start > barge_after:
                    conv.cancel()
                    conv.truncate(played * FRAME_S * 1000)
                    barge_after = None
                    self.stats["barge_ins"] += 1
                elif wait > 0:
                    await asyncio.sleep(wait)
            elif isinstance(event, ResponseDone | ResponseError):
                self.stats["replies"] += 1


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    period = 0.01
    nxt = time.perf_counter() + period
    while not stop.is_set():
        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
        now = time.perf_counter()
        lags.append(max(0.0, now - nxt))
        nxt = max(nxt + period, now)


async def lag_run(engine: Engine, voice, user, sessions: int, seconds: float, seed: int) -> dict:
    rnd = random.Random(seed)
    stats = {"gaps": [], "late": [], "barge_ins": 0, "replies": 0}
    lags: list[float] = []
    stop = asyncio.Event()
    deadline = time.perf_counter() + seconds

    async def talk(i: int) -> None:
        conv = await engine.open_conversation(voice, "Be brief.", wait_s=30)
        player = Player(stats)
        while time.perf_counter() < deadline:
            await conv.add_user_audio(*user)
            await player.play(conv, user, rnd.uniform(1.0, 3.0))
        await conv.close()

    tick = asyncio.create_task(ticker(stop, lags))
    await asyncio.gather(*(talk(i) for i in range(sessions)))
    stop.set()
    await tick
    ms = [v * 1000 for v in lags]
    return {"sessions": sessions, "seconds": seconds, "lag_p50_ms": percentile(ms, 50), "lag_p95_ms": percentile(ms, 95),
            "lag_p99_ms": percentile(ms, 99), "lag_max_ms": max(ms), "barge_ins": stats["barge_ins"],
            "replies": stats["replies"], "late_frames": len(stats["late"]),
            "late_max_ms": max(stats["late"], default=0.0) * 1000}


async def stall_run(engine: Engine, voice, user, what: str, golden: Path) -> dict:
    stats = {"gaps": [], "late": [], "barge_ins": 0, "replies": 0}
    marks: dict[str, float] = {}

    async def talk() -> None:
        conv = await engine.open_conversation(voice, "Be brief.", wait_s=30)
        await conv.add_user_audio(*user)
        await Player(stats).play(conv, user, None)
        await conv.close()

    async def disturb() -> None:
        await asyncio.sleep(1.5)
        marks["start"] = time.perf_counter()
        if what == "60 s turn":
            other = await engine.open_conversation(voice, wait_s=30)
            clip = (np.random.default_rng(1).standard_normal(60 * 16000) * 0.1).astype(np.float32)
            await other.add_user_audio(clip, 16000)
            async for event in other.respond(max_frames=2):
                if isinstance(event, ResponseDone):
                    marks["prefill_ms"] = event.timings.prefill_ms
            await other.close()
        else:
            clip, rate = sf.read(golden / "voice.wav", dtype="float32")
            clip = np.tile(clip, 3)[: 10 * rate]
            await engine.create_voice(clip, "A ten second clip of someone speaking.", sample_rate=rate)
        marks["end"] = time.perf_counter()

    await asyncio.gather(*(talk() for _ in range(4)), disturb())
    return {"disturbance": what, "took_ms": (marks["end"] - marks["start"]) * 1000,
            "prefill_ms": marks.get("prefill_ms"), "max_gap_ms": max(stats["gaps"]) * 1000,
            "median_gap_ms": statistics.median(stats["gaps"]) * 1000, "late_frames": len(stats["late"]),
            "late_max_ms": max(stats["late"], default=0.0) * 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=DEFAULT_TINY)
    ap.add_argument("--sessions", default="1,8,16")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    model = ChromaModel.from_pretrained(args.fixture, progress=False)
    processor = ChromaProcessor.from_pretrained(args.fixture)
    golden = args.fixture / "golden" / "public_single_turn"
    case = json.loads((golden / "case.json").read_text())
    pcm, rate = sf.read(golden / "user1.wav", dtype="int16")
    counts = [int(s) for s in args.sessions.split(",")]
    engine = Engine(model, processor, EngineConfig(max_sessions=max(max(counts), 5)),
                    voices=VoiceStore(Path("/tmp/chroma-bench-voices")), sampling=SamplingParams(temperature=0.7, top_k=50))
    voice = engine.create_voice(golden / "voice.wav", case["voice_text"], name="bench").result()
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "machine": machine_info(),
              "torch": torch.__version__, "lag": [], "stalls": []}
    for n in counts:
        result["lag"].append(asyncio.run(lag_run(engine, voice, (pcm, rate), n, args.seconds, seed=n)))
        print(json.dumps(result["lag"][-1]), flush=True)
    for what in ("60 s turn", "voice clone"):
        result["stalls"].append(asyncio.run(stall_run(engine, voice, (pcm, rate), what, golden)))
        print(json.dumps(result["stalls"][-1]), flush=True)
    engine.close()
    lines = ["| conversations | ticker lag p50 / p95 / p99 / max (ms) | barge-ins | frames after their time |",
             "| ---: | --- | ---: | ---: |"]
    for r in result["lag"]:
        lines.append(f"| {r['sessions']} | {r['lag_p50_ms']:.1f} / {r['lag_p95_ms']:.1f} / {r['lag_p99_ms']:.1f} / "
                     f"{r['lag_max_ms']:.1f} | {r['barge_ins']} | {r['late_frames']} (max {r['late_max_ms']:.0f} ms) |")
    lines += ["", "| while 4 conversations play | took | longest frame gap | median gap | frames after their time |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["stalls"]:
        lines.append(f"| {r['disturbance']} | {r['took_ms']:.0f} ms | {r['max_gap_ms']:.0f} ms | "
                     f"{r['median_gap_ms']:.0f} ms | {r['late_frames']} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
