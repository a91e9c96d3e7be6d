"""POST /v1/chat/completions: FlashLabs' request, OpenAI's reply, streamed as server-sent events on request.

Each request is one short conversation: it takes an engine slot, adds the request's messages as turns,
generates one reply and gives the slot back, whatever happens (errors, a client that leaves mid-stream).
Everything that can be refused is checked before the reply starts, so a bad request gets a 4xx status and
never a half-sent stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from chroma_agent.audio import AudioError, encode_wav, load_audio, to_pcm16
from chroma_agent.engine.conversation import Conversation, ConversationError
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, ResponseEvent, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
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
)
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.system import ERROR_RESPONSES, ProtectedRoute, check_model
from chroma_agent.voices import MAX_CLIP_SECONDS, UnknownVoiceError, VoiceError, VoiceProfile

log = logging.getLogger(__name__)

# Not strict about Content-Type: scripts often post JSON without naming it.
router = APIRouter(route_class=ProtectedRoute, tags=["chat"], strict_content_type=False)

# Longer strings are never file names; treating them as paths would only turn bad base64 into "not found".
_MAX_PATH_CHARS = 1024

CHAT_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"},
                                            "description": "with stream=true: chat.completion.chunk events"}}},
    404: {"model": ErrorResponse, "description": "unknown model or voice"},
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
    if not resolved.is_file():
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
    try:
        return load_audio(source, target_rate, allow_paths=False, max_seconds=limit)
    except AudioError as exc:
        text = source.strip()
        maybe_path = (allow_paths and settings.assets_dir is not None and 0 < len(text) <= _MAX_PATH_CHARS
                      and "\x00" not in text and not text.lower().startswith(("data:", "http://", "https://")))
        if not maybe_path:
            raise _invalid_audio(where, exc) from None
    path = _asset_path(text, Path(settings.assets_dir), where)
    try:
        return load_audio(path, target_rate, max_seconds=limit)
    except AudioError as exc:
        raise _invalid_audio(where, exc) from None


# --- from request to conversation ----------------------------------------------------------------------


@dataclass
class _Turn:
    role: str  # system, user or assistant
    where: str  # the request field it came from, for error messages
    text: str | None = None
    parts: list[str | np.ndarray] | None = None  # a user message: text and audio (at the processor's rate)


@dataclass
class _Plan:
    voice: VoiceProfile
    instructions: str | None
    turns: list[_Turn]
    sampling: SamplingParams
    max_frames: int
    return_audio: bool
    audio_format: str  # wav or pcm16


def _voice(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest) -> VoiceProfile:
    """The request's voice: cloned from prompt_text + prompt_audio, a stored one, or the server's default."""
    name = body.voice
    if body.audio is not None and body.audio.voice is not None:
        if name is not None and name != body.audio.voice:
            raise APIError(400, "voice and audio.voice name different voices", param="voice")
        name = body.audio.voice
    if (body.prompt_text is None) != (body.prompt_audio is None):
        missing = "prompt_audio" if body.prompt_audio is None else "prompt_text"
        raise APIError(400, f"{missing} is missing: prompt_text and prompt_audio go together (give both or "
                       "neither)", param=missing)
    if body.prompt_audio is not None:
        if name is not None:
            raise APIError(400, "give either a stored voice or prompt_text + prompt_audio, not both", param="voice")
        rate = engine.processor.voice_sample_rate
        clip = load_request_audio(body.prompt_audio, rate, "prompt_audio", settings, max_seconds=MAX_CLIP_SECONDS)
        try:
            # Not stored: a per-request clone. Its backbone prefix is still cached by content in the engine.
            profile = engine.create_voice(clip, body.prompt_text, sample_rate=rate, allow_paths=False)
        except VoiceError as exc:
            param = "prompt_audio" if str(exc).startswith("voice clip") else "prompt_text"
            raise APIError(400, f"{param}: {exc}", param=param) from None
    elif name is not None:
        try:
            profile = engine.resolve_voice(name)
        except UnknownVoiceError:
            raise APIError(404, f"voice {name!r} not found (GET /v1/voices lists the stored voices)",
                           type="not_found_error", param="voice", code="voice_not_found") from None
        except VoiceError as exc:
            raise APIError(400, f"voice: {exc}", param="voice") from None
    elif engine.default_voice is not None:
        profile = engine.default_voice
    else:
        raise APIError(400, "voice: this server has no default voice: name a stored voice with `voice`, or clone "
                       "one with prompt_text + prompt_audio (or start the server with --voice NAME, or "
                       "--voice-audio CLIP --voice-text '...')", param="voice", code="voice_required")
    try:
        profile.require_compatible(engine.model.config)
    except VoiceError as exc:
        raise APIError(400, f"voice: {exc}", param="voice") from None
    return profile


def _turns(engine: Engine, settings: ServerSettings,
           body: ChatCompletionRequest) -> tuple[str | None, list[_Turn]]:
    """The instructions (a leading system message) and the other messages as conversation turns.

    A user message is one turn holding its text and audio parts in order (the chat template renders them in
    one user block, as the reference does); consecutive text parts are joined, as the template joins them.
    """
    rate = engine.processor.audio_sample_rate
    audio_token = engine.processor.audio_token
    instructions: str | None = None
    turns: list[_Turn] = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role
        content = "" if message.content is None else message.content
        parts = [(f"{where}.content", TextPart(type="text", text=content))] if isinstance(content, str) else [
            (f"{where}.content[{j}]", part) for j, part in enumerate(content)
        ]
        pieces: list[str | np.ndarray] = []
        for part_where, part in parts:
            if isinstance(part, TextPart):
                if audio_token in part.text:
                    raise APIError(400, f"{part_where}: text must not contain {audio_token}", param=part_where)
                if pieces and isinstance(pieces[-1], str):
                    pieces[-1] += part.text
                else:
                    pieces.append(part.text)
            else:
                if isinstance(part, AudioPart):
                    clip = load_request_audio(part.audio, rate, part_where, settings)
                else:  # OpenAI's input_audio is base64 by definition: never a path
                    clip = load_request_audio(part.input_audio.data, rate, part_where, settings, allow_paths=False)
                if len(clip) < engine.processor.min_audio_samples:
                    raise APIError(400, f"{part_where}: audio is too short ({len(clip)} samples at {rate} Hz; at "
                                   f"least {engine.processor.min_audio_samples})", param=part_where)
                pieces.append(clip)
        text = "".join(p for p in pieces if isinstance(p, str))
        has_audio = any(not isinstance(p, str) for p in pieces)
        if not has_audio and not text.strip() and role != "assistant":
            raise APIError(400, f"{where}.content is empty", param=f"{where}.content")
        if i == 0 and role == "system":
            instructions = text
        elif role == "user":
            turns.append(_Turn(role, f"{where}.content", parts=[p for p in pieces if not isinstance(p, str) or p]))
        else:
            turns.append(_Turn(role, f"{where}.content", text=text))
    return instructions, turns


def _prepare(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest) -> _Plan:
    """Everything about a request that can be refused, checked before a slot is taken (runs in a thread)."""
    instructions, turns = _turns(engine, settings, body)
    voice = _voice(engine, settings, body)  # after the messages: cloning is the expensive part
    overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                   ("top_k", body.top_k), ("seed", body.seed)) if v is not None}
    try:
        sampling = replace(engine.sampling, **overrides)
        max_frames = engine.clamp_frames(voice, body.max_tokens or body.max_completion_tokens
                                         or settings.default_max_frames)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    audio_format = body.audio_format
    if "audio_format" not in body.model_fields_set and body.audio is not None and body.audio.format is not None:
        audio_format = body.audio.format
    return _Plan(
        voice=voice, instructions=instructions, turns=turns, sampling=sampling, max_frames=max_frames,
        return_audio=body.return_audio and (body.modalities is None or "audio" in body.modalities),
        audio_format="pcm16" if audio_format == "pcm" else audio_format,
    )


def _open(engine: Engine, plan: _Plan, wait_s: float) -> Conversation:
    """A conversation holding the request's turns (runs in a thread: it may wait for a slot)."""
    try:
        conv = engine.open_conversation(plan.voice, plan.instructions, sampling=plan.sampling, wait_s=wait_s)
    except EngineBusyError as exc:
        raise APIError(503, f"{exc}; try again shortly", type="server_error", code="engine_busy",
                       headers={"Retry-After": "1"}) from None
    turn: _Turn | None = None
    try:
        rate = engine.processor.audio_sample_rate
        for turn in plan.turns:
            if turn.role == "user":
                conv.add_user_message([p if isinstance(p, str) else (p, rate) for p in turn.parts])
            elif turn.role == "system":
                conv.add_system_text(turn.text)
            else:
                conv.add_assistant_text(turn.text)
    except ValueError as exc:  # AudioError and VoiceError included
        conv.close()
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

    def describe(self) -> str:
        return f"request {self.request_id}: conversation {self.conversation.id} (voice {self.plan.voice.name})"

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
    return "length" if done.reason == "max_frames" else "stop"


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
    except (ConversationError, ValueError) as exc:  # e.g. the messages do not fit the thinker context
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
    pcm: list[np.ndarray] = []
    done: ResponseDone | None = None
    async for event in _with_first(first, events):
        if isinstance(event, AudioChunk):
            if reply.plan.return_audio:
                pcm.append(event.pcm)
        elif isinstance(event, ResponseDone):
            done = event
        elif isinstance(event, ResponseError):
            raise reply.failed(event)
    assert done is not None  # respond() always ends with ResponseDone or ResponseError
    reply.finished(done)
    audio = audio_format = sample_rate = message_audio = None
    if reply.plan.return_audio:
        samples = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
        data = encode_wav(samples, reply.sample_rate) if reply.plan.audio_format == "wav" else to_pcm16(samples)
        audio = base64.b64encode(data).decode("ascii")
        audio_format, sample_rate = reply.plan.audio_format, reply.sample_rate
        # The id cannot be referenced by later requests (nothing is kept), so it expires at once.
        message_audio = ReplyAudio(id=reply.audio_id, data=audio, transcript=done.text,
                                   expires_at=reply.created)
    return ChatCompletion(
        id=reply.id, created=reply.created, model=reply.model,
        choices=[Choice(message=AssistantMessage(content=done.text, audio=message_audio),
                        finish_reason=_finish_reason(done))],
        usage=_usage(done), audio=audio, audio_format=audio_format, sample_rate=sample_rate,
        timings=ReplyTimings(**asdict(done.timings)),
    )


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _chunk(reply: _Reply, delta: Delta, finish_reason: str | None = None, usage: Usage | None = None) -> str:
    chunk = ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.model, usage=usage,
                                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
                                sample_rate=reply.sample_rate if reply.plan.return_audio else None)
    return _sse(chunk.model_dump_json(exclude_none=True))


