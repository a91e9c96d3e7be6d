"""The realtime server's ``server_vad`` on the shared :class:`~chroma_agent.vad.TurnDetector`.

What the client is told: ``speech_started`` / ``speech_stopped`` at the times the session's settings give, on the
input audio clock (all audio appended since connect, across detector restarts, commits and clears), and a commit
of the buffer from the prefix padding through the pause. A stand-in for Silero judges each 32 ms window by its
loudness, so every time is exact; the connection runs without a socket or an engine (a stand-in conversation
takes the committed audio; sent events are recorded).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from chroma_agent.audio import to_pcm16
from chroma_agent.engine.conversation import TurnRef
from chroma_agent.realtime_protocol import SAMPLE_RATE, parse_client_event
from chroma_agent.server.realtime import RealtimeConnection, input_buffer, session_config
from chroma_agent.server.realtime.input_buffer import server_vad
from chroma_agent.server.settings import ServerSettings
from chroma_agent.vad import TurnDetector

ENGINE_RATE = 16_000  # what the stand-in engine takes committed audio at
WINDOW_MS = 32
LOUD, QUIET = 0.5, 0.2  # tone amplitudes: P(speech) 1.0 and 0.4 to the stand-in


def speech_prob(window: np.ndarray) -> float:
    """A stand-in for Silero: P(speech) grows with the window's peak (a 0.2 tone is 0.4: below the default 0.5)."""
    return float(min(1.0, 2 * np.abs(window).max()))


class StandInConversation:
    """Takes committed user audio as the engine's conversation would, and remembers it."""

    def __init__(self) -> None:
        self.clips: list[np.ndarray] = []

    async def add_user_audio(self, clip: np.ndarray, rate: int) -> TurnRef:
        assert rate == ENGINE_RATE
        self.clips.append(clip)
        return TurnRef(len(self.clips), "user")


class Errors:
    def labels(self, kind: str) -> Errors:
        raise AssertionError(f"unexpected error {kind}")


class Session(RealtimeConnection):
    """A realtime connection without a socket: events are parsed and dispatched as the reader would."""

    def __init__(self) -> None:
        engine = SimpleNamespace(config=SimpleNamespace(max_user_audio_s=60.0),
                                 processor=SimpleNamespace(audio_sample_rate=ENGINE_RATE))
        state = SimpleNamespace(engine=engine, settings=ServerSettings(), metrics=SimpleNamespace(errors=Errors()))
        super().__init__(SimpleNamespace(app=SimpleNamespace(state=state)), dialect="ga")
        self.conv = StandInConversation()
        self.sent: list[dict[str, Any]] = []
        self.audio = np.zeros(0, dtype=np.float32)  # everything appended, at 24 kHz

    async def _send(self, event: dict[str, Any] | None, **_: Any) -> bool:
        self.sent.append(event)
        return True

    async def client(self, event: dict[str, Any]) -> None:
        await self._dispatch(parse_client_event(json.dumps(event)))

    async def append(self, *segments: np.ndarray, chunk_ms: int = 100) -> None:
        """Append audio as a client streams it: base64 PCM16 in `chunk_ms` messages."""
        audio = np.concatenate(segments)
        self.audio = np.concatenate([self.audio, audio])
        step = chunk_ms * SAMPLE_RATE // 1000
        for start in range(0, len(audio), step):
            pcm = to_pcm16(audio[start:start + step])
            await self.client({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})

    def now_ms(self) -> float:
        return len(self.audio) * 1000 / SAMPLE_RATE

    def take(self, kind: str) -> list[dict[str, Any]]:
        """The events of one type sent so far (and forget all sent events)."""
        found = [e for e in self.sent if e["type"] == f"input_audio_buffer.{kind}"]
        self.sent.clear()
        return found


def silence(ms: float) -> np.ndarray:
    return np.zeros(round(ms * SAMPLE_RATE / 1000), dtype=np.float32)


