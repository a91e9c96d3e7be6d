"""Conversation items: ``conversation.item.create`` / ``truncate`` / ``delete`` / ``retrieve``.

The client sees items; the engine sees turns. This part keeps the map between the two (an :class:`_Item` and the
turns it became) and the limits on both (``max_items``, ``max_turn_chars``), so every other part that adds an
item (a commit, a reply) goes through the same bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chroma_agent.audio import pcm16_to_float, resample
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import ConversationError, Pending, TurnRef
from chroma_agent.realtime_protocol import (
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    ErrorCode,
    ProtocolError,
    audio_ms,
    b64_to_pcm,
    new_id,
)
from chroma_agent.realtime_protocol.rules import MIN_COMMIT_MS
from chroma_agent.server.priority import in_background
from chroma_agent.server.realtime.connection import Connection

log = logging.getLogger(__name__)



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


class Items(Connection):
    """The conversation's items, and the engine turns behind them."""

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
