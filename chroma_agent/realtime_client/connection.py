"""One WebSocket to the server = one server-side conversation: a writer task, a reader task that parses and
dispatches every server event, requests matched to their answers, and the running reply's stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from chroma_agent.playout import Playout
from chroma_agent.realtime_client.errors import ConnectionLost, RequestRefused, ServerTimeout
from chroma_agent.realtime_client.reply import ClientReply, nothing_said
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

log = logging.getLogger("chroma_agent.realtime_client")

__all__ = ["ClientConnection"]

ACK_TIMEOUT_S = 30.0  # a client event the server must answer (session.update, commit, item.create)
REPLY_IDLE_TIMEOUT_S = 60.0  # a reply whose server sends nothing for this long is given up
CANCEL_WAIT_S = 5.0  # an abandoned reply: how long to wait for the server to end it
CLOSE_TIMEOUT_S = 2.0
APPEND_BYTES = 5 * SAMPLE_RATE * SAMPLE_WIDTH  # input_audio_buffer.append: 5 s of PCM16 per message
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
_S = ServerEventType


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
            reply.playout = Playout()
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
                    reason = f"the server closed the connection (code {code}{close_detail(msg)})"
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
            index = reply.playout.frame_out()
            await reply.inbox.put(AudioChunk(pcm=pcm, frame_index=index, timestamp_ms=frames_ms(index)))
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
            playout = reply.playout
            # the server reports no prefill time; the rest is measured here
            timings = Timings(time_to_first_audio_ms=playout.time_to_first_ms, prefill_ms=math.nan,
                              total_ms=(time.monotonic() - playout.started) * 1000, audio_ms=playout.sent_ms)
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
        await close_quietly(self.ws, self.http)


def close_detail(msg: aiohttp.WSMessage) -> str:
    return f", {msg.extra}" if isinstance(msg.extra, str) and msg.extra else ""


async def close_quietly(ws: aiohttp.ClientWebSocketResponse | None, http: aiohttp.ClientSession) -> None:
    if ws is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
    with contextlib.suppress(Exception):
        await http.close()
