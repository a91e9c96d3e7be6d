"""Voice activity for every front end: one Silero loader and one turn detector.

The realtime server's ``server_vad`` and the WebRTC playground both cut a live stream into turns with the
same :class:`TurnDetector` over the same :class:`SileroVad`; they differ only in parameters (the server has no
minimum speech length and keeps its own input buffer; the playground keeps the turn's audio, with a pre-roll
and a maximum length).

Silero's ONNX model is the one livekit-plugins-silero ships. Its file is located without importing that
package: the package's ``__init__`` registers a LiveKit plugin, which LiveKit allows on the main thread only,
and pulls in all of livekit-agents. One ONNX session serves the whole process (``run`` is thread-safe); the
recurrent state is per stream, in each :class:`SileroVad`.

Everything here is blocking CPU work (resampling and Silero cost about 12 ms per second of audio): front ends
call :meth:`TurnDetector.push` from a worker thread, one call at a time per stream, never on their event loop.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chroma_agent.audio import StreamResampler

__all__ = [
    "VAD_RATE",
    "WINDOW",
    "SileroVad",
    "SpeechStarted",
    "TurnDetector",
    "TurnEnded",
    "VadEvent",
    "VadUnavailable",
    "silero_session",
]

VAD_RATE = 16_000  # Silero's rate (and the thinker's: a turn cut here needs no other resample)
WINDOW = 512  # samples Silero judges at once: 32 ms
_CONTEXT = 64  # samples of the previous window Silero sees again
_WINDOW_MS = WINDOW * 1000 / VAD_RATE
_HYSTERESIS = 0.15  # speech ends below threshold - this, as Silero's own iterator does


class VadUnavailable(RuntimeError):
    """Silero cannot run here (livekit-plugins-silero or onnxruntime is not installed, or broken)."""


@functools.cache
def silero_session() -> Any:
    """The process's Silero ONNX session (CPU, one thread, no spinning: it shares cores with the engine)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise VadUnavailable(f"onnxruntime is not installed ({exc}); pip install 'chroma-agent[livekit]'") from None
    spec = importlib.util.find_spec("livekit.plugins.silero")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("livekit-plugins-silero is not installed (pip install 'chroma-agent[livekit]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "silero_vad.onnx"
    if not path.is_file():
        raise VadUnavailable(f"livekit-plugins-silero has no model file at {path}")
    opts = onnxruntime.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], sess_options=opts)


class SileroVad:
    """P(speech) of consecutive 32 ms windows of one 16 kHz stream."""

    def __init__(self, session: Any = None) -> None:
        self._session = session if session is not None else silero_session()
        self._rate = np.array(VAD_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)

    def __call__(self, window: np.ndarray) -> float:
        x = np.concatenate([self._context, window.astype(np.float32, copy=False)])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._rate})
        self._context = x[0, -_CONTEXT:]
        return float(out.item())


@dataclass(frozen=True)
class SpeechStarted:
    """The user has spoken for ``min_speech_ms``: enough to interrupt the agent."""

    at_ms: int  # where the speech began on the detector's clock (the start of its first speech window)


@dataclass(frozen=True)
class TurnEnded:
    """The user paused for ``min_silence_ms`` (or the turn reached ``max_turn_s``)."""

    at_ms: int  # where the turn ended on the detector's clock (the end of the pause)
    audio: np.ndarray | None  # the turn at 16 kHz, pre-roll to pause, when the detector keeps audio


VadEvent = SpeechStarted | TurnEnded


