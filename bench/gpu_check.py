"""One prepared GPU run (fits in 8 minutes on an H100/H200): full-size Chroma-4B with random bf16 weights.

    python3 bench/gpu_check.py --out OUTDIR          # writes gpu_check.json and gpu_check.md there
    python3 bench/gpu_check.py --dry-run --out /tmp/x  # the same script on the tiny model on CPU (no capture):
                                                     # proves the script itself works before GPU time is spent

What it measures, each part on its own so one failure does not cost the others:

1. exactness on the GPU: a 24-frame greedy reply gives the same codes with the eager step and the captured
   (CUDA graph) step;
2. time to first audio of a spoken user turn (3.5 s of audio) through the engine, eager vs captured;
3. the batch-1 real-time factor (step time / 80 ms), eager vs captured;
4. a sessions sweep (1, 8, 16, 32, 64 active rows, captured): step time, per-session real-time factor, the
   largest count that stays real time;
5. achieved memory bandwidth: the bytes a step reads (weights + the KV slots it attends to) / step time;
6. peak GPU memory.

The weights are random (N(0, 0.02)): what they say is noise, but every shape, every kernel and every byte read
is the real model's. The tokenizer, chat template and voice clip come from the tiny fixture (their ids fit the
real vocabulary); the model's config is `chroma-4b-config.json`. A stock GPU image may lack some of our
dependencies: the script checks them first and prints what to install (README, "GPU check").
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = {  # module -> what to install
    "torch": "torch (a CUDA build)",
    "transformers": "transformers>=5.0 (5.23.0 is what the tests run)",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "huggingface_hub": "huggingface_hub",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "numpy": "numpy",
    "tqdm": "tqdm",
    "jinja2": "jinja2",
}


def check_dependencies() -> list[str]:
    missing = []
    for module, what in NEEDED.items():
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken native library
            missing.append(f"{what}  ({type(exc).__name__}: {exc})")
            continue
        if module == "transformers" and int(mod.__version__.split(".")[0]) < 5:
            missing.append(f"{what}  (found {mod.__version__})")
    return missing


def fixture_dir() -> Path:
    folder = REPO / "tests" / "fixtures"
    if not (folder / "chroma-tiny" / "config.json").is_file():
        raise SystemExit(f"the test fixtures are missing ({folder}/chroma-tiny)")
    return folder


def build_model(config_path: Path, device: str, dtype_name: str = "bfloat16"):
    import torch

    from chroma_agent.model.chroma import ChromaModel
    from chroma_agent.model.config import ChromaConfig

    config = ChromaConfig.from_json_file(config_path)
    model = ChromaModel.empty(config, device=torch.device(device), dtype=getattr(torch, dtype_name), with_vision=False)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("cluster_usage"):
                tensor.fill_(1.0)
            elif "norm" in name and name.endswith("weight") or name.endswith("layer_scale.scale"):
                tensor.fill_(1.0 if "norm" in name else 0.1)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    model.fuse_weights()  # the fused buffers were filled through their views; re-link to be sure
    return model.eval()


def weight_bytes(model) -> dict[str, int]:
    """Bytes of weights a decode step reads, per part (the depth decoder runs once per codebook 1..7)."""
    def size(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    thinker = size(model.thinker.model.layers) + size(model.thinker.lm_head)
    backbone = size(model.backbone.model.layers) + size(model.backbone.codebook0_head)
    decoder = size(model.decoder.model.layers) + size(model.decoder.projection)
    heads = size(model.decoder.codebook_head)
    codec = sum(p.numel() * p.element_size() for n, p in model.codec_model.named_parameters()
                if "decoder" in n or "upsample" in n or "quantizer" in n)
    steps = model.config.num_codebooks - 1
    return {"thinker": thinker, "backbone": backbone, "depth_decoder": decoder * steps + heads, "codec": codec}


def kv_bytes_per_row(batch, text: bool) -> int:
    """KV bytes one row's attention reads in a step (every slot: the step attends over the whole row)."""
    b = batch.backbone_cache.nbytes // batch.rows
    t = batch.thinker_cache.nbytes // batch.rows if text else 0
    return b + t + batch.decoder_cache.nbytes // batch.rows * (batch.model.config.num_codebooks - 1)


