"""Chroma's audio clock: the rates it hears and speaks at, the frame its replies stream in, and conversions.

The values are Chroma-4B's: the thinker's Whisper front end hears 16 kHz; Mimi speaks 24 kHz at 12.5 frames
a second, so one frame is 1920 samples, 80 ms. They are constants rather than read from a checkpoint because
code that never loads the model needs them too (the realtime wire protocol, a remote client, the LiveKit
plugin in remote mode); :func:`check_codec` holds a loaded model's codec to them, and the engine calls it
when it starts, so the two cannot disagree silently.

Plain Python (no numpy, no torch): every front end can import it, whatever it has installed.
"""

from __future__ import annotations

import math

__all__ = [
    "FRAME_MS",
    "FRAME_S",
    "FRAME_SAMPLES",
    "INPUT_RATE",
    "OUTPUT_RATE",
    "check_codec",
    "frame_start_s",
    "frames_ms",
    "frames_for_seconds",
]

INPUT_RATE = 16_000  # what the thinker's audio encoder hears (user audio is resampled to this once)
OUTPUT_RATE = 24_000  # what Mimi speaks
FRAME_SAMPLES = 1920  # one Mimi frame at OUTPUT_RATE
FRAME_MS = 1000.0 * FRAME_SAMPLES / OUTPUT_RATE  # 80.0
FRAME_S = FRAME_MS / 1000.0  # 0.08


def frames_for_seconds(seconds: float) -> int:
    """The frames a reply of at most ``seconds`` may make: rounded up, at least one (80 ms steps)."""
    # 1e-9: 0.24 s is 3 frames, not 4, whatever float rounding does to 0.24 * 1000 / 80
    return max(1, math.ceil(seconds * 1000.0 / FRAME_MS - 1e-9))


def frames_ms(frames: int) -> float:
    """Milliseconds of audio in ``frames`` frames."""
    return frames * FRAME_MS


def frame_start_s(index: int) -> float:
    """Where frame ``index`` starts within its reply, in seconds."""
    return index * FRAME_S


def check_codec(sample_rate: int, samples_per_frame: int) -> None:
    """Refuse a codec whose frames are not the ones every front end counts in."""
    if sample_rate != OUTPUT_RATE or samples_per_frame != FRAME_SAMPLES:
        frame_ms = 1000.0 * samples_per_frame / sample_rate
        raise ValueError(f"the streaming front ends count {FRAME_SAMPLES}-sample frames at {OUTPUT_RATE} Hz "
                         f"({FRAME_MS:g} ms); this codec makes {samples_per_frame} samples at {sample_rate} Hz "
                         f"({frame_ms:g} ms)")
