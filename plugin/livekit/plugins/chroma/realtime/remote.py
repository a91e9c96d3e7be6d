"""Remote mode: the plugin as a client of a ``chroma-agent serve`` server, over its ``/v1/realtime``
WebSocket.

:class:`RemoteBackend` and :class:`RemoteConversation` implement the `Backend` / `BackendConversation`
protocols of :mod:`.backend`, so `RealtimeSession` does not know where Chroma runs. The wire format is the one
in :mod:`chroma_agent.realtime_protocol` (the server's own definition): client events come from its
``ClientEvents`` builders, server events are dispatched on their GA names (``ga_name``), and replies come out
as the engine's own events (`AudioChunk`, `TextDelta`, `ResponseDone`, `ResponseError`).

One `RemoteConversation` holds one WebSocket at a time, which is one server-side conversation (one engine
slot, freed when the socket closes). Each connection has a writer task (client events go out in the order
they were made, so a `truncate` takes effect before anything sent after it) and a reader task. The reader
puts a reply's events into a small bounded inbox; when its consumer falls behind, the reader stops reading,
TCP pushes back, and the server (which awaits every send and never generates more than ``lookahead_s`` ahead
of what it sent) pauses the reply once the socket buffers are full. Nothing is buffered without bound.

A lost connection ends the running reply with a `ResponseError`; the next call opens a new connection and a
new server conversation. The server-side context is lost with the old one: the text turns this conversation
added (and the words of its finished replies) are replayed, user audio turns are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np
from livekit.agents import APIConnectionError, APIStatusError, APITimeoutError, llm

from chroma_agent.audio import pcm16_to_float, resample, to_pcm16
from chroma_agent.engine.events import (
    AudioChunk,
    ResponseDone,
    ResponseError,
    ResponseEvent,
    TextDelta,
    Timings,
    Usage,
)
from chroma_agent.realtime_protocol import (
    FRAME_MS,
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    ClientEvents,
    ErrorCode,
    ProtocolError,
    ServerEventType,
    b64_to_pcm,
    ga_name,
    new_id,
)

from ..log import logger
from .backend import Role, SamplingOverrides, VoiceSpec

__all__ = ["RemoteBackend", "RemoteConversation", "ServerBusyError", "realtime_url"]

REALTIME_PATH = "/v1/realtime"
CONNECT_TIMEOUT_S = 10.0  # TCP + WebSocket handshake + the server's first event (it may wait for a slot)
ACK_TIMEOUT_S = 30.0  # a client event the server must answer (session.update, commit, item.create)
REPLY_IDLE_TIMEOUT_S = 60.0  # a reply whose server sends nothing for this long is given up
CANCEL_WAIT_S = 5.0  # an abandoned reply: how long to wait for the server to end it
CLOSE_TIMEOUT_S = 2.0
INBOX_EVENTS = 32  # events of one reply read ahead of its consumer
APPEND_BYTES = 5 * SAMPLE_RATE * SAMPLE_WIDTH  # input_audio_buffer.append: 5 s of PCM16 per message
MAX_REPLAY_TURNS = 64  # text turns kept to replay on a new connection
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The socket's receive buffer: without a cap, the kernel grows it to megabytes (minutes of audio) before TCP
# pushes back on the server. 256 KiB is about 4 s of audio deltas.
RECEIVE_BUFFER_BYTES = 256 * 1024

_CLOSE_TRY_AGAIN = 1013  # the server's "no free slot" close code (RFC 6455's "try again later")
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
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
                         f"got {_display(base_url)!r}")
    path = parts.path.rstrip("/")
    for suffix in (REALTIME_PATH, "/v1"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((scheme, parts.netloc, path + REALTIME_PATH, parts.query, ""))


def _display(url: str) -> str:
    """A URL without its query and credentials (either may carry a key), for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ServerBusyError(APIStatusError):
    """Every conversation slot of the server is taken (close code 1013): recoverable, try again later."""

    def __init__(self, url: str, detail: str | None = None):
        message = f"the Chroma server at {url} is full: every conversation slot is in use; try again later"
        if detail:
            message += f" ({detail})"
        super().__init__(message, status_code=503, retryable=True)


