"""A conversation's thinker context: its turns with their exact ids, and how much of it the KV row holds.

Pure bookkeeping, no model and no threads: the engine thread owns one per conversation and asks it what
to prefill, then tells it what a reply said. Every turn's ids are rendered on their own (the processor's
`encode_turn`), so adding, dropping or replacing a turn never re-renders the others: the context is the
template's default prefix (when the first turn is not a system turn) followed by the turns' ids.

`cached` counts the leading ids that are valid in the conversation's KV row. Any edit lowers it to where
the edit happened; a new reply prefills from there (from the start of the turn, if that is an audio turn:
its audio vectors come as one piece). Every edit before the end also bumps `epoch`, so a reply whose
prompt was laid out before the edit knows its writes into the row no longer match the context.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from chroma_agent.model.processor import TemplatePieces

_turn_ids = itertools.count(1)


class ContextError(ValueError):
    """The context cannot take this (the instructions or a single turn do not fit)."""


@dataclass(eq=False)
class Turn:
    role: str  # "system" | "user" | "assistant"
    ids: list[int]
    text: str = ""
    features: list[torch.Tensor] = field(default_factory=list)  # Whisper features per clip, in order
    audio_seconds: float = 0.0
    header: int = 0  # assistant turns: the template's header ids before the reply's own ids
    instructions: bool = False  # the conversation's system prompt: kept when old turns are dropped
    id: int = field(default_factory=lambda: next(_turn_ids))


@dataclass
class ReplyPrompt:
    """What a reply must prefill: ids from slot `start` on, with the features of the audio turns in them."""

    turn: Turn  # the open assistant turn (header only) the reply fills
    start: int
    ids: list[int]
    features: list[torch.Tensor]
    context_len: int  # ids in the context through the assistant header (the reply's first slot)
    epoch: int  # the context's epoch when the prompt was laid out
    audio_tokens: int = 0  # audio placeholders in the whole context


class ThinkerContext:
    def __init__(self, pieces: TemplatePieces, capacity: int):
        self.pieces = pieces
        self.capacity = capacity  # thinker slots a conversation may use
        self.turns: list[Turn] = []
        self.cached = 0
        self.epoch = 0

    # --- reading --------------------------------------------------------------------------------------

    @property
    def prefix(self) -> list[int]:
        first = self.turns[0].role if self.turns else "system"
        return [] if first == "system" else list(self.pieces.default_prefix)

    @property
    def ids(self) -> list[int]:
        return self.prefix + [t for turn in self.turns for t in turn.ids]

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(turn.ids) for turn in self.turns)

    def offset(self, turn: Turn) -> int:
        """Where `turn` starts in the context."""
        at = len(self.prefix)
        for t in self.turns:
            if t is turn:
                return at
            at += len(t.ids)
        raise KeyError(f"turn {turn.id} is not in the context")

    def find(self, turn_id: int) -> Turn | None:
        return next((t for t in self.turns if t.id == turn_id), None)

    # --- editing --------------------------------------------------------------------------------------

    def _invalidate_from(self, position: int) -> None:
        self.cached = min(self.cached, position)
        self.epoch += 1

    def append(self, turn: Turn) -> Turn:
        if len(self.prefix) + len(turn.ids) + (len(self.turns[0].ids) if self._has_instructions() else 0) \
                > self.capacity:
            raise ContextError(f"a {turn.role} turn of {len(turn.ids)} tokens cannot fit the thinker context "
                               f"of {self.capacity} tokens (thinker_context)")
        if not self.turns:
            self._invalidate_from(0)  # the default prefix may come or go with the first turn
        self.turns.append(turn)
        # Turns added without a reply in between would otherwise pile up without bound (a client adding
        # thousands of items): beyond twice the capacity the oldest go now, as the next reply would drop them.
        if len(self) > 2 * self.capacity:
            self._drop_oldest(self.capacity, keep_last=True)
        return turn

    def remove(self, turn: Turn) -> None:
        if turn not in self.turns:
            return
        index = self.turns.index(turn)
        self._invalidate_from(0 if index == 0 else self.offset(turn))
        del self.turns[index]

    def _has_instructions(self) -> bool:
        return bool(self.turns) and self.turns[0].instructions

    def set_instructions(self, turn: Turn | None) -> None:
        """Replace the system prompt (the first turn), or remove it with None; other system notes stay."""
        if self._has_instructions():
            if turn is not None and turn.ids == self.turns[0].ids:
                return
            del self.turns[0]
        elif turn is None:
            return
        if turn is not None:
            turn.instructions = True
            self.turns.insert(0, turn)
        self._invalidate_from(0)

    def fit(self, reserve: int) -> int:
        """Drop the oldest turns (never the instructions) until `reserve` more slots fit; returns how many.

        When it must drop, it frees a quarter of the context more than needed, so a long conversation does
        not re-prefill its whole history on every turn. When even the last turn alone leaves no room, nothing
        is dropped and ContextError says so.
        """
        if len(self) + reserve <= self.capacity:
            return 0
        # What is left when every turn that may go has gone: the instructions and the last turn (and the
        # template's default prefix unless a system turn comes first).
        kept = [self.turns[0], self.turns[-1]] if self._has_instructions() and len(self.turns) > 1 \
            else self.turns[-1:]
        least = sum(len(t.ids) for t in kept) + (0 if kept and kept[0].role == "system"
                                                 else len(self.pieces.default_prefix))
        if least + reserve > self.capacity:
            raise ContextError(f"the conversation does not fit the thinker context of {self.capacity} tokens "
                               f"with room for the reply (thinker_context): its last turn alone is too long")
        return self._drop_oldest(max(0, self.capacity - reserve - self.capacity // 4), keep_last=True)

    def _drop_oldest(self, target: int, keep_last: bool) -> int:
        """Drop the oldest turns after the instructions until the context holds at most `target` ids (or only
        the instructions and the last turn are left); one pass, however many turns go."""
        first = 1 if self._has_instructions() else 0
        last = len(self.turns) - (1 if keep_last else 0)
        body = sum(len(t.ids) for t in self.turns)
        default = len(self.pieces.default_prefix)

        def prefix_len(first_turn: Turn | None) -> int:
            return 0 if first_turn is not None and first_turn.role == "system" else default

        stop = first
        while stop < last and body + prefix_len(self.turns[0] if first else self.turns[stop]) > target:
            body -= len(self.turns[stop].ids)
            stop += 1
        if stop == first:
            return 0
        start = self.offset(self.turns[first])
        del self.turns[first:stop]
        self._invalidate_from(0 if first == 0 else start)
        return stop - first

    # --- replies --------------------------------------------------------------------------------------

    def open_reply(self, reserve: int) -> ReplyPrompt:
        """Fit the context with `reserve` slots for the reply, open an assistant turn, say what to prefill."""
        self.fit(reserve + len(self.pieces.assistant_header))
        turn = Turn("assistant", list(self.pieces.assistant_header), header=len(self.pieces.assistant_header))
        self.turns.append(turn)
        start = self.cached
        at = len(self.prefix)
        for t in self.turns:  # a partly cached audio turn is prefilled whole
            if at < start < at + len(t.ids) and t.features:
                start = at
            at += len(t.ids)
        features: list[torch.Tensor] = []
        at = len(self.prefix)
        for t in self.turns:
            if at >= start:
                features.extend(t.features)
            at += len(t.ids)
        ids = self.ids
        audio = sum(t.ids.count(self.pieces.audio_token_id) for t in self.turns if t.features)
        return ReplyPrompt(turn, start, ids[start:], features, len(ids), self.epoch, audio)

    def prefilled(self, prompt: ReplyPrompt) -> None:
        """The reply's prompt is in the row now, unless an edit since it was laid out voided it."""
        if self.epoch == prompt.epoch:
            self.cached = prompt.context_len

    def close_reply(self, prompt: ReplyPrompt, kept: list[int], fed: int, text: str) -> None:
        """The reply said `kept` (its ids without the end of turn); `fed` of its ids went through the thinker.

        The turn becomes header + kept + the template's end of turn. The row holds the header and the fed
        ids, so the cache stays valid up to the longest prefix of `kept` that was fed.
        """
        turn = prompt.turn
        if turn not in self.turns:
            return
        turn.ids = turn.ids[: turn.header] + list(kept) + list(self.pieces.turn_end)
        turn.text = text
        if self.epoch == prompt.epoch and self.cached == prompt.context_len:
            self.cached = prompt.context_len + min(fed, len(kept))

    def truncate_reply(self, turn: Turn, kept: list[int], text: str) -> None:
        """Shorten a closed assistant turn to what the listener heard (a prefix of what it said)."""
        if turn not in self.turns:
            return
        start = self.offset(turn) + turn.header
        turn.ids = turn.ids[: turn.header] + list(kept) + list(self.pieces.turn_end)
        turn.text = text
        self._invalidate_from(start + len(kept))

    def drop_reply(self, prompt: ReplyPrompt) -> None:
        """A reply that failed: its turn goes, and nothing of it stays valid in the row."""
        if prompt.turn in self.turns:
            self.remove(prompt.turn)
