"""`chroma-agent` command line: every command reads its settings from `chroma_agent.config`."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chroma_agent.config import (
    TINY_MAX_REPLY_S,
    DemoSettings,
    GenerateSettings,
    PlaygroundSettings,
    ServeSettings,
    SettingsError,
    add_flags,
)
from chroma_agent.frames import FRAME_MS

log = logging.getLogger("chroma_agent")

MAX_FRAMES = int(60_000 / FRAME_MS)  # 60 s
# random weights almost never stop by themselves; whole frames, as the engine counts its max_reply_s
TINY_MAX_FRAMES = int(TINY_MAX_REPLY_S * 1000 / FRAME_MS)


class UsageError(ValueError):
    """Bad command-line input: reported on stderr with exit code 2."""


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--greedy", action="store_true", help="argmax decoding (reproduces the reference exactly)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-frames", type=int, default=None,
                   help=f"reply length limit in 80 ms frames (default {MAX_FRAMES}; {TINY_MAX_FRAMES} for tiny)")


# LiveKit Agents worker commands: livekit-agents' own CLI parses their options (see chroma_agent.worker).
WORKER_COMMANDS = {
    "start": "run the LiveKit Agents worker (production)",
    "dev": "run the LiveKit Agents worker in development mode",
    "console": "talk to the agent in this terminal (no LiveKit server)",
    "connect": "join one LiveKit room (--room NAME)",
}
SETTINGS_NOTE = ("Each setting is a flag, else its environment variable, else the default (both in brackets); "
                 "a flag means the same in every chroma-agent command (README.md, Configuration).")


def _sub(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. {SETTINGS_NOTE}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chroma-agent", description="Voice agents driven by FlashLabs Chroma 1.0. " + SETTINGS_NOTE,
        epilog="The worker commands (start, dev, console, connect) are parsed by livekit-agents' own CLI: "
               "see `chroma-agent start --help`.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = _sub(sub, "generate", "answer one conversation in a cloned voice, streaming frame by frame")
    add_flags(gen, GenerateSettings)
    _add_sampling_args(gen)
    gen.add_argument("--messages", required=True, type=Path, help="conversation JSON (the API's messages list)")
    gen.add_argument("--out", required=True, type=Path, help="reply WAV (24 kHz)")
    gen.add_argument("--codes-out", type=Path, help="write the decoded frames as int64 .npy [frames, 8]")
    gen.add_argument("--text-out", type=Path, help="write the reply transcript")

    tiny = sub.add_parser("make-tiny", help="write a tiny random Chroma checkpoint (for demos and tests)")
    tiny.add_argument("folder", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    demo = _sub(sub, "demo", "run the whole pipeline once on a tiny model with synthetic audio")
    add_flags(demo, DemoSettings)
    demo.add_argument("--out-dir", type=Path, default=Path("build/demo"),
                      help="folder for the clips and the reply (default build/demo)")
    demo.add_argument("--out", dest="out_dir", type=Path, help=argparse.SUPPRESS)  # its old name

    play = _sub(sub, "playground", "talk to the agent from a browser (WebRTC, no LiveKit server)")
    add_flags(play, PlaygroundSettings)

    srv = _sub(sub, "serve", "serve the HTTP API (chat completions, realtime, voices) with uvicorn")
    add_flags(srv, ServeSettings)
    srv.add_argument("--default-voice", dest="voice", default=None, help=argparse.SUPPRESS)  # the old --voice
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
    from chroma_agent.voices import VoiceStore, create_voice_profile

    settings = GenerateSettings.from_args(args)
    max_frames = args.max_frames if args.max_frames is not None else (
        TINY_MAX_FRAMES if settings.is_tiny else MAX_FRAMES)
    if max_frames < 1:
        raise UsageError("--max-frames must be >= 1")
    if settings.voice is None and settings.voice_audio is None:
        raise UsageError("generate needs a voice: --voice NAME (a stored voice) or --voice-audio CLIP "
                         "--voice-text 'what the clip says'")
    stored = settings.stored_voice()  # an unknown name fails before the model loads
    sampling = SamplingParams(
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    messages = _load_messages(args.messages)
    device, dtype = settings.torch_device()
    folder = resolve_checkpoint(settings.checkpoint())
    processor = ChromaProcessor.from_pretrained(folder)
    prompt = processor.encode_messages(messages, base_dir=args.messages.resolve().parent)
    if stored is None:  # a bad clip fails before the model loads too
        processor.encode_voice_prompt(settings.voice_text or "", settings.voice_audio)

    t_load = time.perf_counter()
    model = ChromaModel.from_pretrained(folder, device=device, dtype=dtype)
    log.info("model loaded in %.2f s", time.perf_counter() - t_load)
    if stored is not None:
        stored.require_compatible(model.config)
        voice = stored
    else:
        voice = create_voice_profile(model, processor, settings.voice_audio, settings.voice_text or "",
                                     name=settings.voice)
        if settings.voice is not None:
            log.info("stored the voice as %s", VoiceStore(settings.voices_dir).save(voice, overwrite=True))
    prefix = model.voice_prefix(voice.text_ids, voice.codes)
    mimi = StreamingMimiDecoder(model.codec_model)
    top = model.config.codebook_size - 1

    chunks: list[np.ndarray] = []
    t0 = time.perf_counter()
    first_frame_s: float | None = None
    done: ReplyDone | None = None
    for event in generate_reply(model, prompt, prefix, max_frames=max_frames, sampling=sampling,
                                step_mode=settings.engine_step_mode):
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




def run_demo(args: argparse.Namespace) -> int:
    import soundfile as sf

    from chroma_agent.model.tiny import synthetic_speech

    settings = DemoSettings.from_args(args)
    model = settings.checkpoint()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sf.write(str(args.out_dir / "voice.wav"), synthetic_speech(3.0, 24000, 180.0, 1), 24000, subtype="PCM_16")
    sf.write(str(args.out_dir / "question.wav"), synthetic_speech(2.0, 16000, 120.0, 2), 16000, subtype="PCM_16")
    conversation = [
        {"role": "system", "content": "You are Chroma, a helpful voice assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "question.wav"}]},
    ]
    (args.out_dir / "conversation.json").write_text(json.dumps(conversation, indent=2) + "\n")
    print("Chroma demo: tiny random model, synthetic audio. The tiny model speaks noise; use real weights")
    print("(--model FlashLabs/Chroma-4B on a GPU) for speech. See README.md.\n")
    gen_args = build_parser().parse_args(
        [
            "generate", "--model", model, "--device", settings.device, "--dtype", settings.dtype,
            "--messages", str(args.out_dir / "conversation.json"),
            "--voice-audio", str(args.out_dir / "voice.wav"), "--voice-text", "Hello, this is the voice to clone.",
            "--out", str(args.out_dir / "reply.wav"), "--max-frames", "50", "--seed", "0",
            "--codes-out", str(args.out_dir / "reply_codes.npy"), "--text-out", str(args.out_dir / "reply.txt"),
        ]
    )
    return run_generate(gen_args)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads so that a busy port fails in a second."""
    from chroma_agent.server.runner import bind

    try:
        return bind(host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (try --port)") from None


def run_playground(args: argparse.Namespace) -> int:
    import uvicorn

    from chroma_agent.webrtc.playground import TINY_NOTICE, create_app, open_engine, reach_hint

    settings = PlaygroundSettings.from_args(args)
    settings.torch_device()  # a missing GPU fails now, not after the port is taken
    with _listen(settings.host, settings.port) as sock:
        port = sock.getsockname()[1]
        engine, voice = open_engine(settings)
        app = create_app(engine, voice=voice, notice=TINY_NOTICE if settings.is_tiny else None)
        print(f"\nChroma playground: open http://{_url_host(settings.host)}:{port}/ in a browser, press Start "
              "talking and allow the microphone. Ctrl-C stops it.")
        print(reach_hint(settings.host, port))
        if settings.is_tiny:
            print("The tiny model has random weights: it answers with noise. For speech, use real weights:\n"
                  "  chroma-agent playground --model FlashLabs/Chroma-4B \\\n"
                  "      --voice-audio ref.wav --voice-text \"what ref.wav says\"")
        print(flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        finally:
            engine.close()
    return 0


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def run_serve(args: argparse.Namespace) -> int:
    from chroma_agent.server.runner import serve
    from chroma_agent.server.settings import ServerSettings

    settings = ServeSettings.from_args(args)
    try:
        server = ServerSettings(api_key=settings.api_key, assets_dir=settings.assets_dir,
                                max_request_bytes=max(1024, int(settings.max_request_mb * 1024 * 1024)),
                                max_audio_samples=settings.max_audio_samples,
                                header_timeout_s=settings.header_timeout_s,
                                max_header_bytes=settings.max_header_kb * 1024,
                                max_connections=settings.max_connections or None,  # 0: no cap
                                max_messages=settings.max_messages, max_turn_chars=settings.max_turn_chars,
                                max_items=settings.max_items, stream_stall_s=settings.stream_stall_s,
                                realtime_idle_timeout_s=settings.realtime_idle_timeout_s or None,  # 0: never
                                realtime_max_session_s=settings.realtime_max_session_s or None,
                                docs=not settings.no_docs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings.torch_device()  # a missing GPU fails now, not after the port is taken
    settings.stored_voice()  # so does an unknown --voice
    with _listen(settings.host, settings.port) as sock:
        engine = settings.load_engine()
        try:
            if engine.default_voice is None:
                log.warning("no default voice: requests must name a stored voice (`voice`) or clone one "
                            "(prompt_text + prompt_audio); start with --voice NAME, or --voice-audio CLIP "
                            "--voice-text '...', to give them one")
            else:
                log.info("default voice: %s", engine.default_voice.name)
            serve(engine, server, sock)
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
    from chroma_agent.voices import VoiceError

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
    except (UsageError, SettingsError, AudioError, ConfigError, CheckpointError, VoiceError, FileNotFoundError,
            ValueError) as exc:
        print(f"chroma-agent: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