def _refused(what: str, exc: ProtocolError) -> llm.RealtimeError:
    return llm.RealtimeError(f"the Chroma server refused {what}: {exc.message} ({exc.code})", code=exc.code)


# --- one reply's events, bounded ---------------------------------------------------------------------------


class _Inbox:
    """A bounded FIFO from the reader task to one reply's consumer; its final event always fits."""

    def __init__(self, size: int = INBOX_EVENTS):
        self._items: deque[ResponseEvent] = deque()
        self._size = size
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.abandoned = False  # the consumer left: everything is dropped

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: ResponseEvent) -> None:
        while len(self._items) >= self._size and not self.abandoned:
            self._writable.clear()
            await self._writable.wait()
        if not self.abandoned:
            self._items.append(item)
            self._readable.set()

    def put_final(self, item: ResponseEvent) -> None:
        if not self.abandoned:
            self._items.append(item)
            self._readable.set()

    async def get(self, timeout: float) -> ResponseEvent:
        while not self._items:
            self._readable.clear()
            await asyncio.wait_for(self._readable.wait(), timeout)
        item = self._items.popleft()
        self._writable.set()
        return item

    def abandon(self) -> None:
        self.abandoned = True
        self._items.clear()
        self._writable.set()


@dataclass(eq=False)
class _Reply:
    instructions: str | None
    max_frames: int | None
    temperature: float | None
    inbox: _Inbox = field(default_factory=_Inbox)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the server ended it (or the connection did)
    conn: _Connection | None = None
    event_id: str | None = None  # of its response.create
    response_id: str | None = None
    item_id: str | None = None
    sent: bool = False
    finished: bool = False  # its final event is in the inbox
    cancel_requested: bool = False
    truncate_ms: float | None = None  # a truncation waiting for the item's id
    frames: int = 0
    created: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None
    entry: list[str] | None = None  # its line in the replay log
    kept: str | None = None  # its words after a truncation the server applied after it ended


@dataclass(eq=False)
class _Pending:
    """A client event waiting for its answer (`match`) or its error (by event_id)."""

    event_id: str
    what: str
    match: Callable[[str, dict[str, Any]], bool] | None
    future: asyncio.Future[dict[str, Any]]


