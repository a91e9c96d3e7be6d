"""Server-wide request handling (API key, body size limit, request ids, metrics) and the system endpoints.

Every HTTP route of the server uses one of the route classes below, so those concerns live in one place:
the API key is checked before the body is read (an unauthenticated client cannot make the server read
50 MB), the body limit holds for chunked uploads as well as for an honest Content-Length, and every
request is counted by endpoint and status and logged once with its request id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from chroma_agent.server.errors import APIError
from chroma_agent.server.schemas import ErrorResponse, Health, ModelCard, ModelList
from chroma_agent.server.security import require_api_key

log = logging.getLogger(__name__)

_STARTED = int(time.time())
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Probed every few seconds by load balancers and Prometheus: their successes would drown the log.
_POLLED = frozenset({"/health", "/metrics"})

#: OpenAPI entries for the errors any route may answer with (they all share the OpenAI error shape).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request (the message names the field)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "request body larger than the server accepts"},
}


class _BodyTooLarge(HTTPException):
    """Raised from inside `receive`; FastAPI lets (Starlette) HTTPExceptions from body parsing through."""


def _limited_receive(receive: Receive, limit: int) -> Receive:
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(413)
        return message

    return wrapped


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")


def _error_kind(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, APIError):
        return exc.status, exc.code or exc.type
    if isinstance(exc, RequestValidationError):
        return 400, "invalid_request"
    if isinstance(exc, HTTPException):
        return exc.status_code, f"http_{exc.status_code}"
    return 500, "internal"


class InstrumentedRoute(APIRoute):
    """Request id, body size limit, metrics and one log line per request."""

    requires_api_key = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        endpoint = self.path

        async def instrumented(request: Request) -> Response:
            given = request.headers.get("x-request-id", "")
            request_id = given if _REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex[:16]}"
            request.state.request_id = request_id
            metrics = request.app.state.metrics
            limit = request.app.state.settings.max_request_bytes
            t0 = time.perf_counter()
            try:
                if self.requires_api_key:
                    await require_api_key(request)
                length = request.headers.get("content-length", "0")
                if not length.isdigit():
                    raise APIError(400, "invalid Content-Length header")
                if int(length) > limit:
                    raise _too_large(limit)
                limited = Request(request.scope, _limited_receive(request.receive, limit))
                try:
                    response = await handler(limited)
                except _BodyTooLarge:
                    raise _too_large(limit) from None
            except Exception as exc:
                status, kind = _error_kind(exc)
                metrics.requests.labels(endpoint, str(status)).inc()
                metrics.errors.labels(kind).inc()
                log.info("request %s: %s %s -> %d %s (%.0f ms)", request_id, request.method, endpoint,
                         status, kind, (time.perf_counter() - t0) * 1000)
                raise
            response.headers["X-Request-ID"] = request_id
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            log.log(logging.DEBUG if endpoint in _POLLED else logging.INFO, "request %s: %s %s -> %d (%.0f ms)",
                    request_id, request.method, endpoint, response.status_code, (time.perf_counter() - t0) * 1000)
            return response

        return instrumented


class ProtectedRoute(InstrumentedRoute):
    """An InstrumentedRoute that needs the API key when the server has one."""

    requires_api_key = True


def served_names(request: Request) -> list[str]:
    """The served model's id, then its aliases (`ServerSettings.model_aliases`)."""
    settings = request.app.state.settings
    return [settings.model_name, *(a for a in settings.model_aliases if a != settings.model_name)]


def check_model(request: Request, model: str) -> None:
    """For GET /v1/models/{id}: only the listed names exist (chat completions accept any `model`)."""
    if model not in served_names(request):
        raise APIError(404, f"model {model!r} is not listed here (GET /v1/models); chat completions and the "
                       f"realtime endpoint accept any model name and answer with "
                       f"{request.app.state.settings.model_name!r}", type="not_found_error", param="model",
                       code="model_not_found")


# --- endpoints -----------------------------------------------------------------------------------------

router = APIRouter(route_class=InstrumentedRoute, tags=["system"])
_models = APIRouter(route_class=ProtectedRoute, tags=["system"])


@router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "engine stopped"}})
async def health(request: Request) -> JSONResponse:
    """Liveness and capacity; no API key needed (for load balancers and orchestrators)."""
    engine = request.app.state.engine
    # The engine exposes no public liveness flag; its step thread is what serves every reply.
    alive = engine.alive
    body = Health(status="ok" if alive else "unavailable", model_loaded=True, slots_total=engine.config.max_sessions,
                  slots_free=engine.free_slots, sessions=engine.live_sessions)
    return JSONResponse(body.model_dump(), status_code=200 if alive else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics; no API key needed (keep the port private or scrape through a proxy)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@_models.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    """The served model and its aliases, in OpenAI's list format (requests may name any model)."""
    return ModelList(data=[ModelCard(id=name, created=_STARTED, owned_by="flashlabs")
                           for name in served_names(request)])


@_models.get("/v1/models/{model:path}", response_model=ModelCard,
             responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "model not served"}})
async def retrieve_model(request: Request, model: str) -> ModelCard:
    check_model(request, model)
    return ModelCard(id=model, created=_STARTED, owned_by="flashlabs")


router.include_router(_models)
