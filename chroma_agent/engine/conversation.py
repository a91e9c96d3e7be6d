"""A conversation handle: one user or call, its thinker context kept in a KV-cache row between turns.

The handle owns nothing but ids: the engine thread owns the row, the context and every reply, and the
handle's methods only post commands to it. CPU work a command needs (decoding and resampling audio,
Whisper features, the chat template, tokenizing) runs in the engine's worker pool before the command is
queued, never on the caller's event loop and never on the engine thread. Commands of one conversation are
applied in the order they were called, whatever their preparation takes.

Every method returns at once. The ones with a result return a `Pending`: `await` it from async code, or
call `.result()` from a script. `cancel()` acts immediately (a flag the step loop reads before its next
step); `truncate`, `close` and the edits are queued and never wait for a step either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, ResponseEvent
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.voices.profile import VoiceProfile

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine

T = TypeVar("T")


class ConversationError(RuntimeError):
    """A conversation was used in a way it cannot serve (closed, reply already running, ...)."""


class Pending(concurrent.futures.Future, Generic[T]):
    """The result of an engine command: awaitable from any event loop, `.result()` from a plain thread."""

    def __await__(self):
        return asyncio.wrap_future(self).__await__()


@dataclass(frozen=True)
class TurnRef:
    """A turn added to a conversation, to remove it later (`Conversation.remove_turns`)."""

    id: int
    role: str


@dataclass(frozen=True)
class TurnInfo:
    id: int
    role: str
    text: str
    tokens: int
    audio_seconds: float  # user audio heard, or reply audio made
    instructions: bool = False  # the conversation's system prompt


@dataclass(frozen=True)
class ContextView:
    """A snapshot of a conversation's thinker context (`Conversation.inspect`)."""

    turns: list[TurnInfo]
    ids: list[int]  # the whole context as the thinker reads it (template prefix included)
    cached: int  # leading ids held in the conversation's KV row
    replying: bool  # a reply is queued or running

    @property
    def history(self) -> list[dict[str, Any]]:
        """The turns as plain dicts (role, text, audio seconds)."""
        return [{"role": t.role, "text": t.text, "audio_seconds": round(t.audio_seconds, 3)} for t in self.turns]


class Response:
    """One reply's events as they are made: `AudioChunk`s and `TextDelta`s, then `ResponseDone` or
    `ResponseError`. Iterate it with `async for` (or plain `for` in a script without an event loop).

    Leaving the iteration early cancels the reply (a disconnected client frees its slot within a step).
    """

    def __init__(self, conversation: Conversation):
        self.conversation = conversation
        self.started: Pending[None] = Pending()
        self.frames_consumed = 0  # written here, read by the engine thread: pacing needs no lock
        self.frames_produced = 0  # written by the engine thread
        self.throttled = False  # set by the engine thread when it waits for this consumer
        self.cancel_requested = False
        self.finished = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if self._loop else queue.SimpleQueue()
        self._buffer: list[ResponseEvent] = []
        self._stream: AsyncIterator[ResponseEvent] | None = None

    # --- the engine side ----------------------------------------------------------------------------

    def deliver(self, events: list[ResponseEvent]) -> None:
        """Hand a step's events to the consumer in one wake-up (called on the engine thread)."""
        if not events:
            return
        if self._loop is None:
            self._queue.put(events)
            return
        # A closed consumer loop means nobody listens any more; the reply still finishes normally.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, events)

    # --- the consumer side --------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop before the next step; the final event is `ResponseDone(reason="cancelled")`."""
        if not self.finished and not self.cancel_requested:
            self.cancel_requested = True
            self.conversation.engine.nudge()

    def _consumed(self, event: ResponseEvent) -> bool:
        if isinstance(event, AudioChunk):
            self.frames_consumed += 1
            if self.throttled:
                self.conversation.engine.nudge()
        if isinstance(event, ResponseDone | ResponseError):
            self.finished = True
            return True
        return False

    # One underlying stream however it is read: `async for`, `anext()`, then `async for` again, `aclose()`.
    def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        return self._events()

    def __anext__(self):
        return self._events().__anext__()

    async def aclose(self) -> None:
        """Stop reading; a reply still running is cancelled."""
        await self._events().aclose()
        if not self.finished:
            self.cancel()

    def _events(self) -> AsyncIterator[ResponseEvent]:
        if self._stream is None:
            self._stream = self._aiter()
        return self._stream

    async def _aiter(self) -> AsyncIterator[ResponseEvent]:
        await self.started  # raises ConversationError if the reply could not start
        try:
            done = False
            while not done:
                if not self._buffer:
                    self._buffer = await self._queue.get()
                event, done = self._pop()
                yield event
        finally:
            self._left()

    def __iter__(self) -> Iterator[ResponseEvent]:
        if self._loop is not None:
            raise RuntimeError("this response was created inside an event loop: iterate it with `async for`")
        self.started.result()
        try:
            done = False
            while not done:
                if not self._buffer:
                    self._buffer = self._queue.get()
                event, done = self._pop()
                yield event
        finally:
            self._left()

    def _pop(self) -> tuple[ResponseEvent, bool]:
        """The next buffered event, and whether it is the last one."""
        event = self._buffer.pop(0)
        return event, self._consumed(event)

    def _left(self) -> None:
        if not self.finished:  # the consumer stopped reading early: nobody listens to the rest
            self.cancel()


