"""uvicorn's connection protocols with the limits a public server needs.

uvicorn's HTTP protocol waits for a request's headers forever and keeps whatever headers arrive: a client that
opens connections and never finishes a request line (slowloris) holds a file descriptor each, indefinitely, and
one that streams headers without end grows the server's memory. :func:`guarded_http_protocol` adds:

* a deadline for the headers of every request (the first on a connection, and each next one on a keep-alive
  connection, from its first byte): past it the client gets ``408`` and the connection is closed;
* a size limit on one request's headers: ``431`` beyond it;
* a cap on open connections: a connection beyond it gets ``503`` at once and is closed, so that the file
  descriptor is freed immediately instead of the client hanging.

Every refusal is OpenAI's JSON error naming the setting. :class:`CleanRefusalWebSocketProtocol` fixes how uvicorn's
websockets protocol treats a handshake refused with an HTTP response (our ``401`` for a wrong key): it logs
``ERROR: ASGI callable returned without completing handshake`` for each, which is noise, not an error.

Both protocols also give the app a way to drop a connection at once (:func:`abort_connection`): a client that
stopped reading has filled every buffer, so a polite close (flush, then close) would never complete and its
coroutine and socket would stay. ASGI has no such message; the protocols put an abort callable into the scope's
``extensions``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _BaseHttpProtocol
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools everywhere we run
    _BaseHttpProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

#: The scope extension holding a callable that drops the connection now (discarding what is unsent).
ABORT_EXTENSION = "chroma.abort_connection"


def abort_connection(scope: dict[str, Any]) -> bool:
    """Drop the request's connection at once; False when the server gives no way to (not our protocols)."""
    abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if abort is None:
        return False
    abort()
    return True


def _error_response(status: int, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def guarded_http_protocol(*, header_timeout_s: float, max_header_bytes: int,
                          max_connections: int | None) -> type[asyncio.Protocol] | str:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` enforcing the three limits above."""
    if _BaseHttpProtocol is None:  # pragma: no cover
        log.warning("httptools is not installed: request header deadlines and size limits are not enforced")
        return "auto"

    class GuardedHttpProtocol(_BaseHttpProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_deadline: asyncio.TimerHandle | None = None
            self._in_headers = False
            self._header_bytes = 0

        # --- the header phase: from a request's first byte (or the connection) to its last header --------

        def _await_headers(self) -> None:
            self._in_headers = True
            self._header_bytes = 0
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _headers_done(self) -> None:
            self._in_headers = False
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _refuse(self, status: int, message: str, code: str) -> None:
            self._headers_done()
            if not self.transport.is_closing():
                self.transport.write(_error_response(status, message, code))
                self.transport.close()

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            # After a WebSocket upgrade the transport belongs to another protocol: nothing of ours to time out.
            if self._in_headers and self.transport.get_protocol() is self:
                log.debug("closing a connection from %s: no complete request headers within %g s", self.client,
                          header_timeout_s)
                self._refuse(408, f"request headers were not complete within {header_timeout_s:g} s "
                             "(header_timeout_s)", "request_timeout")

        # --- uvicorn's protocol ------------------------------------------------------------------------------

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            if max_connections is not None and len(self.connections) > max_connections:
                log.warning("refusing a connection from %s: %d connections are open (max_connections %d)",
                            self.client, len(self.connections) - 1, max_connections)
                self._refuse(503, f"the server has {max_connections} connections open (max_connections); "
                             "try again shortly", "too_many_connections")
                return
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            counting = self._in_headers
            super().data_received(data)
            # Counted after parsing: a chunk that completes the headers may carry body bytes as well, and the
            # parser's callbacks below have then ended the header phase.
            if counting and self._in_headers:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(431, f"request headers are larger than {max_header_bytes} bytes "
                                 "(max_header_bytes)", "headers_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # the next request on a keep-alive connection
                self._await_headers()

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()
            # The request's task starts on the next loop turn, so the scope it gets has the hook.
            self.scope.setdefault("extensions", {})[ABORT_EXTENSION] = self.transport.abort

    return GuardedHttpProtocol


class CleanRefusalWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, but a handshake answered with an HTTP response counts as complete.

    Refusing with ``send_denial_response`` (HTTP 401 and a JSON body) is the ASGI way to refuse a WebSocket
    with a status; uvicorn sends it correctly and then, not having marked the handshake done, logs an ERROR.
    """

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message.get("type") == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake itself was refused
        if scope is not None:
            scope.setdefault("extensions", {})[ABORT_EXTENSION] = self.transport.abort
