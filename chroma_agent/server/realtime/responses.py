"""Responses: ``response.create`` / ``response.cancel``, and streaming a reply out as it is made.

A reply runs in its own task while the handler goes on reading client events, so everything that may touch a
running reply (a cancel, a barge-in, a truncate, a context edit that must wait for it) meets it here, through the
:class:`_Response` record and the deferred edits it settles when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import ConversationError
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.realtime_protocol import (
    FRAME_MS,
    ErrorCode,
    Modality,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    new_id,
)
from chroma_agent.realtime_protocol.rules import check_format, max_frames, output_modality, voice_name
from chroma_agent.server.realtime.connection import RESPONSE_STOP_WAIT_S, Connection, _Disconnected
from chroma_agent.server.realtime.items import _Item
from chroma_agent.server.voice_choice import is_stock_voice

log = logging.getLogger(__name__)



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


class Responses(Connection):
    """The session's one reply at a time: starting it, streaming it, cancelling it, settling it."""

    async def _edit_context(self, op: Callable[[], Awaitable[Any]]) -> None:
        """Context edits wait for a running reply, so its item keeps the context it was made in."""
        if self.response is not None:
            self.deferred.append(op)
        else:
            await op()

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
            modality = output_modality(getattr(p, name), f"response.{name}", eid) or modality
        if p.conversation not in (None, "auto"):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "out-of-band responses (conversation != 'auto') are not "
                                "supported", param="response.conversation", event_id=eid)
        if p.input:
            raise ProtocolError(ErrorCode.UNSUPPORTED, "response.input is not supported; add items with "
                                "conversation.item.create", param="response.input", event_id=eid)
        voice = voice_name(p.voice) or (voice_name(p.audio.output.voice) if p.audio and p.audio.output else None)
        if voice is not None and not is_stock_voice(voice) and (self.voice is None or voice != self.voice.name):
            raise ProtocolError(ErrorCode.UNSUPPORTED, "a per-response voice is not supported; change the voice "
                                "with session.update", param="response.voice", event_id=eid)
        if p.audio and p.audio.output:
            check_format(p.audio.output.format, "response.audio.output.format", eid)
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
            max_frames=max_frames(tokens, self.settings.default_max_frames), max_output_tokens=tokens,
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
