"""Audio conversion for the whole project: decode, validate, downmix and resample.

Every place that turns user-supplied audio (files, bytes, base64, data URLs, arrays) into samples goes through
:func:`load_audio`, so that the servers, the processor and the tests agree on one set of rules and one set of
error messages.

Conventions:

* Samples are float32 in [-1, 1]; 16-bit integers map by ``x / 32768`` (what soundfile, librosa and
  torchaudio all do, so a WAV read here equals the reference's tensor bit for bit).
* Multi-channel audio is downmixed by the channel mean *before* resampling, like ``librosa.load(mono=True)``.
* Resampling uses soxr at quality ``"HQ"`` (librosa's default ``res_type="soxr_hq"``) and the output length is
  ``ceil(n * target / source)``, which is the length librosa enforces after soxr; so user audio at another rate
  is resampled like the reference's ``librosa.load(path, sr=16000)``.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE",
    "AudioError",
    "AudioSource",
    "decode_audio",
    "encode_wav",
    "load_audio",
    "pcm16_to_float",
    "resample",
    "to_pcm16",
]

#: Anything above this is a mistake (e.g. samples passed as the rate), not a real recording.
MAX_SAMPLE_RATE = 384_000
#: 7.1 surround is the widest layout we expect; wider arrays are almost surely transposed or not audio.
MAX_CHANNELS = 8

AudioSource = Any  # bytes | bytearray | memoryview | np.ndarray | str | Path (torch tensors are duck-typed)

# Leading bytes of the containers we accept inside base64 text. Only used to tell base64 audio from a
# file name: soundfile has the final word on whether the bytes decode.
_AUDIO_MAGIC: tuple[bytes, ...] = (
    b"RIFF",  # WAV
    b"RF64",  # WAV > 4 GiB
    b"fLaC",  # FLAC
    b"OggS",  # Ogg Vorbis / Opus / FLAC
    b"ID3",  # MP3 with a tag
    b"\xff\xfb",  # MP3 frame sync (MPEG-1 layer III)
    b"\xff\xf3",
    b"\xff\xf2",
    b"FORM",  # AIFF
)
_B64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
# Below this a string is treated as a path: even a 1 ms WAV is longer once base64-encoded.
_MIN_B64_CHARS = 64
_WS_RE = re.compile(r"\s+")


class AudioError(ValueError):
    """Audio the caller sent cannot be used; the message says why and is safe to show to the client."""


def _check_rate(rate: Any) -> int:
    try:
        value = int(rate)
    except (TypeError, ValueError):
        raise AudioError(f"sample rate {rate!r} is invalid") from None
    if value != rate or value <= 0 or value > MAX_SAMPLE_RATE:
        raise AudioError(f"sample rate {rate} is invalid (expected 1..{MAX_SAMPLE_RATE} Hz)")
    return value


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an in-memory audio file (WAV/FLAC/OGG, and MP3 where libsndfile supports it).

    Returns ``(samples, rate)`` with samples float32 and always 2-D ``[samples, channels]``: keeping the channel
    axis lets callers decide how to downmix instead of guessing from the shape.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AudioError(f"expected audio file bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AudioError("audio is empty (0 bytes)")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        logger.debug("soundfile could not decode %d bytes: %s", len(data), exc)
        raise AudioError("not a decodable audio file (WAV/FLAC/OGG expected)") from None
    return np.ascontiguousarray(samples, dtype=np.float32), _check_rate(rate)


def _downmix(x: np.ndarray, channel_axis: int) -> np.ndarray:
    if x.shape[channel_axis] > MAX_CHANNELS:
        raise AudioError(f"audio has {x.shape[channel_axis]} channels (at most {MAX_CHANNELS})")
    mono = x.mean(axis=channel_axis, dtype=np.float32) if x.shape[channel_axis] > 1 else x.reshape(-1)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _array_to_mono(array: np.ndarray) -> np.ndarray:
    """Integer PCM to float and channels to mono; the layout rules are documented in :func:`load_audio`."""
    if array.dtype == np.int16:
        x = array.astype(np.float32) / np.float32(32768.0)
    elif array.dtype == np.int32:
        x = (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif array.dtype == np.uint8:  # 8-bit WAV convention: unsigned, centred on 128
        x = (array.astype(np.float32) - np.float32(128.0)) / np.float32(128.0)
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32, copy=False)
    else:
        raise AudioError(f"unsupported sample type {array.dtype} (int16, int32, uint8 or float expected)")

    if x.size == 0:
        raise AudioError("audio is empty (0 samples)")
    if x.ndim == 1:
        return np.ascontiguousarray(x)
    if x.ndim != 2:
        raise AudioError(f"audio array must be 1-D or 2-D, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    # [samples, channels] is soundfile's layout and wins when both axes are small; [channels, samples] is
    # torch's and librosa's.
    if cols <= MAX_CHANNELS:
        return _downmix(x, 1)
    if rows <= MAX_CHANNELS:
        return _downmix(x, 0)
    raise AudioError(f"audio array of shape {tuple(x.shape)} has too many channels (at most {MAX_CHANNELS})")


def _looks_like_base64_audio(text: str) -> bytes | None:
    """Decoded bytes when ``text`` is base64 of a known audio container, else None (then it is a path)."""
    compact = _WS_RE.sub("", text)
    if len(compact) < _MIN_B64_CHARS or len(compact) % 4 != 0 or not _B64_RE.match(compact):
        return None
    urlsafe = "-" in compact or "_" in compact
    try:
        head = base64.b64decode(compact[:16], altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not head.startswith(_AUDIO_MAGIC):
        return None
    return _b64decode(compact, urlsafe=urlsafe)


def _b64decode(text: str, *, urlsafe: bool = False) -> bytes:
    compact = _WS_RE.sub("", text)
    if urlsafe or "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise AudioError("invalid base64 audio data") from None


def _resolve_path(text: str | Path, base_dir: Path | None) -> Path:
    path = (
        Path(text[len("file://") :]) if isinstance(text, str) and text.startswith("file://") else Path(text)
    )
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        exists = path.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...: cannot be a file we could read
        exists = False
    if not exists:
        shown = str(text)
        if len(shown) >= _MIN_B64_CHARS and _B64_RE.match(_WS_RE.sub("", shown)):
            # Long text in the base64 alphabet is far more likely failed base64 than a file name.
            raise AudioError("neither base64 of an audio file (WAV/FLAC/OGG expected) nor an existing file")
        raise AudioError(f"audio file not found: {shown[:200]}")
    return path


def _decoded_to_mono(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = decode_audio(data)
    return _downmix(samples, 1), rate


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AudioError(f"cannot read audio file {path.name}: {exc.strerror or exc}") from None
    try:
        return _decoded_to_mono(data)
    except AudioError as exc:
        raise AudioError(f"{path.name}: {exc}") from None


def _source_to_mono(
    source: AudioSource, sample_rate: int | None, base_dir: Path | None, allow_paths: bool
) -> tuple[np.ndarray, int]:
    """Any accepted source to ``(mono float32 samples, rate)``."""
    if hasattr(source, "detach") and hasattr(source, "cpu"):  # a torch tensor, without importing torch here
        source = source.detach().cpu().numpy()

    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError("an audio array needs its sample_rate")
        rate = _check_rate(sample_rate)
        return _array_to_mono(source), rate

    if isinstance(source, bytes | bytearray | memoryview):
        return _decoded_to_mono(bytes(source))

    if isinstance(source, Path):
        if not allow_paths:
            raise AudioError("server-side paths are not allowed; send the audio inline (base64 or data URL)")
        return _read_file(_resolve_path(source, base_dir))

    if not isinstance(source, str):
        raise AudioError(
            f"unsupported audio source of type {type(source).__name__} "
            "(bytes, base64 text, data URL, file path or array expected)"
        )

    text = source.strip()
    if not text:
        raise AudioError("audio is empty (empty string)")
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise AudioError("data URL must be base64-encoded (data:audio/wav;base64,...)")
        return _decoded_to_mono(_b64decode(payload))
    if lowered.startswith(("http://", "https://")):
        raise AudioError("audio URLs are not fetched; send the audio inline (base64 or data URL)")

    decoded = _looks_like_base64_audio(text)
    if decoded is not None:
        return _decoded_to_mono(decoded)

    if not allow_paths:
        if len(text) >= _MIN_B64_CHARS and _B64_RE.match(_WS_RE.sub("", text)):
            raise AudioError("base64 data does not decode to an audio file (WAV/FLAC/OGG expected)")
        raise AudioError("server-side paths are not allowed; send the audio inline (base64 or data URL)")
    return _read_file(_resolve_path(text, base_dir))


def resample(x: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 resampling with the length librosa enforces, so the mel frame count matches the reference."""
    if source_rate == target_rate:
        return x
    y = soxr.resample(x, source_rate, target_rate, quality="HQ")
    want = math.ceil(len(x) * target_rate / source_rate)
    if len(y) < want:
        y = np.pad(y, (0, want - len(y)))
    return np.ascontiguousarray(y[:want], dtype=np.float32)