def tone(ms: float, amplitude: float = LOUD) -> np.ndarray:
    t = np.arange(round(ms * SAMPLE_RATE / 1000)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def window_start(origin_ms: float, at_ms: float) -> int:
    """Where the detector's window holding `at_ms` starts (its windows run from its origin, 32 ms each)."""
    return int(origin_ms + (at_ms - origin_ms) // WINDOW_MS * WINDOW_MS)


def pause_end(origin_ms: float, speech_end_ms: float, silence_ms: float) -> int:
    """Where a turn ends: `silence_ms` of whole silent windows after the window holding the speech's end."""
    last = (speech_end_ms - origin_ms) // WINDOW_MS  # the window the speech ends in (still speech)
    return int(origin_ms + (last + 1 + math.ceil(silence_ms / WINDOW_MS)) * WINDOW_MS)


def in_window_of(reported_ms: int, at_ms: float) -> bool:
    """After a reset the windows run from where it came (the clock counts what it dropped, part windows too):
    a time then lies in the window holding `at_ms`, wherever that window starts."""
    return at_ms - WINDOW_MS < reported_ms <= at_ms + 1


def ends_after_pause(reported_ms: int, speech_end_ms: float, silence_ms: float) -> bool:
    """The end of the window holding the speech's end, plus `silence_ms` in whole windows."""
    pause = math.ceil(silence_ms / WINDOW_MS) * WINDOW_MS
    return speech_end_ms + pause - 1 <= reported_ms <= speech_end_ms + WINDOW_MS + pause + 1


@pytest.fixture()
def stand_in(monkeypatch):
    """server_vad with the stand-in for Silero, wherever the server makes a detector."""
    made = functools.partial(server_vad, speech_prob=speech_prob)
    monkeypatch.setattr(input_buffer, "server_vad", made)
    monkeypatch.setattr(session_config, "server_vad", made)


def test_server_vad_settings_and_times_on_the_input_clock(stand_in):
    async def scenario() -> None:
        session = Session()
        await session._start_server_vad()  # as a session opens: OpenAI's defaults (threshold 0.5)
        assert isinstance(session.vad, TurnDetector) and session.turn_detection["threshold"] == 0.5
        await session.append(silence(400), tone(300, QUIET), silence(300))  # P 0.4 is not speech at 0.5
        assert session.take("speech_started") == []

        # A new turn_detection restarts the detector where the input clock stands (1000 ms in).
        await session.client({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": 0.3, "silence_duration_ms": 320,
                               "prefix_padding_ms": 200, "create_response": False}}}}})
        origin = session.now_ms()
        assert origin == 1000
        speech_at = origin + 15 * WINDOW_MS + 16  # mid-window, so the window holding it is plainly speech
        await session.append(silence(speech_at - origin))
        await session.append(tone(600, QUIET))  # P 0.4 is speech at 0.3
        speech_end = session.now_ms()
        (started,) = session.take("speech_started")
        assert started["audio_start_ms"] == window_start(origin, speech_at) - 200  # the prefix padding before it
        await session.append(silence(600))
        (stopped,) = [e for e in session.sent if e["type"] == "input_audio_buffer.speech_stopped"]
        assert stopped["audio_end_ms"] == pause_end(origin, speech_end, 320)
        assert stopped["item_id"] == started["item_id"]
        (committed,) = session.take("committed")
        assert committed["item_id"] == started["item_id"]
        assert session.response is None  # create_response false

        # The item keeps the prefix padding before the speech (at most what lay before its window) and runs
        # through the pause, to the end of the append the pause ended in.
        (clip,) = session.conv.clips
        onset_ms = np.flatnonzero(np.abs(clip) > 0.1)[0] * 1000 / ENGINE_RATE
        assert 200 - 2 <= onset_ms <= speech_at - started["audio_start_ms"] + 2
        clip_end = speech_at - onset_ms + len(clip) * 1000 / ENGINE_RATE  # on the input clock
        assert stopped["audio_end_ms"] - 2 <= clip_end <= stopped["audio_end_ms"] + 100

    asyncio.run(scenario())


def test_after_a_clear_or_a_commit_the_detector_starts_over_and_the_clock_keeps_counting(stand_in):
    async def scenario() -> None:
        session = Session()
        await session.client({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500, "create_response": False}}}}})
        origin = session.now_ms()
        assert origin == 0

        # a turn cut short by a clear: no speech_stopped for it, and nothing committed
        await session.append(silence(200), tone(300))
        (first,) = session.take("speech_started")
        assert first["audio_start_ms"] == 0  # 192 ms - 300 ms of padding, clamped at the clock's start
        await session.client({"type": "input_audio_buffer.clear"})
        assert session.take("cleared") and not session.vad.speaking
        await session.append(silence(800))
        assert session.take("speech_stopped") == []

        # speech again: its time counts all audio appended before the clear
        speech_at = session.now_ms() + 16
        await session.append(silence(16), tone(400))
        (second,) = session.take("speech_started")
        assert in_window_of(second["audio_start_ms"] + 300, speech_at)
        assert second["item_id"] != first["item_id"]

        # a client commit mid-speech ends that turn (its item takes the speech's id) and starts the detector over
        await session.client({"type": "input_audio_buffer.commit"})
        (committed,) = session.take("committed")
        assert committed["item_id"] == second["item_id"] and not session.vad.speaking
        await session.append(silence(700))
        assert session.take("speech_stopped") == []  # the committed turn does not end a second time

        speech_at = session.now_ms() + 10
        await session.append(silence(10), tone(500))
        speech_end = session.now_ms()
        await session.append(silence(700))
        started, stopped = (e for e in session.sent if e["type"].startswith("input_audio_buffer.speech_"))
        assert in_window_of(started["audio_start_ms"] + 300, speech_at)
        assert ends_after_pause(stopped["audio_end_ms"], speech_end, 500)
        assert len(session.conv.clips) == 2

    asyncio.run(scenario())
