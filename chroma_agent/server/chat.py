"""POST /v1/chat/completions: FlashLabs' request and OpenAI's audio-model request, OpenAI's reply, streamed as
server-sent events on request.

Each request is one short conversation: it takes an engine slot, adds the request's messages as turns,
generates one reply and gives the slot back, whatever happens (errors, a client that leaves mid-stream).
Everything that can be refused is checked before the reply starts, so a bad request gets a 4xx status and
never a half-sent stream.

Two reply styles share one pipeline. A request that uses FlashLabs' fields (`voice`, `prompt_audio`,
`return_audio`, `audio_format`, ...) gets FlashLabs' reply: the transcript in `message.content` and the audio
also at the top level. Any other request gets exactly what OpenAI's audio models return: audio only when
`modalities` asks for it, then `message.content` null and the transcript in `message.audio.transcript`
(streamed in `delta.audio.transcript`). Replies with audio are remembered by their audio id (transcript only,
bounded, until `expires_at`) so that a later request can refer to them as OpenAI clients do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chroma_agent.audio import AudioError, load_audio
from chroma_agent.audio_encode import AudioEncoder, encode_audio, supported_formats
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import Conversation, ConversationError
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, ResponseEvent, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.server.connections import abort_connection
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.priority import in_background
from chroma_agent.server.schemas import (
    AssistantMessage,
    AudioPart,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    DeltaAudio,
    ErrorBody,
    ErrorResponse,
    PromptTokensDetails,
    ReplyAudio,
    ReplyTimings,
    TextPart,
    Usage,
    VoiceRef,
)
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.system import ERROR_RESPONSES, ProtectedRoute
from chroma_agent.server.voice_choice import (
    DEFAULT_VOICE_SETTING,
    VoiceNotFound,
    resolve_voice,
)
from chroma_agent.voices import MAX_CLIP_SECONDS, VoiceError, VoiceProfile

log = logging.getLogger(__name__)

# Not strict about Content-Type: scripts often post JSON without naming it.
router = APIRouter(route_class=ProtectedRoute, tags=["chat"], strict_content_type=False)

#: How long a stalled stream waits for the disconnect its aborted connection causes (one loop turn in practice).
RESPONSE_ABORT_WAIT_S = 5.0

#: OpenAI's code for a conversation that does not fit the model's context.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

# Longer strings are never file names; treating them as paths would only turn bad base64 into "not found".
_MAX_PATH_CHARS = 1024

CHAT_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"},
                                            "description": "with stream=true: chat.completion.chunk events"}}},
    503: {"model": ErrorResponse, "description": "every engine slot is busy; see Retry-After"},
}


# --- request audio -------------------------------------------------------------------------------------


def _invalid_audio(where: str, exc: Exception) -> APIError:
    return APIError(400, f"{where}: {exc}", param=where, code="invalid_audio")


def _asset_path(text: str, root: Path, where: str) -> Path:
    """`text` as a file inside the assets folder; anything that could leave it is refused."""
    escape = APIError(400, f"{where}: audio paths must be relative to the assets folder and stay inside it",
                      param=where, code="path_not_allowed")
    candidate = Path(text)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise escape
    root = root.resolve()
    try:
        resolved = (root / candidate).resolve()
    except (OSError, RuntimeError):  # symlink loops
        raise escape from None
    if not resolved.is_relative_to(root):  # a symlink pointing out
        raise escape
    try:
        is_file = resolved.is_file()
    except OSError as exc:  # a component longer than the file system allows, permissions: the client's path
        raise APIError(400, f"{where}: audio path cannot be used: {exc.strerror or exc}", param=where,
                       code="audio_not_found") from None
    if not is_file:
        raise APIError(400, f"{where}: audio file not found in the assets folder: {text[:200]}", param=where,
                       code="audio_not_found")
    return resolved


def load_request_audio(source: str, target_rate: int, where: str, settings: ServerSettings, *,
                       allow_paths: bool = True, max_seconds: float | None = None) -> np.ndarray:
    """Audio a request sent (base64, data URL, or a file in the assets folder) as mono float32 at `target_rate`.

    Inline audio is tried first; a string that is not inline audio is a path only when the server has an
    assets folder, and then it must resolve inside it. Errors name `where` (e.g. `messages[1].content[0]`).
    """
    limit = settings.max_audio_seconds if max_seconds is None else min(max_seconds, settings.max_audio_seconds)
    samples = settings.max_audio_samples
    try:
        return load_audio(source, target_rate, allow_paths=False, max_seconds=limit, max_samples=samples)
    except AudioError as exc:
        text = source.strip()
        # Audio recognised as inline (a known container's base64) and then refused is never retried as a path.
        maybe_path = (allow_paths and settings.assets_dir is not None and 0 < len(text) <= _MAX_PATH_CHARS
                      and not exc.inline and "\x00" not in text
                      and not text.lower().startswith(("data:", "http://", "https://")))
        if not maybe_path:
            raise _invalid_audio(where, exc) from None
    path = _asset_path(text, Path(settings.assets_dir), where)
    try:
        return load_audio(path, target_rate, max_seconds=limit, max_samples=samples)
    except AudioError as exc:
        raise _invalid_audio(where, exc) from None


# --- replies a later request may refer to ---------------------------------------------------------------


class AudioReplyStore:
    """Transcripts of recent replies with audio, by audio id, until their `expires_at` (bounded, in memory).

    Every entry lives `ttl_s`, so insertion order is expiry order and expired entries leave from the front.
    When the store is full of live entries a new reply is not kept, and says so: its `expires_at` is its
    creation time (no entry ever disappears before the `expires_at` it was given).
    """

    def __init__(self, ttl_s: float, capacity: int):
        self.ttl_s, self.capacity = ttl_s, capacity
        self._entries: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared in worker threads
        self._full_logged = False

    def _purge(self, now: float) -> None:
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] > now:
                break
            self._entries.popitem(last=False)

    def add(self, audio_id: str, transcript: str, created: int) -> int:
        """Remember a reply; returns its `expires_at` (Unix seconds)."""
        expires_at = int(created + self.ttl_s)
        now = time.time()
        with self._lock:
            self._purge(now)
            if expires_at <= now:
                return created
            if len(self._entries) >= self.capacity:
                if not self._full_logged:
                    log.warning("audio reply store full (%d live transcripts, audio_reply_store_size): new replies "
                                "cannot be referred to until older ones expire", len(self._entries))
                    self._full_logged = True
                return created
            self._full_logged = False
            self._entries[audio_id] = (expires_at, transcript)
        return expires_at

    def get(self, audio_id: str) -> str | None:
        """The transcript, while the reply's `expires_at` has not passed; None otherwise."""
        now = time.time()
        with self._lock:
            self._purge(now)
            entry = self._entries.get(audio_id)
        return entry[1] if entry is not None and now < entry[0] else None

    def __len__(self) -> int:
        return len(self._entries)