def _is(kind: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda t, _event: t == kind


def _item_added(item_id: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda t, event: t == _S.CONVERSATION_ITEM_ADDED and (event.get("item") or {}).get("id") == item_id


def _retrieve_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failure nobody awaited is not logged as "never retrieved"


# --- one WebSocket ------------------------------------------------------------------------------------------


class _Connection:
    """One WebSocket = one server-side conversation: a writer task, a reader task, answers to requests."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 session: dict[str, Any]):
        self.http, self.ws = http, ws
        self.session_id: str = str(session.get("id") or new_id("sess"))
        self.model: str | None = session.get("model")
        self.temperature: float | None = None  # what the server applies now (None: its default)
        self.alive = True
        self.lost_reason: str | None = None
        self.reply: _Reply | None = None  # the reply this connection streams
        self.on_retrieved: Callable[[dict[str, Any]], None] | None = None
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._pending: list[_Pending] = []
        self._quiet: deque[str] = deque(maxlen=64)  # fire-and-forget events whose errors are expected
        self._writer = asyncio.create_task(self._write(), name="chroma.remote.writer")
        self._reader = asyncio.create_task(self._read(), name="chroma.remote.reader")

    # --- sending -------------------------------------------------------------------------------------

    def send(self, event: dict[str, Any], *, quiet: bool = False) -> str:
        """Queue a client event (sent in order); `quiet`: its error is expected and only logged at debug."""
        if not self.alive:
            raise APIConnectionError(f"the connection to the Chroma server is lost ({self.lost_reason})")
        if quiet:
            self._quiet.append(event["event_id"])
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))
        return event["event_id"]

    def submit(self, event: dict[str, Any], what: str,
               match: Callable[[str, dict[str, Any]], bool] | None) -> asyncio.Future[dict[str, Any]]:
        """Send `event`; the future gets the server event that answers it (`match`), or its error."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve_result)
        self._pending.append(_Pending(event["event_id"], what, match, future))
        try:
            self.send(event)
        except Exception:
            self._pending.pop()
            raise
        return future

    async def wait(self, future: asyncio.Future[dict[str, Any]], what: str,
                   timeout: float = ACK_TIMEOUT_S) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self.lose(f"no answer to {what} within {timeout:g} s")
            raise APITimeoutError(f"the Chroma server did not answer {what} within {timeout:g} s") from None
        except ProtocolError as exc:
            raise _refused(what, exc) from exc

    async def request(self, event: dict[str, Any], what: str,
                      match: Callable[[str, dict[str, Any]], bool]) -> dict[str, Any]:
        return await self.wait(self.submit(event, what, match), what)

    def forget(self, futures: list[asyncio.Future[dict[str, Any]]]) -> ProtocolError | None:
        """Stop waiting for `futures` (error-only requests); the first error one of them got, if any."""
        ids = {id(f) for f in futures}
        self._pending = [p for p in self._pending if id(p.future) not in ids]
        error = None
        for f in futures:
            if f.done() and not f.cancelled() and isinstance(f.exception(), ProtocolError):
                error = error or f.exception()
            elif not f.done():
                f.cancel()
        return error

    async def _write(self) -> None:
        try:
            while True:
                text = await self._outbox.get()
                await self.ws.send_str(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket is gone
            self.lose(f"sending failed: {type(exc).__name__}: {exc}")

    # --- reading -------------------------------------------------------------------------------------

    async def _read(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        event = json.loads(msg.data)
                    except ValueError:
                        logger.warning("ignoring a message from the Chroma server that is not JSON")
                        continue
                    if isinstance(event, dict) and isinstance(event.get("type"), str):
                        await self._dispatch(ga_name(event["type"]), event)
                elif msg.type in _CLOSED:
                    code = self.ws.close_code if msg.type != aiohttp.WSMsgType.CLOSE else msg.data
                    reason = f"the server closed the connection (code {code}{_extra(msg)})"
                    break
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    reason = f"connection error: {self.ws.exception() or msg.data}"
                    break
        except asyncio.CancelledError:
            reason = "closed"
            raise
        except Exception as exc:
            logger.exception("reading from the Chroma server failed")
            reason = f"reading failed: {type(exc).__name__}: {exc}"
        finally:
            self.lose(reason)

    async def _dispatch(self, kind: str, event: dict[str, Any]) -> None:
        if kind == _S.ERROR:
            self._on_error(event.get("error") or {})
            return
        reply = self.reply
        if reply is not None and not reply.finished:
            rid = event.get("response_id")
            if kind == _S.RESPONSE_CREATED and reply.response_id is None:
                reply.response_id = (event.get("response") or {}).get("id")
            elif rid is not None and rid == reply.response_id:
                await self._on_reply_event(reply, kind, event)
                if kind in (_S.RESPONSE_OUTPUT_AUDIO_DELTA, _S.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA):
                    return
            elif kind == _S.RESPONSE_DONE and (event.get("response") or {}).get("id") == reply.response_id:
                self._finish(reply, event.get("response") or {})
                return
        if kind == _S.CONVERSATION_ITEM_RETRIEVED and self.on_retrieved is not None:
            self.on_retrieved(event.get("item") or {})
        for pending in self._pending:
            if pending.match is not None and pending.match(kind, event):
                self._pending.remove(pending)
                if not pending.future.done():
                    pending.future.set_result(event)
                break

    async def _on_reply_event(self, reply: _Reply, kind: str, event: dict[str, Any]) -> None:
        if kind == _S.RESPONSE_OUTPUT_AUDIO_DELTA:
            pcm = pcm16_to_float(b64_to_pcm(event.get("delta"), param="delta"))
            if reply.first_audio is None:
                reply.first_audio = time.perf_counter()
            chunk = AudioChunk(pcm=pcm, frame_index=reply.frames, timestamp_ms=float(reply.frames * FRAME_MS))
            reply.frames += 1
            await reply.inbox.put(chunk)
        elif kind == _S.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA:
            text = event.get("delta")
            if isinstance(text, str) and text:
                # the frame it is spoken in is not on the wire: the next frame is the best estimate
                await reply.inbox.put(TextDelta(text=text, token_id=-1, frame_index=reply.frames))
        elif kind == _S.RESPONSE_OUTPUT_ITEM_ADDED:
            reply.item_id = (event.get("item") or {}).get("id")
            if reply.truncate_ms is not None and reply.item_id:
                self.send(ClientEvents.conversation_item_truncate(reply.item_id, int(reply.truncate_ms)),
                          quiet=True)

    def _finish(self, reply: _Reply, response: dict[str, Any]) -> None:
        status = response.get("status")
        details = response.get("status_details") or {}
        final: ResponseEvent
        if status == "failed":
            error = details.get("error") or {}
            final = ResponseError(str(error.get("message") or "the reply failed on the Chroma server"),
                                  kind=str(error.get("code") or "server_error"))
        else:
            reason = {"incomplete": "max_frames", "cancelled": "cancelled"}.get(str(status), "completed")
            now = time.perf_counter()
            ttfa = None if reply.first_audio is None else (reply.first_audio - reply.created) * 1000
            # the server reports no prefill time; the rest is measured here
            timings = Timings(time_to_first_audio_ms=ttfa, prefill_ms=math.nan,
                              total_ms=(now - reply.created) * 1000, audio_ms=float(reply.frames * FRAME_MS))
            final = ResponseDone(reason=reason, text=_transcript(response),
                                 usage=_usage(response.get("usage")), timings=timings)
        self._end(reply, final)

    def _end(self, reply: _Reply, final: ResponseEvent) -> None:
        if reply.finished:
            return
        reply.finished = True
        reply.inbox.put_final(final)
        reply.done.set()
        if self.reply is reply:
            self.reply = None

    def _on_error(self, error: dict[str, Any]) -> None:
        exc = ProtocolError(str(error.get("code") or ErrorCode.SERVER_ERROR),
                            str(error.get("message") or "unknown error"), param=error.get("param"),
                            event_id=error.get("event_id"), type=str(error.get("type") or "server_error"))
        for pending in self._pending:
            if exc.event_id is not None and pending.event_id == exc.event_id:
                self._pending.remove(pending)
                if not pending.future.done():
                    pending.future.set_exception(exc)
                return
        reply = self.reply
        if reply is not None and exc.event_id is not None and exc.event_id == reply.event_id:
            self._end(reply, ResponseError(f"the Chroma server refused the reply: {exc.message}",
                                           kind=exc.code))
        elif exc.event_id is not None and exc.event_id in self._quiet:
            # e.g. a cancel that arrived after the reply ended
            logger.debug("Chroma server: %s (%s)", exc.message, exc.code)
        else:
            logger.warning("Chroma server error: %s (%s)", exc.message, exc.code)

    # --- the end -------------------------------------------------------------------------------------

    def lose(self, reason: str) -> None:
        """The connection is unusable: fail what waits on it and end its reply with an error."""
        if not self.alive:
            return
        self.alive = False
        self.lost_reason = reason
        error = APIConnectionError(f"the connection to the Chroma server was lost: {reason}")
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        reply = self.reply
        if reply is not None:
            self._end(reply, ResponseError(f"the connection to the Chroma server was lost during the reply "
                                           f"({reason}); the next turn reconnects", kind="connection_lost"))
        self._writer.cancel()
        if reason != "closed":
            logger.warning("Chroma server connection %s lost: %s", self.session_id, reason)

    async def close(self) -> None:
        """Close the socket (the server frees the conversation's slot)."""
        self.lose("closed")
        current = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await self.http.close()


def _extra(msg: aiohttp.WSMessage) -> str:
    return f", {msg.extra}" if isinstance(msg.extra, str) and msg.extra else ""


def _transcript(response: dict[str, Any]) -> str:
    for item in response.get("output") or []:
        for part in item.get("content") or []:
            if isinstance(part.get("transcript"), str):
                return part["transcript"]
    return ""


def _usage(usage: dict[str, Any] | None) -> Usage:
    """The server's OpenAI-shaped usage as the engine's (input = prompt + cached, output = text + frames)."""
    if not usage:
        return Usage(prompt_tokens=0, cached_tokens=0, text_tokens=0, audio_frames=0)
    cached = int((usage.get("input_token_details") or {}).get("cached_tokens") or 0)
    out = usage.get("output_token_details") or {}
    return Usage(prompt_tokens=max(int(usage.get("input_tokens") or 0) - cached, 0), cached_tokens=cached,
                 text_tokens=int(out.get("text_tokens") or 0), audio_frames=int(out.get("audio_tokens") or 0))


# --- the backend --------------------------------------------------------------------------------------------


class RemoteBackend:
    """A ``chroma-agent serve`` server; every conversation is one WebSocket to its ``/v1/realtime``."""

    input_sample_rate = SAMPLE_RATE  # the session buffers user audio at the wire's rate: one resampling

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, reply_timeout: float = REPLY_IDLE_TIMEOUT_S):
        self.url = realtime_url(base_url)
        self.display_url = _display(self.url)
        self._api_key = api_key or None
        self.connect_timeout = float(connect_timeout)
        self.reply_timeout = float(reply_timeout)
        self._model: str | None = None

    def __repr__(self) -> str:
        return f"RemoteBackend({self.display_url!r})"

    @property
    def model_name(self) -> str:
        return self._model or "chroma"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def load(self) -> None:
        """Check now (blocking) that the server answers and takes the API key (``GET /v1/models``)."""
        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        base = parts.path[: -len(REALTIME_PATH)]
        url = urlunsplit((scheme, parts.netloc, base + "/v1/models", "", ""))
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.connect_timeout) as response:
                body = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise _status_error(self.display_url, exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise APIConnectionError(f"cannot reach the Chroma server at {self.display_url}: {exc}") from None
        models = [m.get("id") for m in body.get("data") or [] if isinstance(m, dict)]
        if models:
            self._model = str(models[0])

    def capacity(self) -> tuple[int, int] | None:
        return None  # the server's slots are shared with its other clients: see its /health

    async def open(self, *, voice: VoiceSpec, instructions: str | None,
                   sampling: SamplingOverrides) -> RemoteConversation:
        if voice.profile is not None or voice.audio is not None:
            raise ValueError("remote mode speaks with voices stored on the server: give voice=<name>")
        conv = RemoteConversation(self, voice=voice.name, instructions=instructions,
                                  temperature=sampling.temperature)
        try:
            await conv.connect()
        except BaseException:
            await conv.close()
            raise
        return conv

    async def connect(self) -> _Connection:
        """A new WebSocket, past the server's ``session.created`` (a new server-side conversation)."""
        http = aiohttp.ClientSession(connector=_connector())
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws, first = await asyncio.wait_for(self._handshake(http), self.connect_timeout)
            if first.type != aiohttp.WSMsgType.TEXT:
                code = ws.close_code if first.type != aiohttp.WSMsgType.CLOSE else first.data
                if code == _CLOSE_TRY_AGAIN:
                    raise ServerBusyError(self.display_url)
                raise APIConnectionError(f"the Chroma server at {self.display_url} closed the connection "
                                         f"before the session started (code {code}{_extra(first)})")
            event = json.loads(first.data)
            kind = ga_name(str(event.get("type")))
            if kind == _S.ERROR:
                error = event.get("error") or {}
                if error.get("code") == ErrorCode.SERVER_BUSY:
                    raise ServerBusyError(self.display_url, error.get("message"))
                raise llm.RealtimeError(f"the Chroma server at {self.display_url} refused the session: "
                                        f"{error.get('message')}", code=error.get("code"))
            if kind != _S.SESSION_CREATED:
                raise llm.RealtimeError(f"expected session.created from {self.display_url}, got {kind!r}")
        except aiohttp.WSServerHandshakeError as exc:
            await http.close()
            raise _status_error(self.display_url, exc.status) from None
        except asyncio.TimeoutError:
            await _close_quietly(ws, http)
            raise APITimeoutError(f"the Chroma server at {self.display_url} did not start a session within "
                                  f"{self.connect_timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            await _close_quietly(ws, http)
            raise APIConnectionError(f"cannot connect to the Chroma server at {self.display_url}: "
                                     f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            await _close_quietly(ws, http)
            raise
        session = event.get("session") or {}
        self._model = session.get("model") or self._model
        return _Connection(http, ws, session)

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


def _status_error(url: str, status: int) -> APIStatusError:
    if status in (401, 403):
        return APIStatusError(f"the Chroma server at {url} refused the API key (HTTP {status}): pass the "
                              "server's key as api_key= or in CHROMA_API_KEY", status_code=status)
    if status == 404:
        return APIStatusError(f"no Chroma realtime endpoint at {url} (HTTP 404): base_url should be the "
                              "server's root URL, e.g. http://host:8000", status_code=status)
    return APIStatusError(f"the Chroma server at {url} answered HTTP {status}", status_code=status)


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse | None, http: aiohttp.ClientSession) -> None:
    if ws is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
    with contextlib.suppress(Exception):
        await http.close()


# --- one conversation ---------------------------------------------------------------------------------------


class RemoteConversation:
    """A `BackendConversation` on a Chroma server: one WebSocket at a time, reopened after a loss."""

    def __init__(self, backend: RemoteBackend, *, voice: str | None, instructions: str | None,
                 temperature: float | None):
        self._backend = backend
        self._voice = voice
        self._instructions = instructions
        self._temperature = temperature
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._replay: deque[list[str]] = deque(maxlen=MAX_REPLAY_TURNS)  # [role, text] of the text turns
        self._latest: _Reply | None = None
        self._closed = False
        self._id = ""
        self.connections = 0  # how many WebSockets this conversation has opened

    @property
    def id(self) -> str:
        """The server's session id of the current (or last) connection."""
        return self._id

    @property
    def instructions(self) -> str | None:
        return self._instructions

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive

    # --- the connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._connection()

    async def _connection(self) -> _Connection:
        if self._closed:
            raise llm.RealtimeError("the Chroma conversation is closed")
        if self._conn is not None and self._conn.alive:
            return self._conn
        async with self._connect_lock:
            if self._conn is not None and self._conn.alive:
                return self._conn
            old, self._conn = self._conn, None
            if old is not None:
                await old.close()
                logger.info("reconnecting to the Chroma server at %s: the server-side context is lost; "
                            "replaying %d text turns", self._backend.display_url, len(self._replay))
            conn = await self._backend.connect()
            try:
                await self._set_up(conn)
            except BaseException:
                await conn.close()
                raise
            if self._closed:
                await conn.close()
                raise llm.RealtimeError("the Chroma conversation is closed")
            self._conn, self._id = conn, conn.session_id
            self.connections += 1
            return conn

    async def _set_up(self, conn: _Connection) -> None:
        conn.on_retrieved = self._on_retrieved
        update = ClientEvents.session_update(instructions=self._instructions, voice=self._voice,
                                             turn_detection=None, temperature=self._temperature)
        await conn.request(update, "session.update", _is(_S.SESSION_UPDATED))
        conn.temperature = self._temperature
        replayed = []
        for entry in self._replay:
            if entry[1].strip():
                item_id = new_id("item")
                event = ClientEvents.conversation_item_create(entry[0], text=entry[1], item_id=item_id)
                replayed.append((entry, conn.submit(event, "conversation.item.create", _item_added(item_id))))
        for entry, future in replayed:
            try:
                await conn.wait(future, "conversation.item.create")
            except llm.RealtimeError as exc:
                logger.warning("a %s turn could not be replayed: %s", entry[0], exc)

    def _on_retrieved(self, item: dict[str, Any]) -> None:
        """A truncated reply's kept words (asked for after the reply ended) replace its replay text."""
        reply = self._latest
        if reply is not None and item.get("id") == reply.item_id:
            reply.kept = _transcript({"output": [item]})
            if reply.entry is not None:
                reply.entry[1] = reply.kept

    # --- context -------------------------------------------------------------------------------------

    async def add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        conn = await self._connection()
        data = to_pcm16(resample(np.asarray(pcm, dtype=np.float32), int(sample_rate), SAMPLE_RATE))
        appends = [conn.submit(ClientEvents.input_audio_buffer_append(data[i: i + APPEND_BYTES]),
                               "input_audio_buffer.append", None) for i in range(0, len(data), APPEND_BYTES)]
        try:
            await conn.request(ClientEvents.input_audio_buffer_commit(), "input_audio_buffer.commit",
                               _is(_S.INPUT_AUDIO_BUFFER_COMMITTED))
        finally:
            error = conn.forget(appends)
        if error is not None:
            raise _refused("input_audio_buffer.append", error)

    async def add_text(self, role: Role, text: str) -> None:
        conn = await self._connection()
        item_id = new_id("item")
        await conn.request(ClientEvents.conversation_item_create(role, text=text, item_id=item_id),
                           "conversation.item.create", _item_added(item_id))
        self._replay.append([role, text])

    async def set_instructions(self, text: str | None) -> None:
        self._instructions = text
        if self.connected:
            await self._conn.request(ClientEvents.session_update(instructions=text or ""), "session.update",
                                     _is(_S.SESSION_UPDATED))

    async def set_voice(self, voice: VoiceSpec) -> None:
        if voice.profile is not None or voice.audio is not None:
            raise ValueError("remote mode speaks with voices stored on the server: give voice=<name>")
        if voice.name is None:
            logger.warning("remote mode: the voice stays %s (a server's default voice cannot be asked for by "
                           "omission)", self._voice or "the server's default")
            return
        if self.connected:
            await self._conn.request(ClientEvents.session_update(voice=voice.name), "session.update",
                                     _is(_S.SESSION_UPDATED))
        self._voice = voice.name

    # --- replies -------------------------------------------------------------------------------------

    def respond(self, *, instructions: str | None, max_seconds: float | None,
                sampling: SamplingOverrides) -> AsyncIterator[ResponseEvent]:
        max_frames = None if max_seconds is None else max(1, math.ceil(max_seconds * 1000 / FRAME_MS - 1e-9))
        reply = _Reply(instructions=instructions, max_frames=max_frames, temperature=sampling.temperature)
        self._latest = reply  # cancel() and truncate() apply to it from now on
        return self._stream(reply)

    async def _stream(self, reply: _Reply) -> AsyncIterator[ResponseEvent]:
        conn: _Connection | None = None
        try:
            if reply.cancel_requested:  # interrupted before it was sent: nothing was said
                yield _nothing_said()
                return
            conn = await self._connection()
            if reply.temperature is not None and reply.temperature != conn.temperature:
                update = ClientEvents.session_update(temperature=reply.temperature)
                await conn.request(update, "session.update", _is(_S.SESSION_UPDATED))
                conn.temperature = self._temperature = reply.temperature
            if reply.cancel_requested:
                yield _nothing_said()
                return
            event = ClientEvents.response_create(instructions=reply.instructions,
                                                 max_output_tokens=reply.max_frames)
            reply.conn, reply.event_id, conn.reply = conn, event["event_id"], reply
            conn.send(event)
            reply.sent = True
            reply.created = time.perf_counter()
            while True:
                try:
                    item = await reply.inbox.get(self._backend.reply_timeout)
                except asyncio.TimeoutError:
                    conn.lose(f"no reply event for {self._backend.reply_timeout:g} s")
                    continue  # the loss put a ResponseError in the inbox
                yield item
                if isinstance(item, ResponseDone | ResponseError):
                    if isinstance(item, ResponseDone):
                        self._remember(reply, item)
                    return
        finally:
            if not reply.finished and reply.sent and conn is not None:
                await self._abandon(reply, conn)

    def _remember(self, reply: _Reply, done: ResponseDone) -> None:
        """What the reply left in the server's context, for a replay: its instructions and its words."""
        if reply.instructions and reply.instructions.strip():
            self._replay.append(["system", reply.instructions])
        if done.usage.audio_frames or done.text:
            reply.entry = ["assistant", done.text if reply.kept is None else reply.kept]
            self._replay.append(reply.entry)

    async def _abandon(self, reply: _Reply, conn: _Connection) -> None:
        """The consumer left before the reply ended: cancel it and wait (bounded) for the server to end it."""
        reply.inbox.abandon()
        if conn.alive:
            self._cancel_sent(reply)
            try:
                await asyncio.wait_for(reply.done.wait(), CANCEL_WAIT_S)
            except asyncio.TimeoutError:
                conn.lose(f"a cancelled reply did not end within {CANCEL_WAIT_S:g} s")
            except asyncio.CancelledError:
                conn.lose("cancelled while a reply was ending")
                raise

    def cancel(self) -> None:
        reply = self._latest
        if reply is None or reply.finished or reply.cancel_requested:
            return
        reply.cancel_requested = True
        if reply.sent:
            self._cancel_sent(reply)

    def _cancel_sent(self, reply: _Reply) -> None:
        conn = reply.conn
        if conn is not None and conn.alive and not reply.finished:
            with contextlib.suppress(APIConnectionError):
                conn.send(ClientEvents.response_cancel(reply.response_id), quiet=True)

    def truncate(self, heard_ms: float, on_kept: Callable[[str], None] | None = None) -> None:
        """Sent at once (or as soon as the reply's item is known); the kept words are not known here (the
        replay log learns them from the server), so `on_kept` is not called: a running reply reports them in
        its `ResponseDone.text`."""
        reply = self._latest
        heard = max(0.0, float(heard_ms)) if math.isfinite(heard_ms) else 0.0
        if reply is None:
            return
        if reply.item_id is None:  # not sent or not started yet: truncated as soon as its item exists
            reply.truncate_ms = heard
            return
        conn = reply.conn
        if conn is None or not conn.alive or conn is not self._conn:
            return  # that server conversation is gone
        if reply.finished:
            heard = min(heard, reply.frames * FRAME_MS)
        try:
            conn.send(ClientEvents.conversation_item_truncate(reply.item_id, int(heard)), quiet=True)
            if reply.finished:  # learn the kept words for the replay log
                conn.send(ClientEvents.conversation_item_retrieve(reply.item_id), quiet=True)
        except APIConnectionError:
            pass

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _nothing_said() -> ResponseDone:
    timings = Timings(time_to_first_audio_ms=None, prefill_ms=0.0, total_ms=0.0, audio_ms=0.0)
    return ResponseDone(reason="cancelled", text="", usage=_usage(None), timings=timings)
