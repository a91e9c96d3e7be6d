"""The FastAPI app: one `Engine`, routers per resource, errors in one handler."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from chroma_agent import __version__
from chroma_agent.engine.engine import Engine
from chroma_agent.server import chat, realtime, system, voices_api
from chroma_agent.server.errors import install_error_handlers
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.settings import ServerSettings

log = logging.getLogger(__name__)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(
        title="chroma-agent",
        version=__version__,
        description="FlashLabs Chroma 1.0 speech-to-speech: FlashLabs-compatible chat completions, "
        "an OpenAI-Realtime-compatible WebSocket, voice profiles.",
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = ServerMetrics(engine)
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(chat.router)
    app.include_router(voices_api.router)
    app.include_router(realtime.router)
    return app
