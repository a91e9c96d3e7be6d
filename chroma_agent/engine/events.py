"""What a reply streams to its consumer: audio chunks, text deltas, then one final event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from chroma_agent.audio import to_pcm16

if TYPE_CHECKING:
    from chroma_agent.engine.conversation import TurnRef


@dataclass(frozen=True)
class AudioChunk:
    """One 80 ms Mimi frame of 24 kHz mono audio."""

    pcm: np.ndarray  # float32 [1920]
    frame_index: int
    timestamp_ms: float  # where the chunk starts within the reply
    codes: np.ndarray | None = None  # the frame's Mimi codes [K] (int64, before clamping)

    def pcm16(self) -> bytes:
        return to_pcm16(self.pcm)


@dataclass(frozen=True)
class TextDelta:
    """Transcript text as the thinker chooses it (it leads the audio it is spoken in by up to ~2 frames)."""

    text: str
    token_id: int
    frame_index: int  # the first frame that carries this token


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # thinker tokens prefilled for this reply
    cached_tokens: int  # thinker tokens reused from earlier turns (not recomputed)
    text_tokens: int
    audio_frames: int
    audio_prompt_tokens: int = 0  # audio placeholders (encoded audio) in the whole context read

    # What every API reports (chat completions, realtime, LiveKit metrics): input is the whole context the
    # thinker read (cached or not), output is the text tokens plus the audio frames.
    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens + self.cached_tokens

    @property
    def output_tokens(self) -> int:
        return self.text_tokens + self.audio_frames

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Timings:
    time_to_first_audio_ms: float | None
    prefill_ms: float
    total_ms: float
    audio_ms: float

    @property
    def real_time_factor(self) -> float | None:
        """Generation time per second of audio (< 1 is faster than real time)."""
        return self.total_ms / self.audio_ms if self.audio_ms else None


@dataclass(frozen=True)
class ResponseDone:
    reason: str  # "completed" (end of audio / of text), "max_frames", "max_tokens" (text only), "cancelled"
    text: str
    usage: Usage
    timings: Timings
    frame_steps: list[int] = field(default_factory=list, repr=False)
    turn: TurnRef | None = None  # the assistant turn this reply became (to remove it later)

    @property
    def cut_short(self) -> bool:
        """The reply hit its length limit (frames, or tokens for a text reply) before it ended by itself."""
        return self.reason in ("max_frames", "max_tokens")


@dataclass(frozen=True)
class ResponseError:
    """The reply failed; the conversation and every other session go on."""

    message: str
    kind: str = "internal_error"


ResponseEvent = AudioChunk | TextDelta | ResponseDone | ResponseError