def reply_store(request: Request) -> AudioReplyStore:
    """The app's store (made on first use, on the event loop, so there is exactly one)."""
    state = request.app.state
    store = getattr(state, "audio_replies", None)
    if store is None:
        settings: ServerSettings = state.settings
        store = state.audio_replies = AudioReplyStore(settings.audio_reply_ttl_s, settings.audio_reply_store_size)
    return store


# --- from request to conversation ----------------------------------------------------------------------


@dataclass
class _Turn:
    role: str  # system, user or assistant
    where: str  # the request field it came from, for error messages
    text: str | None = None
    parts: list[str | np.ndarray] | None = None  # a user message: text and audio (at the processor's rate)


@dataclass
class _Plan:
    voice: VoiceProfile | None  # None for a text reply that names no voice
    instructions: str | None
    turns: list[_Turn]
    sampling: SamplingParams
    max_frames: int
    return_audio: bool
    audio_format: str  # one of audio_encode.OUTPUT_FORMATS
    flashlabs: bool  # FlashLabs' reply style: transcript in message.content, audio also at the top level


#: FlashLabs' request fields; a request with any of them gets FlashLabs' reply style.
_FLASHLABS_FIELDS = ("return_audio", "prompt_audio", "prompt_text", "voice", "audio_format")


def _given(body: ChatCompletionRequest, name: str) -> bool:
    return name in body.model_fields_set and getattr(body, name) is not None


