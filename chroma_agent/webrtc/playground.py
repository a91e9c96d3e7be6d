"""The WebRTC playground server: one page and POST /offer; each browser tab becomes a PeerSession."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from chroma_agent.engine.engine import Engine, EngineBusyError, EngineConfig
from chroma_agent.vad import silero_session
from chroma_agent.voices import VoiceProfile
from chroma_agent.webrtc.session import PeerSession, use_loopback_only

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_INSTRUCTIONS = "You are Chroma, a helpful voice assistant."
TINY = "tiny"
TINY_MAX_REPLY_S = 5.0  # random weights almost never end a reply by themselves
TINY_VOICE_TEXT = "Hello, this is the voice to clone."
TINY_NOTICE = (
    f"This is the tiny model with random weights: it answers with loud noise (at most {TINY_MAX_REPLY_S:g} s). "
    "Turn your volume down. For speech, start the playground with real weights (see below)."
)


class Offer(BaseModel):
    sdp: str = Field(min_length=1, max_length=64_000)
    type: Literal["offer"]


class Answer(BaseModel):
    sdp: str
    type: str
    session: str


def create_app(
    engine: Engine,
    *,
    voice: VoiceProfile | str | None = None,
    instructions: str = DEFAULT_INSTRUCTIONS,
    notice: str | None = None,
) -> FastAPI:
    """The playground app; the caller owns `engine` (the app closes its sessions, not the engine).

    Starting a playground keeps this process's WebRTC media on loopback and loads Silero (once per process)
    here, before any page connects, rather than in the first offer's handler on the event loop."""
    use_loopback_only()
    silero_session()
    sessions: dict[str, PeerSession] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.gather(*(s.close() for s in list(sessions.values())))

    app = FastAPI(title="chroma-agent playground", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.post("/offer")
    async def offer(body: Offer) -> Answer:
        try:
            conversation = await engine.open_conversation(voice, instructions)
        except EngineBusyError as exc:
            raise HTTPException(503, f"{exc}; close another tab and try again") from None
        try:
            session = PeerSession(conversation, notice=notice, on_closed=lambda s: sessions.pop(s.id, None))
        except BaseException:
            conversation.close()
            raise
        sessions[session.id] = session
        try:
            answer = await session.accept(body.sdp)
        except ValueError as exc:
            await session.close()
            raise HTTPException(400, f"unusable offer: {exc}") from None
        return Answer(sdp=answer.sdp, type=answer.type, session=session.id)

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def open_engine(
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    tiny_dir: Path = Path("build/tiny"),
    voice: str | None = None,
    voice_audio: Path | None = None,
    voice_text: str | None = None,
) -> tuple[Engine, VoiceProfile]:
    """The engine and the voice it speaks in. `model="tiny"` builds a random checkpoint in `tiny_dir` if
    missing and, unless a voice is given, clones a synthetic clip."""
    if (voice_audio is None) != (voice_text is None):
        raise ValueError("--voice-audio and --voice-text go together")
    tiny = model == TINY
    if not tiny and voice is None and voice_audio is None:
        raise ValueError(f"--model {model} needs a voice: --voice NAME (a saved voice) or "
                         "--voice-audio WAV --voice-text 'what the clip says'")
    if tiny and not (tiny_dir / "config.json").is_file():
        from chroma_agent.model.tiny import build_tiny_checkpoint

        log.info("building the tiny random checkpoint in %s", tiny_dir)
        build_tiny_checkpoint(tiny_dir)
    config = EngineConfig(max_reply_s=TINY_MAX_REPLY_S) if tiny else None
    engine = Engine.from_pretrained(tiny_dir if tiny else model, device=device, dtype=dtype, config=config)
    try:
        if voice_audio is not None:
            profile = engine.create_voice(voice_audio, voice_text, name="playground").result()
        elif voice is not None:
            profile = engine.voices.get(voice)
        else:
            from chroma_agent.cli import _synthetic_clip

            rate = engine.model.config.sample_rate
            clip = _synthetic_clip(3.0, rate, 180.0, 1)
            profile = engine.create_voice(clip, TINY_VOICE_TEXT, name="tiny-demo", sample_rate=rate).result()
    except BaseException:
        engine.close()
        raise
    return engine, profile
