"""Where the server is (URL, API key, timeouts), checking it, and opening connections to it."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from chroma_agent.realtime_client.connection import (
    CLOSE_TIMEOUT_S,
    REPLY_IDLE_TIMEOUT_S,
    ClientConnection,
    close_detail,
    close_quietly,
)
from chroma_agent.realtime_client.errors import (
    RealtimeClientError,
    RequestRefused,
    ServerBusy,
    ServerRefused,
    ServerTimeout,
    ServerUnreachable,
)
from chroma_agent.realtime_protocol import (
    ErrorCode,
    ErrorEvent,
    ProtocolError,
    ServerEventType,
    SessionEvent,
    parse_server_event,
)

__all__ = ["RealtimeClient", "display_url", "realtime_url"]

REALTIME_PATH = "/v1/realtime"
CONNECT_TIMEOUT_S = 10.0  # TCP + WebSocket handshake + the server's first event (it may wait for a slot)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The socket's receive buffer: without a cap, the kernel grows it to megabytes (minutes of audio) before TCP
# pushes back on the server. 256 KiB is about 4 s of audio deltas.
RECEIVE_BUFFER_BYTES = 256 * 1024
CLOSE_TRY_AGAIN = 1013  # the server's "no free slot" close code (RFC 6455's "try again later")
_S = ServerEventType


def realtime_url(base_url: str) -> str:
    """``http://host:8000`` (or ``https://``, ``ws://``, ``wss://``, ``.../v1``, ``.../v1/realtime``) to the
    server's ``ws(s)://host:8000/v1/realtime`` URL (a query string is kept)."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError("remote mode: base_url must be the server's URL, e.g. http://localhost:8000")
    parts = urlsplit(base_url.strip())
    scheme = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"remote mode: base_url must be an http(s):// or ws(s):// URL with a host, "
                         f"got {display_url(base_url)!r}")
    path = parts.path.rstrip("/")
    for suffix in (REALTIME_PATH, "/v1"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((scheme, parts.netloc, path + REALTIME_PATH, parts.query, ""))


def display_url(url: str) -> str:
    """A URL without its query and credentials (either may carry a key), for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RealtimeClient:
    """A ``chroma-agent serve`` server; every :meth:`connect` is one WebSocket to its ``/v1/realtime``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 reply_timeout: float = REPLY_IDLE_TIMEOUT_S):
        self.url = realtime_url(base_url)
        self.display_url = display_url(self.url)
        self._api_key = api_key or None
        self.connect_timeout = float(connect_timeout)
        self.reply_timeout = float(reply_timeout)

    def __repr__(self) -> str:
        return f"RealtimeClient({self.display_url!r})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def check(self) -> str | None:
        """Check now (blocking) that the server answers and takes the API key (``GET /v1/models``); the
        first model it serves, if it names one."""
        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        base = parts.path[: -len(REALTIME_PATH)]
        url = urlunsplit((scheme, parts.netloc, base + "/v1/models", "", ""))
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout) as response:
                body = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise ServerRefused(self.display_url, exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ServerUnreachable(f"cannot reach the Chroma server at {self.display_url}: {exc}") from None
        models = [m.get("id") for m in body.get("data") or [] if isinstance(m, dict)]
        return str(models[0]) if models else None

    async def connect(self) -> ClientConnection:
        """A new WebSocket, past the server's ``session.created`` (a new server-side conversation)."""
        http = aiohttp.ClientSession(connector=_connector())
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws, first = await asyncio.wait_for(self._handshake(http), self.connect_timeout)
            if first.type != aiohttp.WSMsgType.TEXT:
                code = ws.close_code if first.type != aiohttp.WSMsgType.CLOSE else first.data
                if code == CLOSE_TRY_AGAIN:
                    raise ServerBusy(self.display_url)
                raise ServerUnreachable(f"the Chroma server at {self.display_url} closed the connection before "
                                        f"the session started (code {code}{close_detail(first)})")
            event = parse_server_event(first.data)
            if isinstance(event, ErrorEvent):
                if event.error.code == ErrorCode.SERVER_BUSY:
                    raise ServerBusy(self.display_url, event.error.message)
                raise RequestRefused(f"the session at {self.display_url}", event.error.to_protocol_error())
            if not isinstance(event, SessionEvent) or event.type != _S.SESSION_CREATED:
                raise RealtimeClientError(f"expected session.created from {self.display_url}, got {event.type!r}")
        except aiohttp.WSServerHandshakeError as exc:
            await http.close()
            raise ServerRefused(self.display_url, exc.status) from None
        except asyncio.TimeoutError:
            await close_quietly(ws, http)
            raise ServerTimeout(f"the Chroma server at {self.display_url} did not start a session within "
                                f"{self.connect_timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            await close_quietly(ws, http)
            raise ServerUnreachable(f"cannot connect to the Chroma server at {self.display_url}: "
                                    f"{type(exc).__name__}: {exc}") from None
        except ProtocolError as exc:
            await close_quietly(ws, http)
            raise RealtimeClientError(f"the Chroma server at {self.display_url} started with a message that is "
                                      f"not a server event: {exc.message}") from None
        except BaseException:
            await close_quietly(ws, http)
            raise
        return ClientConnection(http, ws, event, reply_timeout=self.reply_timeout)

    async def _handshake(self, http: aiohttp.ClientSession):
        ws = await http.ws_connect(self.url, headers=self._headers(), autoping=True, heartbeat=None,
                                   max_msg_size=MAX_MESSAGE_BYTES, timeout=aiohttp.ClientWSTimeout(
                                       ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
        try:
            return ws, await ws.receive()
        except BaseException:
            await ws.close()
            raise


def _connector() -> aiohttp.TCPConnector:
    try:
        return aiohttp.TCPConnector(socket_factory=_bounded_socket)
    except TypeError:  # aiohttp < 3.12: the kernel's default receive buffer
        return aiohttp.TCPConnector()


def _bounded_socket(addr_info) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    return sock