def _wants_audio(body: ChatCompletionRequest) -> bool:
    """Audio only when asked for: `return_audio` decides, else `modalities`, else FlashLabs' audio fields."""
    if _given(body, "return_audio"):
        return bool(body.return_audio)
    if body.modalities is not None:
        return "audio" in body.modalities
    return any(_given(body, name) for name in ("prompt_audio", "prompt_text", "voice", "audio_format"))


def _audio_format(body: ChatCompletionRequest) -> tuple[str, str]:
    """(format, the field that named it); FlashLabs' audio_format wins over OpenAI's audio.format."""
    if body.audio_format is not None:
        fmt, param = body.audio_format, "audio_format"
    elif body.audio is not None and body.audio.format is not None:
        fmt, param = body.audio.format, "audio.format"
    else:
        fmt, param = "wav", "audio_format"
    return ("pcm16" if fmt == "pcm" else fmt), param


def _voice_name(body: ChatCompletionRequest) -> tuple[str | None, str]:
    """The voice the request names and the field it came from (`voice` or `audio.voice`)."""
    name, param = body.voice, "voice"
    if body.audio is not None and body.audio.voice is not None:
        given = body.audio.voice.id if isinstance(body.audio.voice, VoiceRef) else body.audio.voice
        if name is not None and name != given:
            raise APIError(400, "voice and audio.voice name different voices", param="voice")
        name, param = given, "audio.voice"
    elif name is None and body.audio is not None:
        param = "audio.voice"
    return name, param


def _voice(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
           speaks: bool) -> VoiceProfile | None:
    """The request's voice: cloned from prompt_text + prompt_audio, a stored one, or the configured default.

    A reply that does not speak needs no voice (None).
    """
    name, param = _voice_name(body)
    if (body.prompt_text is None) != (body.prompt_audio is None):
        missing = "prompt_audio" if body.prompt_audio is None else "prompt_text"
        raise APIError(400, f"{missing} is missing: prompt_text and prompt_audio go together (give both or "
                       "neither)", param=missing)
    if body.prompt_audio is not None:
        if name is not None:
            raise APIError(400, "give either a stored voice or prompt_text + prompt_audio, not both", param="voice")
        if not speaks:  # cloning is the expensive part, and a text-only reply does not use the voice
            return None
        rate = engine.processor.voice_sample_rate
        clip = load_request_audio(body.prompt_audio, rate, "prompt_audio", settings, max_seconds=MAX_CLIP_SECONDS)
        try:
            # Not stored: a per-request clone. Its backbone prefix is still cached by content in the engine.
            profile = engine.create_voice(clip, body.prompt_text, sample_rate=rate, allow_paths=False).result()
        except VoiceError as exc:
            param = "prompt_audio" if str(exc).startswith("voice clip") else "prompt_text"
            raise APIError(400, f"{param}: {exc}", param=param) from None
    else:
        try:
            found = resolve_voice(engine, name)
        except VoiceNotFound:
            raise APIError(400, f"{param}: voice {name!r} not found (GET /v1/voices lists the stored voices; "
                           "OpenAI's voice names speak with the server's default voice)", param=param,
                           code="voice_not_found") from None
        except VoiceError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        if found is None:
            if not speaks:
                return None
            named = f"{name!r} stands for the server's default voice, but " if name is not None else ""
            raise APIError(400, f"{param}: {named}this server has no default voice ({DEFAULT_VOICE_SETTING} is not "
                           "set): name a stored voice, or clone one with prompt_text + prompt_audio", param=param,
                           code="voice_required")
        profile = found
    try:
        profile.require_compatible(engine.model.config)
    except VoiceError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
    return profile


