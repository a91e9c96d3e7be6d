"""One reply as the client sees it: its bounded inbox of events, and cancel / truncate at any moment of its life."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chroma_agent.engine.events import ResponseDone, ResponseEvent, Timings, Usage
from chroma_agent.playout import Playout
from chroma_agent.realtime_client.errors import ConnectionLost
from chroma_agent.realtime_protocol import ClientEvents

if TYPE_CHECKING:
    from chroma_agent.realtime_client.connection import ClientConnection

__all__ = ["INBOX_EVENTS", "ClientReply", "nothing_said"]

INBOX_EVENTS = 32  # events of one reply read ahead of its consumer


class _Inbox:
    """A bounded FIFO from the reader task to one reply's consumer; its final event always fits."""

    def __init__(self, size: int = INBOX_EVENTS):
        self._items: deque[ResponseEvent] = deque()
        self._size = size
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.abandoned = False  # the consumer left: everything is dropped

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: ResponseEvent) -> None:
        while len(self._items) >= self._size and not self.abandoned:
            self._writable.clear()
            await self._writable.wait()
        if not self.abandoned:
            self._items.append(item)
            self._readable.set()

    def put_final(self, item: ResponseEvent) -> None:
        if not self.abandoned:
            self._items.append(item)
            self._readable.set()

    async def get(self, timeout: float) -> ResponseEvent:
        while not self._items:
            self._readable.clear()
            await asyncio.wait_for(self._readable.wait(), timeout)
        item = self._items.popleft()
        self._writable.set()
        return item

    def abandon(self) -> None:
        self.abandoned = True
        self._items.clear()
        self._writable.set()


@dataclass(eq=False)
class ClientReply:
    """One reply: made before it is sent, so `cancel` and `truncate` work at any moment of its life.

    A truncation asked for before the server named the reply's item is sent as soon as it does; one after the
    reply ended is clamped to the audio received and followed by a ``conversation.item.retrieve``, so the
    connection's ``on_retrieved`` learns the words kept.
    """

    instructions: str | None = None
    max_frames: int | None = None
    inbox: _Inbox = field(default_factory=_Inbox)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the server ended it (or the connection did)
    conn: ClientConnection | None = None
    event_id: str | None = None  # of its response.create
    response_id: str | None = None
    item_id: str | None = None
    sent: bool = False
    finished: bool = False  # its final event is in the inbox
    cancel_requested: bool = False
    truncate_ms: float | None = None  # a truncation waiting for the item's id
    playout: Playout = field(default_factory=Playout)  # its audio as received (restarted when it is sent)

    @property
    def frames(self) -> int:
        """Audio frames received."""
        return self.playout.frames

    def cancel(self) -> None:
        """Stop the reply (at once if it was not sent yet; else the server ends it within a step)."""
        if self.finished or self.cancel_requested:
            return
        self.cancel_requested = True
        if self.sent:
            self._send_cancel()

    def _send_cancel(self) -> None:
        conn = self.conn
        if conn is not None and conn.alive and not self.finished:
            with contextlib.suppress(ConnectionLost):
                conn.send(ClientEvents.response_cancel(self.response_id), quiet=True)

    def truncate(self, heard_ms: float) -> None:
        """Keep of the reply in the server's context only what the listener heard (``heard_ms``)."""
        heard = max(0.0, float(heard_ms)) if math.isfinite(heard_ms) else 0.0
        if self.finished:  # nothing more will come: no more than what was received can be kept
            heard = self.playout.clamp(heard)
        if self.item_id is None:  # not sent or not started yet: truncated as soon as its item exists
            self.truncate_ms = heard
            return
        conn = self.conn
        if conn is None or not conn.alive:
            return  # that server conversation is gone
        try:
            conn.send(ClientEvents.conversation_item_truncate(self.item_id, int(heard)), quiet=True)
            if self.finished:  # learn the kept words
                conn.send(ClientEvents.conversation_item_retrieve(self.item_id), quiet=True)
        except ConnectionLost:
            pass


def nothing_said() -> ResponseDone:
    """The end of a reply cancelled before it reached the server."""
    timings = Timings(time_to_first_audio_ms=None, prefill_ms=0.0, total_ms=0.0, audio_ms=0.0)
    return ResponseDone(reason="cancelled", text="", usage=Usage(0, 0, 0, 0), timings=timings)
