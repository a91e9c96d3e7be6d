"""One realtime connection's life and transport: accepting it, sending events, reading client messages, ending it.

This is the base every part of a session builds on (:mod:`.session_config`, :mod:`.input_buffer`, :mod:`.items`,
:mod:`.responses`, put together in :mod:`chroma_agent.server.realtime`): it owns the session's state, so the
parts share one set of fields instead of passing them around, and it knows nothing of what the events mean (it
hands each parsed event to ``_dispatch``). Sending and reading sit together because the rate limits, the stall
guard and the idle timeout all count the same traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState

from chroma_agent.engine.conversation import Conversation
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.realtime_protocol import (
    INSECURE_API_KEY_SUBPROTOCOL,
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    SUBPROTOCOL,
    Dialect,
    ErrorCode,
    Modality,
    ProtocolError,
    ServerEvents,
    new_id,
    parse_client_event,
)
from chroma_agent.realtime_protocol.rules import dialect_of, peek_event_id
from chroma_agent.server.connections import abort_connection
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.security import bearer_token, key_matches
from chroma_agent.server.settings import ServerSettings
from chroma_agent.voices import VoiceProfile

if TYPE_CHECKING:
    from chroma_agent.server.realtime.items import _Item
    from chroma_agent.server.realtime.responses import _Response
    from chroma_agent.vad import TurnDetector

log = logging.getLogger(__name__)

CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_INTERNAL = 1011
FLOOD_BURSTS = 2.0  # dropped messages beyond this many seconds' worth of the rate close the connection
CLOSE_GOING_AWAY = 1001  # what OpenAI closes with when a session hits its maximum duration
RESPONSE_STOP_WAIT_S = 5.0  # how long a closing connection waits for its reply task to unwind
LAST_WORDS_S = 1.0  # how long an ending session tries to deliver its last error and close frame
# Client messages read but not yet handled, in bytes: the reader keeps reading (so the rate limit sees when
# messages arrive, not when a busy handler gets to them) up to this much, then waits (TCP backpressure).
INBOX_BYTES = 32 * 1024 * 1024


class _Disconnected(Exception):
    """The client went away while we were sending."""



def _given_key(websocket: WebSocket) -> str | None:
    key = bearer_token(websocket.headers.get("authorization")) or websocket.headers.get("api-key")
    if key:
        return key
    key = websocket.query_params.get("api-key")
    if key:
        return key
    for proto in websocket.scope.get("subprotocols", []):
        if proto.startswith(INSECURE_API_KEY_SUBPROTOCOL):
            return proto[len(INSECURE_API_KEY_SUBPROTOCOL):]
    return None


def _duration(seconds: float) -> str:
    """60 minutes, 90 s: OpenAI says "60 minutes" of its own limit."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"