class _Budget:
    """What the rest of a request may still bring: messages, text and audio, per turn and in all (the settings
    `max_messages`, `max_turn_chars`, `max_request_chars`, `max_audio_seconds`, `max_request_audio_seconds`).

    Text is counted before anything is tokenized; audio as each part is decoded (a part is decoded up to the
    per-part limit), so a refused request costs at most one part beyond the limits.
    """

    def __init__(self, settings: ServerSettings, rate: int):
        self.settings, self.rate = settings, rate
        self.chars = 0
        self.audio = 0  # samples at `rate`
        self.turn_chars = 0
        self.turn_audio = 0

    def next_turn(self) -> None:
        self.turn_chars = self.turn_audio = 0

    def text(self, where: str, text: str) -> None:
        s = self.settings
        self.turn_chars += len(text)
        self.chars += len(text)
        if self.turn_chars > s.max_turn_chars:
            raise APIError(400, f"{where}: the message holds more than {s.max_turn_chars} characters of text "
                           "(max_turn_chars)", param=where, code="text_too_long")
        if self.chars > s.max_request_chars:
            raise APIError(400, f"{where}: the request holds more than {s.max_request_chars} characters of text "
                           "(max_request_chars)", param=where, code="text_too_long")

    def audio_part(self, where: str, samples: int) -> None:
        s = self.settings
        self.turn_audio += samples
        self.audio += samples
        if self.turn_audio > s.max_audio_seconds * self.rate:
            raise APIError(400, f"{where}: the message's audio is {self.turn_audio / self.rate:.1f} s long in all; "
                           f"at most {s.max_audio_seconds:g} s per message (max_audio_seconds)", param=where,
                           code="invalid_audio")
        if self.audio > s.max_request_audio_seconds * self.rate:
            raise APIError(400, f"{where}: the request's audio is {self.audio / self.rate:.1f} s long in all; at most "
                           f"{s.max_request_audio_seconds:g} s per request (max_request_audio_seconds)", param=where,
                           code="invalid_audio")


def _turns(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
           store: AudioReplyStore) -> tuple[str | None, list[_Turn]]:
    """The instructions (a leading system message) and the other messages as conversation turns.

    A user message is one turn holding its text and audio parts in order (the chat template renders them in
    one user block, as the reference does); consecutive text parts are joined, as the template joins them.
    An assistant message that refers to an earlier reply by its audio id is that reply's transcript. One pass
    over the messages and their parts: the work is linear in the request, and bounded by the limits.
    """
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"messages: {len(body.messages)} messages; at most {settings.max_messages} per request "
                       "(max_messages)", param="messages", code="too_many_messages")
    rate = engine.processor.audio_sample_rate
    audio_token = engine.processor.audio_token
    budget = _Budget(settings, rate)
    instructions: str | None = None
    turns: list[_Turn] = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        budget.next_turn()
        role = "system" if message.role == "developer" else message.role
        content = "" if message.content is None else message.content
        ref = getattr(message, "audio", None)
        if ref is not None:
            transcript = store.get(ref.id)
            if transcript is None:
                raise APIError(400, f"{where}.audio.id: no reply with audio id {ref.id!r} can be referred to (unknown "
                               "to this server, or its expires_at has passed); send its transcript as content "
                               "instead", param=f"{where}.audio.id", code="audio_expired")
            budget.text(f"{where}.audio", transcript)
            turns.append(_Turn(role, f"{where}.audio", text=transcript))
            continue
        parts = [(f"{where}.content", TextPart(type="text", text=content))] if isinstance(content, str) else [
            (f"{where}.content[{j}]", part) for j, part in enumerate(content)
        ]
        pieces: list[list[str] | np.ndarray] = []  # runs of text parts (joined at the end) and audio clips
        for part_where, part in parts:
            if isinstance(part, TextPart):
                budget.text(part_where, part.text)
                if audio_token in part.text:
                    raise APIError(400, f"{part_where}: text must not contain {audio_token}", param=part_where)
                if pieces and isinstance(pieces[-1], list):
                    pieces[-1].append(part.text)
                else:
                    pieces.append([part.text])
            else:
                if isinstance(part, AudioPart):
                    clip = load_request_audio(part.audio, rate, part_where, settings)
                else:  # OpenAI's input_audio is base64 by definition: never a path
                    clip = load_request_audio(part.input_audio.data, rate, part_where, settings, allow_paths=False)
                if len(clip) < engine.processor.min_audio_samples:
                    raise APIError(400, f"{part_where}: audio is too short ({len(clip)} samples at {rate} Hz; at "
                                   f"least {engine.processor.min_audio_samples})", param=part_where)
                budget.audio_part(part_where, len(clip))
                pieces.append(clip)
        joined: list[str | np.ndarray] = ["".join(p) if isinstance(p, list) else p for p in pieces]
        text = "".join(p for p in joined if isinstance(p, str))
        has_audio = any(not isinstance(p, str) for p in joined)
        if not has_audio and not text.strip() and role != "assistant":
            raise APIError(400, f"{where}.content is empty", param=f"{where}.content")
        if i == 0 and role == "system":
            instructions = text
        elif role == "user":
            turns.append(_Turn(role, f"{where}.content", parts=[p for p in joined if not isinstance(p, str) or p]))
        else:
            turns.append(_Turn(role, f"{where}.content", text=text))
    return instructions, turns


