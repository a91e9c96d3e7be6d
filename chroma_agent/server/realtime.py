"""``GET /v1/realtime``: the OpenAI Realtime protocol (the subset an audio conversation needs) over a WebSocket.

One connection = one engine :class:`~chroma_agent.engine.conversation.Conversation` (a KV-cache slot, held from
accept to close). Client events are handled one at a time by the reader loop, in order; a response runs in its own
task and streams one ``response.output_audio.delta`` per 80 ms frame. Every send is awaited, so a slow reader
slows its own reply (the engine never runs more than ``lookahead_s`` ahead of what was sent) and nothing is
buffered without bound. Blocking engine calls (feature extraction, context edits) run in worker threads.

The wire format (names, validation, event shapes) lives in :mod:`chroma_agent.realtime_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState

from chroma_agent.audio import pcm16_to_float, resample
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import Conversation, ConversationError, Pending, TurnRef
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.realtime_protocol import (
    BETA_HEADER_VALUE,
    BETA_SUBPROTOCOL,
    DEFAULT_TURN_DETECTION,
    FRAME_MS,
    INSECURE_API_KEY_SUBPROTOCOL,
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    SUBPROTOCOL,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    Dialect,
    ErrorCode,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    Modality,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    ServerEvents,
    SessionUpdate,
    TurnDetection,
    VoiceRef,
    audio_ms,
    b64_to_pcm,
    new_id,
    parse_client_event,
)
from chroma_agent.server.connections import abort_connection
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.priority import in_background
from chroma_agent.server.security import bearer_token, key_matches
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.voice_choice import (
    DEFAULT_VOICE_SETTING,
    VoiceNotFound,
    is_stock_voice,
    known_voices,
    resolve_voice,
)
from chroma_agent.voices import VoiceError, VoiceProfile

log = logging.getLogger(__name__)

router = APIRouter()

MIN_COMMIT_MS = 100  # OpenAI refuses shorter buffers with the same error code
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


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    await RealtimeConnection(websocket).run()


@router.websocket("/v1/beta/realtime")
async def realtime_beta(websocket: WebSocket) -> None:
    """The same endpoint, always speaking the beta dialect (``response.audio.delta``, ...)."""
    await RealtimeConnection(websocket, dialect="beta").run()


# --- helpers -----------------------------------------------------------------------------------------------


class _Disconnected(Exception):
    """The client went away while we were sending."""


def _dialect_of(websocket: WebSocket) -> Dialect:
    beta = websocket.headers.get("openai-beta", "")
    if BETA_HEADER_VALUE in beta.replace(" ", "").split(","):
        return "beta"
    if BETA_SUBPROTOCOL in websocket.scope.get("subprotocols", []):
        return "beta"
    return "ga"


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


def _voice_name(voice: str | VoiceRef | None) -> str | None:
    return voice.id if isinstance(voice, VoiceRef) else voice


def _check_format(fmt, param: str, event_id: str | None) -> None:
    """GA format object: audio/pcm at 24 kHz (both may be omitted)."""
    if fmt is None:
        return
    if (fmt.type not in (None, "audio/pcm")) or (fmt.rate not in (None, SAMPLE_RATE)):
        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO_FORMAT,
                            f"unsupported audio format {fmt.model_dump(exclude_none=True)}: only "
                            f"{{'type': 'audio/pcm', 'rate': {SAMPLE_RATE}}} (PCM16 mono) is supported",
                            param=param, event_id=event_id)


def _check_beta_format(value: str | None, param: str, event_id: str | None) -> None:
    if value not in (None, "pcm16"):
        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO_FORMAT,
                            f"unsupported audio format {value!r}: only 'pcm16' (24 kHz mono) is supported",
                            param=param, event_id=event_id)


def _modality(mods: list[str] | None, param: str, event_id: str | None) -> Modality | None:
    """`output_modalities` / `modalities` -> "audio" (speech and its transcript) or "text" (text only)."""
    if mods is None:
        return None
    unknown = [m for m in mods if m not in ("audio", "text")]
    if unknown or not mods:
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"modalities must be ['audio'] or ['text'] (beta: ['audio', "
                            f"'text'] or ['text']), got {mods!r}", param=param, event_id=event_id)
    return "audio" if "audio" in mods else "text"


def _max_frames(value: int | str | None, default: int) -> int | None:
    """Output tokens -> reply frames: one 80 ms audio frame per token; "inf" means the engine's own limit."""
    if value is None:
        return default
    return None if value == "inf" else int(value)


_vad_unavailable_logged = False


def _log_vad_unavailable(exc: Exception) -> None:
    global _vad_unavailable_logged
    if not _vad_unavailable_logged:  # once per process: every session would say the same
        _vad_unavailable_logged = True
        log.warning("server_vad is unavailable (%s: %s): realtime sessions start with turn_detection null",
                    type(exc).__name__, exc)


@functools.lru_cache(maxsize=1)
def _silero_session():
    """Silero VAD's ONNX model as livekit-plugins-silero ships it, loaded once per process (safe to share).

    The model file is located without importing the plugin package: its ``__init__`` registers a LiveKit plugin,
    which only works on the main thread, and pulls in all of livekit-agents.
    """
    import importlib.util
    from pathlib import Path

    import onnxruntime

    spec = importlib.util.find_spec("livekit.plugins.silero")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("livekit-plugins-silero is not installed (pip install 'chroma-agent[livekit]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "silero_vad.onnx"
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=opts)


