"""A client of a ``chroma-agent serve`` server's ``/v1/realtime`` WebSocket: the OpenAI Realtime protocol as
:mod:`chroma_agent.realtime_protocol` defines it, replies as the engine's own events.

:class:`RealtimeClient` says where the server is (URL, API key, timeouts). Its :meth:`~RealtimeClient.connect`
opens one :class:`ClientConnection`: one WebSocket, which is one server-side conversation (one engine slot,
freed when the socket closes). The LiveKit plugin's remote mode, the tests and the examples use it.

Each connection has a writer task (client events go out in the order they were made, so a truncate takes
effect before anything sent after it) and a reader task that parses every server event into its typed model
and dispatches it: to the request waiting for it (matched by what answers it, or by the ``event_id`` an error
names), or to the running reply. A reply's events go into a small bounded inbox; when its consumer falls
behind, the reader stops reading, TCP pushes back, and the server (which awaits every send and never
generates more than ``lookahead_s`` ahead of what it sent) pauses the reply once the socket buffers are full.
Nothing is buffered without bound.

A lost connection ends its running reply with a `ResponseError` (``kind="connection_lost"``) and refuses
every later call with :class:`ConnectionLost`. Reconnecting is a new server conversation: the caller decides
whether and what to replay (the plugin keeps a replay log of text turns).

Failures are :class:`RealtimeClientError` subclasses, each saying what to do about it (busy: try later;
refused: fix the request or the key; lost or unreachable: reconnect). Messages never carry the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from chroma_agent.audio import pcm16_to_float
from chroma_agent.engine.events import (
    AudioChunk,
    ResponseDone,
    ResponseError,
    ResponseEvent,
    TextDelta,
    Timings,
    Usage,
)
from chroma_agent.frames import frames_ms
from chroma_agent.realtime_protocol import (
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    ClientEvents,
    DeltaEvent,
    ErrorCode,
    ErrorDetail,
    ErrorEvent,
    ItemBody,
    ItemEvent,
    OutputItemEvent,
    ProtocolError,
    ResponseBody,
    ResponseStatusEvent,
    ServerEvent,
    ServerEventType,
    SessionEvent,
    b64_to_pcm,
    new_id,
    parse_server_event,
)

__all__ = [
    "ClientConnection",
    "ClientReply",
    "ConnectionLost",
    "RealtimeClient",
    "RealtimeClientError",
    "RequestRefused",
    "ServerBusy",
    "ServerRefused",
    "ServerTimeout",
    "ServerUnreachable",
    "display_url",
    "nothing_said",
    "realtime_url",
]

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
CONNECT_TIMEOUT_S = 10.0  # TCP + WebSocket handshake + the server's first event (it may wait for a slot)
ACK_TIMEOUT_S = 30.0  # a client event the server must answer (session.update, commit, item.create)
REPLY_IDLE_TIMEOUT_S = 60.0  # a reply whose server sends nothing for this long is given up
CANCEL_WAIT_S = 5.0  # an abandoned reply: how long to wait for the server to end it
CLOSE_TIMEOUT_S = 2.0
INBOX_EVENTS = 32  # events of one reply read ahead of its consumer
APPEND_BYTES = 5 * SAMPLE_RATE * SAMPLE_WIDTH  # input_audio_buffer.append: 5 s of PCM16 per message
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The socket's receive buffer: without a cap, the kernel grows it to megabytes (minutes of audio) before TCP
# pushes back on the server. 256 KiB is about 4 s of audio deltas.
RECEIVE_BUFFER_BYTES = 256 * 1024

CLOSE_TRY_AGAIN = 1013  # the server's "no free slot" close code (RFC 6455's "try again later")
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
_S = ServerEventType


# --- errors -------------------------------------------------------------------------------------------------


class RealtimeClientError(Exception):
    """Something between this client and the server failed; the message says what (never the API key)."""


class ServerUnreachable(RealtimeClientError):
    """No session could be started: nothing answers at the URL, or the server closed before a session."""


class ConnectionLost(RealtimeClientError):
    """The connection broke (or was closed); a new one is a new server conversation."""


class ServerTimeout(RealtimeClientError):
    """The server did not answer in time (the connection is given up)."""


class ServerBusy(RealtimeClientError):
    """Every conversation slot of the server is taken (close code 1013): try again later."""

    def __init__(self, url: str, detail: str | None = None):
        message = f"the Chroma server at {url} is full: every conversation slot is in use; try again later"
        super().__init__(message + (f" ({detail})" if detail else ""))
        self.url, self.detail = url, detail


class ServerRefused(RealtimeClientError):
    """The server answered the handshake (or ``/v1/models``) with an HTTP error: a wrong key, a wrong URL."""

    def __init__(self, url: str, status: int):
        if status in (401, 403):
            message = (f"the Chroma server at {url} refused the API key (HTTP {status}): pass the server's key as "
                       "api_key= or in CHROMA_API_KEY")
        elif status == 404:
            message = (f"no Chroma realtime endpoint at {url} (HTTP 404): base_url should be the server's root "
                       "URL, e.g. http://host:8000")
        else:
            message = f"the Chroma server at {url} answered HTTP {status}"
        super().__init__(message)
        self.url, self.status = url, status


class RequestRefused(RealtimeClientError):
    """The server refused a client event (an ``error`` event naming it); ``code`` is the protocol's."""

    def __init__(self, what: str, error: ProtocolError):
        super().__init__(f"the Chroma server refused {what}: {error.message} ({error.code})")
        self.what, self.error, self.code = what, error, error.code


