"""One conversation with Chroma driven by AgentSession: audio in, replies out as LiveKit generations."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from livekit import rtc
from livekit.agents import APIError, llm, utils
from livekit.agents.metrics import RealtimeModelMetrics
from livekit.agents.metrics.base import Metadata
from livekit.agents.types import NOT_GIVEN, NotGivenOr, TimedString
from livekit.agents.utils import is_given

from chroma_agent.audio import StreamResampler, pcm16_to_mono
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.frames import INPUT_RATE, OUTPUT_RATE, frame_start_s

from ..log import logger
from .backend import BackendConversation, Role
from .generation import MODALITIES, Generation, Item
from .options import updated_options

if TYPE_CHECKING:
    from chroma_agent.voices import VoiceProfile

    from .realtime_model import RealtimeModel

__all__ = ["RealtimeSession"]

MIN_COMMIT_S = 0.1  # a shorter "turn" is a stray commit, not speech
MAX_AHEAD_FRAMES = 4  # audio frames a reply may queue ahead of its consumer (the engine adds its lookahead)
_INSTRUCTION_IDS = frozenset({"lk.agent_task.instructions", "lk.agent_task.dynamic_instructions"})

class RealtimeSession(llm.RealtimeSession):
    """One conversation with Chroma (one engine slot), driven by AgentSession.

    Audio: `push_audio` takes frames at any rate and channel count; each stream is resampled once to 16 kHz
    mono (24 kHz in remote mode, the wire's rate) with the project's streaming resampler and buffered until
    `commit_audio` makes it the user's turn (the latest ``max_turn_seconds`` are kept). `clear_audio` drops
    the buffer.

    Replies: `generate_reply` returns an already resolved future; its generation's single message streams
    24 kHz mono `rtc.AudioFrame`s of 1920 samples (80 ms) and the transcript as they are made. All its
    streams close when the reply ends, is interrupted or fails. Failures are ``error`` events
    (`RealtimeModelError`): recoverable for a failed reply, a full engine or server, or a lost connection
    (the next reply opens the conversation again), unrecoverable when it can never open (unknown voice,
    missing checkpoint, a wrong API key). Every reply that ran emits ``metrics_collected``.

    Context: text messages of `update_chat_ctx` become turns of Chroma's context (user, assistant and system
    text). Audio turns exist only as the audio committed here: a chat item carrying audio cannot be added as
    audio, only its text (when it has any), and committed audio turns show in `chat_ctx` as user messages
    without content. Chroma cannot remove or rewrite earlier turns; removing the latest reply drops its
    words from the context, other removals and edits are kept (with a warning).
    """

    def __init__(self, realtime_model: RealtimeModel) -> None:
        super().__init__(realtime_model)
        self._model = realtime_model
        self._opts = replace(realtime_model._opts)
        self._voice = realtime_model._voice
        self._backend = realtime_model._backend
        self._instructions: str | None = self._opts.instructions
        self._tools = llm.ToolContext.empty()
        self._items: list[Item] = []
        self._warned: set[str] = set()

        self._conv: BackendConversation | None = None
        self._open_failed: BaseException | None = None  # a failure no retry can fix
        self._closed = False
        self._ops: asyncio.Queue[Callable[[], Coroutine[Any, Any, None]] | None] = asyncio.Queue()
        self._loop = asyncio.get_event_loop()  # the session's loop: engine callbacks are handed to it
        self._generations: deque[Generation] = deque(maxlen=16)
        self._reply_message_id: str | None = None  # the backend's latest reply

        # pushed audio is resampled once, to the rate the backend takes
        self._in_rate = int(getattr(self._backend, "input_sample_rate", INPUT_RATE))
        # about 12 us per 20 ms frame: cheaper inline than a hop to a worker thread, and it keeps the order
        self._resampler = StreamResampler(self._in_rate)
        self._buffer: deque[np.ndarray] = deque()
        self._buffered = 0

        self._main_atask = asyncio.create_task(self._main_task(), name="chroma.RealtimeSession")
        self._enqueue(self._open_op)

    # --- properties ------------------------------------------------------------------------------------

    @property
    def chat_ctx(self) -> llm.ChatContext:
        return llm.ChatContext([item.message for item in self._items])

    @property
    def tools(self) -> llm.ToolContext:
        return self._tools.copy()

    @property
    def conversation(self) -> BackendConversation | None:
        """The backend conversation once open (None before)."""
        return self._conv

    @property
    def pending_audio_seconds(self) -> float:
        """User audio buffered since the last commit/clear (at the backend's input rate, after resampling)."""
        return self._buffered / self._in_rate

    # --- the serial op queue: everything that touches the conversation runs in order -------------------

    def _enqueue(self, op: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if not self._closed:
            self._ops.put_nowait(op)

    async def _main_task(self) -> None:
        while True:
            op = await self._ops.get()
            if op is None:
                return
            try:
                await op()
            except Exception as exc:
                logger.exception("chroma session operation failed")
                self._emit_error(exc, recoverable=True)

    async def _conversation(self) -> BackendConversation:
        if self._conv is not None:
            return self._conv
        if self._closed:
            raise llm.RealtimeError("the session is closed")
        if self._open_failed is not None:
            raise llm.RealtimeError(f"the Chroma conversation could not be opened: {self._open_failed}")
        try:
            conv = await self._backend.open(voice=self._voice, instructions=self._instructions,
                                            sampling=self._opts.sampling())
        except Exception as exc:
            if not _is_busy(exc):
                self._open_failed = exc
            raise
        if self._closed:
            await conv.close()
            raise llm.RealtimeError("the session is closed")
        self._conv = conv
        logger.info("chroma conversation %s opened (voice %s)", conv.id, self._voice.label)
        return conv

    async def _open_op(self) -> None:
        try:
            await self._conversation()
        except Exception as exc:
            self._emit_open_error(exc)

    async def _conversation_or_none(self) -> BackendConversation | None:
        """For context changes: None when no conversation can be opened (a reply reports that error)."""
        try:
            return await self._conversation()
        except Exception as exc:
            logger.debug("no Chroma conversation for a context change: %s", exc)
            return None

    def _emit_open_error(self, exc: BaseException) -> None:
        busy = _is_busy(exc)
        if busy:
            logger.warning("no Chroma conversation now (the next reply tries again): %s", exc)
        else:
            logger.error("could not open a Chroma conversation: %s", exc)
        self._emit_error(exc, recoverable=busy)

    # --- audio in --------------------------------------------------------------------------------------

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        if self._closed:
            return
        mono = pcm16_to_mono(bytes(frame.data), frame.num_channels)  # downmixed first: one channel to resample
        self._append(self._resampler.push(mono, frame.sample_rate))

    def _append(self, mono: np.ndarray) -> None:
        if mono.size == 0:
            return
        self._buffer.append(mono)
        self._buffered += mono.size
        limit = int(self._opts.max_turn_seconds * self._in_rate)
        if self._buffered > limit:
            self._warn_once("turn_cap", "a user turn is longer than max_turn_seconds=%g; "
                            "keeping its latest part", self._opts.max_turn_seconds)
            while self._buffered - self._buffer[0].size >= limit:
                self._buffered -= self._buffer.popleft().size
            excess = self._buffered - limit
            if excess > 0:
                self._buffer[0] = self._buffer[0][excess:]
                self._buffered -= excess

    def _take_audio(self) -> np.ndarray:
        self._append(self._resampler.flush())
        pcm = np.concatenate(list(self._buffer)) if self._buffer else np.zeros(0, dtype=np.float32)
        self._buffer.clear()
        self._buffered = 0
        return pcm

    def commit_audio(self) -> None:
        """The audio pushed since the last commit/clear becomes the user's turn."""
        pcm = self._take_audio()
        if self._closed:
            return
        if pcm.size < MIN_COMMIT_S * self._in_rate:
            logger.debug("commit_audio: %.3f s of audio is no turn; ignored", pcm.size / self._in_rate)
            return
        message = llm.ChatMessage(role="user", content=[], id=utils.shortuuid("chroma_user_"))
        previous = self._items[-1].message.id if self._items else None
        item = Item(message, "audio")
        self._items.append(item)
        self.emit("remote_item_added", llm.RemoteItemAddedEvent(previous_item_id=previous, item=message))

        async def add() -> None:
            conv = await self._conversation_or_none()
            try:
                if conv is None:
                    raise llm.RealtimeError("no Chroma conversation")
                await conv.add_user_audio(pcm, self._in_rate)
            except Exception as exc:
                self._remove_item(item)
                seconds = pcm.size / self._in_rate
                logger.warning("the user's turn (%.1f s) was not added: %s", seconds, exc)
                if conv is not None:
                    self._emit_error(exc, recoverable=True)

        self._enqueue(add)

    def clear_audio(self) -> None:
        self._buffer.clear()
        self._buffered = 0
        self._resampler.flush()  # its tail belongs to the audio dropped

    def push_video(self, frame: rtc.VideoFrame) -> None:
        self._warn_once("video", "Chroma does not see video; video frames are ignored")

    # --- replies ---------------------------------------------------------------------------------------

    def generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN,
    ) -> asyncio.Future[llm.GenerationCreatedEvent]:
        """Start a reply to the conversation so far; the future is resolved at once (before any audio).

        ``instructions`` are added to the context as a system note before this reply (Chroma keeps it).
        A reply still running is interrupted first.
        """
        fut: asyncio.Future[llm.GenerationCreatedEvent] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(llm.RealtimeError("the session is closed"))
            return fut
        if is_given(tools) and tools:
            self._warn_tools()
        self.interrupt()
        gen = Generation(
            response_id=utils.shortuuid("chroma_resp_"), message_id=utils.shortuuid("chroma_msg_"),
            instructions=instructions if is_given(instructions) and instructions else None,
            created_at=time.time(), progress=asyncio.Event(),
        )
        gen.modalities.set_result(list(MODALITIES))
        gen.message_ch.send_nowait(
            llm.MessageGeneration(message_id=gen.message_id, text_stream=gen.text_stream,
                                  audio_stream=gen.audio_stream, modalities=gen.modalities)
        )
        self._generations.append(gen)
        event = llm.GenerationCreatedEvent(message_stream=gen.message_ch, function_stream=gen.function_ch,
                                           user_initiated=True, response_id=gen.response_id)
        fut.set_result(event)
        self.emit("generation_created", event)
        self._enqueue(lambda: self._run_generation(gen))
        return fut

    async def _run_generation(self, gen: Generation) -> None:
        if gen.cancelled:
            gen.close_streams()
            return
        try:
            conv = await self._conversation()
        except Exception as exc:
            gen.close_streams()
            self._emit_open_error(exc)
            return
        if gen.cancelled:
            gen.close_streams()
            return
        if not (self._items or self._instructions or gen.instructions):
            gen.close_streams()
            self._emit_error(llm.RealtimeError("nothing to reply to yet: no instructions and no turns"),
                             recoverable=True)
            return

        done: ResponseDone | None = None
        error: BaseException | ResponseError | None = None
        item = Item(llm.ChatMessage(role="assistant", content=[], id=gen.message_id), "reply")
        stream = conv.respond(instructions=gen.instructions, max_seconds=self._opts.max_reply_seconds,
                              sampling=self._opts.sampling())
        gen.submitted = True
        previous_reply, self._reply_message_id = self._reply_message_id, gen.message_id
        self._items.append(item)
        try:
            async for event in stream:
                if isinstance(event, AudioChunk):
                    gen.playout.frame_out()
                    await self._wait_for_room(gen)
                    if not gen.cancelled:
                        frame = rtc.AudioFrame(event.pcm16(), OUTPUT_RATE, 1, int(event.pcm.shape[-1]))
                        with contextlib.suppress(utils.aio.ChanClosed):
                            gen.audio_ch.send_nowait(frame)
                elif isinstance(event, TextDelta):
                    gen.text += event.text
                    if not gen.cancelled:
                        with contextlib.suppress(utils.aio.ChanClosed):
                            start = frame_start_s(event.frame_index)  # where in the reply's audio it is spoken
                            gen.text_ch.send_nowait(TimedString(event.text, start_time=start))
                elif isinstance(event, ResponseDone):
                    done = event
                elif isinstance(event, ResponseError):
                    error = event
        except Exception as exc:  # e.g. the voice is too long for the backbone context
            error = exc
        finally:
            gen.finished = True
            gen.close_streams()
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

        if done is not None:
            text = done.text if gen.kept is None else gen.kept  # a truncation may be applied before we get here
            item.message.content = [text] if text else []
            self._emit_metrics(gen, done)
        if error is not None:
            if done is None:  # the turn never made it into the context
                self._remove_item(item)
                self._reply_message_id = previous_reply
            if isinstance(error, ResponseError):
                message = error.message
            else:
                message = f"{type(error).__name__}: {error}"
            logger.error("Chroma reply %s failed: %s", gen.response_id, message)
            exc = error if isinstance(error, Exception) else llm.RealtimeError(message, code=error.kind)
            self._emit_error(exc, recoverable=True)

    async def _wait_for_room(self, gen: Generation) -> None:
        """Hold the reply while its consumer has enough audio queued (the engine stops at its lookahead).

        A consumer that reads the transcript but never the audio (audio output disabled) is not waited for.
        """
        while (
            not gen.cancelled
            and gen.audio_ch.qsize() >= MAX_AHEAD_FRAMES
            and not (gen.text_stream.started and not gen.audio_stream.started)
        ):
            gen.progress.clear()
            await gen.progress.wait()

    def interrupt(self) -> None:
        """Cancel the reply in progress (and any not started yet); a no-op when none runs."""
        for gen in self._generations:
            if gen.finished or gen.cancelled:
                continue
            gen.cancelled = True
            gen.close_streams()
            if gen.submitted and self._conv is not None:
                self._conv.cancel()
                if gen.audio_stream.taken == 0:
                    # nothing of it reached the listener: none of its words stay in the context
                    self._truncate_latest(gen.message_id, 0.0)

    def truncate(
        self,
        *,
        message_id: str,
        modalities: list[Literal["text", "audio"]],
        audio_end_ms: int,
        audio_transcript: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        """Keep in the context only the part of reply `message_id` the listener heard (`audio_end_ms`).

        Works before the first frame (nothing is kept) and while the reply still runs (it is truncated when
        it stops). Only the latest reply can be truncated.
        """
        logger.debug("truncate %s at %d ms", message_id, audio_end_ms)
        gen = next((g for g in self._generations if g.message_id == message_id), None)
        if gen is not None and not gen.submitted:
            gen.cancelled = True
            gen.close_streams()
            return
        self._truncate_latest(message_id, max(0.0, float(audio_end_ms)))

    def _truncate_latest(self, message_id: str, heard_ms: float) -> None:
        if self._conv is None:
            return
        if message_id != self._reply_message_id:
            self._warn_once("truncate_old", "only the latest Chroma reply can be truncated (not %s)",
                            message_id)
            return
        item = next((i for i in self._items if i.message.id == message_id), None)
        gen = next((g for g in self._generations if g.message_id == message_id), None)
        loop = self._loop

        def kept(text: str) -> None:  # may come from the engine's thread
            def apply() -> None:
                if gen is not None:
                    gen.kept = text
                if item is not None:
                    item.message.content = [text] if text else []

            with contextlib.suppress(RuntimeError):  # the session's loop is gone
                loop.call_soon_threadsafe(apply)

        self._conv.truncate(heard_ms, kept)

    # --- context ---------------------------------------------------------------------------------------

    async def update_instructions(self, instructions: str) -> None:
        """Replace the system prompt (Chroma re-reads the context on the next reply)."""
        self._instructions = instructions or None

        async def apply() -> None:
            conv = await self._conversation_or_none()
            if conv is not None and conv.instructions != self._instructions:
                await conv.set_instructions(self._instructions)

        self._enqueue(apply)

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        """Bring Chroma's context in line with `chat_ctx` as far as Chroma allows.

        New text messages after the known ones become turns (``user``/``assistant`` as such, ``system`` and
        ``developer`` as system notes). Messages carrying only audio or images cannot be added (Chroma takes
        audio only as committed turns). Removing the latest reply drops its words from the context;
        earlier turns cannot be removed or edited, so such changes are kept with a one-time warning.
        """
        new = [it for it in chat_ctx.items if it.type == "message" and it.id not in _INSTRUCTION_IDS]
        new_ids = {m.id for m in new}
        known = {item.message.id: item for item in self._items}

        for item in list(self._items):
            if item.message.id in new_ids or item.origin == "audio":
                continue  # committed audio has no local copy in AgentSession's context: keep it
            if item.origin == "reply" and item.message.id == self._reply_message_id:
                self._truncate_latest(item.message.id, 0.0)
                self._remove_item(item)
            else:
                self._warn_once("remove", "Chroma cannot remove earlier turns from a live conversation; "
                                "message %s stays in its context", item.message.id)

        last_known = max((i for i, m in enumerate(new) if m.id in known), default=-1)
        additions: list[tuple[Role, str]] = []
        for i, msg in enumerate(new):
            old = known.get(msg.id)
            if old is not None:
                if old.origin == "text" and msg.text_content != old.message.text_content:
                    self._warn_once("edit", "Chroma cannot edit earlier turns; message %s keeps its old text",
                                    msg.id)
                continue
            if i < last_known:
                self._warn_once("insert", "Chroma can only append to a conversation; message %s is skipped",
                                msg.id)
                continue
            text = msg.text_content
            if not text or not text.strip():
                logger.debug("message %s has no text; Chroma cannot add audio or images to its context",
                             msg.id)
                continue
            role: Role = {"user": "user", "assistant": "assistant"}.get(msg.role, "system")  # type: ignore
            self._items.append(Item(msg.model_copy(), "text"))
            additions.append((role, text))

        if additions:
            async def add() -> None:
                conv = await self._conversation_or_none()
                if conv is None:
                    return
                for role, text in additions:
                    await conv.add_text(role, text)

            self._enqueue(add)

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        """Accepted and ignored: Chroma has no function calling (warned once when tools are given)."""
        if tools:
            self._warn_tools()
        self._tools = llm.ToolContext(tools)

    def update_options(
        self,
        *,
        tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN,
        voice: NotGivenOr[str | VoiceProfile] = NOT_GIVEN,
        temperature: NotGivenOr[float | None] = NOT_GIVEN,
        top_k: NotGivenOr[int | None] = NOT_GIVEN,
        top_p: NotGivenOr[float | None] = NOT_GIVEN,
        max_reply_seconds: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """Change this session's voice and sampling (from the next reply on); `tool_choice` is ignored."""
        self._opts = updated_options(self._opts, voice=voice, temperature=temperature, top_k=top_k,
                                      top_p=top_p, max_reply_seconds=max_reply_seconds)
        if is_given(voice):
            self._voice = spec = self._opts.voice_spec()

            async def apply() -> None:
                conv = await self._conversation_or_none()
                if conv is not None:
                    await conv.set_voice(spec)

            self._enqueue(apply)

    # --- closing ---------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Cancel what runs and free the conversation's slot."""
        if self._closed:
            return
        self.interrupt()
        self._closed = True
        self._ops.put_nowait(None)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._main_atask), timeout=5.0)
        if not self._main_atask.done():
            await utils.aio.cancel_and_wait(self._main_atask)
        if self._conv is not None:
            await self._conv.close()
            logger.info("chroma conversation %s closed", self._conv.id)

    # --- helpers ---------------------------------------------------------------------------------------

    def _remove_item(self, item: Item) -> None:
        with contextlib.suppress(ValueError):
            self._items.remove(item)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _warn_tools(self) -> None:
        self._warn_once("tools", "Chroma has no function calling: tools are ignored")

    def _emit_error(self, error: BaseException, *, recoverable: bool) -> None:
        if not isinstance(error, Exception):
            error = llm.RealtimeError(str(error))
        if not isinstance(error, APIError | llm.RealtimeError):
            error = APIError(f"Chroma: {type(error).__name__}: {error}", body=None, retryable=recoverable)
        self.emit("error", llm.RealtimeModelError(timestamp=time.time(), label=self._model.label, error=error,
                                                  recoverable=recoverable))

    def _emit_metrics(self, gen: Generation, done: ResponseDone) -> None:
        now = time.monotonic()
        duration = now - gen.playout.started
        usage = done.usage
        first = gen.playout.time_to_first_ms
        ttft = first / 1000 if first is not None else -1.0
        input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
        metrics = RealtimeModelMetrics(
            label=self._model.label,
            request_id=gen.response_id,
            timestamp=gen.created_at,
            duration=duration,
            ttft=ttft,
            cancelled=done.reason == "cancelled",
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=usage.total_tokens,
            tokens_per_second=output_tokens / duration if duration > 0 else 0.0,
            input_token_details=RealtimeModelMetrics.InputTokenDetails(
                cached_tokens=usage.cached_tokens,
                cached_tokens_details=RealtimeModelMetrics.CachedTokenDetails(),
            ),
            output_token_details=RealtimeModelMetrics.OutputTokenDetails(
                text_tokens=usage.text_tokens, audio_tokens=usage.audio_frames
            ),
            metadata=Metadata(model_name=self._model.model, model_provider=self._model.provider),
        )
        logger.debug("chroma reply %s: %s after %d frames, time to first audio %.0f ms, prefill %.0f ms",
                     gen.response_id, done.reason, usage.audio_frames, ttft * 1000, done.timings.prefill_ms)
        self.emit("metrics_collected", metrics)


def _is_busy(exc: BaseException) -> bool:
    """A failure to open that a later try may not meet: a full engine or server, a connection error."""
    return type(exc).__name__ == "EngineBusyError" or (isinstance(exc, APIError) and exc.retryable)
