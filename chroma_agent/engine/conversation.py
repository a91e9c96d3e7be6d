"""A conversation: one user or call, its thinker context kept in a KV-cache row between turns.

The thinker context is a list of turns, each with the exact token ids it contributes (rendered with the
checkpoint's chat template; an assistant turn holds the ids the thinker actually chose). The engine keeps
`cached` of those ids in the row's KV cache, so a new turn prefills only what follows them. Barge-in
(`truncate`) shortens the last assistant turn to what the listener heard and closes it as the template
closes a turn; the cached ids that still match stay valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from chroma_agent.audio import load_audio
from chroma_agent.engine.events import (
    AudioChunk,
    ResponseDone,
    ResponseError,
    ResponseEvent,
)
from chroma_agent.engine.sampling import Sampler, SamplingParams
from chroma_agent.engine.step import ReplyState
from chroma_agent.voices import VoiceProfile

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine

FRAME_MS = 80.0


class ConversationError(RuntimeError):
    """A conversation was used in a way it cannot serve (closed, reply already running, ...)."""


@dataclass
class Turn:
    role: str
    message: dict[str, Any]  # chat-template form (audio parts as placeholders), used to render later turns
    ids: list[int]
    features: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None
    text: str = ""
    audio_seconds: float = 0.0
    prompt_len: int = 0  # assistant turns: ids of the template's "assistant" header before the reply


@dataclass
class Reply:
    """One `respond()` call as the engine's step loop sees it."""

    conversation: Conversation
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sampler: Sampler
    max_frames: int
    prefill_ids: list[int]
    prefill_features: torch.Tensor | None
    prefill_mask: torch.Tensor | None
    context_start: int  # thinker slot of the first prefilled id
    context_len: int  # context ids (through the assistant header) when the reply started
    turn: Turn  # the assistant turn this reply fills
    started_at: float = field(default_factory=time.perf_counter)
    state: ReplyState | None = None
    cancelled: bool = False
    finished: bool = False
    frames_produced: int = 0
    frames_consumed: int = 0
    first_audio_at: float | None = None
    prefill_ms: float = 0.0
    text_ids: list[int] = field(default_factory=list)
    frame_steps: list[int] = field(default_factory=list)
    spoken_text: str = ""
    truncate_ms: float | None = None
    frames_heard: int | None = None
    epoch: int = 0  # the conversation's epoch when the reply was prefilled

    def emit(self, event: ResponseEvent) -> None:
        # A closed consumer loop means nobody listens any more; the reply still finishes normally.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Conversation:
    """Created by `Engine.open_conversation`; every method is safe to call from any thread."""

    def __init__(
        self,
        engine: Engine,
        row: int,
        voice: VoiceProfile,
        instructions: str | None,
        sampling: SamplingParams,
    ):
        self.id = uuid.uuid4().hex[:12]
        self.engine = engine
        self.row = row
        self.voice = voice
        self.sampling = sampling
        self.instructions = instructions
        self.turns: list[Turn] = []
        self.cached = 0  # leading context ids valid in this row's thinker KV cache
        self.epoch = 0  # bumped whenever the whole context is re-rendered (the cache is then void)
        self.reply: Reply | None = None
        self.last_reply: Reply | None = None
        self.closed = False
        self.history: list[dict[str, Any]] = []
        if instructions:
            self._append_turn("system", {"role": "system", "content": instructions}, text=instructions)

    # --- building the context -----------------------------------------------------------------------

    @property
    def context_ids(self) -> list[int]:
        return [t for turn in self.turns for t in turn.ids]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.engine.processor.render(messages, add_generation_prompt=generation_prompt)

    def _messages(self) -> list[dict[str, Any]]:
        return [turn.message for turn in self.turns]

    def _tokenize(self, text: str, clips: list[np.ndarray]) -> tuple[list[int], Any]:
        inputs = self.engine.processor.encode_text(text, clips)
        return inputs.input_ids[0].tolist(), inputs

    def _append_turn(self, role: str, message: dict[str, Any], *, clips: list[np.ndarray] | None = None,
                     text: str = "") -> Turn:
        before = self._messages()
        piece = self._render([*before, message])[len(self._render(before)):]
        ids, inputs = self._tokenize(piece, clips or [])
        turn = Turn(role, message, ids, inputs.input_features, inputs.feature_attention_mask, text,
                    sum(len(c) for c in (clips or [])) / self.engine.processor.audio_sample_rate)
        self.turns.append(turn)
        self.history.append({"role": role, "text": text, "audio_seconds": round(turn.audio_seconds, 3)})
        return turn

    def _rerender(self) -> None:
        """Recompute every templated turn (after the system prompt changed or old turns were dropped)."""
        messages: list[dict[str, Any]] = []
        for turn in self.turns:
            if turn.role != "assistant":
                piece = self._render([*messages, turn.message])[len(self._render(messages)):]
                turn.ids = self.engine.processor.tokenizer(piece, add_special_tokens=False)["input_ids"]
                if turn.features is not None:
                    turn.ids = self._expand_audio(turn.ids, turn.feature_mask)
            messages.append(turn.message)
        self.cached = 0
        self.epoch += 1

    def _expand_audio(self, ids: list[int], mask: torch.Tensor) -> list[int]:
        from chroma_agent.model.processor import num_audio_tokens

        counts = iter(num_audio_tokens(int(n)) for n in mask.sum(-1))
        audio_id = self.engine.processor.audio_token_id
        out: list[int] = []
        for t in ids:
            out.extend([t] * next(counts) if t == audio_id else [t])
        return out

    # --- public API ---------------------------------------------------------------------------------

    def add_user_audio(self, pcm: np.ndarray | bytes, sample_rate: int) -> None:
        """A user turn spoken as audio (any rate, mono or [samples, channels]; int16 or float)."""
        self.add_user_message([(pcm, sample_rate)])

    def add_user_message(self, parts: list[str | tuple[np.ndarray | bytes, int]]) -> None:
        """One user turn of text and audio parts in order (text as str, audio as (pcm, sample_rate)).

        The chat template renders them inside one user message, as the reference does for a message with
        several content parts.
        """
        rate = self.engine.processor.audio_sample_rate
        content: list[dict[str, str]] = []
        clips: list[np.ndarray] = []
        for part in parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                pcm, sample_rate = part
                clips.append(load_audio(pcm, rate, sample_rate=sample_rate, allow_paths=False,
                                        max_seconds=self.engine.config.max_user_audio_s))
                content.append({"type": "audio", "audio": "<clip>"})
        text = "".join(p["text"] for p in content if p["type"] == "text")
        if not clips and not text.strip():
            raise ValueError("user message is empty")
        with self.engine.lock:
            self._check_open()
            self._append_turn("user", {"role": "user", "content": content}, clips=clips, text=text)

    def add_user_text(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("user text is empty")
        with self.engine.lock:
            self._check_open()
            self._append_turn("user", {"role": "user", "content": text}, text=text)

    def add_system_text(self, text: str) -> None:
        """A system note at this point of the conversation (kept in the context)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("system text is empty")
        with self.engine.lock:
            self._check_open()
            self._append_turn("system", {"role": "system", "content": text}, text=text)

    def add_assistant_text(self, text: str) -> None:
        """An assistant turn given as text (e.g. restored chat history); no audio is generated for it."""
        if not isinstance(text, str):
            raise ValueError("assistant text must be a string")
        with self.engine.lock:
            self._check_open()
            self._append_turn("assistant", {"role": "assistant", "content": text}, text=text)

    def set_instructions(self, text: str | None) -> None:
        """Replace the system prompt. The whole context is prefilled again on the next reply."""
        with self.engine.lock:
            self._check_open()
            self.instructions = text or None
            if self.turns and self.turns[0].role == "system" and self.turns[0] is not None:
                self.turns.pop(0)
            if self.instructions:
                self.turns.insert(0, Turn("system", {"role": "system", "content": self.instructions}, [],
                                          text=self.instructions))
            self._rerender()

    def set_voice(self, voice: VoiceProfile) -> None:
        with self.engine.lock:
            self._check_open()
            self.voice = voice

    async def respond(
        self,
        instructions: str | None = None,
        *,
        max_frames: int | None = None,
        sampling: SamplingParams | None = None,
        output_audio: bool = True,
    ) -> AsyncIterator[ResponseEvent]:
        """Stream the assistant's reply: `AudioChunk`s and `TextDelta`s, then `ResponseDone`/`ResponseError`.

        With `output_audio=False` the reply is text only: `TextDelta`s, then `ResponseDone` with
        `usage.audio_frames == 0`.
        Leaving the iteration early cancels the reply (a disconnected client frees its slot within a step).
        """
        reply = self._submit(instructions, max_frames, sampling)
        try:
            while True:
                event = await reply.queue.get()
                if isinstance(event, AudioChunk):
                    reply.frames_consumed += 1
                    self.engine.wake()
                    if not output_audio:  # interim: the engine runs text-only replies natively (lead)
                        continue
                if not output_audio and isinstance(event, ResponseDone):  # interim (lead)
                    event = dataclasses.replace(event, usage=dataclasses.replace(event.usage, audio_frames=0))
                yield event
                if isinstance(event, ResponseDone | ResponseError):
                    return
        finally:
            if not reply.finished:
                reply.cancelled = True
                self.engine.wake()

    def cancel(self) -> None:
        """Stop the running reply before the next step (no-op when none runs)."""
        reply = self.reply
        if reply is not None:
            reply.cancelled = True
            self.engine.wake()

    def truncate(self, heard_ms: float) -> str | None:
        """Keep only the part of the last reply the listener heard; returns the kept transcript.

        A reply still running is cancelled and truncated when it stops: then this returns None and the
        kept transcript arrives as that reply's `ResponseDone.text`.
        """
        if heard_ms < 0 or not math.isfinite(heard_ms):
            raise ValueError(f"heard_ms must be a finite number >= 0, got {heard_ms}")
        with self.engine.lock:
            self._check_open()
            reply = self.reply or self.last_reply
            if reply is None:
                raise ConversationError("nothing to truncate: the conversation has no reply yet")
            if not reply.finished:
                reply.cancelled = True
                reply.truncate_ms = heard_ms
                self.engine.wake()
                return None
            self._apply_truncation(reply, heard_ms)
            return reply.spoken_text

    def close(self) -> None:
        """Free the KV-cache row at once; a running reply ends as cancelled."""
        self.engine.release(self)

    # --- used by the engine's step loop (under the engine lock) ----------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ConversationError(f"conversation {self.id} is closed")

    def _submit(self, instructions: str | None, max_frames: int | None, sampling: SamplingParams | None) -> Reply:
        engine = self.engine
        loop = asyncio.get_running_loop()
        with engine.lock:
            self._check_open()
            if self.reply is not None:
                raise ConversationError("a reply is already in progress; cancel it first")
            if not self.turns and not instructions:
                raise ConversationError("the conversation is empty: add a user turn or instructions first")
            if instructions:
                self._append_turn("system", {"role": "system", "content": instructions}, text=instructions)
            frames = engine.clamp_frames(self.voice, max_frames)
            self._fit_context(frames)
            messages = self._messages()
            prompt = self._render(messages, True)[len(self._render(messages)):]
            ids = engine.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            turn = Turn("assistant", {"role": "assistant", "content": ""}, ids, prompt_len=len(ids))
            self.turns.append(turn)
            self.history.append({"role": "assistant", "text": "", "audio_seconds": 0.0})
            context = self.context_ids
            start = self.cached
            # A partly cached audio turn is prefilled whole: its audio embeddings come as one piece.
            offset = 0
            for t in self.turns:
                if offset < start < offset + len(t.ids) and t.features is not None:
                    start = offset
                offset += len(t.ids)
            features, mask = self._features_from(start)
            reply = Reply(
                conversation=self, loop=loop, queue=asyncio.Queue(), sampler=Sampler(sampling or self.sampling,
                device=engine.model.device), max_frames=frames, prefill_ids=context[start:],
                prefill_features=features, prefill_mask=mask, context_start=start, context_len=len(context),
                turn=turn, epoch=self.epoch,
            )
            self.reply = reply
            engine.submit(reply)
            return reply

    def _features_from(self, start: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        feats, masks = [], []
        offset = 0
        for t in self.turns:
            if offset >= start and t.features is not None:
                feats.extend(t.features)
                masks.extend(t.feature_mask)
            offset += len(t.ids)
        if not feats:
            return None, None
        width = max(f.shape[-1] for f in feats)
        features = torch.zeros(len(feats), feats[0].shape[0], width)
        mask = torch.zeros(len(feats), width, dtype=torch.long)
        for i, (f, m) in enumerate(zip(feats, masks, strict=True)):
            features[i, :, : f.shape[-1]] = f
            mask[i, : m.shape[-1]] = m
        return features, mask

    def _fit_context(self, max_frames: int) -> None:
        """Drop the oldest turns (never the system prompt) until the context and a reply fit the row."""
        budget = self.engine.config.thinker_context - (max_frames + 2) // 2 - 8
        dropped = False
        while len(self.context_ids) + 16 > budget:
            first = 1 if self.turns and self.turns[0].role == "system" and self.instructions else 0
            if len(self.turns) <= first:
                raise ConversationError("the instructions alone do not fit the thinker context")
            self.turns.pop(first)
            dropped = True
        if dropped:
            self._rerender()

    def on_finished(self, reply: Reply, reason: str) -> ResponseDone:
        """Close the assistant turn with what was spoken; returns the final event."""
        chosen = [t for t, _ in reply.state.text] if reply.state else []
        # Reply ids fed to the thinker sit in the row right after the context; none if prefill never ran or
        # the context was re-rendered meanwhile (new instructions, removed turns): then the row is void.
        valid = reply.state is not None and reply.epoch == self.epoch
        fed = reply.state.thinker_pos - reply.context_len if valid else None
        self._close_turn(reply, self._without_end(chosen), fed)
        if reply.truncate_ms is not None:
            self._apply_truncation(reply, reply.truncate_ms)
        return ResponseDone(
            reason=reason, text=reply.spoken_text, usage=self.engine.usage(reply), timings=self.engine.timings(reply),
            frame_steps=list(reply.frame_steps),
        )

    def remove_turns(self, turns: list[Turn]) -> None:
        """Remove turns from the context (e.g. a deleted conversation item)."""
        with self.engine.lock:
            self._check_open()
            for turn in turns:
                self.drop_turn(turn)

    def drop_turn(self, turn: Turn) -> None:
        """Forget a turn (a deleted item, a failed reply); the row's cache stays valid up to where it began.

        Call with the engine lock held, or through `remove_turns`.
        """
        index = next((i for i, t in enumerate(self.turns) if t is turn), None)
        if index is None:
            return
        self.cached = min(self.cached, sum(len(t.ids) for t in self.turns[:index]))
        del self.turns[index]
        if index == 0:  # the template renders the first message differently (a default system prompt)
            self._rerender()
        if turn.role == "assistant":
            for i in range(len(self.history) - 1, -1, -1):
                if self.history[i]["role"] == "assistant":
                    del self.history[i]
                    break

    def _without_end(self, ids: list[int]) -> list[int]:
        end = self.engine.model.config.im_end_id
        return [t for t in ids if t != end]

    def _close_turn(self, reply: Reply, kept: list[int], fed: int | None) -> None:
        """Assistant turn = its header + the kept reply ids + the template's end of turn."""
        turn = reply.turn
        index = next(i for i, t in enumerate(self.turns) if t is turn)
        before = sum(len(t.ids) for t in self.turns[:index])
        text = self.engine.processor.decode_text(kept, skip_special_tokens=True)
        turn.ids = turn.ids[: turn.prompt_len] + kept + self.engine.turn_end_ids
        turn.message = {"role": "assistant", "content": text}
        turn.text = text
        reply.text_ids = kept
        reply.spoken_text = text
        for entry in reversed(self.history):
            if entry["role"] == "assistant":
                entry["text"] = text
                entry["audio_seconds"] = round(reply.frames_produced * FRAME_MS / 1000, 3)
                break
        # The row holds the header and the reply ids fed so far: only the prefix matching `kept` stays valid.
        if fed is None:
            self.cached = min(self.cached, before + turn.prompt_len + len(kept))
        else:
            self.cached = before + turn.prompt_len + min(fed, len(kept))

    def _apply_truncation(self, reply: Reply, heard_ms: float) -> None:
        heard = min(math.ceil(heard_ms / FRAME_MS - 1e-9), len(reply.frame_steps))
        reply.frames_heard = heard
        if heard >= len(reply.frame_steps) and reply.state is not None and reply.state.finished:
            return  # everything was heard
        last_step = reply.frame_steps[heard - 1] if heard > 0 else -1
        spoken = [t for t, step in (reply.state.text if reply.state else []) if step <= last_step]
        self._close_turn(reply, self._without_end(spoken), None)


class _Detokenizer:
    """Streams text for growing token ids without splitting multi-byte characters."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta
