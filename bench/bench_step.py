"""The engine's decode step: aten ops per step (machine-independent), step time, and the per-frame step
against the generate-per-frame baseline, in every step mode; plus time to first audio and how long a long
prefill delays a running reply's frames.

    python bench/bench_step.py                      # tiny fixture, CPU, eager + compiled
    python bench/bench_step.py --modes eager        # skip the (slow to compile) inductor step
    python bench/bench_step.py --json out.json

Eager ops are counted with a `TorchDispatchMode` around one step: every aten call is one dispatch (on a GPU,
one kernel launch for the non-view ones), whatever the machine. A compiled step is one graph call running
inductor's own fused kernels; for it the table counts the aten calls it still makes (the matmuls and
attention it hands to ATen), read from the profiler. Times are medians of interleaved runs in one process,
so a busy machine slows all modes alike: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

# a sibling script: Python puts this folder on the path when it runs `python bench/<script>.py`
from bench_generate import DEFAULT_TINY, ReferenceLoop, load_golden, machine_info
from torch.utils._python_dispatch import TorchDispatchMode

from chroma_agent.engine.engine import Engine, EngineConfig
from chroma_agent.engine.events import AudioChunk, ResponseDone
from chroma_agent.engine.generate import AudioFrame, ReplyDone, generate_reply
from chroma_agent.engine.runner import StepRunner
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.engine.step import DecodeBatch
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import VoiceStore, create_voice_profile


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if torch.Tag.view_copy in func.tags or func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, mode: str) -> OpCounter:
    """aten calls of one call of `fn`: a dispatch mode for eager code; the profiler for compiled code (a
    dispatch mode would make dynamo fall back to eager)."""
    if mode == "eager":
        with OpCounter() as counter:
            fn()
        return counter
    from torch.profiler import profile

    with profile() as prof:
        fn()
    counter = OpCounter.__new__(OpCounter)
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    counter.ops = len(top)
    counter.views = sum(e.name in ("aten::view", "aten::as_strided", "aten::reshape", "aten::transpose",
                                   "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
                                   "aten::expand", "aten::permute", "aten::alias") for e in top)
    return counter


def _active_batch(model: ChromaModel, rows: int, sampled: bool) -> DecodeBatch:
    batch = DecodeBatch(model, rows, 512, 512)
    params = SamplingParams(temperature=0.7, top_k=50, seed=1) if sampled else SamplingParams()
    for row in range(rows):
        batch.set_active(row, True)
        batch.limit[row] = 10**6
        batch.sampling.set_row(row, params)
    return batch


@torch.inference_mode()
def bench_ops(model: ChromaModel, modes: list[str], sessions: list[int], repeats: int,
              compiled_sessions: list[int]) -> list[dict]:
    """Ops and time of one decode step (the text and audio steps averaged) per mode, sessions, sampling.

    Compiled steps only at `compiled_sessions` (each shape is a compile of about a minute)."""
    rows = []
    for sampled in (False, True):
        for n in sessions:
            batch = _active_batch(model, n, sampled)
            suffix = "+sampled" if sampled else ""
            for mode in modes:
                if mode != "eager" and n not in compiled_sessions:
                    continue
                runner = StepRunner(batch, mode)
                kinds = ("text" + suffix, "audio" + suffix)
                t0 = time.perf_counter()
                # warm-up with every row active is fine here: this batch serves no reply
                for kind in kinds:
                    runner.launch(n, kind).wait()
                compile_s = time.perf_counter() - t0
                counts = [count_ops(lambda k=kind, r=runner, b=n: r.launch(b, k).wait(), mode) for kind in kinds]
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    for kind in kinds:
                        runner.launch(n, kind).wait()
                    times.append((time.perf_counter() - t) / 2)
                rows.append({"mode": mode, "sessions": n, "sampling": sampled,
                             "ops_per_step": sum(c.ops for c in counts) / 2,
                             "non_view_ops_per_step": sum(c.ops - c.views for c in counts) / 2,
                             "step_ms": statistics.median(times) * 1000, "warm_up_s": compile_s})
    return rows


def bench_vs_baseline(model: ChromaModel, fixture: Path, modes: list[str], frames: int, repeats: int) -> dict:
    """Per-frame step and first frame of `generate_reply` in each mode vs the baseline, one process."""
    inputs, golden = load_golden(fixture)
    prompt = SimpleNamespace(input_ids=inputs["thinker_input_ids"], input_features=inputs["thinker_input_features"],
                             feature_attention_mask=inputs["thinker_feature_attention_mask"])
    prefix = model.voice_prefix(inputs["input_ids"][0], model.encode_voice_codes(inputs["input_values"][0, 0]))
    baseline = ReferenceLoop(model)

    def ours(mode: str) -> dict:
        start = time.perf_counter()
        stamps, done = [], None
        for event in generate_reply(model, prompt, prefix, max_frames=frames, step_mode=mode):
            if isinstance(event, AudioFrame):
                stamps.append(time.perf_counter())
            elif isinstance(event, ReplyDone):
                done = event
        if not np.array_equal(done.codes().numpy(), golden["frames"][:frames]):
            raise AssertionError(f"{mode}: frames differ from the golden frames")
        return {"per_frame": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "first_frame": stamps[0] - start}

    results: dict[str, list[dict]] = {m: [] for m in [*modes, "baseline"]}
    for i in range(repeats + 1):
        for name in ([*modes, "baseline"] if i % 2 == 0 else ["baseline", *reversed(modes)]):
            if name == "baseline":
                run = baseline.run(inputs, frames)
                if not np.array_equal(run["codes"].numpy(), golden["frames"][:frames]):
                    raise AssertionError("the baseline's frames differ from the golden frames")
                result = {"per_frame": run["per_frame"], "first_frame": run["ttff"]}
            else:
                result = ours(name)
            if i:  # run 0 warms up (and compiles)
                results[name].append(result)
    out = {name: {k: statistics.median(r[k] for r in runs) * 1000 for k in ("per_frame", "first_frame")}
           for name, runs in results.items()}
    for mode in modes:
        out[mode]["speed_up"] = out["baseline"]["per_frame"] / out[mode]["per_frame"]
    return out


def bench_prefill_stall(fixture: Path, seconds: float, mode: str) -> dict:
    """A reply streams while another conversation sends a long audio turn: the longest gap between the
    running reply's frames before and during that turn's prefill."""
    model = ChromaModel.from_pretrained(fixture, progress=False)
    processor = ChromaProcessor.from_pretrained(fixture)
    golden = fixture / "golden" / "public_single_turn"
    case = json.loads((golden / "case.json").read_text())
    voice = create_voice_profile(model, processor, golden / "voice.wav", case["voice_text"], name="bench")
    engine = Engine(model, processor, EngineConfig(max_sessions=2, step_mode=mode, lookahead_s=60.0),
                    voices=VoiceStore(Path("/tmp/chroma-bench-voices")), sampling=SamplingParams())
    rng = np.random.default_rng(0)
    long_turn = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)

    async def run():
        talker = await engine.open_conversation(voice, "Be brief.")
        await talker.add_user_text("Tell me a long story.")
        other = await engine.open_conversation(voice, "Be brief.")
        stamps: list[float] = []
        marks: dict[str, float] = {}

        async def listen():
            async for event in talker.respond(max_frames=400):
                if isinstance(event, AudioChunk):
                    stamps.append(time.perf_counter())

        async def upload():
            while len(stamps) < 40:
                await asyncio.sleep(0.005)
            marks["sent"] = time.perf_counter()
            await other.add_user_audio(long_turn, 16000)
            async for event in other.respond(max_frames=1):
                if isinstance(event, ResponseDone):
                    marks["done"] = time.perf_counter()
                    marks["prefill_ms"] = event.timings.prefill_ms

        await asyncio.gather(listen(), upload())
        return stamps, marks

    stamps, marks = asyncio.run(run())
    engine.close()
    gaps = np.diff(stamps) * 1000
    during = [g for t, g in zip(stamps[1:], gaps, strict=True) if marks["sent"] <= t <= marks["done"] + 0.05]
    before = [g for t, g in zip(stamps[1:], gaps, strict=True) if t < marks["sent"]]
    return {"turn_s": seconds, "prefill_ms": marks["prefill_ms"], "gap_before_max_ms": max(before),
            "gap_before_median_ms": statistics.median(before), "gap_during_max_ms": max(during),
            "pieces": engine.stats["prefill_pieces"]}


def table(r: dict) -> str:
    lines = ["| mode | sessions | sampling | aten ops / step | non-view ops | step ms |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for row in r["ops"]:
        lines.append(f"| {row['mode']} | {row['sessions']} | {'yes' if row['sampling'] else 'greedy'} | "
                     f"{row['ops_per_step']:.0f} | {row['non_view_ops_per_step']:.0f} | {row['step_ms']:.2f} |")
    lines += ["", "| per-frame step (32 golden frames) | ms | first frame ms | speed-up vs baseline |",
              "| --- | ---: | ---: | ---: |"]
    for name, v in r["vs_baseline"].items():
        lines.append(f"| {name} | {v['per_frame']:.2f} | {v['first_frame']:.1f} | "
                     f"{v.get('speed_up', 1.0):.2f}x |")
    if r.get("prefill_stall"):
        p = r["prefill_stall"]
        lines += ["", f"A {p['turn_s']:.0f} s audio turn prefilled in {p['prefill_ms']:.0f} ms ({p['pieces']} pieces) "
                  f"while another reply streamed: that reply's longest frame gap {p['gap_during_max_ms']:.1f} ms "
                  f"(before: median {p['gap_before_median_ms']:.1f}, max {p['gap_before_max_ms']:.1f} ms)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=DEFAULT_TINY)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--compiled-sessions", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stall-seconds", type=float, default=60.0)
    ap.add_argument("--parts", default="ops,baseline,stall", help="which parts to run (comma-separated)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    model = ChromaModel.from_pretrained(args.fixture, progress=False)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
        "machine": machine_info(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads,
        "ops": bench_ops(model, modes, [int(s) for s in args.sessions.split(",")], args.repeats,
                         [int(s) for s in args.compiled_sessions.split(",")]) if "ops" in parts else [],
        "vs_baseline": bench_vs_baseline(model, args.fixture, modes, args.frames, args.repeats)
        if "baseline" in parts else {},
        "prefill_stall": bench_prefill_stall(args.fixture, args.stall_seconds, "eager") if "stall" in parts else None,
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