async def _stream(reply: _Reply, events: AsyncIterator[ResponseEvent], first: ResponseEvent) -> AsyncIterator[str]:
    """OpenAI chunks: text deltas as `content`, each 80 ms frame as base64 PCM16 in `audio.data`."""
    try:
        yield _chunk(reply, Delta(role="assistant", content=""))
        async for event in _with_first(first, events):
            if isinstance(event, AudioChunk):
                if reply.plan.return_audio:
                    data = base64.b64encode(event.pcm16()).decode("ascii")
                    yield _chunk(reply, Delta(audio=DeltaAudio(id=reply.audio_id, data=data)))
            elif isinstance(event, TextDelta):
                yield _chunk(reply, Delta(content=event.text))
            elif isinstance(event, ResponseDone):
                reply.finished(event)
                yield _chunk(reply, Delta(), _finish_reason(event), _usage(event))
            else:
                error = reply.failed(event)
                body = ErrorResponse(error=ErrorBody(message=error.message, type=error.type, code=error.code))
                yield _sse(body.model_dump_json())
        yield _sse("[DONE]")
    finally:
        await events.aclose()


class _ReplyStream(StreamingResponse):
    """Server-sent events whose conversation is closed however the stream ends, the client leaving included."""

    def __init__(self, content: AsyncIterator[str], reply: _Reply):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.reply = reply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.conversation.close()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=CHAT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """FlashLabs-compatible chat completion: the reply's transcript and audio, optionally streamed."""
    check_model(request, body.model)
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    plan = await run_in_threadpool(_prepare, engine, settings, body)
    conv = await run_in_threadpool(_open, engine, plan, settings.session_wait_s)
    key = uuid.uuid4().hex
    reply = _Reply(id=f"chatcmpl-{key}", audio_id=f"audio_{key}", created=int(time.time()), model=body.model,
                   request_id=request.state.request_id, conversation=conv, plan=plan,
                   sample_rate=engine.model.config.sample_rate, metrics=request.app.state.metrics)
    log.info("%s: %d turns, up to %d frames, %s", reply.describe(), len(plan.turns), plan.max_frames,
             "streaming" if body.stream else "whole reply")
    streaming = False
    try:
        async with _cancel_on_disconnect(request, reply):
            events = conv.respond(max_frames=plan.max_frames)
            first = await _first_event(reply, events)
            if not body.stream:
                try:
                    return await _complete(reply, events, first)
                finally:
                    await events.aclose()
        # The watcher is gone before the stream starts: the streaming response listens for disconnects itself.
        streaming = True
        return _ReplyStream(_stream(reply, events, first), reply)
    finally:
        if not streaming:
            conv.close()
