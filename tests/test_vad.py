"""chroma_agent.vad and the streaming resampler: the one turn detector, as the server and the playground set it up.

The playground's own settings are tested in tests/test_playground.py; here: the server's settings (no minimum
speech, no kept audio, a clock that lines up with the input clock), input at other rates, and the resampler.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from chroma_agent.audio import StreamResampler, pcm16_to_mono, resample, to_pcm16
from chroma_agent.vad import (
    VAD_RATE,
    WINDOW,
    SileroVad,
    SpeechStarted,
    TurnDetector,
    TurnEnded,
    silero_session,
)


def loud_prob(window: np.ndarray) -> float:
    """A stand-in for Silero: any window with a loud sample is speech."""
    return float(np.abs(window).max() > 0.1)


def tone(seconds: float, rate: int = VAD_RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float, rate: int = VAD_RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def server_detector(**kwargs) -> TurnDetector:
    """As the realtime server sets it up: OpenAI's server_vad timings, no minimum speech, no kept audio."""
    return TurnDetector(loud_prob, threshold=0.5, min_speech_ms=0, min_silence_ms=500, preroll_ms=300,
                        max_turn_s=None, keep_audio=False, **kwargs)


def push_all(detector: TurnDetector, audio: np.ndarray, rate: int, chunk_s: float = 0.02) -> list:
    chunk = round(chunk_s * rate)
    events = []
    for start in range(0, len(audio), chunk):
        events += detector.push(audio[start:start + chunk], rate)
    return events


def test_server_settings_start_on_one_speech_window_and_report_times_on_the_input_clock():
    audio = np.concatenate([silence(1.0), tone(0.05), silence(1.0)])
    started, ended = push_all(server_detector(origin_ms=5000), audio, VAD_RATE)
    # one 32 ms window of speech is a start (the playground's 200 ms minimum is not the server's)
    assert isinstance(started, SpeechStarted) and isinstance(ended, TurnEnded) and ended.audio is None
    assert started.at_ms == 5000 + (VAD_RATE // WINDOW * WINDOW) * 1000 // VAD_RATE  # the window holding 1.0 s
    # the turn ends after 500 ms of silence, counted in whole windows (16 of 32 ms), after the last speech window
    last_speech_end = 5000 + 1000 + 64  # the tone (from 1.0 s to 1.05 s) touches the windows up to 1.056 s
    assert ended.at_ms == pytest.approx(last_speech_end + 16 * 32, abs=32)


def test_reset_drops_the_open_turn_but_the_clock_keeps_counting():
    detector = server_detector()
    first_speech_window = VAD_RATE // 2 // WINDOW  # the window that holds 0.5 s
    started = push_all(detector, np.concatenate([silence(0.5), tone(0.3)]), VAD_RATE)[0]
    assert started == SpeechStarted(first_speech_window * WINDOW * 1000 // VAD_RATE)
    assert detector.speaking
    detector.push(tone(0.01))  # a part window is pending when the commit comes
    detector.reset()
    assert not detector.speaking
    (again,) = push_all(detector, np.concatenate([silence(0.2), tone(0.1)]), VAD_RATE)[:1]
    # 0.81 s were pushed before the reset; speech resumes 0.2 s later, in the window that holds it
    assert isinstance(again, SpeechStarted) and 810 + 200 - 32 <= again.at_ms <= 810 + 200


def test_a_reset_drops_what_the_resampler_still_holds_and_counts_it_on_the_clock():
    """At 24 kHz (the realtime server's input) the resampler holds the last few ms of what was pushed: after a
    reset they are gone with the rest (speech cut by a commit opens no second turn) and the clock has counted
    every sample pushed before it."""
    rate = 24_000
    detector = server_detector()
    assert isinstance(push_all(detector, np.concatenate([silence(0.5, rate), tone(0.5, rate)]), rate)[0],
                      SpeechStarted)
    detector.reset()
    assert push_all(detector, silence(1.0, rate), rate) == []  # no turn from the speech before the reset
    (again,) = push_all(detector, tone(0.2, rate), rate)[:1]
    # 2.0 s were pushed before this speech: it starts in the window holding 2.0 s (windows run from the reset)
    assert isinstance(again, SpeechStarted) and 2000 - 32 < again.at_ms <= 2000


def test_input_at_48_and_24_khz_is_resampled_in_stream_and_keeps_the_clock():
    speech_16k = np.concatenate([silence(1.0), tone(1.0), silence(0.8)])
    expected = push_all(server_detector(), speech_16k, VAD_RATE)
    for rate in (24_000, 48_000):
        events = push_all(server_detector(), resample(speech_16k, VAD_RATE, rate), rate)
        assert [type(e) for e in events] == [type(e) for e in expected]
        # the stream resampler delays by its filter (a few ms), never by a drift that grows with the stream
        assert all(abs(a.at_ms - b.at_ms) <= 32 for a, b in zip(events, expected, strict=True))


def test_max_turn_cuts_a_turn_that_never_pauses_and_keeps_its_audio():
    detector = TurnDetector(loud_prob, min_speech_ms=0, preroll_ms=0, max_turn_s=1.0)
    events = push_all(detector, tone(2.05), VAD_RATE)  # 64 windows and a bit: two whole turns
    assert [type(e) for e in events] == [SpeechStarted, TurnEnded, SpeechStarted, TurnEnded]
    assert all(len(e.audio) == 32 * WINDOW for e in events if isinstance(e, TurnEnded))


def test_silero_model_resets_its_state(golden_dir):
    speech, rate = sf.read(str(golden_dir / "user1.wav"), dtype="float32")
    window = speech[8000:8000 + WINDOW]
    vad = SileroVad()
    first = vad(window)
    assert vad(window) != first  # the recurrent state carries over
    vad.reset()
    assert vad(window) == first
    assert silero_session() is silero_session()  # one ONNX session per process


def test_stream_resampler_equals_resampling_the_whole_stream_and_restarts_on_a_new_rate():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 48_000).astype(np.float32)
    resampler = StreamResampler(16_000)
    out = [resampler.push(x[i:i + 960], 48_000) for i in range(0, len(x), 960)]
    out.append(resampler.flush())
    np.testing.assert_array_equal(np.concatenate(out), soxr.resample(x, 48_000, 16_000, quality="HQ"))
    # a new rate ends the first stream (its tail comes first) and starts another
    resampler.push(x[:4800], 48_000)
    joined = resampler.push(x[:2400], 24_000)
    assert resampler.source_rate == 24_000 and len(joined) > 0
    same = StreamResampler(16_000)
    assert same.push(x[:100], 16_000) is not None and same.flush().size == 0  # equal rates pass through


def test_pcm16_to_mono_is_the_channel_mean():
    left, right = np.full(4, 0.5, dtype=np.float32), np.full(4, -0.25, dtype=np.float32)
    stereo = to_pcm16(np.stack([left, right], axis=1).reshape(-1))
    np.testing.assert_allclose(pcm16_to_mono(stereo, 2), 0.125, atol=1 / 32768)
