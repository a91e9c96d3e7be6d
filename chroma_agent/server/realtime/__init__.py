"""``GET /v1/realtime``: the OpenAI Realtime protocol (the subset an audio conversation needs) over a WebSocket.

One connection = one engine :class:`~chroma_agent.engine.conversation.Conversation` (a KV-cache slot, held from
accept to close). Client events are handled one at a time by the reader loop, in order; a response runs in its own
task and streams one ``response.output_audio.delta`` per 80 ms frame. Every send is awaited, so a slow reader
slows its own reply (the engine never runs more than ``lookahead_s`` ahead of what was sent) and nothing is
buffered without bound. Blocking engine calls (feature extraction, context edits) run in worker threads.

A connection is made of parts, one job each, over one shared state: :mod:`.connection` (its life and transport),
:mod:`.session_config` (``session.update``), :mod:`.input_buffer` (input audio and server VAD), :mod:`.items`
(conversation items) and :mod:`.responses` (replies). This module puts them together and maps each client event
to its handler, so no part needs to know the others' events. The modules import downward only (connection, items,
input_buffer, session_config, responses, this one); at run time the parts reach each other through the one
connection object (a commit adds an item, a barge-in cancels the reply), as the events they handle do.

The wire format (names, validation, event shapes) lives in :mod:`chroma_agent.realtime_protocol`.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from chroma_agent.realtime_protocol import (
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
)
from chroma_agent.server.realtime.input_buffer import InputBuffer
from chroma_agent.server.realtime.items import Items
from chroma_agent.server.realtime.responses import Responses
from chroma_agent.server.realtime.session_config import SessionConfig

__all__ = ["RealtimeConnection", "router"]

router = APIRouter()


class RealtimeConnection(SessionConfig, InputBuffer, Items, Responses):
    """One ``/v1/realtime`` connection: its parts, and which of them handles each client event."""

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


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    await RealtimeConnection(websocket).run()


@router.websocket("/v1/beta/realtime")
async def realtime_beta(websocket: WebSocket) -> None:
    """The same endpoint, always speaking the beta dialect (``response.audio.delta``, ...)."""
    await RealtimeConnection(websocket, dialect="beta").run()