class ServerVad:
    """Server-side turn detection on the input buffer with Silero (16 kHz, 32 ms windows).

    ``push`` takes PCM16 24 kHz bytes and returns ``("start", ms)`` / ``("stop", ms)`` events, ``ms`` counted on
    the session's input audio clock (all audio appended since connect).
    """

    WINDOW = 512  # samples at 16 kHz
    CONTEXT = 64  # samples of the previous window the model sees again

    def __init__(self, config: dict[str, Any]):
        self.threshold = float(config["threshold"])
        self.prefix_padding_ms = int(config["prefix_padding_ms"])
        self.silence_duration_ms = int(config["silence_duration_ms"])
        self.session = _silero_session()
        self.window = self.WINDOW
        self.origin_ms = 0  # the input audio clock when this detector started
        self.position = 0  # 16 kHz samples already judged
        self.reset()

    def _prob(self, chunk: np.ndarray) -> float:
        x = np.concatenate([self.context, chunk])[None, :].astype(np.float32)
        out, self.state = self.session.run(None, {"input": x, "state": self.state,
                                                  "sr": np.array(16000, dtype=np.int64)})
        self.context = x[0, -self.CONTEXT:]
        return float(out.item())

    def push(self, pcm: bytes) -> list[tuple[str, int]]:
        x = resample(pcm16_to_float(pcm), SAMPLE_RATE, 16000)
        self.pending = np.concatenate([self.pending, x])
        events = []
        release = max(self.threshold - 0.15, 0.01)
        while self.pending.size >= self.window:
            chunk, self.pending = self.pending[: self.window], self.pending[self.window:]
            prob = self._prob(chunk)
            self.position += self.window
            if not self.speaking:
                if prob >= self.threshold:
                    self.speaking = True
                    self.silent_samples = 0
                    events.append(("start", self.origin_ms + (self.position - self.window) // 16))
            elif prob < release:
                self.silent_samples += self.window
                if self.silent_samples * 1000 >= self.silence_duration_ms * 16000:
                    self.speaking = False
                    events.append(("stop", self.origin_ms + self.position // 16))
            else:
                self.silent_samples = 0
        return events

    def reset(self) -> None:
        self.position += getattr(self, "pending", np.zeros(0)).size  # the clock keeps counting what is dropped
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(self.CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)
        self.speaking = False
        self.silent_samples = 0


@dataclass
class _Item:
    """A conversation item as the client sees it, and the engine turns it became."""

    id: str
    role: str
    content: list[dict[str, Any]]
    turns: list[TurnRef] = field(default_factory=list)
    status: str = "completed"
    audio: bool = False  # an assistant audio item made by a response
    audio_ms: float = 0.0  # audio of it sent to the client
    cut_ms: float | None = None  # where its context was truncated (server barge-in, client truncate)
    finished: bool = True
    submitted: bool = False  # its reply reached the engine (so the engine's latest reply is this item's)


@dataclass
class _Response:
    id: str
    item_id: str
    event_id: str | None
    metadata: dict[str, str] | None
    instructions: str | None
    max_frames: int | None
    max_output_tokens: int | str
    sampling: SamplingParams
    modality: Modality = "audio"
    cancel_requested: bool = False
    cancel_reason: str = "client_cancelled"
    cut_ms: float | None = None  # truncate the reply's context here when it ends (barge-in, client truncate)
    frames_sent: int = 0
    first_sent_at: float | None = None  # monotonic time of its first audio delta
    task: asyncio.Task | None = None

    def sent_ms(self) -> float:
        return self.frames_sent * FRAME_MS

    def heard_ms(self) -> float:
        """What the listener can have heard: the audio sent, at most as much as real-time playback allows."""
        if self.first_sent_at is None:
            return 0.0
        return min(self.sent_ms(), (time.monotonic() - self.first_sent_at) * 1000)


# --- the connection ----------------------------------------------------------------------------------------


class RealtimeConnection:
    def __init__(self, websocket: WebSocket, dialect: Dialect | None = None):
        self.ws = websocket
        state = websocket.app.state
        self.engine: Engine = state.engine
        self.settings: ServerSettings = state.settings
        self.metrics: ServerMetrics = state.metrics
        self.dialect: Dialect = dialect or _dialect_of(websocket)
        self.events = ServerEvents(self.dialect)
        self.session_id = new_id("sess")
        self.conv: Conversation | None = None
        self.voice: VoiceProfile | None = None  # None: no voice to speak with (no default configured)
        self.modality: Modality = "audio"
        self.instructions: str | None = None
        self.turn_detection: dict[str, Any] | None = None
        self.vad: ServerVad | None = None
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
        # OpenAI sessions start with server VAD; so do ours when Silero is installed.
        try:
            self.vad = await asyncio.to_thread(ServerVad, DEFAULT_TURN_DETECTION)
            self.turn_detection = dict(DEFAULT_TURN_DETECTION)
        except Exception as exc:  # livekit-plugins-silero / onnxruntime missing or broken
            _log_vad_unavailable(exc)
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
                        event_id=_peek_event_id(text[:4096]))))
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
                                                     type="server_error", event_id=_peek_event_id(text[:4096])))

    async def _rate_limited(self, text: str | None) -> bool:
        """Tell the client it is too fast (at most once a second); False once flooding must end the connection."""
        rate = self.settings.ws_messages_per_second
        self.metrics.errors.labels("realtime_rate_limited").inc()
        if self._excess > FLOOD_BURSTS * rate:
            await self._send_error(ProtocolError(
                ErrorCode.RATE_LIMITED, f"closing the connection: sustained flooding above {rate:g} messages/s",
                event_id=_peek_event_id((text or "")[:4096])))
            await self.ws.close(CLOSE_POLICY, "message rate limit exceeded")
            return False
        now = time.monotonic()
        if now - self._last_rate_error >= 1.0:
            self._last_rate_error = now
            self._inbox.put_nowait(("error", ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many messages: at most {rate:g} per second; this message was dropped",
                event_id=_peek_event_id((text or "")[:4096]))))
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

    async def _dispatch(self, event) -> None:
        handler = {
            SessionUpdate: self._session_update,
            InputAudioBufferAppend: self._append,
            InputAudioBufferCommit: self._commit,
            InputAudioBufferClear: self._clear,
            ConversationItemCreate: self._item_create,
            ConversationItemTruncate: self._item_truncate,
            ConversationItemDelete: self._item_delete,
            ConversationItemRetrieve: self._item_retrieve,
            ResponseCreate: self._response_create,
            ResponseCancel: self._response_cancel,
        }[type(event)]
        await handler(event)

    # --- session --------------------------------------------------------------------------------------------

    def _session_payload(self) -> dict[str, Any]:
        return self.events.session(
            session_id=self.session_id, model=self.settings.model_name, instructions=self.instructions or "",
            voice=self.voice.name if self.voice else None, turn_detection=self.turn_detection,
            max_output_tokens=self.max_output_tokens, temperature=self.temperature, modality=self.modality)

    def _sampling(self, temperature: float | None) -> SamplingParams:
        base = self.engine.sampling
        t = temperature if temperature is not None else self.temperature
        return base if t is None else dataclasses.replace(base, temperature=t)

    async def _resolve_voice(self, name: str, param: str, event_id: str | None) -> VoiceProfile | None:
        """A stored voice, the configured default (its name or an OpenAI stock name), or None: a stock name
        while no default is configured (the update's other fields still apply; audio replies are refused)."""
        if self.voice is not None and name == self.voice.name and not is_stock_voice(name):
            return self.voice
        try:
            return await asyncio.to_thread(resolve_voice, self.engine, name)
        except VoiceNotFound:
            known = await asyncio.to_thread(known_voices, self.engine)
            raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"unknown voice {name!r}; available voices: {known} (OpenAI's "
                                "voice names speak with the server's default voice)", param=param,
                                event_id=event_id) from None
        except VoiceError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"voice {name!r} cannot be used: {exc}", param=param,
                                event_id=event_id) from None

    def _voice_param(self) -> str:
        return "session.audio.output.voice" if self.dialect == "ga" else "session.voice"

    def _require_voice(self, event_id: str | None) -> None:
        """An audio reply needs a voice; refuse it (naming the setting) when the session has none."""
        if self.voice is None:
            raise ProtocolError(ErrorCode.VOICE_REQUIRED, f"this server has no default voice ({DEFAULT_VOICE_SETTING} "
                                f"is not set) and the session has none: set {self._voice_param()} to a stored voice, "
                                "or ask for a text reply (output_modalities ['text'])", param=self._voice_param(),
                                event_id=event_id)

    def _turn_detection(self, td: TurnDetection | None, param: str, event_id: str | None) -> dict[str, Any] | None:
        if td is None or td.type in (None, "none"):
            return None
        if td.type not in ("server_vad", "semantic_vad"):
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"turn_detection type {td.type!r} is not supported "
                                "(use null for client-side commits, or 'server_vad')", param=f"{param}.type",
                                event_id=event_id)
        # semantic_vad has no counterpart here; it runs as server_vad with the default timings.
        given = {k: getattr(td, k) for k in DEFAULT_TURN_DETECTION if k != "type" and getattr(td, k) is not None}
        return {**DEFAULT_TURN_DETECTION, **given}

    async def _session_update(self, event: SessionUpdate) -> None:
        s, eid = event.session, event.event_id
        fields = s.model_fields_set
        # 1. validate everything, apply nothing
        if isinstance(s.instructions, str):
            self._require_text(len(s.instructions), "session.instructions", eid)
        modality = self.modality
        for name in ("output_modalities", "modalities"):
            modality = _modality(getattr(s, name), f"session.{name}", eid) or modality
        _check_beta_format(s.input_audio_format, "session.input_audio_format", eid)
        _check_beta_format(s.output_audio_format, "session.output_audio_format", eid)
        voice_name = _voice_name(s.voice)
        voice_param = "session.voice"
        td_given, td, td_param = False, None, "session.turn_detection"
        if "turn_detection" in fields:
            td_given, td = True, s.turn_detection
        audio = s.audio
        if audio is not None:
            if audio.input is not None:
                _check_format(audio.input.format, "session.audio.input.format", eid)
                if "turn_detection" in audio.input.model_fields_set:
                    td_given, td, td_param = True, audio.input.turn_detection, "session.audio.input.turn_detection"
            if audio.output is not None:
                _check_format(audio.output.format, "session.audio.output.format", eid)
                if audio.output.voice is not None:
                    voice_name, voice_param = _voice_name(audio.output.voice), "session.audio.output.voice"
        new_td = self._turn_detection(td, td_param, eid) if td_given else self.turn_detection
        voice = await self._resolve_voice(voice_name, voice_param, eid) if voice_name else self.voice
        if voice is None and voice_name:
            log.info("realtime session %s: voice %r stands for the default voice, and none is configured",
                     self.session_id, voice_name)
        max_tokens = self.max_output_tokens
        for name in ("max_output_tokens", "max_response_output_tokens"):
            if name in fields:
                value = getattr(s, name)
                max_tokens = self.settings.default_max_frames if value is None else value
        vad = self.vad
        if new_td != self.turn_detection:
            vad = None
            if new_td is not None:
                try:
                    vad = await asyncio.to_thread(ServerVad, new_td)
                except Exception as exc:  # silero/onnxruntime missing or broken
                    log.warning("server_vad unavailable: %s", exc)
                    raise ProtocolError(ErrorCode.UNSUPPORTED, f"server_vad is not available on this server "
                                        f"({type(exc).__name__}: {exc}); use turn_detection null and commit the "
                                        "input audio buffer yourself", param=td_param, event_id=eid) from None
        # 2. apply
        if voice is not self.voice:
            self.voice = voice
            await self.conv.set_voice(self._engine_voice())
        self.modality = modality
        if "instructions" in fields and (s.instructions or None) != self.instructions:
            self.instructions = s.instructions or None
            await self._edit_context(functools.partial(self.conv.set_instructions, self.instructions))
        if "temperature" in fields:
            self.temperature = s.temperature
        self.max_output_tokens = max_tokens
        if new_td != self.turn_detection:
            if vad is not None:
                vad.origin_ms = int(self.input_ms_total)
            self.turn_detection, self.vad, self.vad_item_id = new_td, vad, None
        await self._send(self.events.session_updated(self._session_payload()))

    async def _edit_context(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Context edits wait for a running reply, so its item keeps the context it was made in."""
        if self.response is not None:
            self.deferred.append(op)
        else:
            await op()

    # --- input audio ----------------------------------------------------------------------------------------

    async def _append(self, event: InputAudioBufferAppend) -> None:
        room = self.max_buffer_bytes - len(self.buffer)
        try:  # the size check runs on the base64 length, before decoding: +4 covers its padding
            pcm: bytes | None = b64_to_pcm(event.audio, max_bytes=max(room, 0) + 4, event_id=event.event_id)
        except ProtocolError as exc:
            if exc.code != ErrorCode.AUDIO_TOO_LARGE:
                raise
            pcm = None  # reported below with the buffer's real limit, not the room left in it
        if pcm is None or len(pcm) > room:
            limit_s = self.max_buffer_bytes / (SAMPLE_RATE * SAMPLE_WIDTH)
            raise ProtocolError(ErrorCode.AUDIO_TOO_LARGE,
                                f"the input audio buffer holds at most {limit_s:g} s of audio (max_audio_seconds) "
                                f"and has {len(self.buffer) / (SAMPLE_RATE * SAMPLE_WIDTH):.1f} s; commit or clear "
                                "it first", param="audio", event_id=event.event_id)
        self.buffer.extend(pcm)
        self.input_ms_total += len(pcm) * 1000 / (SAMPLE_RATE * SAMPLE_WIDTH)
        if self.vad is not None:
            await self._run_vad(pcm)

    async def _run_vad(self, pcm: bytes) -> None:
        cfg = self.turn_detection
        # ~12 ms of CPU per second of audio (resampling + Silero): off the event loop, which every session shares
        # (onnxruntime releases the GIL). Appends are handled one at a time, so the detector sees them in order.
        for kind, ms in await asyncio.to_thread(self.vad.push, pcm):
            if kind == "start":
                self.vad_item_id = new_id("item")
                start = max(0, ms - cfg["prefix_padding_ms"])
                # keep the padding before the speech, drop older silence
                drop = max(0, (start - self.buffer_start_ms) * SAMPLE_RATE // 1000) * SAMPLE_WIDTH
                del self.buffer[:min(drop, len(self.buffer))]
                self.buffer_start_ms = max(self.buffer_start_ms, start)
                interrupted = self.response if cfg["interrupt_response"] else None
                cut = self._barge_in(interrupted) if interrupted is not None else None
                # the reply is cancelled (nothing more of it goes out) before the client hears of the speech
                await self._send(self.events.speech_started(self.vad_item_id, start))
                if cut is not None:
                    await self._send(self.events.item_truncated(interrupted.item_id, 0, cut))
            else:
                item_id, self.vad_item_id = self.vad_item_id or new_id("item"), None
                await self._send(self.events.speech_stopped(item_id, ms))
                if await self._commit_buffer(item_id, None) and cfg["create_response"]:
                    await self._await_cancelled()
                    if self.response is None:
                        try:
                            if self.modality == "audio":
                                self._require_voice(None)
                        except ProtocolError as exc:
                            await self._send_error(exc)
                        else:
                            self._start_response(None, None)
        if not self.vad.speaking:  # between turns keep only the prefix padding
            keep = cfg["prefix_padding_ms"] * SAMPLE_RATE // 1000 * SAMPLE_WIDTH
            if len(self.buffer) > keep:
                del self.buffer[: len(self.buffer) - keep]
            self.buffer_start_ms = int(self.input_ms_total) - audio_ms(len(self.buffer))

    async def _commit(self, event: InputAudioBufferCommit) -> None:
        if audio_ms(len(self.buffer)) < MIN_COMMIT_MS:
            raise ProtocolError(ErrorCode.COMMIT_EMPTY, f"buffer too small: expected at least {MIN_COMMIT_MS}ms of "
                                f"audio, but the buffer holds {audio_ms(len(self.buffer))}ms",
                                event_id=event.event_id)
        item_id, self.vad_item_id = self.vad_item_id or new_id("item"), None
        if self.vad is not None:
            self.vad.reset()
        await self._commit_buffer(item_id, event.event_id)

    async def _commit_buffer(self, item_id: str, event_id: str | None) -> bool:
        pcm = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = int(self.input_ms_total)
        if audio_ms(len(pcm)) < MIN_COMMIT_MS:
            return False
        await self._require_room(event_id)
        rate = self.engine.processor.audio_sample_rate
        clip = await in_background(resample, pcm16_to_float(pcm), SAMPLE_RATE, rate)  # off the event loop
        try:
            turns = await self._add_turns([(self.conv.add_user_audio, (clip, rate))])
        except ContextError as exc:
            raise ProtocolError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"the input audio cannot be used: {exc}",
                                event_id=event_id) from None
        except (ValueError, ConversationError) as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, f"the input audio cannot be used: {exc}",
                                event_id=event_id) from None
        previous = self.items[-1].id if self.items else None
        item = _Item(item_id, "user", [self.events.user_audio_content()], turns)
        self.items.append(item)
        await self._send(self.events.input_audio_buffer_committed(item_id, previous))
        body = self._item_body(item)
        await self._send(self.events.item_added(body, previous))
        await self._send(self.events.item_done(body, previous))
        return True

    async def _clear(self, event: InputAudioBufferClear) -> None:
        self.buffer.clear()
        self.buffer_start_ms = int(self.input_ms_total)
        self.vad_item_id = None
        if self.vad is not None:
            self.vad.reset()
        await self._send(self.events.input_audio_buffer_cleared())

    # --- items ----------------------------------------------------------------------------------------------

    async def _add_turns(self, calls: list[tuple[Callable, tuple]]) -> list[TurnRef]:
        """Run Conversation.add_* calls (queued in order) and return their turns: all of the item or nothing."""
        pending = [fn(*args) for fn, args in calls]
        results = await asyncio.gather(*pending, return_exceptions=True)
        turns = [r for r in results if isinstance(r, TurnRef)]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            self._drop_turns(turns)
            raise failed
        return turns

    def _drop_turns(self, turns: list[TurnRef]) -> Awaitable[Any]:
        """Remove turns from the context; the KV cache stays valid up to the first removed turn."""
        if self.conv is not None and turns:
            return self.conv.remove_turns(turns)
        nothing: Pending[None] = Pending()  # awaitable or not: callers that only queue the edit do not await it
        nothing.set_result(None)
        return nothing

    async def _prune_items(self) -> None:
        """Forget the items whose turns the engine dropped from the context (long sessions keep the latest turns
        that fit), then the oldest beyond `max_items`; the latest assistant audio item stays (truncation)."""
        alive = {t.id for t in (await self.conv.inspect()).turns}
        kept = []
        for item in self.items:
            had = bool(item.turns)
            item.turns = [t for t in item.turns if t.id in alive]
            if had and not item.turns and item is not self.latest_audio_item:
                continue  # the model no longer sees it
            kept.append(item)
        limit = self.settings.max_items
        if len(kept) > limit:
            kept = [i for i in kept[:-limit] if i is self.latest_audio_item] + kept[-limit:]
        self.items = kept

    async def _require_room(self, event_id: str | None) -> None:
        """A new client item (created or committed) must fit the conversation's `max_items` (items whose turns
        the context has dropped do not count: they are forgotten first)."""
        limit = self.settings.max_items
        if len(self.items) >= limit:
            await self._prune_items()
        if len(self.items) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_ITEMS, f"the conversation holds {len(self.items)} items; at most "
                                f"{limit} (max_items): delete items (conversation.item.delete) before adding more",
                                param="item", event_id=event_id)

    def _require_text(self, chars: int, param: str, event_id: str | None) -> None:
        """Text is counted before it is tokenized: one turn's (an item's parts together, instructions) fits
        `max_turn_chars`."""
        limit = self.settings.max_turn_chars
        if chars > limit:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, f"{param}: {chars} characters of text (an item's parts count "
                                f"together); at most {limit} per turn (max_turn_chars)", param=param, event_id=event_id)

    def _item_body(self, item: _Item) -> dict[str, Any]:
        return self.events.message_item(item.id, item.role, item.content, item.status)

    def _find(self, item_id: str, event_id: str | None, code: str, param: str = "item_id") -> _Item:
        """The item by id; else the error `code` OpenAI sends for this event (e.g. item_truncate_invalid_item_id)."""
        for item in self.items:
            if item.id == item_id:
                return item
        raise ProtocolError(code, f"Item with item_id not found: {item_id}", param=param, event_id=event_id)

    async def _item_create(self, event: ConversationItemCreate) -> None:
        item, eid = event.item, event.event_id
        if item.type != "message":
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"item type {item.type!r} is not supported (only 'message')",
                                param="item.type", event_id=eid)
        if item.role not in ("user", "system", "assistant"):
            raise ProtocolError(ErrorCode.INVALID_VALUE, "item.role must be 'user', 'system' or 'assistant'",
                                param="item.role", event_id=eid)
        if not item.content:
            raise ProtocolError(ErrorCode.MISSING_PARAMETER, "item.content must hold at least one part",
                                param="item.content", event_id=eid)
        previous = self.items[-1].id if self.items else None
        if event.previous_item_id not in (None, previous) and not (event.previous_item_id == "root" and not self.items):
            self._find(event.previous_item_id, eid, ErrorCode.ITEM_NOT_FOUND, "previous_item_id")
            raise ProtocolError(ErrorCode.UNSUPPORTED, "items can only be appended at the end of the conversation",
                                param="previous_item_id", event_id=eid)
        if item.id is not None and any(i.id == item.id for i in self.items):
            raise ProtocolError(ErrorCode.DUPLICATE_ITEM_ID, f"an item with id {item.id!r} already exists",
                                param="item.id", event_id=eid)
        await self._require_room(eid)
        calls, content, texts = [], [], []
        user_parts: list = []
        conv = self.conv
        chars = audio_bytes = 0

        def flush_text():
            if texts:
                fn = {"system": conv.add_system_text, "assistant": conv.add_assistant_text}[item.role]
                calls.append((fn, ("\n".join(texts),)))
                texts.clear()

        for i, part in enumerate(item.content):
            param = f"item.content.{i}"
            kind = part.type
            if item.role == "user" and kind == "input_audio":
                if part.audio is None:
                    raise ProtocolError(ErrorCode.MISSING_PARAMETER, "an input_audio part needs 'audio'",
                                        param=f"{param}.audio", event_id=eid)
                room = self.max_buffer_bytes - audio_bytes
                try:
                    pcm = b64_to_pcm(part.audio, param=f"{param}.audio", max_bytes=room, event_id=eid)
                except ProtocolError as exc:
                    if exc.code != ErrorCode.AUDIO_TOO_LARGE:
                        raise
                    limit_s = self.max_buffer_bytes / (SAMPLE_RATE * SAMPLE_WIDTH)
                    raise ProtocolError(ErrorCode.INVALID_AUDIO, f"the item's audio is longer than {limit_s:g} s in "
                                        "all (max_audio_seconds)", param=f"{param}.audio", event_id=eid) from None
                audio_bytes += len(pcm)
                if audio_ms(len(pcm)) < MIN_COMMIT_MS:
                    raise ProtocolError(ErrorCode.INVALID_AUDIO, f"audio must be at least {MIN_COMMIT_MS}ms long",
                                        param=f"{param}.audio", event_id=eid)
                rate = self.engine.processor.audio_sample_rate
                # minutes of audio take a while to resample: not on the event loop every session shares
                clip = await in_background(resample, pcm16_to_float(pcm), SAMPLE_RATE, rate)
                user_parts.append((clip, rate))
                content.append(self.events.user_audio_content(part.transcript))
                continue
            allowed = {"user": ("input_text",), "system": ("input_text",),
                       "assistant": ("output_text", "text", "output_audio", "audio")}[item.role]
            if kind not in allowed:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"content type {kind!r} is not supported for role "
                                    f"{item.role!r} (expected one of {list(allowed)})", param=f"{param}.type",
                                    event_id=eid)
            text = part.transcript if kind in ("output_audio", "audio") else part.text
            what = "transcript" if kind in ("output_audio", "audio") else "text"
            if not isinstance(text, str) or not text.strip():
                raise ProtocolError(ErrorCode.MISSING_PARAMETER, f"a {kind} part needs a non-empty '{what}'",
                                    param=f"{param}.{what}", event_id=eid)
            chars += len(text)
            self._require_text(chars, f"{param}.{what}", eid)
            if item.role == "user":
                user_parts.append(text)
                content.append(self.events.user_text_content(text))
                continue
            texts.append(text)
            if item.role == "system":
                content.append(self.events.system_text_content(text))
            else:
                content.append(self.events.assistant_text_content(text))
        flush_text()
        if user_parts:  # one user turn, its parts in order, as the chat template renders a message
            calls.append((conv.add_user_message, (user_parts,)))
        try:
            turns = await self._add_turns(calls)
        except ContextError as exc:
            raise ProtocolError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"the item cannot be added: {exc}", param="item",
                                event_id=eid) from None
        except (ValueError, ConversationError) as exc:
            raise ProtocolError(ErrorCode.INVALID_VALUE, f"the item cannot be added: {exc}", param="item",
                                event_id=eid) from None
        new = _Item(item.id or new_id("item"), item.role, content, turns)
        self.items.append(new)
        body = self._item_body(new)
        await self._send(self.events.item_added(body, previous))
        await self._send(self.events.item_done(body, previous))

    async def _item_truncate(self, event: ConversationItemTruncate) -> None:
        eid = event.event_id
        item = self._find(event.item_id, eid, ErrorCode.ITEM_TRUNCATE_INVALID_ID)
        if not item.audio:
            raise ProtocolError(ErrorCode.INVALID_VALUE, "only assistant audio items made by a response can be "
                                "truncated", param="item_id", event_id=eid)
        if event.content_index != 0:
            raise ProtocolError(ErrorCode.INVALID_VALUE, "content_index must be 0 (the item's audio part)",
                                param="content_index", event_id=eid)
        if item is not self.latest_audio_item:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "only the most recent assistant audio item can be truncated",
                                param="item_id", event_id=eid)
        # Past the audio that was sent (or past an earlier cut, the server's barge-in included) is clamped there:
        # the context cannot hold more than the client was given.
        end = float(event.audio_end_ms)
        resp = self.response
        if not item.finished and resp is not None and resp.item_id == item.id:  # running: ends cancelled, cut here
            end = min(end, resp.sent_ms(), resp.cut_ms if resp.cut_ms is not None else math.inf)
            resp.cut_ms = end
            self._cancel(resp, "client_cancelled")
        else:
            end = min(end, item.audio_ms, item.cut_ms if item.cut_ms is not None else math.inf)
            if item.submitted and item.turns and (item.cut_ms is None or end < item.cut_ms):
                kept = await self.conv.truncate(end)
                if kept is not None:
                    item.content = [self.events.assistant_audio_content(kept)]
            item.cut_ms = end
        await self._send(self.events.item_truncated(item.id, 0, int(end)))

    async def _item_delete(self, event: ConversationItemDelete) -> None:
        item = self._find(event.item_id, event.event_id, ErrorCode.ITEM_DELETE_INVALID_ID)
        resp = self.response
        if resp is not None and resp.item_id == item.id:
            self._cancel(resp, "client_cancelled")
        self.items.remove(item)
        if self.latest_audio_item is item:
            self.latest_audio_item = None
        await self._edit_context(lambda: self._drop_turns(item.turns))
        await self._send(self.events.item_deleted(item.id))

    async def _item_retrieve(self, event: ConversationItemRetrieve) -> None:
        item = self._find(event.item_id, event.event_id, ErrorCode.ITEM_RETRIEVE_INVALID_ID)
        await self._send(self.events.item_retrieved(self._item_body(item)))

    # --- responses ------------------------------------------------------------------------------------------

    async def _response_create(self, event: ResponseCreate) -> None:
        eid = event.event_id
        await self._await_cancelled()
        if self.response is not None:
            raise ProtocolError(ErrorCode.ACTIVE_RESPONSE, f"Conversation already has an active response in "
                                f"progress: {self.response.id}. Wait until the response is finished before "
                                "creating a new one.", event_id=eid)
        p = event.response
        if p is None:
            if self.modality == "audio":
                self._require_voice(eid)
            self._start_response(eid, None)
            return
        fields = p.model_fields_set
        if isinstance(p.instructions, str):
            self._require_text(len(p.instructions), "response.instructions", eid)
        modality = self.modality
        for name in ("output_modalities", "modalities"):
            modality = _modality(getattr(p, name), f"response.{name}", eid) or modality
        if p.conversation not in (None, "auto"):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "out-of-band responses (conversation != 'auto') are not "
                                "supported", param="response.conversation", event_id=eid)
        if p.input:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "response.input is not supported; add items with "
                                "conversation.item.create", param="response.input", event_id=eid)
        voice = _voice_name(p.voice) or (_voice_name(p.audio.output.voice) if p.audio and p.audio.output else None)
        if voice is not None and not is_stock_voice(voice) and (self.voice is None or voice != self.voice.name):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "a per-response voice is not supported; change the voice "
                                "with session.update", param="response.voice", event_id=eid)
        if p.audio and p.audio.output:
            _check_format(p.audio.output.format, "response.audio.output.format", eid)
        if modality == "audio":
            self._require_voice(eid)
        max_tokens = None
        for name in ("max_output_tokens", "max_response_output_tokens"):
            if name in fields and getattr(p, name) is not None:
                max_tokens = getattr(p, name)
        self._start_response(eid, p, max_tokens=max_tokens, modality=modality)

    def _start_response(self, event_id: str | None, params, max_tokens: int | str | None = None,
                        modality: Modality | None = None) -> None:
        tokens = max_tokens if max_tokens is not None else self.max_output_tokens
        resp = _Response(
            id=new_id("resp"), item_id=new_id("item"), event_id=event_id,
            metadata=params.metadata if params else None,
            instructions=(params.instructions or None) if params else None,
            max_frames=_max_frames(tokens, self.settings.default_max_frames), max_output_tokens=tokens,
            sampling=self._sampling(params.temperature if params else None), modality=modality or self.modality,
        )
        self.response = resp
        resp.task = asyncio.create_task(self._run_response(resp), name=f"realtime-{resp.id}")

    async def _await_cancelled(self) -> None:
        """A reply being cancelled ends within an engine step: let it finish rather than refuse what follows."""
        resp = self.response
        if resp is not None and resp.cancel_requested and resp.task is not None:
            await asyncio.wait([resp.task], timeout=RESPONSE_STOP_WAIT_S)

    def _cancel(self, resp: _Response, reason: str) -> None:
        """Stop a reply now: no delta of it is sent after this returns (the reply task checks the flag under the
        send lock), so call it before acknowledging whatever caused it."""
        if not resp.cancel_requested:
            resp.cancel_requested, resp.cancel_reason = True, reason
        if self.conv is not None:
            self.conv.cancel()

    def _barge_in(self, resp: _Response) -> int | None:
        """Server VAD heard the user over a reply: cancel it, and keep of it what can have been played.

        Returns the `audio_end_ms` the item is truncated to (the audio sent, and no more than real-time playback
        since its first delta), or None when none of its audio went out.
        """
        self._cancel(resp, "turn_detected")
        if resp.modality != "audio" or resp.frames_sent == 0:
            return None
        heard = int(resp.heard_ms())
        resp.cut_ms = heard if resp.cut_ms is None else min(resp.cut_ms, heard)
        return int(resp.cut_ms)

    async def _response_cancel(self, event: ResponseCancel) -> None:
        resp = self.response
        if resp is None or (event.response_id and event.response_id != resp.id):
            what = "no active response found" if resp is None else f"response {event.response_id!r} is not active"
            raise ProtocolError(ErrorCode.CANCEL_NOT_ACTIVE, f"Cancellation failed: {what}", param="response_id",
                                event_id=event.event_id)
        self._cancel(resp, "client_cancelled")

    def _response_body(self, resp: _Response, **fields: Any) -> dict[str, Any]:
        return self.events.response(resp.id, metadata=resp.metadata, voice=self.voice.name if self.voice else None,
                                    max_output_tokens=resp.max_output_tokens, modality=resp.modality, **fields)

    async def _run_response(self, resp: _Response) -> None:
        ev, conv = self.events, self.conv
        audio = resp.modality == "audio"

        def cancelled() -> bool:
            return resp.cancel_requested

        try:
            await self._send(ev.response_created(self._response_body(resp)))
            previous = self.items[-1].id if self.items else None
            content = ev.assistant_audio_content(None) if audio else ev.assistant_text_content("")
            item = _Item(resp.item_id, "assistant", [content], status="in_progress", audio=audio, finished=False)
            self.items.append(item)
            # only the latest reply's item can be truncated (the engine truncates its latest reply)
            self.latest_audio_item = item if audio else None
            await self._send(ev.output_item_added(resp.id, {**self._item_body(item), "content": []}))
            await self._send(ev.item_added({**self._item_body(item), "content": []}, previous))
            await self._send(ev.content_part_added(resp.id, item.id, modality=resp.modality))

            done: ResponseDone | None = None
            failure: str | None = None
            failure_code = "engine_error"
            parts: list[str] = []
            started = False
            if not resp.cancel_requested:
                started = item.submitted = True  # respond() submits synchronously on its first step
                try:
                    gen = conv.respond(resp.instructions, max_frames=resp.max_frames, sampling=resp.sampling,
                                       output_audio=audio)
                    async with contextlib.aclosing(gen):
                        async for out in gen:
                            if resp.cancel_requested:
                                conv.cancel()  # then drain to ResponseDone: nothing more is sent
                            if isinstance(out, AudioChunk):
                                if await self._send(ev.audio_delta(resp.id, item.id, out.pcm16()), unless=cancelled,
                                                    audio_s=FRAME_MS / 1000):
                                    resp.frames_sent += 1
                                    item.audio_ms = resp.sent_ms()
                                    if resp.first_sent_at is None:
                                        resp.first_sent_at = time.monotonic()
                            elif isinstance(out, TextDelta):
                                delta = (ev.transcript_delta if audio else ev.text_delta)(resp.id, item.id, out.text)
                                if await self._send(delta, unless=cancelled):
                                    parts.append(out.text)
                            elif isinstance(out, ResponseDone):
                                done = out
                            elif isinstance(out, ResponseError):
                                failure = out.message
                except ContextError as exc:  # the conversation's last turn leaves no room for the reply
                    item.submitted = False
                    failure, failure_code = str(exc), ErrorCode.CONTEXT_LENGTH_EXCEEDED
                except (ValueError, ConversationError) as exc:  # refused before it started
                    item.submitted = False
                    failure = str(exc)
            await self._finish_response(resp, item, previous, done, failure, parts, started, failure_code)
        except (_Disconnected, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("realtime session %s: response %s failed", self.session_id, resp.id)
        finally:
            if self.response is resp:  # ended early (disconnect, a bug): settle what it was holding back
                if not self._closed:
                    self._run_deferred()
                self.response = None

    def _run_deferred(self) -> None:
        while self.deferred:
            op = self.deferred.pop(0)
            try:
                op()  # queued in order by the engine; nobody waits for it here
            except Exception:
                log.exception("realtime session %s: a deferred context edit failed", self.session_id)

    def _cut_point(self, resp: _Response, done: ResponseDone) -> float | None:
        """Where the ended reply's context must be cut: what was sent of a cancelled reply, or an explicit cut."""
        cut = resp.cut_ms
        produced = len(done.frame_steps)
        if resp.modality == "audio" and resp.cancel_requested and resp.frames_sent < produced:
            cut = resp.sent_ms() if cut is None else min(cut, resp.sent_ms())
        return cut

    async def _finish_response(self, resp: _Response, item: _Item, previous: str | None, done: ResponseDone | None,
                               failure: str | None, parts: list[str], started: bool,
                               failure_code: str = "engine_error") -> None:
        ev, conv = self.events, self.conv
        details = None
        if failure is not None:
            kind = "invalid_request_error" if failure_code == ErrorCode.CONTEXT_LENGTH_EXCEEDED else "server_error"
            status, details = "failed", {"type": "failed", "error": {"type": kind, "code": failure_code,
                                                                     "message": failure}}
        elif done is None or done.reason == "cancelled" or resp.cancel_requested:
            status, details = "cancelled", {"type": "cancelled", "reason": resp.cancel_reason}
        elif done.reason == "completed":
            status = "completed"
        else:  # max_frames: the output token limit
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        # Keep in the context only what the client was sent (and, after a barge-in, what it could have played).
        # A client truncate may arrive while this runs: apply cuts until none is left.
        # the reply's kept text (a truncation that arrived before it ended is already applied to it)
        transcript = done.text if done is not None else "".join(parts)
        applied: float | None = None
        while started and done is not None and failure is None:
            cut = self._cut_point(resp, done)
            if cut is None or (applied is not None and cut >= applied):
                break
            kept = await conv.truncate(cut)
            if kept is not None:
                transcript = kept
            applied = item.cut_ms = cut
        item.status = "completed" if status == "completed" else "incomplete"
        if resp.modality == "audio":
            item.content = [ev.assistant_audio_content(transcript)]
        else:
            item.content = [ev.assistant_text_content(transcript)]
        item.audio_ms = resp.sent_ms()
        item.turns = [done.turn] if started and done is not None and done.turn is not None and failure is None \
            else []
        item.finished = True
        usage = None
        if done is not None:
            self.metrics.reply_done(done)
            n_audio = done.usage.audio_prompt_tokens
            n_input = done.usage.prompt_tokens + done.usage.cached_tokens
            usage = ev.usage(input_text=max(n_input - n_audio, 0), input_audio=n_audio,
                             cached=done.usage.cached_tokens, output_text=done.usage.text_tokens,
                             output_audio=resp.frames_sent)
        elif failure is not None:
            self.metrics.errors.labels("realtime_reply_failed").inc()
        body = self._item_body(item)
        if resp.modality == "audio":
            await self._send(ev.audio_done(resp.id, item.id))
            await self._send(ev.transcript_done(resp.id, item.id, transcript))
        else:
            await self._send(ev.text_done(resp.id, item.id, transcript))
        await self._send(ev.content_part_done(resp.id, item.id, transcript, modality=resp.modality))
        await self._send(ev.output_item_done(resp.id, body))
        await self._send(ev.item_done(body, previous))
        final = ev.response_done(self._response_body(resp, status=status, output=[body], usage=usage,
                                                     status_details=details))
        await self._prune_items()
        # the next response.create may follow response.done at once: settle the context first
        while self.deferred:
            op = self.deferred.pop(0)
            try:
                await op()
            except Exception:
                log.exception("realtime session %s: a deferred context edit failed", self.session_id)
        self.response = None
        await self._send(final)


def _duration(seconds: float) -> str:
    """60 minutes, 90 s: OpenAI says "60 minutes" of its own limit."""
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"


def _peek_event_id(text: str) -> str | None:
    """The event_id of a message we will not fully parse (too big, rate-limited), when it is easy to find."""
    try:
        data = json.loads(text)
    except ValueError:
        start = text.find('"event_id"')
        if start < 0:
            return None
        rest = text[start + len('"event_id"'):].lstrip(" :")
        if rest.startswith('"'):
            end = rest.find('"', 1)
            return rest[1:end] if end > 0 else None
        return None
    value = data.get("event_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