# --- URLs ---------------------------------------------------------------------------------------------------


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


# --- one reply ----------------------------------------------------------------------------------------------


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
class ClientReply:
    """One reply: made before it is sent, so `cancel` and `truncate` work at any moment of its life.

    A truncation asked for before the server named the reply's item is sent as soon as it does; one after the
    reply ended is clamped to the audio received and followed by a ``conversation.item.retrieve``, so the
    connection's ``on_retrieved`` learns the words kept.
    """

    instructions: str | None = None
    max_frames: int | None = None
    inbox: _Inbox = field(default_factory=_Inbox)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the server ended it (or the connection did)
    conn: ClientConnection | None = None
    event_id: str | None = None  # of its response.create
    response_id: str | None = None
    item_id: str | None = None
    sent: bool = False
    finished: bool = False  # its final event is in the inbox
    cancel_requested: bool = False
    truncate_ms: float | None = None  # a truncation waiting for the item's id
    frames: int = 0  # audio frames received
    created: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None

    def cancel(self) -> None:
        """Stop the reply (at once if it was not sent yet; else the server ends it within a step)."""
        if self.finished or self.cancel_requested:
            return
        self.cancel_requested = True
        if self.sent:
            self._send_cancel()

    def _send_cancel(self) -> None:
        conn = self.conn
        if conn is not None and conn.alive and not self.finished:
            with contextlib.suppress(ConnectionLost):
                conn.send(ClientEvents.response_cancel(self.response_id), quiet=True)

    def truncate(self, heard_ms: float) -> None:
        """Keep of the reply in the server's context only what the listener heard (``heard_ms``)."""
        heard = max(0.0, float(heard_ms)) if math.isfinite(heard_ms) else 0.0
        if self.item_id is None:  # not sent or not started yet: truncated as soon as its item exists
            self.truncate_ms = heard
            return
        conn = self.conn
        if conn is None or not conn.alive:
            return  # that server conversation is gone
        if self.finished:
            heard = min(heard, frames_ms(self.frames))
        try:
            conn.send(ClientEvents.conversation_item_truncate(self.item_id, int(heard)), quiet=True)
            if self.finished:  # learn the kept words
                conn.send(ClientEvents.conversation_item_retrieve(self.item_id), quiet=True)
        except ConnectionLost:
            pass


def nothing_said() -> ResponseDone:
    """The end of a reply cancelled before it reached the server."""
    timings = Timings(time_to_first_audio_ms=None, prefill_ms=0.0, total_ms=0.0, audio_ms=0.0)
    return ResponseDone(reason="cancelled", text="", usage=Usage(0, 0, 0, 0), timings=timings)


# --- one WebSocket ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pending:
    """A client event waiting for its answer (`match`) or its error (by event_id)."""

    event_id: str
    what: str
    match: Callable[[ServerEvent], bool] | None
    future: asyncio.Future[ServerEvent]


def _is(kind: str) -> Callable[[ServerEvent], bool]:
    return lambda event: event.type == kind


