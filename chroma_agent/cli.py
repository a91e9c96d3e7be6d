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


# LiveKit Agents worker commands: livekit-agents' own CLI parses their options (see chroma_agent.worker).
WORKER_COMMANDS = {
    "start": "run the LiveKit Agents worker (production)",
    "dev": "run the LiveKit Agents worker in development mode",
    "console": "talk to the agent in this terminal (no LiveKit server)",
    "connect": "join one LiveKit room (--room NAME)",
}


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

    play = sub.add_parser("playground", help="talk to the agent from a browser (WebRTC, no LiveKit server)")
    play.add_argument("--model", default="tiny",
                      help="'tiny' (random weights, built into build/tiny: speaks noise), a checkpoint folder "
                           "or a Hugging Face repo id")
    play.add_argument("--voice", help="a saved voice's name")
    play.add_argument("--voice-audio", type=Path, help="clip of the voice to clone (with --voice-text)")
    play.add_argument("--voice-text", help="transcript of --voice-audio")
    play.add_argument("--host", default="127.0.0.1")
    play.add_argument("--port", type=int, default=8080)
    play.add_argument("--device", default="cpu")
    play.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")

    srv = sub.add_parser("serve", help="serve the HTTP API (chat completions, realtime, voices) with uvicorn")
    srv.add_argument("--model", required=True, help="checkpoint folder or Hugging Face repo id (FlashLabs/Chroma-4B)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require this key (Bearer) on every request but /health and /metrics; "
                     "default: $CHROMA_API_KEY")
    srv.add_argument("--voices-dir", type=Path, help="stored voices (default: $CHROMA_VOICES_DIR or "
                     "~/.cache/chroma-agent/voices)")
    srv.add_argument("--default-voice", help="stored voice for requests that name none and clone none")
    srv.add_argument("--assets-dir", type=Path, help="folder requests may name audio files in (off by default)")
    srv.add_argument("--max-sessions", type=int, default=4, help="conversations served at once (engine slots)")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--max-request-mb", type=float, default=50.0, help="largest accepted request body")
    # Hardening limits (docs/api.md, "Limits"); defaults are ServerSettings' own.
    srv.add_argument("--max-audio-samples", type=int, default=None,
                     help="most samples (frames x channels) one audio file may decode to (default 28800000)")
    srv.add_argument("--header-timeout-s", type=float, default=None,
                     help="a request's headers must arrive within this many seconds, else 408 (default 10)")
    srv.add_argument("--max-header-kb", type=int, default=None, help="largest request headers, else 431 (default 64)")
    srv.add_argument("--max-connections", type=int, default=None,
                     help="open connections beyond this get 503 at once; 0 = no cap (default 1000)")
    srv.add_argument("--no-docs", action="store_true", help="do not serve /docs, /redoc and /openapi.json")
    # Work per request and slots that come back (docs/api.md, "Limits"; docs/realtime.md).
    srv.add_argument("--max-messages", type=int, default=None, help="messages of one chat request (default 2048)")
    srv.add_argument("--max-turn-chars", type=int, default=None,
                     help="text of one message, realtime item or instructions, in characters (default 32768)")
    srv.add_argument("--max-items", type=int, default=None, help="items a realtime conversation holds (default 1000)")
    srv.add_argument("--stream-stall-s", type=float, default=None,
                     help="a streamed reply whose client falls this far behind is cancelled (default 5)")
    srv.add_argument("--realtime-idle-timeout-s", type=float, default=None,
                     help="a realtime session idle this long ends; 0 = never (default 120)")
    srv.add_argument("--realtime-max-session-s", type=float, default=None,
                     help="a realtime session ends after this long; 0 = never (default 3600, OpenAI's)")
    for name, text in WORKER_COMMANDS.items():
        sub.add_parser(name, help=f"{text}; see `chroma-agent {name} --help`", add_help=False)
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


