"""chroma_agent.audio: every accepted source decodes to the same samples, and bad input fails clearly."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from chroma_agent.audio import (
    AudioError,
    decode_audio,
    encode_wav,
    load_audio,
    pcm16_to_float,
    resample,
    to_pcm16,
)


def _wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def user_wav(golden_dir: Path) -> Path:
    return golden_dir / "user1.wav"


@pytest.fixture(scope="module")
def user_int16(user_wav: Path) -> np.ndarray:
    samples, rate = sf.read(user_wav, dtype="int16")
    assert rate == 16000
    return samples


@pytest.fixture(scope="module")
def user_float(user_int16: np.ndarray) -> np.ndarray:
    return user_int16.astype(np.float32) / np.float32(32768.0)


def test_decode_audio_is_2d_float32(user_wav: Path, user_float: np.ndarray) -> None:
    samples, rate = decode_audio(user_wav.read_bytes())
    assert rate == 16000
    assert samples.dtype == np.float32 and samples.shape == (user_float.size, 1)
    np.testing.assert_array_equal(samples[:, 0], user_float)


def test_every_source_form_gives_the_same_samples(
    user_wav: Path, user_int16: np.ndarray, user_float: np.ndarray, tmp_path: Path
) -> None:
    data = user_wav.read_bytes()
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style line breaks
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    stereo = np.stack([user_float, user_float], axis=1)
    sources = {
        "str path": str(user_wav),
        "Path": user_wav,
        "file URL": f"file://{user_wav}",
        "relative path": (user_wav.name, {"base_dir": user_wav.parent}),
        "bytes": data,
        "bytearray": bytearray(data),
        "base64": b64,
        "base64 with newlines": wrapped,
        "urlsafe base64": urlsafe,
        "data URL": "data:audio/wav;base64," + b64,
        "int16 array": (user_int16, {"sample_rate": 16000}),
        "float32 array": (user_float, {"sample_rate": 16000}),
        "float64 array": (user_float.astype(np.float64), {"sample_rate": 16000}),
        "[samples, 2] array": (stereo, {"sample_rate": 16000}),
        "[2, samples] array": (np.ascontiguousarray(stereo.T), {"sample_rate": 16000}),
    }
    for name, spec in sources.items():
        source, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        out = load_audio(source, 16000, **kwargs)
        assert out.dtype == np.float32, name
        np.testing.assert_array_equal(out, user_float, err_msg=name)


def test_path_outside_base_dir_loads_when_paths_are_allowed(user_wav: Path, tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "clip.wav").write_bytes(user_wav.read_bytes())
    out = load_audio("../clip.wav", 16000, base_dir=inner)
    assert out.size == sf.info(user_wav).frames


@pytest.mark.parametrize(
    ("rate", "channels"),
    [(48000, 2), (8000, 1), (22050, 1), (44100, 2)],
)
def test_resampled_versions_load_with_the_librosa_length_and_stay_close(
    user_float: np.ndarray, rate: int, channels: int
) -> None:
    other = soxr.resample(user_float, 16000, rate, quality="HQ")
    if channels == 2:
        other = np.stack([other, other], axis=1)
    wav = _wav_bytes(other, rate, subtype="FLOAT")
    out = load_audio(wav, 16000)
    assert out.dtype == np.float32
    assert out.size == math.ceil(other.shape[0] * 16000 / rate)  # librosa.resample(fix=True) length
    assert abs(out.size - user_float.size) <= 1
    n = min(out.size, user_float.size)
    if rate > 16000:
        # Up then down again only loses the band edge: the clip comes back nearly intact.
        err = np.sqrt(np.mean((out[:n] - user_float[:n]) ** 2)) / np.sqrt(np.mean(user_float**2))
        assert err < 0.05, err
    else:
        # 8 kHz lost everything above 4 kHz; compare the part that survived.
        band = soxr.resample(soxr.resample(user_float, 16000, rate, quality="HQ"), rate, 16000, quality="HQ")
        np.testing.assert_allclose(out[:n], band[:n], atol=1e-5)
        corr = np.corrcoef(out[:n], user_float[:n])[0, 1]
        assert corr > 0.8, corr


def test_resample_is_identity_at_the_same_rate(user_float: np.ndarray) -> None:
    assert resample(user_float, 16000, 16000) is user_float


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        (b"definitely not audio" * 10, {}, "not a decodable audio file"),
        (b"", {}, "empty"),
        (np.zeros(0, dtype=np.float32), {"sample_rate": 16000}, "empty"),
        (np.zeros((0, 2), dtype=np.float32), {"sample_rate": 16000}, "empty"),
        (np.full(100, np.nan, dtype=np.float32), {"sample_rate": 16000}, "NaN or infinite"),
        (np.array([0.0, np.inf] * 50, dtype=np.float32), {"sample_rate": 16000}, "NaN or infinite"),
        (np.zeros(100, dtype=np.float32), {}, "needs its sample_rate"),
        (np.zeros(100, dtype=np.float32), {"sample_rate": 0}, "sample rate 0 is invalid"),
        (np.zeros(100, dtype=np.float32), {"sample_rate": -8000}, "sample rate -8000 is invalid"),
        (np.zeros(100, dtype=np.float32), {"sample_rate": 1_000_000}, "sample rate 1000000 is invalid"),
        (np.zeros((100, 16), dtype=np.float32), {"sample_rate": 16000}, "too many channels"),
        (np.zeros((2, 2, 100), dtype=np.float32), {"sample_rate": 16000}, "1-D or 2-D"),
        (np.zeros(100, dtype=np.complex64), {"sample_rate": 16000}, "unsupported sample type"),
        ("http://example.com/a.wav", {}, "not fetched"),
        ("https://example.com/a.wav", {}, "not fetched"),
        ("data:audio/wav;base64,@@@@", {}, "invalid base64"),
        ("data:audio/wav,RIFF", {}, "base64-encoded"),
        ("data:audio/wav;base64," + base64.b64encode(b"RIFF" + b"\0" * 60).decode(), {}, "not a decodable"),
        ("/no/such/file.wav", {}, "audio file not found"),
        ("A" * 400, {}, "neither base64 of an audio file"),
        ("", {}, "empty"),
        (12345, {}, "unsupported audio source"),
    ],
)
def test_bad_input_names_the_problem(source: object, kwargs: dict, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        load_audio(source, 16000, **kwargs)


def test_empty_wav_file_is_rejected() -> None:
    wav = _wav_bytes(np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="audio is empty"):
        load_audio(wav, 16000)


def test_wav_with_too_many_channels_is_rejected() -> None:
    wav = _wav_bytes(np.zeros((100, 10), dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="10 channels"):
        load_audio(wav, 16000)


def test_nan_in_float_wav_is_rejected() -> None:
    wav = _wav_bytes(np.array([0.0, np.nan, 0.1] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(wav, 16000)


def test_paths_are_refused_when_not_allowed(user_wav: Path) -> None:
    for source in (str(user_wav), user_wav, f"file://{user_wav}", "user1.wav"):
        with pytest.raises(AudioError, match="server-side paths are not allowed"):
            load_audio(source, 16000, base_dir=user_wav.parent, allow_paths=False)
    # Inline audio still works without paths.
    b64 = base64.b64encode(user_wav.read_bytes()).decode()
    assert load_audio(b64, 16000, allow_paths=False).size == sf.info(user_wav).frames
    with pytest.raises(AudioError, match="does not decode to an audio file"):
        load_audio("QUJD" * 40, 16000, allow_paths=False)


def test_max_seconds(user_float: np.ndarray) -> None:
    seconds = user_float.size / 16000
    assert load_audio(user_float, 16000, sample_rate=16000, max_seconds=seconds + 0.1).size == user_float.size
    with pytest.raises(AudioError, match=r"at most 1 s"):
        load_audio(user_float, 16000, sample_rate=16000, max_seconds=1.0)


def test_audio_error_is_a_value_error() -> None:
    assert issubclass(AudioError, ValueError)


def test_pcm16_round_trip_and_clipping() -> None:
    ints = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    floats = ints.astype(np.float32) / 32768
    assert to_pcm16(floats) == ints.astype("<i2").tobytes()
    np.testing.assert_array_equal(pcm16_to_float(to_pcm16(floats)), floats)
    clipped = pcm16_to_float(to_pcm16(np.array([2.0, -2.0], dtype=np.float32)))
    np.testing.assert_array_equal(clipped, np.array([32767, -32768], dtype=np.float32) / 32768)
    with pytest.raises(AudioError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")


def test_encode_wav_round_trips_exactly(user_float: np.ndarray) -> None:
    wav = encode_wav(user_float, 16000)
    info = sf.info(io.BytesIO(wav))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
    np.testing.assert_array_equal(load_audio(wav, 16000), user_float)
    stereo = encode_wav(np.stack([user_float, -user_float], axis=1), 24000)
    samples, rate = decode_audio(stereo)
    assert rate == 24000 and samples.shape == (user_float.size, 2)
    np.testing.assert_array_equal(samples[:, 1], -user_float)
