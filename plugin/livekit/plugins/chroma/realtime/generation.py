"""A reply as AgentSession consumes it (its message, text and audio channels), and the session's items."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from livekit import rtc
from livekit.agents import llm, utils

from chroma_agent.playout import Playout

__all__ = ["MODALITIES", "ConsumerStream", "Generation", "Item"]

MODALITIES: list[Literal["text", "audio"]] = ["audio", "text"]

T = TypeVar("T")


class ConsumerStream(Generic[T]):
    """What AgentSession iterates; counts what its consumer takes so the producer can pace itself."""

    def __init__(self, ch: utils.aio.Chan[T], on_progress: Callable[[], None]):
        self._ch = ch
        self._on_progress = on_progress
        self.started = False
        self.taken = 0

    def __aiter__(self) -> ConsumerStream[T]:
        return self

    async def __anext__(self) -> T:
        if not self.started:
            self.started = True
            self._on_progress()
        item = await self._ch.__anext__()
        self.taken += 1
        self._on_progress()
        return item


@dataclass(eq=False)
class Generation:
    response_id: str
    message_id: str
    instructions: str | None
    created_at: float  # time.time(), as RealtimeModelMetrics wants it
    progress: asyncio.Event
    message_ch: utils.aio.Chan[llm.MessageGeneration] = field(default_factory=utils.aio.Chan)
    function_ch: utils.aio.Chan[llm.FunctionCall] = field(default_factory=utils.aio.Chan)
    text_ch: utils.aio.Chan[str] = field(default_factory=utils.aio.Chan)
    audio_ch: utils.aio.Chan[rtc.AudioFrame] = field(default_factory=utils.aio.Chan)
    modalities: asyncio.Future[list[Literal["text", "audio"]]] = field(default_factory=asyncio.Future)
    playout: Playout = field(default_factory=Playout)  # the reply's audio as it is queued for the listener
    cancelled: bool = False
    submitted: bool = False
    finished: bool = False
    text: str = ""  # the reply's words so far
    kept: str | None = None  # what a truncation after the reply's end kept of them

    def __post_init__(self) -> None:
        self.audio_stream = ConsumerStream(self.audio_ch, self.progress.set)
        self.text_stream = ConsumerStream(self.text_ch, self.progress.set)

    def close_streams(self) -> None:
        if not self.modalities.done():
            self.modalities.set_result(list(MODALITIES))
        for ch in (self.text_ch, self.audio_ch, self.function_ch, self.message_ch):
            if not ch.closed:
                ch.close()
        self.progress.set()


@dataclass(eq=False)
class Item:
    """One item of the session's view of the conversation (what `chat_ctx` returns)."""

    message: llm.ChatMessage
    origin: Literal["text", "audio", "reply"]