def _prepare(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
             store: AudioReplyStore) -> _Plan:
    """Everything about a request that can be refused, checked before a slot is taken (runs in a thread)."""
    speaks = _wants_audio(body)
    audio_format, format_param = _audio_format(body)
    if speaks and audio_format not in supported_formats():
        raise APIError(400, f"{format_param}: {audio_format!r} cannot be encoded on this server (its FFmpeg has "
                       f"no encoder for it); use one of {', '.join(supported_formats())}", param=format_param)
    instructions, turns = _turns(engine, settings, body, store)
    voice = _voice(engine, settings, body, speaks)  # after the messages: cloning is the expensive part
    overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                   ("top_k", body.top_k), ("seed", body.seed)) if v is not None}
    try:
        sampling = replace(engine.sampling, **overrides)
        limit = body.max_tokens or body.max_completion_tokens or settings.default_max_frames
        # speech: frames the voice's backbone row can hold; text: tokens (the engine caps them)
        max_frames = engine.clamp_frames(voice, limit) if voice is not None else int(limit)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return _Plan(
        voice=voice, instructions=instructions, turns=turns, sampling=sampling, max_frames=max_frames,
        return_audio=speaks, audio_format=audio_format,
        flashlabs=any(_given(body, name) for name in _FLASHLABS_FIELDS),
    )


async def _open(engine: Engine, plan: _Plan, wait_s: float) -> Conversation:
    """A conversation holding the request's turns (waiting for a slot holds no thread)."""
    try:
        conv = await engine.open_conversation(plan.voice, plan.instructions, sampling=plan.sampling, wait_s=wait_s)
    except EngineBusyError as exc:
        raise APIError(503, f"{exc}; try again shortly", type="server_error", code="engine_busy",
                       headers={"Retry-After": "1"}) from None
    added: list[tuple[_Turn, Any]] = []
    try:
        rate = engine.processor.audio_sample_rate
        # Queued all at once: the engine's pool renders them in parallel, the engine applies them in order.
        for turn in plan.turns:
            if turn.role == "user":
                added.append((turn, conv.add_user_message([p if isinstance(p, str) else (p, rate)
                                                           for p in turn.parts])))
            elif turn.role == "system":
                added.append((turn, conv.add_system_text(turn.text)))
            else:
                added.append((turn, conv.add_assistant_text(turn.text)))
        for turn, pending in added:
            try:
                await pending
            except ContextError as exc:  # this turn alone cannot fit the thinker context
                raise APIError(400, f"{turn.where}: {exc}", param=turn.where, code=CONTEXT_LENGTH_EXCEEDED) from None
            except ValueError as exc:  # AudioError and VoiceError included
                raise APIError(400, f"{turn.where}: {exc}", param=turn.where) from None
    except BaseException:
        conv.close()
        raise
    return conv


