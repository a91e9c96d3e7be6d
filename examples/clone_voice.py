"""Clone a voice once and store it under a name the agents can use (``voice="anna"``, ``CHROMA_VOICE=anna``).

    # here, with the model (writes <voices dir>/anna.safetensors):
    python examples/clone_voice.py anna.wav --text "Hi, I'm Anna from support." --name anna \
        --model FlashLabs/Chroma-4B --voices-dir ~/.cache/chroma-agent/voices

    # or on a running `chroma-agent serve` (POST /v1/voices; stored in that server's voices folder):
    python examples/clone_voice.py anna.wav --text "Hi, I'm Anna from support." --name anna \
        --server http://gpu-box:8000 [--api-key KEY]

The clip: 1-30 s of one person speaking clearly (WAV, FLAC, OGG; any rate), and ``--text`` exactly what it
says. Only the clip's Mimi codes and the transcript's token ids are stored, not the recording. Prints the
stored voice as JSON. Exit codes: 0 stored, 1 refused (bad clip, name taken, server error), 2 bad arguments.

Environment: CHROMA_MODEL (default for --model), CHROMA_VOICES_DIR (default for --voices-dir),
CHROMA_API_KEY (default for --api-key in --server mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


class CloneError(RuntimeError):
    """The voice was not stored; the message says why."""


def clone_local(audio: Path, text: str, name: str, *, model: str, voices_dir: str | Path | None = None,
                device: str = "auto", dtype: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Clone with the model loaded here (`Engine.create_voice`) into `voices_dir`; returns the profile."""
    from chroma_agent.config import ModelSettings, SettingsError
    from chroma_agent.engine.engine import Engine, EngineConfig
    from chroma_agent.voices import VoiceError, VoiceStore, validate_voice_name

    try:
        validate_voice_name(name)
    except VoiceError as exc:
        raise CloneError(str(exc)) from None
    store = VoiceStore(voices_dir)
    if not overwrite and name in store:  # before loading a model for nothing
        raise CloneError(f"voice {name!r} already exists in {store.folder}; pass --overwrite to replace it")
    # The same --model / --device / --dtype as every chroma-agent command (`tiny`, `auto` included).
    try:
        settings = ModelSettings.from_sources({}, model=model, device=device, dtype=dtype)
        device, dtype = settings.torch_device()
        checkpoint = settings.checkpoint()
    except SettingsError as exc:
        raise CloneError(str(exc)) from None
    # One conversation slot: the engine is only used for its codec and tokenizer here.
    try:
        engine = Engine.from_pretrained(checkpoint, device=device, dtype=dtype, voices_dir=store.folder,
                                        config=EngineConfig(max_sessions=1))
    except (OSError, ValueError, RuntimeError) as exc:  # no such checkpoint, no GPU, a bad config
        raise CloneError(f"cannot load the model {model}: {exc}") from None
    with engine:
        try:
            profile = engine.create_voice(audio, text, name=name, save=True).result()
        except VoiceError as exc:
            raise CloneError(str(exc)) from None
    return {**profile.to_json(), "path": str(store.path_for(name))}


def clone_remote(audio: Path, text: str, name: str, *, server: str, api_key: str | None = None,
                 overwrite: bool = False, timeout: float = 120.0) -> dict[str, Any]:
    """Upload to a running server's ``POST /v1/voices`` (multipart: name, transcript, file, overwrite)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = {"name": name, "transcript": text, "overwrite": "true" if overwrite else "false"}
    try:
        with audio.open("rb") as clip:
            response = httpx.post(f"{server.rstrip('/')}/v1/voices", data=data, headers=headers,
                                  files={"file": (audio.name, clip, "application/octet-stream")},
                                  timeout=timeout)
    except httpx.HTTPError as exc:
        raise CloneError(f"cannot reach {server}: {exc}") from None
    if response.status_code != 201:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise CloneError(f"the server refused the voice ({response.status_code}): {message}")
    return response.json()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clone_voice.py", description="Clone a voice from a clip and its "
                                     "transcript, and store it by name.")
    parser.add_argument("audio", type=Path, help="1-30 s clip of the voice (WAV, FLAC, OGG)")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="exactly what the clip says")
    text.add_argument("--text-file", type=Path, help="file holding what the clip says")
    parser.add_argument("--name", required=True, help="name to store the voice under (A-Z, a-z, 0-9, _ . -)")
    parser.add_argument("--overwrite", action="store_true", help="replace a stored voice of that name")
    parser.add_argument("--model", default=os.environ.get("CHROMA_MODEL") or "FlashLabs/Chroma-4B",
                        help="checkpoint folder or Hugging Face repo id [CHROMA_MODEL]")
    parser.add_argument("--voices-dir", default=os.environ.get("CHROMA_VOICES_DIR") or None,
                        help="where voices are stored [CHROMA_VOICES_DIR; ~/.cache/chroma-agent/voices]")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--server", help="clone on this running chroma-agent server instead (http://host:port)")
    parser.add_argument("--api-key", default=os.environ.get("CHROMA_API_KEY") or None,
                        help="the server's API key [CHROMA_API_KEY]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.audio.is_file():
        print(f"clone_voice.py: error: {args.audio}: no such file", file=sys.stderr)
        return 2
    try:
        text = args.text if args.text is not None else args.text_file.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"clone_voice.py: error: --text-file: {exc}", file=sys.stderr)
        return 2
    if not text.strip():
        print("clone_voice.py: error: the transcript is empty: give the words the clip says", file=sys.stderr)
        return 2
    text = text.strip()
    try:
        if args.server:
            profile = clone_remote(args.audio, text, args.name, server=args.server, api_key=args.api_key,
                                   overwrite=args.overwrite)
        else:
            profile = clone_local(args.audio, text, args.name, model=args.model, voices_dir=args.voices_dir,
                                  device=args.device, dtype=args.dtype, overwrite=args.overwrite)
    except CloneError as exc:
        print(f"clone_voice.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(profile, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
