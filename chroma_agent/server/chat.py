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

This module is the route and the reply; checking a request and turning it into turns is `chat_plan`, the
audio a request carries is `request_audio`, the remembered replies are `audio_replies`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chroma_agent.audio_encode import AudioEncoder, encode_audio
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import Conversation, ConversationError
from chroma_agent.engine.engine import Engine
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, ResponseEvent, TextDelta
from chroma_agent.server.audio_replies import AudioReplyStore, reply_store
from chroma_agent.server.chat_plan import CONTEXT_LENGTH_EXCEEDED, ChatPlan, open_planned, plan_request
from chroma_agent.server.connections import abort_connection
from chroma_agent.server.errors import APIError
from chroma_agent.server.metrics import ServerMetrics
from chroma_agent.server.priority import in_background
from chroma_agent.server.schemas import (
    AssistantMessage,
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
    Usage,
)
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.system import ERROR_RESPONSES, ProtectedRoute

log = logging.getLogger(__name__)

# Not strict about Content-Type: scripts often post JSON without naming it.
router = APIRouter(route_class=ProtectedRoute, tags=["chat"], strict_content_type=False)

#: How long a stalled stream waits for the disconnect its aborted connection causes (one loop turn in practice).
RESPONSE_ABORT_WAIT_S = 5.0

CHAT_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"},
                                            "description": "with stream=true: chat.completion.chunk events"}}},
    503: {"model": ErrorResponse, "description": "every engine slot is busy; see Retry-After"},
}


@dataclass
class _Reply:
    """What every chunk and log line of one reply shares."""

    id: str
    audio_id: str
    created: int
    model: str
    request_id: str
    conversation: Conversation
    plan: ChatPlan
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
    plan = await in_background(plan_request, engine, settings, body, store)
    conv = await open_planned(engine, plan, settings.session_wait_s)
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