# --- the reply -----------------------------------------------------------------------------------------


@dataclass
class _Reply:
    """What every chunk and log line of one reply shares."""

    id: str
    audio_id: str
    created: int
    model: str
    request_id: str
    conversation: Conversation
    plan: _Plan
    sample_rate: int
    metrics: ServerMetrics
    store: AudioReplyStore

    def remember(self, done: ResponseDone) -> int:
        """Keep the transcript for follow-up requests; returns the audio's `expires_at`."""
        return self.store.add(self.audio_id, done.text, self.created)

    def describe(self) -> str:
        voice = self.plan.voice.name if self.plan.voice is not None else None
        return f"request {self.request_id}: conversation {self.conversation.id} (voice {voice})"

    def finished(self, done: ResponseDone) -> None:
        self.metrics.reply_done(done)
        ttfa = done.timings.time_to_first_audio_ms
        log.info("%s: reply %s after %d frames, %d text tokens, time to first audio %s ms", self.describe(),
                 done.reason, done.usage.audio_frames, done.usage.text_tokens,
                 "-" if ttfa is None else f"{ttfa:.0f}")

    def failed(self, error: ResponseError) -> APIError:
        self.metrics.errors.labels("reply_failed").inc()
        log.error("%s: reply failed: %s", self.describe(), error.message)
        if error.kind == "invalid_request_error":
            return APIError(400, error.message, code="reply_failed")
        return APIError(500, "the reply failed; the server log has the details", type="server_error",
                        code="reply_failed")


def _finish_reason(done: ResponseDone) -> str:
    return "length" if done.reason in ("max_frames", "max_tokens") else "stop"


def _usage(done: ResponseDone) -> Usage:
    u = done.usage
    prompt = u.prompt_tokens + u.cached_tokens
    completion = u.text_tokens + u.audio_frames
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(text_tokens=u.text_tokens, audio_tokens=u.audio_frames),
    )


async def _first_event(reply: _Reply, events: AsyncIterator[ResponseEvent]) -> ResponseEvent:
    """Start the reply; what the engine refuses at this point is still an HTTP error, not a broken stream."""
    try:
        event = await anext(events)
    except ContextError as exc:  # the last message leaves no room for the reply
        raise APIError(400, f"messages: {exc}", param="messages", code=CONTEXT_LENGTH_EXCEEDED) from None
    except (ConversationError, ValueError) as exc:
        raise APIError(400, str(exc), param="messages") from None
    if isinstance(event, ResponseError):
        raise reply.failed(event)
    return event


async def _with_first(first: ResponseEvent, events: AsyncIterator[ResponseEvent]) -> AsyncIterator[ResponseEvent]:
    yield first
    async for event in events:
        yield event


