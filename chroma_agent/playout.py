"""What a listener can have heard of a reply: the one rule every front end cuts a barge-in by.

A reply's audio goes out frame by frame, and the listener hears it in real time from its first frame on. So
when the user interrupts, the conversation keeps of the reply at most the audio that went out, and at most
what real-time playback since the first frame allows (:meth:`Playout.heard_ms`); a truncation asked for by a
client is clamped the same way (:meth:`Playout.clamp`): the context never holds words nobody was sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from chroma_agent.frames import frames_ms

__all__ = ["Playout"]


@dataclass
class Playout:
    """One reply's audio on its way to the listener (times from `time.monotonic`)."""

    started: float = field(default_factory=time.monotonic)  # when the reply was asked for
    frames: int = 0  # frames sent (or received, on a client)
    first_at: float | None = None  # when the first frame went out

    def frame_out(self, now: float | None = None) -> int:
        """Count one more frame out; its index within the reply."""
        if self.first_at is None:
            self.first_at = time.monotonic() if now is None else now
        self.frames += 1
        return self.frames - 1

    @property
    def sent_ms(self) -> float:
        return frames_ms(self.frames)

    @property
    def time_to_first_ms(self) -> float | None:
        return None if self.first_at is None else (self.first_at - self.started) * 1000

    def heard_ms(self, now: float | None = None) -> float:
        """What the listener can have heard by `now`: the audio sent, no more than real time since the first frame."""
        if self.first_at is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return min(self.sent_ms, (now - self.first_at) * 1000)

    def clamp(self, heard_ms: float) -> float:
        """A truncation point within what was sent (a non-finite or negative one is 0)."""
        if not math.isfinite(heard_ms):
            return 0.0
        return min(max(0.0, float(heard_ms)), self.sent_ms)
