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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState

from chroma_agent.audio import pcm16_to_float, resample
from chroma_agent.engine.conversation import Conversation, ConversationError, Turn
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.realtime_protocol import (
    BETA_HEADER_VALUE,
    BETA_SUBPROTOCOL,
    INSECURE_API_KEY_SUBPROTOCOL,
    OPENAI_VOICES,
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
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.security import bearer_token, key_matches
from chroma_agent.server.settings import ServerSettings
from chroma_agent.voices import VoiceError, VoiceProfile

log = logging.getLogger(__name__)

router = APIRouter()

MIN_COMMIT_MS = 100  # OpenAI refuses shorter buffers with the same error code
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
CLOSE_INTERNAL = 1011
FLOOD_BURSTS = 2.0  # dropped messages beyond this many seconds' worth of the rate close the connection
RESPONSE_STOP_WAIT_S = 5.0  # how long a closing connection waits for its reply task to unwind
MAX_ITEMS = 1024  # items a session remembers by id (the engine's context keeps far fewer turns)


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


def _check_modalities(mods: list[str] | None, param: str, event_id: str | None) -> None:
    if mods is not None and "audio" not in mods:
        raise ProtocolError(ErrorCode.UNSUPPORTED, "text-only output is not supported: this model always "
                            "answers with audio plus its transcript", param=param, event_id=event_id)


def _max_frames(value: int | str | None, default: int) -> int | None:
    """Output tokens -> reply frames: one 80 ms audio frame per token; "inf" means the engine's own limit."""
    if value is None:
        return default
    return None if value == "inf" else int(value)


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
    turns: list[Turn] = field(default_factory=list)
    status: str = "completed"
    audio: bool = False  # an assistant audio item made by a response
    audio_ms: float = 0.0
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
    cancel_requested: bool = False
    cancel_reason: str = "client_cancelled"
    task: asyncio.Task | None = None


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
        self.voice: VoiceProfile | None = None
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
            await self._read_loop()
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
        try:
            self.voice = self.engine.resolve_voice(None)
        except ValueError:
            names = self.engine.voices.names()
            self.voice = await asyncio.to_thread(self.engine.voices.get, names[0]) if names else None
        if self.voice is None:
            await self._send(self.events.error("the server has no voice to speak with (no default voice and no "
                                               "stored voices): start it with --voice-audio CLIP --voice-text "
                                               "'...' or store one with POST /v1/voices",
                                               code=ErrorCode.SERVER_ERROR, type="server_error"))
            await self.ws.close(CLOSE_INTERNAL)
            return False
        try:
            self.conv = await asyncio.to_thread(self.engine.open_conversation, self.voice, None,
                                                wait_s=self.settings.session_wait_s)
        except EngineBusyError as exc:
            self.metrics.errors.labels("busy").inc()
            await self._send(self.events.error(f"{exc}; try again later", code=ErrorCode.SERVER_BUSY,
                                               type="server_error"))
            await self.ws.close(CLOSE_TRY_AGAIN, "try again later")
            return False
        log.info("realtime session %s: conversation %s (%s dialect)", self.session_id, self.conv.id, self.dialect)
        return True

    async def _shutdown(self) -> None:
        self._closed = True
        resp = self.response
        if resp is not None and resp.task is not None and not resp.task.done():
            resp.task.cancel()
            await asyncio.wait([resp.task], timeout=RESPONSE_STOP_WAIT_S)
        if self.conv is not None:
            conv, self.conv = self.conv, None
            try:
                await asyncio.to_thread(conv.close)
            except asyncio.CancelledError:
                conv.close()
                raise
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close()

    # --- sending --------------------------------------------------------------------------------------------

    async def _send(self, event: dict[str, Any] | None) -> None:
        if event is None:
            return
        if self._closed:
            raise _Disconnected
        text = json.dumps(event, separators=(",", ":"))
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception as exc:  # WebSocketDisconnect, ClientDisconnected, RuntimeError after close
                self._closed = True
                raise _Disconnected from exc

    async def _send_error(self, exc: ProtocolError) -> None:
        self.metrics.errors.labels(f"realtime_{exc.code}").inc()
        await self._send(self.events.from_protocol_error(exc))

    # --- reading --------------------------------------------------------------------------------------------

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

    async def _read_loop(self) -> None:
        limit = self.settings.max_ws_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if not self._admit():
                if not await self._rate_limited(text):
                    return
                continue
            if text is None:
                await self._send_error(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED,
                                                     "binary messages are not supported; send JSON text events"))
                continue
            size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8"))
            if size > limit:
                await self._send_error(ProtocolError(ErrorCode.MESSAGE_TOO_LARGE,
                                                     f"message of {size} bytes exceeds the limit of {limit} bytes",
                                                     event_id=_peek_event_id(text[:4096])))
                continue
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
            await self._send_error(ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many messages: at most {rate:g} per second; this message was dropped",
                event_id=_peek_event_id((text or "")[:4096])))
        return True

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
            max_output_tokens=self.max_output_tokens, temperature=self.temperature)

    def _sampling(self, temperature: float | None) -> SamplingParams:
        base = self.engine.sampling
        t = temperature if temperature is not None else self.temperature
        return base if t is None else dataclasses.replace(base, temperature=t)

    async def _resolve_voice(self, name: str, param: str, event_id: str | None) -> VoiceProfile:
        default = self.engine.default_voice
        if default is not None and name == default.name:
            return default
        if self.voice is not None and name == self.voice.name:
            return self.voice
        try:
            if name in self.engine.voices:
                profile = await asyncio.to_thread(self.engine.voices.get, name)
                profile.require_compatible(self.engine.model.config)
                return profile
        except VoiceError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"voice {name!r} cannot be used: {exc}", param=param,
                                event_id=event_id) from None
        if name in OPENAI_VOICES and default is not None:
            return default  # OpenAI's stock names (clients' defaults) speak with the server's default voice
        known = sorted({*self.engine.voices.names(), *([default.name] if default else [])})
        raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"unknown voice {name!r}; available voices: {known}",
                            param=param, event_id=event_id)

    def _turn_detection(self, td: TurnDetection | None, param: str, event_id: str | None) -> dict[str, Any] | None:
        if td is None or td.type in (None, "none"):
            return None
        if td.type not in ("server_vad", "semantic_vad"):
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"turn_detection type {td.type!r} is not supported "
                                "(use null for client-side commits, or 'server_vad')", param=f"{param}.type",
                                event_id=event_id)
        # semantic_vad has no counterpart here; it runs as server_vad with the default timings.
        return {
            "type": "server_vad",
            "threshold": td.threshold if td.threshold is not None else 0.5,
            "prefix_padding_ms": td.prefix_padding_ms if td.prefix_padding_ms is not None else 300,
            "silence_duration_ms": td.silence_duration_ms if td.silence_duration_ms is not None else 500,
            "create_response": td.create_response if td.create_response is not None else True,
            "interrupt_response": td.interrupt_response if td.interrupt_response is not None else True,
        }

    async def _session_update(self, event: SessionUpdate) -> None:
        s, eid = event.session, event.event_id
        fields = s.model_fields_set
        # 1. validate everything, apply nothing
        _check_modalities(s.output_modalities, "session.output_modalities", eid)
        _check_modalities(s.modalities, "session.modalities", eid)
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
            await asyncio.to_thread(self.conv.set_voice, voice)
            self.voice = voice
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

    async def _edit_context(self, op: Callable[[], None]) -> None:
        """Context edits wait for a running reply: the engine's row must not change under it."""
        if self.response is not None:
            self.deferred.append(op)
        else:
            await asyncio.to_thread(op)

    # --- input audio ----------------------------------------------------------------------------------------

    async def _append(self, event: InputAudioBufferAppend) -> None:
        room = self.max_buffer_bytes - len(self.buffer)
        pcm = b64_to_pcm(event.audio, max_bytes=max(room, 0) + 4, event_id=event.event_id)
        if len(pcm) > room:
            raise ProtocolError(ErrorCode.AUDIO_TOO_LARGE,
                                f"the input audio buffer would exceed {self.max_buffer_bytes // (SAMPLE_RATE * 2)} s; "
                                "commit or clear it first", param="audio", event_id=event.event_id)
        self.buffer.extend(pcm)
        self.input_ms_total += len(pcm) * 1000 / (SAMPLE_RATE * SAMPLE_WIDTH)
        if self.vad is not None:
            await self._run_vad(pcm)

    async def _run_vad(self, pcm: bytes) -> None:
        cfg = self.turn_detection
        for kind, ms in self.vad.push(pcm):
            if kind == "start":
                self.vad_item_id = new_id("item")
                start = max(0, ms - cfg["prefix_padding_ms"])
                # keep the padding before the speech, drop older silence
                drop = max(0, (start - self.buffer_start_ms) * SAMPLE_RATE // 1000) * SAMPLE_WIDTH
                del self.buffer[:min(drop, len(self.buffer))]
                self.buffer_start_ms = max(self.buffer_start_ms, start)
                await self._send(self.events.speech_started(self.vad_item_id, start))
                if cfg["interrupt_response"] and self.response is not None:
                    self._cancel(self.response, "turn_detected")
            else:
                item_id, self.vad_item_id = self.vad_item_id or new_id("item"), None
                await self._send(self.events.speech_stopped(item_id, ms))
                if await self._commit_buffer(item_id, None) and cfg["create_response"]:
                    await self._await_cancelled()
                    if self.response is None:
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
        rate = self.engine.processor.audio_sample_rate
        clip = resample(pcm16_to_float(pcm), SAMPLE_RATE, rate)  # outside the engine lock
        try:
            turns = await asyncio.to_thread(self._add_turns, [(self.conv.add_user_audio, (clip, rate))])
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

    def _add_turns(self, calls: list[tuple[Callable, tuple]]) -> list[Turn]:
        """Run Conversation.add_* calls and return the turns they appended (atomic under the engine lock)."""
        turns: list[Turn] = []
        with self.engine.lock:
            try:
                for fn, args in calls:
                    fn(*args)
                    turns.append(self.conv.turns[-1])
            except Exception:
                self._drop_turns(turns)  # all of the item or nothing
                raise
        return turns

    def _drop_turns(self, turns: list[Turn]) -> None:
        """Remove turns from the context; the KV cache stays valid up to the first removed turn."""
        if self.conv is not None:
            self.conv.remove_turns(turns)

    def _prune_items(self) -> None:
        """Forget turns the engine dropped from the context (long sessions), and the oldest items beyond a cap."""
        alive = {id(t) for t in self.conv.turns}
        for item in self.items:
            if item.turns:
                item.turns = [t for t in item.turns if id(t) in alive]
        if len(self.items) > MAX_ITEMS:
            del self.items[: len(self.items) - MAX_ITEMS]

    def _item_body(self, item: _Item) -> dict[str, Any]:
        return self.events.message_item(item.id, item.role, item.content, item.status)

    def _find(self, item_id: str, event_id: str | None) -> _Item:
        for item in self.items:
            if item.id == item_id:
                return item
        raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, f"no item with id {item_id!r}", param="item_id",
                            event_id=event_id)

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
            self._find(event.previous_item_id, eid)  # unknown id -> item_not_found
            raise ProtocolError(ErrorCode.UNSUPPORTED, "items can only be appended at the end of the conversation",
                                param="previous_item_id", event_id=eid)
        if item.id is not None and any(i.id == item.id for i in self.items):
            raise ProtocolError(ErrorCode.DUPLICATE_ITEM_ID, f"an item with id {item.id!r} already exists",
                                param="item.id", event_id=eid)
        calls, content, texts = [], [], []
        user_parts: list = []
        conv = self.conv

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
                pcm = b64_to_pcm(part.audio, param=f"{param}.audio", max_bytes=self.max_buffer_bytes, event_id=eid)
                if audio_ms(len(pcm)) < MIN_COMMIT_MS:
                    raise ProtocolError(ErrorCode.INVALID_AUDIO, f"audio must be at least {MIN_COMMIT_MS}ms long",
                                        param=f"{param}.audio", event_id=eid)
                rate = self.engine.processor.audio_sample_rate
                user_parts.append((resample(pcm16_to_float(pcm), SAMPLE_RATE, rate), rate))
                content.append(self.events.user_audio_content(part.transcript))
                continue
            allowed = {"user": ("input_text",), "system": ("input_text",),
                       "assistant": ("output_text", "text", "output_audio", "audio")}[item.role]
            if kind not in allowed:
                raise ProtocolError(ErrorCode.UNSUPPORTED, f"content type {kind!r} is not supported for role "
                                    f"{item.role!r} (expected one of {list(allowed)})", param=f"{param}.type",
                                    event_id=eid)
            text = part.transcript if kind in ("output_audio", "audio") else part.text
            if not isinstance(text, str) or not text.strip():
                what = "transcript" if kind in ("output_audio", "audio") else "text"
                raise ProtocolError(ErrorCode.MISSING_PARAMETER, f"a {kind} part needs a non-empty '{what}'",
                                    param=f"{param}.{what}", event_id=eid)
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
            turns = await asyncio.to_thread(self._add_turns, calls)
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
        item = self._find(event.item_id, eid)
        if not item.audio:
            raise ProtocolError(ErrorCode.INVALID_VALUE, "only assistant audio items made by a response can be "
                                "truncated", param="item_id", event_id=eid)
        if event.content_index != 0:
            raise ProtocolError(ErrorCode.INVALID_VALUE, "content_index must be 0 (the item's audio part)",
                                param="content_index", event_id=eid)
        if item is not self.latest_audio_item:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "only the most recent assistant audio item can be truncated",
                                param="item_id", event_id=eid)
        if item.finished and event.audio_end_ms > item.audio_ms + 1e-6:
            raise ProtocolError(ErrorCode.INVALID_VALUE, f"audio_end_ms ({event.audio_end_ms}) is longer than the "
                                f"item's audio ({item.audio_ms:.0f} ms)", param="audio_end_ms", event_id=eid)
        if item.submitted and (item.turns or not item.finished):
            kept = await asyncio.to_thread(self.conv.truncate, float(event.audio_end_ms))
            if item.finished:  # otherwise the running reply applies it when it ends
                item.content = [self.events.assistant_audio_content(kept)]
        await self._send(self.events.item_truncated(item.id, 0, event.audio_end_ms))

    async def _item_delete(self, event: ConversationItemDelete) -> None:
        item = self._find(event.item_id, event.event_id)
        resp = self.response
        if resp is not None and resp.item_id == item.id:
            self._cancel(resp, "client_cancelled")
        self.items.remove(item)
        if self.latest_audio_item is item:
            self.latest_audio_item = None
        await self._edit_context(lambda: self._drop_turns(item.turns))
        await self._send(self.events.item_deleted(item.id))

    async def _item_retrieve(self, event: ConversationItemRetrieve) -> None:
        item = self._find(event.item_id, event.event_id)
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
            self._start_response(eid, None)
            return
        fields = p.model_fields_set
        _check_modalities(p.output_modalities, "response.output_modalities", eid)
        _check_modalities(p.modalities, "response.modalities", eid)
        if p.conversation not in (None, "auto"):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "out-of-band responses (conversation != 'auto') are not "
                                "supported", param="response.conversation", event_id=eid)
        if p.input:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "response.input is not supported; add items with "
                                "conversation.item.create", param="response.input", event_id=eid)
        voice = _voice_name(p.voice) or (_voice_name(p.audio.output.voice) if p.audio and p.audio.output else None)
        if voice is not None and voice not in OPENAI_VOICES and (self.voice is None or voice != self.voice.name):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "a per-response voice is not supported; change the voice "
                                "with session.update", param="response.voice", event_id=eid)
        if p.audio and p.audio.output:
            _check_format(p.audio.output.format, "response.audio.output.format", eid)
        max_tokens = None
        for name in ("max_output_tokens", "max_response_output_tokens"):
            if name in fields and getattr(p, name) is not None:
                max_tokens = getattr(p, name)
        self._start_response(eid, p, max_tokens=max_tokens)

    def _start_response(self, event_id: str | None, params, max_tokens: int | str | None = None) -> None:
        tokens = max_tokens if max_tokens is not None else self.max_output_tokens
        resp = _Response(
            id=new_id("resp"), item_id=new_id("item"), event_id=event_id,
            metadata=params.metadata if params else None,
            instructions=(params.instructions or None) if params else None,
            max_frames=_max_frames(tokens, self.settings.default_max_frames), max_output_tokens=tokens,
            sampling=self._sampling(params.temperature if params else None),
        )
        self.response = resp
        resp.task = asyncio.create_task(self._run_response(resp), name=f"realtime-{resp.id}")

    async def _await_cancelled(self) -> None:
        """A reply being cancelled ends within an engine step: let it finish rather than refuse what follows."""
        resp = self.response
        if resp is not None and resp.cancel_requested and resp.task is not None:
            await asyncio.wait([resp.task], timeout=RESPONSE_STOP_WAIT_S)

    def _cancel(self, resp: _Response, reason: str) -> None:
        if not resp.cancel_requested:
            resp.cancel_requested, resp.cancel_reason = True, reason
        if self.conv is not None:
            self.conv.cancel()

    async def _response_cancel(self, event: ResponseCancel) -> None:
        resp = self.response
        if resp is None or (event.response_id and event.response_id != resp.id):
            what = "no active response found" if resp is None else f"response {event.response_id!r} is not active"
            raise ProtocolError(ErrorCode.CANCEL_NOT_ACTIVE, f"Cancellation failed: {what}", param="response_id",
                                event_id=event.event_id)
        self._cancel(resp, "client_cancelled")

    async def _run_response(self, resp: _Response) -> None:
        ev, conv = self.events, self.conv
        try:
            await self._send(ev.response_created(ev.response(resp.id, metadata=resp.metadata,
                                                             voice=self.voice.name,
                                                             max_output_tokens=resp.max_output_tokens)))
            previous = self.items[-1].id if self.items else None
            item = _Item(resp.item_id, "assistant", [ev.assistant_audio_content(None)], status="in_progress",
                         audio=True, finished=False)
            self.items.append(item)
            self.latest_audio_item = item
            await self._send(ev.output_item_added(resp.id, {**self._item_body(item), "content": []}))
            await self._send(ev.item_added({**self._item_body(item), "content": []}, previous))
            await self._send(ev.content_part_added(resp.id, item.id))

            done: ResponseDone | None = None
            failure: str | None = None
            parts: list[str] = []
            frames = 0
            started = False
            if not resp.cancel_requested:
                started = item.submitted = True  # respond() submits synchronously on its first step
                try:
                    gen = conv.respond(resp.instructions, max_frames=resp.max_frames, sampling=resp.sampling)
                    async with contextlib.aclosing(gen):
                        async for out in gen:
                            if resp.cancel_requested:
                                conv.cancel()
                            if isinstance(out, AudioChunk):
                                frames += 1
                                await self._send(ev.audio_delta(resp.id, item.id, out.pcm16()))
                            elif isinstance(out, TextDelta):
                                parts.append(out.text)
                                await self._send(ev.transcript_delta(resp.id, item.id, out.text))
                            elif isinstance(out, ResponseDone):
                                done = out
                            elif isinstance(out, ResponseError):
                                failure = out.message
                except (ValueError, ConversationError) as exc:  # refused before it started (context, limits)
                    item.submitted = False
                    failure = str(exc)
            await self._finish_response(resp, item, previous, done, failure, parts, frames, started)
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
                op()
            except Exception:
                log.exception("realtime session %s: a deferred context edit failed", self.session_id)

    async def _finish_response(self, resp: _Response, item: _Item, previous: str | None, done: ResponseDone | None,
                               failure: str | None, parts: list[str], frames: int, started: bool) -> None:
        ev, conv = self.events, self.conv
        reply = conv.last_reply if started else None
        details = None
        if failure is not None:
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                                     "message": failure}}
        elif done is None or done.reason == "cancelled":
            status, details = "cancelled", {"type": "cancelled", "reason": resp.cancel_reason}
        elif done.reason == "completed":
            status = "completed"
        else:  # max_frames: the output token limit
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        # the reply's kept text (a truncation that arrived before this point is already applied to it)
        transcript = reply.spoken_text if reply is not None and done is not None else "".join(parts)
        item.status = "completed" if status == "completed" else "incomplete"
        item.content = [ev.assistant_audio_content(transcript)]
        item.audio_ms = frames * 80.0
        item.turns = [reply.turn] if reply is not None and failure is None else []
        item.finished = True
        usage = None
        if done is not None:
            self.metrics.reply_done(done)
            audio_id = self.engine.processor.audio_token_id
            context = conv.context_ids[: reply.context_len] if reply is not None else []
            n_audio = sum(1 for t in context if t == audio_id)
            n_input = done.usage.prompt_tokens + done.usage.cached_tokens
            usage = ev.usage(input_text=max(n_input - n_audio, 0), input_audio=n_audio,
                             cached=done.usage.cached_tokens, output_text=done.usage.text_tokens,
                             output_audio=done.usage.audio_frames)
        elif failure is not None:
            self.metrics.errors.labels("realtime_reply_failed").inc()
        body = self._item_body(item)
        await self._send(ev.audio_done(resp.id, item.id))
        await self._send(ev.transcript_done(resp.id, item.id, transcript))
        await self._send(ev.content_part_done(resp.id, item.id, transcript))
        await self._send(ev.output_item_done(resp.id, body))
        await self._send(ev.item_done(body, previous))
        final = ev.response_done(ev.response(
            resp.id, status=status, output=[body], metadata=resp.metadata, usage=usage, status_details=details,
            voice=self.voice.name, max_output_tokens=resp.max_output_tokens))
        self._prune_items()
        # the next response.create may follow response.done at once: settle the context first
        while self.deferred:
            op = self.deferred.pop(0)
            try:
                await asyncio.to_thread(op)
            except Exception:
                log.exception("realtime session %s: a deferred context edit failed", self.session_id)
        self.response = None
        await self._send(final)


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