def step_times(runner, batch, n: int, repeats: int) -> tuple[float, float]:
    """Median ms of a text and an audio step over n active rows."""
    import torch

    from chroma_agent.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.7, top_k=50, seed=1)
    for row in range(batch.rows):
        batch.set_active(row, row < n)
        batch.limit[row] = 10**6
        batch.finished[row] = 0
        batch.sampling.set_row(row, params)
    bucket = runner.bucket_for(n)
    out = []
    for kind in ("text+sampled", "audio+sampled"):
        for _ in range(3):
            runner.launch(bucket, kind).wait()
        times = []
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.launch(bucket, kind).wait()
            times.append((time.perf_counter() - t0) * 1000)
        out.append(statistics.median(times))
    for row in range(batch.rows):
        batch.stop_row(row)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--sessions", default="1,8,16,32,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true", help="tiny model, CPU, eager in place of CUDA graphs")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    missing = check_dependencies()
    if missing:
        print("gpu_check: missing dependencies; install them (see README, 'GPU check'):", file=sys.stderr)
        for line in missing:
            print(f"  - {line}", file=sys.stderr)
        return 2
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch", file=sys.stderr)
        return 2
    captured = "eager" if args.dry_run else "cuda_graph"
    sys.path.insert(0, str(REPO))
    from chroma_agent.engine.runner import StepRunner
    from chroma_agent.engine.step import DecodeBatch

    report: dict = {"gpu": "none (dry run on CPU)" if args.dry_run else torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "errors": {}}
    fixtures = fixture_dir()
    t0 = time.perf_counter()
    if args.dry_run:
        model = build_model(fixtures / "chroma-tiny" / "config.json", device, "float32")
    else:
        model = build_model(fixtures / "chroma-4b-config.json", device)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    report["weights_gb"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2)
    weights = weight_bytes(model)
    print(f"built Chroma-4B (random bf16) in {report['build_s']} s: {report['weights_gb']} GB", flush=True)

    def section(name, fn):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"{name}: {report.get(name, report['errors'].get(name))} ({time.perf_counter() - t:.0f} s)",
              flush=True)

    sessions = [int(s) for s in args.sessions.split(",")]
    rows = max(sessions)
    batch = DecodeBatch(model, rows, 4096, 2048)
    graphs = StepRunner(batch, captured, buckets=sorted(set(sessions)))
    eager = StepRunner(batch, "eager", buckets=sorted(set(sessions)))
    section("capture_s", lambda: round(graphs.warm_up(progress=False), 1))

    def exactness():
        from chroma_agent.engine.sampling import SamplingParams

        codes = {}
        for name, runner in (("eager", eager), ("cuda_graph", graphs)):
            for row in range(rows):
                batch.stop_row(row)
            batch.thinker_cache.clear_row(0)
            batch.backbone_cache.clear_row(0)
            hidden = torch.zeros(model.config.backbone.hidden_size, device=device, dtype=model.dtype)
            batch.start_audio_row(0, hidden, torch.tensor(100, device=device), 64, 64, 24, SamplingParams())
            batch.set_active(0, True)
            frames, text = [], True
            while True:
                row = runner.launch(runner.bucket_for(1), "text" if text else "audio").wait()[0]
                text = not text
                if row[model.config.num_codebooks + 2]:
                    frames.append(row[: model.config.num_codebooks].tolist())
                if row[model.config.num_codebooks + 3]:
                    break
            codes[name] = frames
        batch.stop_row(0)
        return {"frames": len(codes["eager"]), "identical": codes["eager"] == codes["cuda_graph"]}

    section("exactness", exactness)

    def sweep():
        out = []
        for n in sessions:
            text_ms, audio_ms = step_times(graphs, batch, n, args.repeats)
            step = (text_ms + audio_ms) / 2
            read = (weights["thinker"] / 2 + weights["backbone"] + weights["depth_decoder"] + weights["codec"]
                    + n * (kv_bytes_per_row(batch, True) + kv_bytes_per_row(batch, False)) / 2)
            out.append({"sessions": n, "text_step_ms": round(text_ms, 3), "audio_step_ms": round(audio_ms, 3),
                        "rtf": round(step / 80.0, 4), "real_time": step <= 80.0,
                        "bandwidth_tb_s": round(read / (step / 1000) / 1e12, 2)})
        return out

    def batch1():
        g_text, g_audio = step_times(graphs, batch, 1, args.repeats)
        e_text, e_audio = step_times(eager, batch, 1, max(5, args.repeats // 4))
        return {"eager_step_ms": round((e_text + e_audio) / 2, 3), "captured_step_ms": round((g_text + g_audio) / 2, 3),
                "eager_rtf": round((e_text + e_audio) / 160, 4), "captured_rtf": round((g_text + g_audio) / 160, 4)}

    section("batch1", batch1)
    section("sweep", sweep)
    if "sweep" in report:
        fast = [r["sessions"] for r in report["sweep"] if r["real_time"]]
        report["max_real_time_sessions"] = max(fast) if fast else 0
    batch = graphs = eager = None  # the engine below allocates its own caches
    if device == "cuda":
        torch.cuda.empty_cache()

    def first_audio():
        import asyncio

        import soundfile as sf

        from chroma_agent.engine.engine import Engine, EngineConfig
        from chroma_agent.engine.events import AudioChunk
        from chroma_agent.engine.sampling import SamplingParams
        from chroma_agent.model.processor import ChromaProcessor

        processor = ChromaProcessor.from_pretrained(fixtures / "chroma-tiny")
        golden = fixtures / "chroma-tiny" / "golden" / "public_single_turn"
        user, rate = sf.read(golden / "user1.wav", dtype="int16")
        out = {}
        for key, mode in (("eager_ms", "eager"), ("cuda_graph_ms", captured)):
            engine = Engine(model, processor, EngineConfig(max_sessions=4, step_mode=mode),
                            sampling=SamplingParams(temperature=0.7, top_k=50))
            voice = engine.create_voice(golden / "voice.wav", "A voice to clone.", name="check").result()

            async def one(engine=engine, voice=voice):
                conv = await engine.open_conversation(voice, "You are a helpful assistant.")
                times = []
                for _ in range(4):
                    await conv.add_user_audio(user, rate)
                    t = time.perf_counter()
                    stream = conv.respond(max_frames=8)
                    async for event in stream:
                        if isinstance(event, AudioChunk):
                            times.append((time.perf_counter() - t) * 1000)
                            break
                    await stream.aclose()
                    await asyncio.sleep(0.2)
                await conv.close()
                return times

            times = asyncio.run(one())
            engine.close()
            out[key] = round(statistics.median(times[1:]), 1)  # the first one also warms the voice cache
        return out

    section("time_to_first_audio", first_audio)
    report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if not report["errors"] else 1


def markdown(r: dict) -> str:
    lines = [f"GPU: {r['gpu']} · torch {r['torch']} · {r['date']} · Chroma-4B shapes, random bf16 weights "
             f"({r.get('weights_gb')} GB)", ""]
    if "exactness" in r:
        e = r["exactness"]
        lines.append(f"- eager vs captured, {e['frames']} greedy frames: {'identical' if e['identical'] else 'DIFFER'}")
    if "batch1" in r:
        b = r["batch1"]
        lines.append(f"- batch-1 step: eager {b['eager_step_ms']} ms (RTF {b['eager_rtf']}), captured "
                     f"{b['captured_step_ms']} ms (RTF {b['captured_rtf']})")
    if "time_to_first_audio" in r:
        t = r["time_to_first_audio"]
        lines.append(f"- time to first audio (3.5 s user turn): eager {t['eager_ms']} ms, captured {t['cuda_graph_ms']} ms")
    if "sweep" in r:
        lines += ["", "| sessions | text step ms | audio step ms | per-session RTF | real time | bandwidth TB/s |",
                  "| ---: | ---: | ---: | ---: | --- | ---: |"]
        for s in r["sweep"]:
            lines.append(f"| {s['sessions']} | {s['text_step_ms']} | {s['audio_step_ms']} | {s['rtf']} | "
                         f"{'yes' if s['real_time'] else 'no'} | {s['bandwidth_tb_s']} |")
        lines.append(f"\nLargest real-time session count measured: {r.get('max_real_time_sessions')}")
    lines.append(f"- peak GPU memory: {r.get('peak_memory_gb')} GB; capture of every bucket: {r.get('capture_s')} s")
    if r["errors"]:
        lines += ["", "Errors:"] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
