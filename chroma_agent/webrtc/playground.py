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

from chroma_agent.config import (
    TINY,
    TINY_MAX_REPLY_S,
    PlaygroundSettings,
    SettingsError,
    ensure_tiny_checkpoint,
)
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.vad import silero_session
from chroma_agent.voices import VoiceProfile
from chroma_agent.webrtc.session import PeerSession, use_loopback_only

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_INSTRUCTIONS = "You are Chroma, a helpful voice assistant."
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

    @app.get("/info")
    async def info() -> dict[str, str | None]:
        """What the page shows before the first click (the tiny model's noise warning)."""
        return {"notice": notice}

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def open_engine(
    model: PlaygroundSettings | str = TINY,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tiny_dir: Path | None = None,
    voice: str | None = None,
    voice_audio: Path | None = None,
    voice_text: str | None = None,
) -> tuple[Engine, VoiceProfile]:
    """The engine and the voice it speaks in, from the command's settings (or the same as arguments).

    `tiny` builds its random checkpoint once (in `tiny_dir`, default ~/.cache/chroma-agent/tiny) and, unless a
    voice is given, clones a synthetic clip; any other model needs a voice."""
    if isinstance(model, PlaygroundSettings):
        settings = model
    else:
        settings = PlaygroundSettings.from_sources({}, model=model, device=device, dtype=dtype, voice=voice,
                                                   voice_audio=voice_audio, voice_text=voice_text)
    if not settings.is_tiny and settings.voice is None and settings.voice_audio is None:
        raise SettingsError(f"--model {settings.model} needs a voice: --voice NAME (a saved voice) or "
                            "--voice-audio WAV --voice-text 'what the clip says'")
    checkpoint = ensure_tiny_checkpoint(tiny_dir) if settings.is_tiny and tiny_dir is not None else None
    engine = settings.load_engine(checkpoint=checkpoint)
    try:
        profile = settings.speaking_voice(engine)  # the tiny model without a voice: a synthetic clip
    except BaseException:
        engine.close()
        raise
    return engine, profile


def reach_hint(host: str, port: int) -> str:
    """How to open the page from another machine: browsers give the microphone only to https:// pages and to
    localhost, so a plain http:// address on the network gets no microphone; an SSH tunnel makes it localhost."""
    tunnel = (f"ssh -N -L {port}:localhost:{port} USER@THIS-MACHINE, then open http://localhost:{port}/ "
              "on that machine")
    if host in ("127.0.0.1", "localhost", "::1"):
        return (f"From another machine: browsers allow the microphone only on https:// or localhost pages, so "
                f"forward the port over SSH: {tunnel}.")
    return (f"Listening on {host}: browsers on other machines allow the microphone only on https:// or "
            f"localhost pages, so a plain http:// address gets no microphone. Forward the port over SSH "
            f"instead: {tunnel} (or put an https proxy in front).")