def _item_added(item_id: str) -> Callable[[ServerEvent], bool]:
    return lambda event: isinstance(event, ItemEvent) and event.type == _S.CONVERSATION_ITEM_ADDED \
        and event.item.id == item_id


def _retrieve_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failure nobody awaited is not logged as "never retrieved"


class ClientConnection:
    """One WebSocket = one server-side conversation: a writer task, a reader task, answers to requests."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, session: SessionEvent,
                 *, reply_timeout: float = REPLY_IDLE_TIMEOUT_S):
        self.http, self.ws = http, ws
        self.session_id: str = session.session.id or new_id("sess")
        self.model: str | None = session.session.model
        self.reply_timeout = reply_timeout
        self.temperature: float | None = None  # what the server applies now (None: its default)
        self.alive = True
        self.lost_reason: str | None = None
        self.reply: ClientReply | None = None  # the reply this connection streams
        self.on_retrieved: Callable[[ItemBody], None] | None = None
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._pending: list[_Pending] = []
        self._quiet: deque[str] = deque(maxlen=64)  # fire-and-forget events whose errors are expected
        self._writer = asyncio.create_task(self._write(), name="chroma.realtime_client.writer")
        self._reader = asyncio.create_task(self._read(), name="chroma.realtime_client.reader")

    # --- the conversation ----------------------------------------------------------------------------

    async def update_session(self, *, instructions: str | None = None, voice: str | None = None,
                             temperature: float | None = None, **fields: Any) -> None:
        """``session.update`` (only what is given changes), answered by ``session.updated``."""
        event = ClientEvents.session_update(instructions=instructions, voice=voice, temperature=temperature,
                                            **fields)
        await self.request(event, "session.update", _is(_S.SESSION_UPDATED))
        if temperature is not None:
            self.temperature = temperature

    async def add_audio(self, pcm16: bytes) -> None:
        """A user audio turn: PCM16 at the wire's 24 kHz, appended in 5 s messages, then committed."""
        appends = [self.submit(ClientEvents.input_audio_buffer_append(pcm16[i: i + APPEND_BYTES]),
                               "input_audio_buffer.append", None) for i in range(0, len(pcm16), APPEND_BYTES)]
        try:
            await self.request(ClientEvents.input_audio_buffer_commit(), "input_audio_buffer.commit",
                               _is(_S.INPUT_AUDIO_BUFFER_COMMITTED))
        finally:
            error = self.forget(appends)
        if error is not None:
            raise RequestRefused("input_audio_buffer.append", error)

    async def add_text(self, role: str, text: str) -> None:
        """A text turn (``user``, ``assistant`` or ``system``), answered by ``conversation.item.added``."""
        (error,) = await self.add_texts([(role, text)])
        if error is not None:
            raise error

    async def add_texts(self, turns: Sequence[tuple[str, str]]) -> list[RequestRefused | None]:
        """Several text turns sent at once (one round trip); what the server refused, per turn."""
        futures = []
        for role, text in turns:
            item_id = new_id("item")
            event = ClientEvents.conversation_item_create(role, text=text, item_id=item_id)
            futures.append(self.submit(event, "conversation.item.create", _item_added(item_id)))
        errors: list[RequestRefused | None] = []
        for future in futures:
            try:
                await self.wait(future, "conversation.item.create")
                errors.append(None)
            except RequestRefused as exc:
                errors.append(exc)
        return errors

    async def stream(self, reply: ClientReply) -> AsyncIterator[ResponseEvent]:
        """Send ``response.create`` for `reply` and yield its events, ending with `ResponseDone` or
        `ResponseError`. Leaving early cancels the reply and waits (bounded) for the server to end it, so the
        next one can start at once."""
        try:
            if reply.cancel_requested:  # interrupted before it was sent: nothing was said
                yield nothing_said()
                return
            event = ClientEvents.response_create(instructions=reply.instructions,
                                                 max_output_tokens=reply.max_frames)
            reply.conn, reply.event_id, self.reply = self, event["event_id"], reply
            self.send(event)
            reply.sent = True
            reply.created = time.perf_counter()
            while True:
                try:
                    item = await reply.inbox.get(self.reply_timeout)
                except asyncio.TimeoutError:
                    self.lose(f"no reply event for {self.reply_timeout:g} s")
                    continue  # the loss put a ResponseError in the inbox
                yield item
                if isinstance(item, ResponseDone | ResponseError):
                    return
        finally:
            if not reply.finished and reply.sent:
                await self._abandon(reply)

    async def _abandon(self, reply: ClientReply) -> None:
        reply.inbox.abandon()
        if self.alive:
            reply._send_cancel()
            try:
                await asyncio.wait_for(reply.done.wait(), CANCEL_WAIT_S)
            except asyncio.TimeoutError:
                self.lose(f"a cancelled reply did not end within {CANCEL_WAIT_S:g} s")
            except asyncio.CancelledError:
                self.lose("cancelled while a reply was ending")
                raise

    # --- sending -------------------------------------------------------------------------------------

    def send(self, event: dict[str, Any], *, quiet: bool = False) -> str:
        """Queue a client event (sent in order); `quiet`: its error is expected and only logged at debug."""
        if not self.alive:
            raise ConnectionLost(f"the connection to the Chroma server is lost ({self.lost_reason})")
        if quiet:
            self._quiet.append(event["event_id"])
        self._outbox.put_nowait(json.dumps(event, separators=(",", ":")))
        return event["event_id"]

    def submit(self, event: dict[str, Any], what: str,
               match: Callable[[ServerEvent], bool] | None) -> asyncio.Future[ServerEvent]:
        """Send `event`; the future gets the server event that answers it (`match`), or its error."""
        future: asyncio.Future[ServerEvent] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve_result)
        self._pending.append(_Pending(event["event_id"], what, match, future))
        try:
            self.send(event)
        except Exception:
            self._pending.pop()
            raise
        return future

    async def wait(self, future: asyncio.Future[ServerEvent], what: str,
                   timeout: float = ACK_TIMEOUT_S) -> ServerEvent:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self.lose(f"no answer to {what} within {timeout:g} s")
            raise ServerTimeout(f"the Chroma server did not answer {what} within {timeout:g} s") from None
        except ProtocolError as exc:
            raise RequestRefused(what, exc) from exc

    async def request(self, event: dict[str, Any], what: str,
                      match: Callable[[ServerEvent], bool]) -> ServerEvent:
        return await self.wait(self.submit(event, what, match), what)

    def forget(self, futures: list[asyncio.Future[ServerEvent]]) -> ProtocolError | None:
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
                        event = parse_server_event(msg.data)
                    except ProtocolError as exc:
                        log.warning("ignoring a message from the Chroma server: %s", exc.message)
                        continue
                    await self._dispatch(event)
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
            log.exception("reading from the Chroma server failed")
            reason = f"reading failed: {type(exc).__name__}: {exc}"
        finally:
            self.lose(reason)

    async def _dispatch(self, event: ServerEvent) -> None:
        if isinstance(event, ErrorEvent):
            self._on_error(event.error)
            return
        reply, kind = self.reply, event.type
        if reply is not None and not reply.finished:
            rid = getattr(event, "response_id", None)
            if isinstance(event, ResponseStatusEvent) and kind == _S.RESPONSE_DONE:
                if event.response.id == reply.response_id:
                    self._finish(reply, event.response)
                    return
            elif isinstance(event, ResponseStatusEvent) and reply.response_id is None:  # response.created
                reply.response_id = event.response.id
            elif rid is not None and rid == reply.response_id and await self._on_reply_event(reply, event):
                return
        if isinstance(event, ItemEvent) and kind == _S.CONVERSATION_ITEM_RETRIEVED and self.on_retrieved:
            self.on_retrieved(event.item)
        for pending in self._pending:
            if pending.match is not None and pending.match(event):
                self._pending.remove(pending)
                if not pending.future.done():
                    pending.future.set_result(event)
                break

    async def _on_reply_event(self, reply: ClientReply, event: ServerEvent) -> bool:
        """One event of the running reply; True when it is consumed here (nothing else waits for it)."""
        kind = event.type
        if isinstance(event, DeltaEvent) and kind == _S.RESPONSE_OUTPUT_AUDIO_DELTA:
            pcm = pcm16_to_float(b64_to_pcm(event.delta, param="delta"))
            if reply.first_audio is None:
                reply.first_audio = time.perf_counter()
            chunk = AudioChunk(pcm=pcm, frame_index=reply.frames, timestamp_ms=frames_ms(reply.frames))
            reply.frames += 1
            await reply.inbox.put(chunk)
            return True
        if isinstance(event, DeltaEvent) and kind in (_S.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA,
                                                      _S.RESPONSE_OUTPUT_TEXT_DELTA):
            if event.delta:
                # the frame it is spoken in is not on the wire: the next frame is the best estimate
                await reply.inbox.put(TextDelta(text=event.delta, token_id=-1, frame_index=reply.frames))
            return True
        if isinstance(event, OutputItemEvent) and kind == _S.RESPONSE_OUTPUT_ITEM_ADDED:
            reply.item_id = event.item.id
            if reply.truncate_ms is not None and reply.item_id:
                self.send(ClientEvents.conversation_item_truncate(reply.item_id, int(reply.truncate_ms)),
                          quiet=True)
        return False

    def _finish(self, reply: ClientReply, response: ResponseBody) -> None:
        failure = response.failure()
        final: ResponseEvent
        if failure is not None:
            final = ResponseError(failure.message, kind=failure.code or ErrorCode.SERVER_ERROR)
        else:
            now = time.perf_counter()
            ttfa = None if reply.first_audio is None else (reply.first_audio - reply.created) * 1000
            # the server reports no prefill time; the rest is measured here
            timings = Timings(time_to_first_audio_ms=ttfa, prefill_ms=math.nan,
                              total_ms=(now - reply.created) * 1000, audio_ms=frames_ms(reply.frames))
            usage = Usage(**response.usage.counts()) if response.usage is not None else Usage(0, 0, 0, 0)
            final = ResponseDone(reason=response.engine_reason(), text=response.transcript(), usage=usage,
                                 timings=timings)
        self._end(reply, final)

    def _end(self, reply: ClientReply, final: ResponseEvent) -> None:
        if reply.finished:
            return
        reply.finished = True
        reply.inbox.put_final(final)
        reply.done.set()
        if self.reply is reply:
            self.reply = None

    def _on_error(self, error: ErrorDetail) -> None:
        exc = error.to_protocol_error()
        for pending in self._pending:
            if exc.event_id is not None and pending.event_id == exc.event_id:
                self._pending.remove(pending)
                if not pending.future.done():
                    pending.future.set_exception(exc)
                return
        reply = self.reply
        if reply is not None and exc.event_id is not None and exc.event_id == reply.event_id:
            self._end(reply, ResponseError(f"the Chroma server refused the reply: {exc.message}", kind=exc.code))
        elif exc.event_id is not None and exc.event_id in self._quiet:
            # e.g. a cancel that arrived after the reply ended
            log.debug("Chroma server: %s (%s)", exc.message, exc.code)
        else:
            log.warning("Chroma server error: %s (%s)", exc.message, exc.code)

    # --- the end -------------------------------------------------------------------------------------

    def lose(self, reason: str) -> None:
        """The connection is unusable: fail what waits on it and end its reply with an error."""
        if not self.alive:
            return
        self.alive = False
        self.lost_reason = reason
        error = ConnectionLost(f"the connection to the Chroma server was lost: {reason}")
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
            log.warning("Chroma server connection %s lost: %s", self.session_id, reason)

    async def close(self) -> None:
        """Close the socket (the server frees the conversation's slot)."""
        self.lose("closed")
        current = asyncio.current_task()
        for task in (self._writer, self._reader):
            if task is not current and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await _close_quietly(self.ws, self.http)


def _extra(msg: aiohttp.WSMessage) -> str:
    return f", {msg.extra}" if isinstance(msg.extra, str) and msg.extra else ""


# --- the server ---------------------------------------------------------------------------------------------


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
                                        f"the session started (code {code}{_extra(first)})")
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
            await _close_quietly(ws, http)
            raise ServerTimeout(f"the Chroma server at {self.display_url} did not start a session within "
                                f"{self.connect_timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            await _close_quietly(ws, http)
            raise ServerUnreachable(f"cannot connect to the Chroma server at {self.display_url}: "
                                    f"{type(exc).__name__}: {exc}") from None
        except ProtocolError as exc:
            await _close_quietly(ws, http)
            raise RealtimeClientError(f"the Chroma server at {self.display_url} started with a message that is "
                                      f"not a server event: {exc.message}") from None
        except BaseException:
            await _close_quietly(ws, http)
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


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse | None, http: aiohttp.ClientSession) -> None:
    if ws is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
    with contextlib.suppress(Exception):
        await http.close()
