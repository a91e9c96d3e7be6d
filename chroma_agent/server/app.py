"""The FastAPI app: one `Engine`, routers per resource, errors in one handler."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chroma_agent import __version__
from chroma_agent.engine.engine import Engine
from chroma_agent.server import chat, realtime, system, voices_api
from chroma_agent.server.errors import install_error_handlers
from chroma_agent.server.memory import MemoryTrimmer
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.priority import lower_pool
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.system import ProtectedRoute

log = logging.getLogger(__name__)

#: A request body at least this large is a spike worth trimming the heap after (see server/memory.py).
TRIM_AFTER_BODY_BYTES = 1024 * 1024


class TrimAfterSpikes:
    """ASGI middleware: after a large HTTP request or any WebSocket session, ask the trimmer to run."""

    def __init__(self, app: ASGIApp, trimmer: MemoryTrimmer, threshold: int = TRIM_AFTER_BODY_BYTES) -> None:
        self.app, self.trimmer, self.threshold = app, trimmer, threshold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            try:
                await self.app(scope, receive, send)
            finally:
                self.trimmer.request()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting, send)
        finally:
            if received >= self.threshold:
                self.trimmer.request()


def _docs_router(app: FastAPI) -> APIRouter:
    """The schema and its two viewers, behind the same API key as the API (FastAPI's own routes have none)."""
    router = APIRouter(route_class=ProtectedRoute, include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    return router


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    app = FastAPI(
        title="chroma-agent",
        version=__version__,
        description="FlashLabs Chroma 1.0 speech-to-speech: FlashLabs-compatible chat completions, "
        "an OpenAI-Realtime-compatible WebSocket, voice profiles.",
        openapi_url=None,  # served by _docs_router instead, with the API key
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    # The engine's preparation threads (chat templates, tokenizing, Whisper features) yield the CPU to its step.
    lower_pool(engine.pool, engine.config.prep_workers)
    app.state.settings = settings
    app.state.metrics = ServerMetrics(engine)
    install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(chat.router)
    app.include_router(voices_api.router)
    app.include_router(realtime.router)
    if settings.docs:
        app.include_router(_docs_router(app))
    app.state.memory_trimmer = MemoryTrimmer()
    app.add_middleware(TrimAfterSpikes, trimmer=app.state.memory_trimmer)
    return app
