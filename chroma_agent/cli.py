"""`chroma-agent` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("chroma_agent")


class UsageError(ValueError):
    """Bad command-line input: reported on stderr with exit code 2."""


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face repo id (FlashLabs/Chroma-4B)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (reproduces the reference exactly)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=750, help="reply length limit in 80 ms frames")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chroma-agent", description="Voice agents driven by FlashLabs Chroma 1.0")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one conversation in a cloned voice, streaming frame by frame")
    _add_generation_args(gen)
    gen.add_argument("--messages", required=True, type=Path, help="conversation JSON (the API's messages list)")
    gen.add_argument("--voice-audio", required=True, type=Path, help="clip of the voice to clone")
    gen.add_argument("--voice-text", required=True, help="transcript of the voice clip")
    gen.add_argument("--out", required=True, type=Path, help="reply WAV (24 kHz)")
    gen.add_argument("--codes-out", type=Path, help="write the decoded frames as int64 .npy [frames, 8]")
    gen.add_argument("--text-out", type=Path, help="write the reply transcript")

    tiny = sub.add_parser("make-tiny", help="write a tiny random Chroma checkpoint (for demos and tests)")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="run the whole pipeline on a tiny model with synthetic audio")
    demo.add_argument("--model", type=Path, default=Path("build/tiny"))
    demo.add_argument("--out", type=Path, default=Path("build/demo"))
    return parser


def _load_messages(path: Path) -> list:
    try:
        messages = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--messages: file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--messages: {path} is not valid JSON ({exc})") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, list):
        raise UsageError(f"--messages: {path} must hold a list of messages (or an object with 'messages')")
    return messages


def run_generate(args: argparse.Namespace) -> int:
    import soundfile as sf

    from chroma_agent.engine.codec import StreamingMimiDecoder
    from chroma_agent.engine.generate import AudioFrame, ReplyDone, TextToken, generate_reply
    from chroma_agent.engine.sampling import SamplingParams
    from chroma_agent.model.chroma import ChromaModel
    from chroma_agent.model.loading import resolve_checkpoint
    from chroma_agent.model.processor import ChromaProcessor

    if args.max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    sampling = SamplingParams(
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    messages = _load_messages(args.messages)
    folder = resolve_checkpoint(args.model)
    processor = ChromaProcessor.from_pretrained(folder)
    prompt = processor.encode_messages(messages, base_dir=args.messages.resolve().parent)
    voice = processor.encode_voice_prompt(args.voice_text, args.voice_audio)

    t_load = time.perf_counter()
    model = ChromaModel.from_pretrained(folder, device=args.device, dtype=args.dtype)
    log.info("model loaded in %.2f s", time.perf_counter() - t_load)
    codes = model.encode_voice_codes(voice.waveform)
    prefix = model.voice_prefix(voice.text_ids, codes)
    mimi = StreamingMimiDecoder(model.codec_model)
    top = model.config.codebook_size - 1

    chunks: list[np.ndarray] = []
    t0 = time.perf_counter()
    first_frame_s: float | None = None
    done: ReplyDone | None = None
    for event in generate_reply(model, prompt, prefix, max_frames=args.max_frames, sampling=sampling):
        if isinstance(event, AudioFrame):
            frame = event.codes.clamp(0, top).to(model.device).reshape(1, -1, 1)
            chunks.append(mimi.decode(frame)[0].float().cpu().numpy())
            if first_frame_s is None:
                first_frame_s = time.perf_counter() - t0
        elif isinstance(event, TextToken):
            log.debug("text token %d at step %d", event.token_id, event.step)
        else:
            done = event
    elapsed = time.perf_counter() - t0
    assert done is not None

    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(args.out), audio, model.config.sample_rate, subtype="PCM_16")
    text = processor.decode_text(done.text_ids, skip_special_tokens=True)
    if args.codes_out:
        np.save(args.codes_out, done.codes().numpy().astype(np.int64).reshape(-1, model.config.num_codebooks))
    if args.text_out:
        args.text_out.write_text(text + "\n")

    n = len(done.frames)
    seconds = n * model.config.samples_per_frame / model.config.sample_rate
    print(f"transcript: {text}")
    print(f"frames: {n} ({seconds:.2f} s of audio, stopped by {done.reason})")
    if first_frame_s is not None:
        print(f"time to first frame: {first_frame_s * 1000:.1f} ms")
    print(f"frames/s: {n / elapsed:.1f}   real-time factor: {elapsed / max(seconds, 1e-9):.3f}")
    print(f"wrote {args.out}")
    return 0


def _synthetic_clip(seconds: float, rate: int, pitch: float, seed: int) -> np.ndarray:
    """A voiced-sounding test signal: harmonics with vibrato and syllable-like bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 3.5 * t)) ** 2
    x = 0.2 * voice * syllables + 0.003 * rng.standard_normal(t.shape)
    return x.astype(np.float32)


def run_demo(args: argparse.Namespace) -> int:
    import soundfile as sf

    from chroma_agent.model.tiny import build_tiny_checkpoint

    if not (args.model / "config.json").is_file():
        build_tiny_checkpoint(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    sf.write(str(args.out / "voice.wav"), _synthetic_clip(3.0, 24000, 180.0, 1), 24000, subtype="PCM_16")
    sf.write(str(args.out / "question.wav"), _synthetic_clip(2.0, 16000, 120.0, 2), 16000, subtype="PCM_16")
    conversation = [
        {"role": "system", "content": "You are Chroma, a helpful voice assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "question.wav"}]},
    ]
    (args.out / "conversation.json").write_text(json.dumps(conversation, indent=2) + "\n")
    print("Chroma demo: tiny random model, synthetic audio. The tiny model speaks noise; use real weights")
    print("(--model FlashLabs/Chroma-4B on a GPU) for speech. See README.md.\n")
    gen_args = build_parser().parse_args(
        [
            "generate", "--model", str(args.model), "--messages", str(args.out / "conversation.json"),
            "--voice-audio", str(args.out / "voice.wav"), "--voice-text", "Hello, this is the voice to clone.",
            "--out", str(args.out / "reply.wav"), "--max-frames", "50", "--seed", "0",
            "--codes-out", str(args.out / "reply_codes.npy"), "--text-out", str(args.out / "reply.txt"),
        ]
    )
    return run_generate(gen_args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from chroma_agent.audio import AudioError
    from chroma_agent.model.config import ConfigError
    from chroma_agent.model.loading import CheckpointError

    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "make-tiny":
            from chroma_agent.model.tiny import build_tiny_checkpoint

            print(f"wrote {build_tiny_checkpoint(args.folder, seed=args.seed)}")
            return 0
        if args.command == "demo":
            return run_demo(args)
    except (UsageError, AudioError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"chroma-agent: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