def load_audio(
    source: AudioSource,
    target_rate: int,
    *,
    sample_rate: int | None = None,
    base_dir: Path | None = None,
    allow_paths: bool = True,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Any accepted audio source to mono float32 samples at ``target_rate``.

    ``source`` may be raw file bytes; a numpy array (1-D mono, or 2-D ``[samples, channels]`` /
    ``[channels, samples]`` with at most 8 channels, ``sample_rate=`` required; int16/int32/uint8 are scaled
    to [-1, 1]); a ``data:...;base64,`` URL; bare base64 text of an audio file; or, when ``allow_paths`` is true,
    a file path (``str``/``Path``, optional ``file://`` prefix, relative to ``base_dir`` when given). http(s)
    URLs are refused: nothing is ever fetched.

    Raises :class:`AudioError` for anything unusable, including audio longer than ``max_seconds``.
    """
    target_rate = _check_rate(target_rate)
    mono, rate = _source_to_mono(source, sample_rate, base_dir, allow_paths)
    if mono.size == 0:
        raise AudioError("audio is empty (0 samples)")
    if not np.isfinite(mono).all():
        raise AudioError("audio contains NaN or infinite samples")
    seconds = mono.size / rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio is {seconds:.1f} s long; at most {max_seconds:g} s is accepted")
    out = resample(mono, rate, target_rate)
    if out.size == 0:
        raise AudioError(f"audio is too short ({mono.size} samples at {rate} Hz)")
    return out


def to_pcm16(x: np.ndarray) -> bytes:
    """Float samples to little-endian 16-bit PCM; scale 32768 so :func:`pcm16_to_float` inverts it exactly."""
    scaled = np.rint(np.asarray(x, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def pcm16_to_float(b: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM bytes to float32 samples (interleaved channels stay interleaved)."""
    if len(b) % 2:
        raise AudioError(f"16-bit PCM needs an even number of bytes, got {len(b)}")
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def encode_wav(x: np.ndarray, rate: int) -> bytes:
    """A 16-bit PCM WAV file in memory; quantised by :func:`to_pcm16` so reading it back is exact."""
    rate = _check_rate(rate)
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise AudioError(f"audio to encode must be 1-D or [samples, channels], got shape {tuple(arr.shape)}")
    pcm = np.frombuffer(to_pcm16(arr), dtype="<i2").reshape(arr.shape)
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()