class Conversation:
    """Made by `Engine.open_conversation`; every method is safe to call from any thread or loop."""

    def __init__(self, engine: Engine, conversation_id: str, row: int, voice: VoiceProfile | None,
                 instructions: str | None = None):
        self.engine = engine
        self.id = conversation_id
        self.row = row
        self.voice = voice  # the voice new replies speak with (as last set through this handle)
        self.instructions = instructions  # the system prompt (as last set through this handle)
        self.closed = False
        self._seq = itertools.count()
        self._latest: Response | None = None

    def __repr__(self) -> str:
        return f"Conversation({self.id}, row {self.row}, voice {self.voice.name if self.voice else None!r})"

    def _command(self, apply: Callable[..., Any], prepare: Callable[[], Any] | None = None) -> Pending:
        if self.closed:
            raise ConversationError(f"conversation {self.id} is closed")
        return self.engine.post(self.id, next(self._seq), apply, prepare)

    # --- the context --------------------------------------------------------------------------------

    def add_user_audio(self, pcm: np.ndarray | bytes, sample_rate: int) -> Pending[TurnRef]:
        """A user turn spoken as audio (any rate, mono or [samples, channels]; int16 or float)."""
        return self.add_user_message([(pcm, sample_rate)])

    def add_user_message(self, parts: Sequence[str | tuple[np.ndarray | bytes, int]]) -> Pending[TurnRef]:
        """One user turn of text and audio parts in order (text as str, audio as (pcm, sample_rate)).

        The chat template renders them inside one user message, as the reference does for a message with
        several content parts.
        """
        parts = list(parts)
        return self._command(self.engine.apply_turn, lambda: self.engine.prepare_turn("user", parts))

    def add_user_text(self, text: str) -> Pending[TurnRef]:
        return self._text_turn("user", text)

    def add_system_text(self, text: str) -> Pending[TurnRef]:
        """A system note at this point of the conversation (kept in the context)."""
        return self._text_turn("system", text)

    def add_assistant_text(self, text: str) -> Pending[TurnRef]:
        """An assistant turn given as text (e.g. restored chat history); no audio is generated for it."""
        return self._text_turn("assistant", text, allow_empty=True)

    def _text_turn(self, role: str, text: str, allow_empty: bool = False) -> Pending[TurnRef]:
        if not isinstance(text, str) or (not allow_empty and not text.strip()):
            raise ValueError(f"{role} text is empty")
        return self._command(self.engine.apply_turn, lambda: self.engine.prepare_turn(role, [text]))

    def set_instructions(self, text: str | None) -> Pending[None]:
        """Replace the system prompt (None removes it). The context is prefilled again on the next reply."""
        text = text or None
        self.instructions = text
        prepare = (lambda: self.engine.prepare_turn("system", [text])) if text else (lambda: None)
        return self._command(self.engine.apply_instructions, prepare)

    def set_voice(self, voice: VoiceProfile | None) -> Pending[None]:
        """The voice of the next replies (None: text replies only)."""
        if voice is not None:
            voice.require_compatible(self.engine.model.config)
        self.voice = voice
        return self._command(lambda session, _: session.set_voice(voice))

    def remove_turns(self, turns: Sequence[TurnRef]) -> Pending[None]:
        """Remove turns from the context (e.g. a deleted conversation item)."""
        ids = [t.id for t in turns]
        return self._command(lambda session, _: session.remove_turns(ids))

    def inspect(self) -> Pending[ContextView]:
        """What the conversation's context holds now (after every command called before this one)."""
        return self._command(lambda session, _: session.view())

    # --- replies ------------------------------------------------------------------------------------

    def respond(
        self,
        instructions: str | None = None,
        *,
        max_frames: int | None = None,
        sampling: SamplingParams | None = None,
        output_audio: bool = True,
        max_tokens: int | None = None,
    ) -> Response:
        """Start the assistant's reply and return its event stream at once.

        `instructions` are added as a system note first. `output_audio=False` runs the thinker alone (a text
        reply at thinker speed, up to `max_tokens`); its text equals the text the same reply would speak.
        """
        response = Response(self)
        self._latest = response
        prepare = (lambda: self.engine.prepare_turn("system", [instructions])) if instructions else (lambda: None)

        def apply(session, note):
            return self.engine.apply_respond(session, response, note, max_frames, sampling, output_audio,
                                             max_tokens)

        pending = self._command(apply, prepare)
        pending.add_done_callback(lambda f: _forward(f, response.started))
        return response

    def cancel(self) -> None:
        """Stop the running reply before the next step (no-op when none runs)."""
        if self._latest is not None:
            self._latest.cancel()

    def truncate(self, heard_ms: float) -> Pending[str | None]:
        """Keep only the part of the last reply the listener heard; its result is the kept transcript.

        A reply still running is cancelled and truncated when it stops: then the result is None and the kept
        transcript arrives as that reply's `ResponseDone.text`.
        """
        if not isinstance(heard_ms, int | float) or heard_ms != heard_ms or heard_ms < 0 or heard_ms == float("inf"):
            raise ValueError(f"heard_ms must be a finite number >= 0, got {heard_ms}")
        if self._latest is not None and not self._latest.finished:
            self._latest.cancel()
        return self._command(lambda session, _: session.truncate(float(heard_ms)))

    def close(self) -> Pending[None]:
        """Free the KV-cache row; a running reply ends as cancelled. Safe to call twice."""
        if self.closed:
            done: Pending[None] = Pending()
            done.set_result(None)
            return done
        self.cancel()
        pending = self._command(self.engine.apply_close)
        self.closed = True
        return pending


def _forward(source: concurrent.futures.Future, target: concurrent.futures.Future) -> None:
    if target.done():
        return
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(None)