def run_playground(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from chroma_agent.webrtc.playground import TINY, TINY_NOTICE, create_app, open_engine

    # Take the port before loading the model, so a busy port fails in a second, not after the load.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc} (try --port)") from None
    with sock:
        engine, voice = open_engine(args.model, device=args.device, dtype=args.dtype, voice=args.voice,
                                    voice_audio=args.voice_audio, voice_text=args.voice_text)
        tiny = args.model == TINY
        app = create_app(engine, voice=voice, notice=TINY_NOTICE if tiny else None)
        print(f"\nChroma playground: open http://{args.host}:{args.port}/ in a browser on this machine, "
              "press Start talking and allow the microphone. Ctrl-C stops it.")
        if tiny:
            print("The tiny model has random weights: it answers with noise. For speech, use real weights:\n"
                  "  chroma-agent playground --model FlashLabs/Chroma-4B --device cuda --dtype bfloat16 \\\n"
                  "      --voice-audio ref.wav --voice-text \"what ref.wav says\"")
        print(flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        finally:
            engine.close()
    return 0


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available in this torch build or on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")


def run_serve(args: argparse.Namespace) -> int:
    import os

    from chroma_agent.engine.engine import Engine, EngineConfig
    from chroma_agent.server.runner import bind, serve
    from chroma_agent.server.settings import ServerSettings
    from chroma_agent.voices import VoiceError, VoiceStore

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_sessions < 1:
        raise UsageError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if not args.max_request_mb > 0:
        raise UsageError(f"--max-request-mb must be > 0, got {args.max_request_mb}")
    if args.assets_dir is not None and not args.assets_dir.is_dir():
        raise UsageError(f"--assets-dir: {args.assets_dir} is not a folder")
    api_key = args.api_key or os.environ.get("CHROMA_API_KEY") or None
    if api_key is not None and len(api_key) < 8:
        raise UsageError("--api-key (or CHROMA_API_KEY) must be at least 8 characters")
    _check_device(args.device)
    hardening: dict[str, int | float | None] = {}  # flags given; the rest keep ServerSettings' defaults
    if args.max_audio_samples is not None:
        hardening["max_audio_samples"] = args.max_audio_samples
    if args.header_timeout_s is not None:
        hardening["header_timeout_s"] = args.header_timeout_s
    if args.max_header_kb is not None:
        hardening["max_header_bytes"] = args.max_header_kb * 1024
    if args.max_connections is not None:
        hardening["max_connections"] = args.max_connections or None  # 0: no cap
    for name in ("max_messages", "max_turn_chars", "max_items", "stream_stall_s"):
        if getattr(args, name) is not None:
            hardening[name] = getattr(args, name)
    for name in ("realtime_idle_timeout_s", "realtime_max_session_s"):
        if getattr(args, name) is not None:
            hardening[name] = getattr(args, name) or None  # 0: no limit
    try:
        settings = ServerSettings(api_key=api_key, assets_dir=args.assets_dir,
                                  max_request_bytes=max(1024, int(args.max_request_mb * 1024 * 1024)),
                                  docs=not args.no_docs, **hardening)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    store = VoiceStore(args.voices_dir)
    default_voice = None
    if args.default_voice is not None:
        try:
            default_voice = store.get(args.default_voice)
        except VoiceError as exc:
            known = ", ".join(store.names()) or "none"
            raise UsageError(f"--default-voice: {exc} in {store.folder} (stored voices: {known})") from None
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc} (try --port)") from None
    with sock:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        config=EngineConfig(max_sessions=args.max_sessions),
                                        voices_dir=store.folder, default_voice=default_voice)
        try:
            if default_voice is not None:
                try:
                    default_voice.require_compatible(engine.model.config)
                except VoiceError as exc:
                    raise UsageError(f"--default-voice: {exc}") from None
            serve(engine, settings, sock)
        finally:
            engine.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WORKER_COMMANDS:
        from chroma_agent.worker import main as worker_main

        return worker_main(argv)
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
        if args.command == "playground":
            return run_playground(args)
        if args.command == "serve":
            return run_serve(args)
    except (UsageError, AudioError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"chroma-agent: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