class TurnDetector:
    """A live stream (any rate) -> speech start and end of turn, on 32 ms windows at 16 kHz.

    ``speech_prob`` takes one window of :data:`WINDOW` samples at 16 kHz and returns P(speech), as
    :class:`SileroVad` does; a stand-in with the same signature is enough for tests. Speech starts after
    ``min_speech_ms`` of windows at or above ``threshold`` (at least one window) and the turn ends after
    ``min_silence_ms`` of windows below ``threshold - 0.15``, or when it has lasted ``max_turn_s``.

    The clock counts the stream's audio in ms from ``origin_ms``, dropped audio included, so event times line up
    with the caller's own input clock. With ``keep_audio`` the detector keeps the turn's audio: ``preroll_ms``
    before the speech (so its onset is never clipped) through the pause.
    """

    def __init__(
        self,
        speech_prob: Callable[[np.ndarray], float],
        *,
        threshold: float = 0.5,
        min_speech_ms: float = 200,
        min_silence_ms: float = 500,
        preroll_ms: float = 300,
        max_turn_s: float | None = 30.0,
        keep_audio: bool = True,
        origin_ms: int = 0,
    ) -> None:
        self._prob = speech_prob
        self.threshold = threshold
        self._release = max(threshold - _HYSTERESIS, 0.01)
        self._min_speech = max(1, math.ceil(min_speech_ms / _WINDOW_MS))
        self._min_silence = max(1, math.ceil(min_silence_ms / _WINDOW_MS))
        self._preroll = math.ceil(preroll_ms / _WINDOW_MS)
        self._max_windows = math.inf if max_turn_s is None else math.ceil(max_turn_s * 1000 / _WINDOW_MS)
        self._keep_audio = keep_audio
        self._origin_ms = int(origin_ms)
        self._resampler = StreamResampler(VAD_RATE)
        self._samples = 0  # 16 kHz samples judged or dropped since the origin
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows: list[np.ndarray] = []  # the turn so far (or the pre-roll before one)
        self._turn_windows = 0
        self._speech_run = 0
        self._silence_run = 0
        self.speaking = False

    def push(self, pcm: np.ndarray, sample_rate: int = VAD_RATE) -> list[VadEvent]:
        """Mono float audio in; the events it completes, in order. Blocking: call it off the event loop."""
        x = self._resampler.push(pcm, sample_rate)
        self._pending = np.concatenate([self._pending, x])  # a copy: kept windows never alias the caller's array
        events = []
        start = 0
        while len(self._pending) - start >= WINDOW:
            event = self._step(self._pending[start:start + WINDOW])
            start += WINDOW
            if event is not None:
                events.append(event)
        self._pending = self._pending[start:].copy()
        return events

    def reset(self) -> None:
        """Forget the stream so far (a commit or a clear): no turn is open; the clock keeps counting.

        What the resampler still holds is from before the reset too: it is dropped with the part window (counted
        on the clock), or its last few ms of speech would open a turn the caller has already ended.
        """
        self._samples += self._pending.size + self._resampler.flush().size
        self._pending = np.zeros(0, dtype=np.float32)
        self._windows = []
        self._turn_windows = self._speech_run = self._silence_run = 0
        self.speaking = False
        reset = getattr(self._prob, "reset", None)
        if reset is not None:
            reset()

    def _ms(self, samples: int) -> int:
        return self._origin_ms + samples * 1000 // VAD_RATE

    def _step(self, window: np.ndarray) -> VadEvent | None:
        p = self._prob(window)
        self._samples += WINDOW
        if self._keep_audio:
            self._windows.append(window)
        if not self.speaking:
            self._speech_run = self._speech_run + 1 if p >= self.threshold else 0
            if self._keep_audio:  # before a turn only the pre-roll and the current run can become part of it
                del self._windows[: max(0, len(self._windows) - self._preroll - self._speech_run)]
            if self._speech_run < self._min_speech:
                return None
            self.speaking = True
            self._silence_run = 0
            self._turn_windows = self._speech_run
            return SpeechStarted(self._ms(self._samples - self._speech_run * WINDOW))
        self._turn_windows += 1
        self._silence_run = self._silence_run + 1 if p < self._release else 0
        length = len(self._windows) if self._keep_audio else self._turn_windows  # pre-roll included
        if self._silence_run < self._min_silence and length < self._max_windows:
            return None
        audio = np.concatenate(self._windows) if self._keep_audio else None
        self._windows = []
        self._turn_windows = self._speech_run = self._silence_run = 0
        self.speaking = False
        return TurnEnded(self._ms(self._samples), audio)
