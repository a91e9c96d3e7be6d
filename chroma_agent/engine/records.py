"""What the engine thread keeps about each conversation and each reply (touched by that thread only).

Plain records with the few rules that belong to them (a conversation's view and truncation, streaming text
without splitting characters); the engine (`chroma_agent.engine.engine`) drives them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chroma_agent.engine.commands import InOrder
from chroma_agent.engine.context import ReplyPrompt, ThinkerContext
from chroma_agent.engine.conversation import ContextView, ConversationError, Response, TurnInfo
from chroma_agent.engine.prefill import PrefillJob
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.voices.profile import VoiceProfile

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine


@dataclass(eq=False)
class Reply:
    """One `respond()` as the engine thread sees it."""

    session: EngineSession
    response: Response
    prompt: ReplyPrompt
    job: PrefillJob
    audio: bool
    limit: int  # frames (audio) or tokens (text-only)
    sampling: SamplingParams
    started_at: float = field(default_factory=time.perf_counter)
    running: bool = False  # its row takes part in steps
    on_device: bool = False  # what the host last wrote to the row's active flag
    inflight: int = 0  # launched steps whose results were not read yet
    steps_read: int = 0  # step results read for it (the first one checked its prefill for non-finite values)
    finished: bool = False
    truncate_ms: float | None = None
    frames: int = 0
    text: list[tuple[int, int]] = field(default_factory=list)  # (token id, step that injected it)
    fed: int = 0
    frame_steps: list[int] = field(default_factory=list)
    first_audio_at: float | None = None
    prefill_ms: float = 0.0
    prefill_started: float | None = None
    spoken_text: str = ""
    detok: Detokenizer | None = None

    @property
    def row(self) -> int:
        return self.session.row


class EngineSession:
    """A conversation's engine-side state (touched by the engine thread only)."""

    def __init__(self, engine: Engine, sid: str, row: int, voice: VoiceProfile | None, sampling: SamplingParams):
        self.engine = engine
        self.id = sid
        self.row = row
        self.voice = voice
        self.sampling = sampling
        self.context = ThinkerContext(engine.processor.pieces, engine.config.thinker_context)
        self.reply: Reply | None = None
        self.last_reply: Reply | None = None
        self.closed = False
        self.commands = InOrder()

    def set_voice(self, voice: VoiceProfile | None) -> None:
        self.voice = voice

    def view(self) -> ContextView:
        ctx = self.context
        turns = [TurnInfo(t.id, t.role, t.text, len(t.ids), t.audio_seconds, t.instructions) for t in ctx.turns]
        return ContextView(turns, ctx.ids, ctx.cached, self.reply is not None)

    def remove_turns(self, ids: Sequence[int]) -> None:
        for turn_id in ids:
            turn = self.context.find(turn_id)
            if turn is not None:
                self.context.remove(turn)

    def truncate(self, heard_ms: float) -> str | None:
        reply = self.reply or self.last_reply
        if reply is None:
            raise ConversationError("nothing to truncate: the conversation has no reply yet")
        if not reply.finished:
            reply.truncate_ms = heard_ms
            reply.response.cancel_requested = True
            return None
        self.engine.apply_truncation(reply, heard_ms)
        return reply.spoken_text


class Detokenizer:
    """Streams text for growing token ids without splitting multi-byte characters, in O(1) per token.

    Only a window of recent ids is decoded each time (the ids since the last emitted text, plus the ones
    before them for context), so a long reply costs the engine thread no more per token than a short one.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here are already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd") or not text.startswith(before):
            return ""  # no new character yet (e.g. half of a multi-byte one)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