class Connection:
    """A session's state and its transport; the parts above it handle the events (see ``_dispatch``)."""

    def __init__(self, websocket: WebSocket, dialect: Dialect | None = None):
        self.ws = websocket
        state = websocket.app.state
        self.engine: Engine = state.engine
        self.settings: ServerSettings = state.settings
        self.metrics: ServerMetrics = state.metrics
        self.dialect: Dialect = dialect or dialect_of(websocket.headers.get("openai-beta"),
                                                      websocket.scope.get("subprotocols", []))
        self.events = ServerEvents(self.dialect)
        self.session_id = new_id("sess")
        self.conv: Conversation | None = None
        self.voice: VoiceProfile | None = None  # None: no voice to speak with (no default configured)
        self.modality: Modality = "audio"
        self.instructions: str | None = None
        self.turn_detection: dict[str, Any] | None = None
        self.vad: TurnDetector | None = None  # server VAD, when turn detection is on
        self.vad_item_id: str | None = None
        self.temperature: float | None = None
        self.max_output_tokens: int | str = self.settings.default_max_frames
        self.items: list[_Item] = []
        self.latest_audio_item: _Item | None = None
        self.response: _Response | None = None
        self.deferred: list[Callable[[], None]] = []  # context edits waiting for the running reply to end
        self.buffer = bytearray()
        self.buffer_start_ms = 0  # where the buffer starts on the input audio clock
        self.input_ms_total = 0.0
        limit_s = min(self.settings.max_audio_seconds, self.engine.config.max_user_audio_s)
        self.max_buffer_bytes = int(limit_s * SAMPLE_RATE) * SAMPLE_WIDTH
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._last_activity = time.monotonic()  # a client message arrived or an event was delivered
        self._send_waited = 0.0  # seconds spent waiting for the client to take events (stall guard)
        self._audio_taken = 0.0  # seconds of reply audio it took
        self._stalled = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._inbox_bytes = 0
        self._inbox_room = asyncio.Event()
        self._inbox_room.set()
        rate = self.settings.ws_messages_per_second
        self._tokens = rate
        self._excess = 0.0
        self._last_refill = time.monotonic()
        self._last_rate_error = -math.inf

    # --- what the parts above provide -----------------------------------------------------------------------

    async def _dispatch(self, event: Any) -> None:
        """Handle one parsed client event (the assembled connection maps each to its part)."""
        raise NotImplementedError

    async def _start_server_vad(self) -> None:
        """Start the session's default turn detection, or log why there is none (:mod:`.input_buffer`)."""
        raise NotImplementedError

    def _cancel(self, resp: _Response, reason: str) -> None:
        """Stop the running reply now (:mod:`.responses`)."""
        raise NotImplementedError

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        if not key_matches(self.settings.api_key, _given_key(self.ws)):
            await self._refuse()
            return
        offered = self.ws.scope.get("subprotocols", [])
        await self.ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        self.metrics.websockets.inc()
        try:
            if not await self._open():
                return
            await self._send(self.events.session_created(self._session_payload()))
            await self._serve()
        except _Disconnected:
            pass
        except Exception:  # a bug must not leak the slot; the client gets a last error when it can
            log.exception("realtime session %s failed", self.session_id)
            with contextlib.suppress(Exception):
                await self._send(self.events.error("internal server error", code=ErrorCode.SERVER_ERROR,
                                                   type="server_error"))
                await self.ws.close(CLOSE_INTERNAL)
        finally:
            await self._shutdown()
            self.metrics.websockets.dec()

    async def _refuse(self) -> None:
        body = APIError(401, "invalid or missing API key", type="authentication_error",
                        code=ErrorCode.INVALID_API_KEY).body()
        try:
            await self.ws.send_denial_response(JSONResponse(body, status_code=401,
                                                            headers={"WWW-Authenticate": "Bearer"}))
        except RuntimeError:  # the server lacks the denial-response extension: plain refusal (HTTP 403)
            await self.ws.close(CLOSE_POLICY)

    async def _open(self) -> bool:
        # The configured default and nothing else; without one the session starts without a voice (text
        # replies work, audio replies wait for a session.update naming a stored voice).
        self.voice = self.engine.default_voice
        try:
            self.conv = await self.engine.open_conversation(self._engine_voice(), None,
                                                            wait_s=self.settings.session_wait_s)
        except EngineBusyError as exc:
            self.metrics.errors.labels("busy").inc()
            await self._send(self.events.error(f"{exc}; try again later", code=ErrorCode.SERVER_BUSY,
                                               type="server_error"))
            await self.ws.close(CLOSE_TRY_AGAIN, "try again later")
            return False
        await self._start_server_vad()  # OpenAI sessions start with server VAD; so do ours
        log.info("realtime session %s: conversation %s (%s dialect, voice %s, turn detection %s)", self.session_id,
                 self.conv.id, self.dialect, self.voice.name if self.voice else "none",
                 "server_vad" if self.vad else "none")
        return True

    def _engine_voice(self) -> VoiceProfile | None:
        """What the engine's conversation carries: the session's voice (None: it can only reply with text)."""
        return self.voice

    async def _shutdown(self) -> None:
        self._closed = True
        resp = self.response
        if resp is not None and resp.task is not None and not resp.task.done():
            resp.task.cancel()
            await asyncio.wait([resp.task], timeout=RESPONSE_STOP_WAIT_S)
        if self.conv is not None:
            conv, self.conv = self.conv, None
            conv.close()  # queued: frees the slot without waiting for a step
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close()

    def _session_payload(self) -> dict[str, Any]:
        return self.events.session(
            session_id=self.session_id, model=self.settings.model_name, instructions=self.instructions or "",
            voice=self.voice.name if self.voice else None, turn_detection=self.turn_detection,
            max_output_tokens=self.max_output_tokens, temperature=self.temperature, modality=self.modality)

    # --- sending --------------------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any] | None, *, unless: Callable[[], bool] | None = None,
                    audio_s: float = 0.0) -> bool:
        """Send one event; with `unless`, only if it is still false once this send's turn comes (checked under the
        send lock, so a flag set before another event is queued keeps this one from going out after it).

        A client that stops reading fills the socket's buffers, and then each send waits for it. The waiting is
        counted against the reply audio (`audio_s`) the client took: `stream_stall_s` beyond it and the client is
        treated as gone (a listener playing in real time never falls behind; a slow server never waits here).
        """
        if event is None:
            return False
        if self._closed:
            raise _Disconnected
        text = json.dumps(event, separators=(",", ":"))
        async with self._send_lock:
            if unless is not None and unless():
                return False
            loop = asyncio.get_running_loop()
            started = loop.time()
            allowed = self.settings.stream_stall_s + self._audio_taken - self._send_waited
            try:
                await asyncio.wait_for(self.ws.send_text(text), timeout=max(0.0, allowed))
            except asyncio.TimeoutError:  # TimeoutError itself only from 3.11 on
                self._send_waited += loop.time() - started
                log.warning("realtime session %s: the client stopped reading (waited %.1f s for it, it took %.1f s "
                            "of audio; stream_stall_s %g): ending the session", self.session_id,
                            self._send_waited, self._audio_taken, self.settings.stream_stall_s)
                self.metrics.errors.labels("client_stalled").inc()
                self._closed = True
                self._stalled.set()
                raise _Disconnected from None
            except Exception as exc:  # WebSocketDisconnect, ClientDisconnected, RuntimeError after close
                self._closed = True
                raise _Disconnected from exc
            self._send_waited += loop.time() - started
            self._audio_taken += audio_s
            self._last_activity = time.monotonic()
        return True

    async def _send_error(self, exc: ProtocolError) -> None:
        self.metrics.errors.labels(f"realtime_{exc.code}").inc()
        await self._send(self.events.from_protocol_error(exc))

    # --- reading --------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Three tasks until one ends: the reader (socket -> inbox, rate limits), the handler (inbox -> events,
        one at a time, in order) and the watchdog (idle timeout, maximum duration, a stalled client)."""
        reader = asyncio.create_task(self._read_socket(), name=f"realtime-read-{self.session_id}")
        handler = asyncio.create_task(self._handle_inbox(), name=f"realtime-handle-{self.session_id}")
        watchdog = asyncio.create_task(self._watch(), name=f"realtime-watch-{self.session_id}")
        tasks = (reader, handler, watchdog)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in (reader, handler):
            if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, _Disconnected):
                raise exc
        if watchdog.cancelled() or watchdog.exception() is not None:
            return
        reason = watchdog.result()
        if reason is not None:
            await self._end_session(*reason)
        else:  # stalled: nothing can reach the client any more
            abort_connection(self.ws.scope)

    def _admit(self) -> bool:
        """Token bucket: `ws_messages_per_second` with a one-second burst."""
        rate = self.settings.ws_messages_per_second
        now = time.monotonic()
        elapsed, self._last_refill = now - self._last_refill, now
        self._tokens = min(rate, self._tokens + elapsed * rate)
        self._excess = max(0.0, self._excess - elapsed * rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._excess += 1.0
        return False

    async def _read_socket(self) -> None:
        """Read client messages as they arrive and queue them for the handler: sizes and rates are judged here,
        at arrival, so a handler that fell behind (a busy engine, a slow send) never makes a client that keeps
        to the rate look like a flood when the backlog is handled."""
        limit = self.settings.max_ws_message_bytes
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                self._last_activity = time.monotonic()
                text = message.get("text")
                if not self._admit():
                    if not await self._rate_limited(text):
                        return
                    continue
                if text is None:
                    self._inbox.put_nowait(("error", ProtocolError(
                        ErrorCode.BINARY_NOT_SUPPORTED, "binary messages are not supported; send JSON text events")))
                    continue
                size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8"))
                if size > limit:
                    self._inbox.put_nowait(("error", ProtocolError(
                        ErrorCode.MESSAGE_TOO_LARGE, f"message of {size} bytes exceeds the limit of {limit} bytes",
                        event_id=peek_event_id(text[:4096]))))
                    continue
                self._inbox_bytes += size
                self._inbox.put_nowait(("event", (text, size)))
                if self._inbox_bytes > INBOX_BYTES:
                    self._inbox_room.clear()
                    await self._inbox_room.wait()
        finally:
            self._inbox.put_nowait(("end", None))

    async def _handle_inbox(self) -> None:
        while True:
            kind, value = await self._inbox.get()
            if kind == "end":
                return
            if kind == "error":
                await self._send_error(value)
                continue
            text, size = value
            self._inbox_bytes -= size
            if self._inbox_bytes <= INBOX_BYTES:
                self._inbox_room.set()
            try:
                event = parse_client_event(text)
                await self._dispatch(event)
            except ProtocolError as exc:
                await self._send_error(exc)
            except _Disconnected:
                raise
            except Exception:
                log.exception("realtime session %s: handling a client event failed", self.session_id)
                await self._send_error(ProtocolError(ErrorCode.SERVER_ERROR, "internal error handling the event",
                                                     type="server_error", event_id=peek_event_id(text[:4096])))

    async def _rate_limited(self, text: str | None) -> bool:
        """Tell the client it is too fast (at most once a second); False once flooding must end the connection."""
        rate = self.settings.ws_messages_per_second
        self.metrics.errors.labels("realtime_rate_limited").inc()
        if self._excess > FLOOD_BURSTS * rate:
            await self._send_error(ProtocolError(
                ErrorCode.RATE_LIMITED, f"closing the connection: sustained flooding above {rate:g} messages/s",
                event_id=peek_event_id((text or "")[:4096])))
            await self.ws.close(CLOSE_POLICY, "message rate limit exceeded")
            return False
        now = time.monotonic()
        if now - self._last_rate_error >= 1.0:
            self._last_rate_error = now
            self._inbox.put_nowait(("error", ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many messages: at most {rate:g} per second; this message was dropped",
                event_id=peek_event_id((text or "")[:4096]))))
        return True

    # --- the session's end ----------------------------------------------------------------------------------

    async def _watch(self) -> tuple[str, str] | None:
        """Sleep until the session must end: idle (no client message, no event delivered), too old, or stalled.
        Returns (error message, close reason), or None when the client just stopped reading (nothing can be
        delivered to it any more)."""
        idle_s = self.settings.realtime_idle_timeout_s
        max_s = self.settings.realtime_max_session_s
        opened = time.monotonic()
        while True:
            now = time.monotonic()
            if max_s is not None and now >= opened + max_s:
                return (f"Your session hit the maximum duration of {_duration(max_s)} (realtime_max_session_s).",
                        "session expired: maximum duration")
            if idle_s is not None and now >= self._last_activity + idle_s:
                return (f"Your session was idle for {_duration(idle_s)}: no client event arrived and no event was "
                        "delivered (realtime_idle_timeout_s).", "session expired: idle")
            wake = min(t for t in (opened + max_s if max_s is not None else math.inf,
                                   self._last_activity + idle_s if idle_s is not None else math.inf, now + 60.0))
            try:
                await asyncio.wait_for(self._stalled.wait(), timeout=max(0.01, wake - now))
            except asyncio.TimeoutError:  # TimeoutError itself only from 3.11 on
                continue
            return None

    async def _end_session(self, message: str, close_reason: str) -> None:
        """End the session as OpenAI ends an expired one: the running reply stops, an `error` (session_expired),
        then close 1001. Both are tried for a moment; a client that does not take them is dropped."""
        log.info("realtime session %s: %s", self.session_id, message)
        self.metrics.errors.labels(f"realtime_{ErrorCode.SESSION_EXPIRED}").inc()
        resp = self.response
        if resp is not None:
            self._cancel(resp, "client_cancelled")
            if resp.task is not None and not resp.task.done():
                resp.task.cancel()
                await asyncio.wait([resp.task], timeout=RESPONSE_STOP_WAIT_S)

        async def last_words() -> None:
            await self._send(self.events.error(message, code=ErrorCode.SESSION_EXPIRED))
            await self.ws.close(CLOSE_GOING_AWAY, close_reason)

        try:
            await asyncio.wait_for(last_words(), timeout=LAST_WORDS_S)
        except (asyncio.TimeoutError, _Disconnected, RuntimeError):
            abort_connection(self.ws.scope)
        self._closed = True
