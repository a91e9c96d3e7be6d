"""Hostile and careless audio: checked from the header before it is decoded, decoded in bounded memory.

Each attack is a small file that used to cost far more than its size: 10 min of 8-channel silence as a 237 KB
FLAC (+1 GB RSS), a FLAC whose header claims 2^36 frames (a 256 GiB allocation, then a 500), a header-only
WAV taken for a file name, float samples x1e30 that overflow the model's features. Peak memory is measured in
a fresh subprocess (``ru_maxrss``), where nothing else of the test run pollutes it.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr

from chroma_agent.audio import (
    DEFAULT_MAX_SAMPLES,
    AudioError,
    decode_audio,
    load_audio,
    probe_audio,
    resample,
)
from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

MB = 1024 * 1024


def flac_silence(seconds: int, rate: int, channels: int) -> bytes:
    """A real FLAC of digital silence, written a second at a time (it compresses to a few hundred bytes/s)."""
    buf = io.BytesIO()
    block = np.zeros((rate, channels), dtype=np.int16)
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def with_total_samples(flac: bytes, total: int) -> bytes:
    """``flac`` with STREAMINFO's 36-bit total-samples field replaced (bytes 18..25 hold rate/channels/bits/total)."""
    assert flac[:4] == b"fLaC" and total < 2**36
    out = bytearray(flac)
    word = int.from_bytes(out[18:26], "big")
    out[18:26] = ((word & ~(2**36 - 1)) | total).to_bytes(8, "big")
    return bytes(out)


def wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def attack_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attacks")
    one_second = flac_silence(1, 16000, 1)
    files = {
        "silence_10min_8ch.flac": flac_silence(600, 48000, 8),
        "lying_2e36.flac": with_total_samples(one_second, 2**36 - 1),
        "stereo_299s.flac": flac_silence(299, 48000, 2),
        "hires_30s_8ch.flac": flac_silence(30, 384000, 8),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


_MEASURE = r"""
import json, resource, sys
import numpy as np
from chroma_agent.audio import AudioError, load_audio

def peak_kb():
    # VmHWM is this process's own peak RSS; ru_maxrss would also carry the parent's peak across fork and exec.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:  # not Linux: ru_maxrss (bytes on macOS), good enough when the parent is smaller
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)

# Warm up: imports, soxr, numpy's first allocations are not the file's cost.
load_audio(np.zeros(48000, np.float32), 16000, sample_rate=48000)
data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    out = load_audio(data, 16000, max_seconds=float(sys.argv[2]), allow_paths=False)
    result = f"ok {out.size}"
except AudioError as exc:
    result = f"refused: {exc}"
print(json.dumps({"peak_growth_kb": peak_kb() - before, "result": result}))
"""


def measure(path: Path, max_seconds: float = 300.0) -> tuple[float, str]:
    """(peak RSS growth in MB, outcome) of load_audio on ``path`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(max_seconds)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["peak_growth_kb"] / 1024, report["result"]


def test_ten_minutes_of_8_channel_silence_is_refused_from_its_header(attack_files):
    path = attack_files["silence_10min_8ch.flac"]
    assert path.stat().st_size < 300_000
    info = probe_audio(path.read_bytes())
    assert (info.frames, info.rate, info.channels) == (600 * 48000, 48000, 8)
    t0 = time.perf_counter()
    with pytest.raises(AudioError, match=r"600\.0 s long; at most 300 s"):
        load_audio(path.read_bytes(), 16000, max_seconds=300)
    assert time.perf_counter() - t0 < 0.5  # nothing decoded (a full decode took 3.2 s)
    growth, result = measure(path)
    assert result.startswith("refused") and growth < 20, (growth, result)  # was +1 GB


def test_a_header_claiming_2_to_the_36_frames_is_refused_without_allocating(attack_files):
    path = attack_files["lying_2e36.flac"]
    assert probe_audio(path.read_bytes()).frames == 2**36 - 1
    growth, result = measure(path)
    assert "at most 300 s is accepted" in result and growth < 20, (growth, result)  # was MemoryError (256 GiB)
    # Without a duration limit the hard cap still holds.
    with pytest.raises(AudioError, match="at most 3600 s"):
        load_audio(path.read_bytes(), 16000)
    with pytest.raises(AudioError, match="at most 3600 s"):
        decode_audio(path.read_bytes())


def test_a_flac_that_does_not_state_its_length_is_refused_clearly():
    unknown = with_total_samples(flac_silence(1, 16000, 1), 0)  # "total samples: unknown" in STREAMINFO
    with pytest.raises(AudioError, match="does not state its length"):
        load_audio(unknown, 16000)


def test_accepted_long_audio_decodes_in_bounded_memory(attack_files):
    # 299 s of 48 kHz stereo is accepted; decoding the whole file at once took +169 MB at peak (the
    # 2-channel float32 file, its mono mix, soxr's output). Streaming keeps only the 16 kHz output (19 MB).
    growth, result = measure(attack_files["stereo_299s.flac"])
    assert result == f"ok {299 * 16000}", result
    assert 15 < growth < 80, growth  # the output itself is 19 MB: the measurement sees it


def test_decoded_samples_are_capped_by_channels_times_frames(attack_files):
    # 30 s at 384 kHz x 8 channels is 92M samples: a 100 KB file that would cost seconds of CPU to decode.
    data = attack_files["hires_30s_8ch.flac"].read_bytes()
    t0 = time.perf_counter()
    with pytest.raises(AudioError, match=rf"at most {DEFAULT_MAX_SAMPLES} are decoded"):
        load_audio(data, 16000, max_seconds=300)
    assert time.perf_counter() - t0 < 0.5
    out = load_audio(data, 16000, max_samples=30 * 384000 * 8)
    assert out.size == 30 * 16000 and not out.any()


@pytest.mark.parametrize(("rate", "channels", "subtype"),
                         [(48000, 2, "FLOAT"), (44100, 1, "PCM_16"), (8000, 1, "PCM_16"), (16000, 3, "PCM_24")])
def test_streamed_decoding_equals_decoding_the_whole_file(rate, channels, subtype):
    # Longer than several blocks, so that block edges are crossed; soxr's stream equals its one-shot output.
    rng = np.random.default_rng(rate + channels)
    x = rng.uniform(-0.9, 0.9, (rate * 5 + 123, channels)).astype(np.float32)  # within full scale
    data = wav(x, rate, subtype)
    whole, got_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = whole.mean(axis=1, dtype=np.float32) if channels > 1 else whole[:, 0]
    np.testing.assert_array_equal(load_audio(data, 16000), resample(mono, got_rate, 16000))
    np.testing.assert_array_equal(decode_audio(data)[0], whole)


def test_a_header_only_wav_is_empty_audio_not_a_path():
    header_only = wav(np.zeros(0, np.int16), 16000)
    assert len(header_only) == 44
    for source in (base64.b64encode(header_only).decode(), "data:audio/wav;base64,"
                   + base64.b64encode(header_only).decode(), header_only):
        with pytest.raises(AudioError, match="audio is empty") as info:
            load_audio(source, 16000, allow_paths=False)
        assert info.value.inline
    # A truncated header is inline audio too, refused as such.
    with pytest.raises(AudioError, match="not a decodable audio file") as info:
        load_audio(base64.b64encode(header_only[:20]).decode(), 16000)
    assert info.value.inline


def test_non_finite_samples_are_refused_in_files_and_arrays():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((40000, 2), np.float32)
        x[39000, 1] = bad  # past the first block
        with pytest.raises(AudioError, match="NaN or infinite"):
            load_audio(wav(x, 16000, "FLOAT"), 16000)
        with pytest.raises(AudioError, match="NaN or infinite"):
            load_audio(x, 16000, sample_rate=16000)


@pytest.mark.parametrize("gain", [1.5, 32768.0, 1e30, 3e38])
def test_float_audio_louder_than_full_scale_is_scaled_to_peak_one(gain):
    t = np.arange(48000 * 2) / 48000
    clean = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    stereo = np.stack([clean, 0.5 * clean], axis=1)
    loud = (stereo.astype(np.float64) * (gain / 0.5)).astype(np.float32)  # channel 0 peaks at `gain`
    assert np.isfinite(loud).all()
    expected = load_audio(wav(stereo / np.float32(0.5), 48000, "FLOAT"), 16000)
    for source, kwargs in ((wav(loud, 48000, "FLOAT"), {}), (loud, {"sample_rate": 48000})):
        out = load_audio(source, 16000, **kwargs)
        assert np.isfinite(out).all() and np.abs(out).max() <= 1.01
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_audio_within_full_scale_is_untouched(golden_dir):
    data = (golden_dir / "user1.wav").read_bytes()
    ints, _ = sf.read(io.BytesIO(data), dtype="int16")
    np.testing.assert_array_equal(load_audio(data, 16000), ints.astype(np.float32) / np.float32(32768))
    full = np.array([1.0, -1.0, 0.25] * 1000, np.float32)
    np.testing.assert_array_equal(load_audio(full, 16000, sample_rate=16000), full)


def test_soxr_stream_equals_one_shot_across_rates():
    # The property streamed decoding rests on, checked at the rates clients send.
    x = np.random.default_rng(0).standard_normal(44100 * 3).astype(np.float32) * 0.1
    for source, target in ((44100, 16000), (48000, 24000), (8000, 16000), (22050, 24000)):
        stream = soxr.ResampleStream(source, target, 1, dtype="float32", quality="HQ")
        parts = [stream.resample_chunk(x[i:i + 32768]) for i in range(0, x.size, 32768)]
        parts.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
        np.testing.assert_array_equal(np.concatenate(parts), soxr.resample(x, source, target, quality="HQ"))


# --- through the server -----------------------------------------------------------------------------------


@pytest.fixture()
def server(make_engine, golden_voice, tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2)
    with ServerThread(create_app(engine, ServerSettings(assets_dir=assets))) as running:
        yield running.url


def _ask(url: str, audio: str, **extra) -> httpx.Response:
    payload = {"model": "chroma", "max_tokens": 2, **extra,
               "messages": [{"role": "user", "content": [{"type": "audio", "audio": audio}]}]}
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60)


def _error(response: httpx.Response, status: int, code: str | None) -> str:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "messages[0].content[0]", error
    return error["message"]


def test_the_server_answers_every_audio_attack_with_a_400(server, attack_files):
    b64 = {name: base64.b64encode(path.read_bytes()).decode() for name, path in attack_files.items()}
    t0 = time.perf_counter()
    assert "at most 300 s is accepted" in _error(_ask(server, b64["silence_10min_8ch.flac"]), 400, "invalid_audio")
    assert time.perf_counter() - t0 < 2
    assert "at most 300 s is accepted" in _error(_ask(server, b64["lying_2e36.flac"]), 400, "invalid_audio")
    assert "are decoded" in _error(_ask(server, b64["hires_30s_8ch.flac"]), 400, "invalid_audio")
    # The server has an assets folder, yet inline audio that fails is never retried as a file name.
    header_only = base64.b64encode(wav(np.zeros(0, np.int16), 16000)).decode()
    assert "audio is empty" in _error(_ask(server, header_only), 400, "invalid_audio")
    # A path component longer than the file system allows is the client's mistake, not a 500.
    message = _error(_ask(server, "a" * 1000 + ".wav"), 400, "audio_not_found")
    assert "File name too long" in message or "not found" in message
    nan = base64.b64encode(wav(np.array([0.0, np.nan] * 8000, np.float32), 16000, "FLOAT")).decode()
    assert "NaN or infinite" in _error(_ask(server, nan), 400, "invalid_audio")


def test_x1e30_float_audio_is_scaled_and_the_server_keeps_answering(server):
    t = np.arange(16000) / 16000
    loud = (np.sin(2 * np.pi * 220 * t) * 1e30).astype(np.float32)
    r = _ask(server, base64.b64encode(wav(loud, 16000, "FLOAT")).decode())
    assert r.status_code == 200, r.text[:500]
    again = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                       json={"model": "chroma", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert again.status_code == 200, again.text[:500]


def test_max_audio_samples_is_a_server_setting(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    stereo = base64.b64encode(wav(np.zeros((16000, 2), np.int16), 16000)).decode()  # 32,000 samples
    with ServerThread(create_app(engine, ServerSettings(max_audio_samples=20_000))) as running:
        assert "at most 20000 are decoded" in _error(_ask(running.url, stereo), 400, "invalid_audio")
    with pytest.raises(ValueError, match="max_audio_samples"):
        ServerSettings(max_audio_samples=0)