@contextlib.asynccontextmanager
async def _cancel_on_disconnect(request: Request, reply: _Reply) -> AsyncIterator[None]:
    """Cancel the reply if the client goes away while we generate (plain responses never notice otherwise)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("%s: client disconnected; cancelling the reply", reply.describe())
        reply.conversation.cancel()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


async def _complete(reply: _Reply, events: AsyncIterator[ResponseEvent], first: ResponseEvent) -> ChatCompletion:
    plan = reply.plan
    pcm: list[np.ndarray] = []
    done: ResponseDone | None = None
    async for event in _with_first(first, events):
        if isinstance(event, AudioChunk):
            pcm.append(event.pcm)
        elif isinstance(event, ResponseDone):
            done = event
        elif isinstance(event, ResponseError):
            raise reply.failed(event)
    assert done is not None  # respond() always ends with ResponseDone or ResponseError
    reply.finished(done)
    audio = audio_format = sample_rate = message_audio = None
    content: str | None = done.text
    if plan.return_audio:
        samples = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
        # compressed formats take a while for a long reply: not on the event loop
        data = await in_background(encode_audio, samples, reply.sample_rate, plan.audio_format)
        b64 = base64.b64encode(data).decode("ascii")
        message_audio = ReplyAudio(id=reply.audio_id, data=b64, transcript=done.text,
                                   expires_at=reply.remember(done))
        if plan.flashlabs:
            audio, audio_format, sample_rate = b64, plan.audio_format, reply.sample_rate
        else:  # OpenAI's shape: the transcript lives in message.audio
            content = None
    return ChatCompletion(
        id=reply.id, created=reply.created, model=reply.model,
        choices=[Choice(message=AssistantMessage(content=content, audio=message_audio),
                        finish_reason=_finish_reason(done))],
        usage=_usage(done), audio=audio, audio_format=audio_format, sample_rate=sample_rate,
        timings=ReplyTimings(**asdict(done.timings)),
    )


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _chunk(reply: _Reply, delta: Delta, finish_reason: str | None = None, usage: Usage | None = None) -> str:
    flashlabs_audio = reply.plan.return_audio and reply.plan.flashlabs
    chunk = ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model, usage=usage,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
                                sample_rate=reply.sample_rate if flashlabs_audio else None)
    return _sse(chunk.model_dump_json(exclude_none=True))


async def _stream(reply: _Reply, events: AsyncIterator[ResponseEvent],
                  first: ResponseEvent) -> AsyncIterator[tuple[str, float]]:
    """OpenAI chunks, each with the seconds of reply audio it carries (what the stall guard counts).

    Text: `delta.content` (FlashLabs style and text-only replies) or `delta.audio.transcript` (audio asked for
    OpenAI's way). Audio: `delta.audio.data`, one 80 ms frame of PCM16 per delta for pcm16 and wav (a WAV header
    needs the length), mp3 / opus / aac piece by piece as they are encoded, flac whole in the last audio delta
    (FLAC readers such as libsndfile need the length in its header); then `delta.audio.expires_at`.
    """
    plan = reply.plan
    encoder = None
    if plan.return_audio and plan.audio_format not in ("wav", "pcm16"):
        encoder = AudioEncoder(plan.audio_format, reply.sample_rate, seekable=plan.audio_format == "flac")
    transcript_in_audio = plan.return_audio and not plan.flashlabs
    held = 0.0  # audio seconds pushed into the encoder and not yet sent

    def audio_delta(**fields) -> str:
        return _chunk(reply, Delta(audio=DeltaAudio(id=reply.audio_id, **fields)))

    try:
        yield _chunk(reply, Delta(role="assistant", content=None if transcript_in_audio else "")), 0.0
        async for event in _with_first(first, events):
            if isinstance(event, AudioChunk):
                if plan.return_audio:
                    held += len(event.pcm) / reply.sample_rate
                    data = encoder.push(event.pcm) if encoder is not None else event.pcm16()
                    if data:
                        yield audio_delta(data=base64.b64encode(data).decode("ascii")), held
                        held = 0.0
            elif isinstance(event, TextDelta):
                if transcript_in_audio:
                    yield audio_delta(transcript=event.text), 0.0
                else:
                    yield _chunk(reply, Delta(content=event.text)), 0.0
            elif isinstance(event, ResponseDone):
                # The reply is made: its slot goes back now, not once the client has read the last chunks.
                reply.conversation.close()
                reply.finished(event)
                if plan.return_audio:
                    if encoder is not None and (tail := encoder.finish()):
                        yield audio_delta(data=base64.b64encode(tail).decode("ascii")), held
                    yield audio_delta(expires_at=reply.remember(event)), 0.0
                yield _chunk(reply, Delta(), _finish_reason(event), _usage(event)), 0.0
            else:
                reply.conversation.close()
                error = reply.failed(event)
                body = ErrorResponse(error=ErrorBody(message=error.message, type=error.type, code=error.code))
                yield _sse(body.model_dump_json()), 0.0
        yield _sse("[DONE]"), 0.0
    finally:
        if encoder is not None:
            encoder.close()
        await events.aclose()


class _ReplyStream(StreamingResponse):
    """Server-sent events whose conversation is closed however the stream ends, the client leaving included.

    A client that stops reading must not hold its engine slot: once the kernel's and the transport's buffers
    are full, each send waits for the client. The stream counts that waiting against the audio the client did
    take; when the waiting exceeds it by `stall_s` (a listener playing in real time takes a second of audio per
    second it makes us wait; a client that reads nothing takes none), the reply is cancelled, its slot freed
    and the connection dropped. A server slower than real time never counts against the client: it does not
    wait in a send.
    """

    def __init__(self, content: AsyncIterator[tuple[str, float]], reply: _Reply, stall_s: float):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.reply = reply
        self.stall_s = stall_s
        self.scope: Scope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.conversation.close()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        waited = taken = 0.0  # seconds spent waiting in sends; seconds of audio the client took
        loop = asyncio.get_running_loop()
        async for chunk, audio_s in self.body_iterator:
            message = {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
            started = loop.time()
            try:
                await asyncio.wait_for(send(message), timeout=max(0.0, self.stall_s + taken - waited))
            except asyncio.TimeoutError:  # TimeoutError itself only from 3.11 on
                await self._stalled(waited + loop.time() - started, taken)
                return
            waited += loop.time() - started
            taken += audio_s
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stalled(self, waited: float, taken: float) -> None:
        reply = self.reply
        log.warning("%s: the client stopped reading (waited %.1f s for it, it took %.1f s of audio; stream_stall_s "
                    "%g): reply cancelled, slot freed, connection dropped", reply.describe(), waited, taken,
                    self.stall_s)
        reply.metrics.errors.labels("client_stalled").inc()
        reply.conversation.close()
        with contextlib.suppress(Exception):
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        if self.scope is not None and abort_connection(self.scope):
            # The disconnect this causes ends the response: starlette cancels the stream on it, so this sleep
            # only bounds the wait. (Under a server without the abort hook the connection is merely closed.)
            await asyncio.sleep(RESPONSE_ABORT_WAIT_S)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=CHAT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat completion: text, or speech and its transcript when asked for (FlashLabs' or OpenAI's way)."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    store = reply_store(request)
    plan = await in_background(_prepare, engine, settings, body, store)
    conv = await _open(engine, plan, settings.session_wait_s)
    key = uuid.uuid4().hex
    # Any model name is accepted (clients send their own defaults); the reply names the model that answered.
    reply = _Reply(id=f"chatcmpl-{key}", audio_id=f"audio_{key}", created=int(time.time()),
                   model=settings.model_name, request_id=request.state.request_id, conversation=conv, plan=plan,
                   sample_rate=engine.model.config.sample_rate, metrics=request.app.state.metrics, store=store)
    log.info("%s: %d turns, up to %d frames, %s, %s", reply.describe(), len(plan.turns), plan.max_frames,
             f"audio ({plan.audio_format})" if plan.return_audio else "text only",
             "streaming" if body.stream else "whole reply")
    streaming = False
    try:
        async with _cancel_on_disconnect(request, reply):
            events = conv.respond(max_frames=plan.max_frames, output_audio=plan.return_audio)
            first = await _first_event(reply, events)
            if not body.stream:
                try:
                    return await _complete(reply, events, first)
                finally:
                    await events.aclose()
        # The watcher is gone before the stream starts: the streaming response listens for disconnects itself.
        streaming = True
        return _ReplyStream(_stream(reply, events, first), reply, settings.stream_stall_s)
    finally:
        if not streaming:
            conv.close()
