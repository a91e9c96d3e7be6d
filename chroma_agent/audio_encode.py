"""Reply audio in the formats OpenAI's chat completions offer: wav, pcm16, mp3, flac, opus and aac.

WAV and raw PCM16 need nothing but numpy. The compressed formats are encoded by FFmpeg through PyAV (`av`,
which aiortc already brings in), in the containers OpenAI returns them in: MP3 frames, FLAC, Ogg Opus and AAC
in ADTS frames. All of them can be written piece by piece: :class:`AudioEncoder` turns each 80 ms frame into the
bytes the container has ready, so a stream of deltas concatenates into one playable file.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass, field

import numpy as np

from chroma_agent.audio import encode_wav, to_pcm16

log = logging.getLogger(__name__)

#: Every format a reply may be asked in (what `supported_formats()` offers depends on the FFmpeg build).
OUTPUT_FORMATS = ("wav", "pcm16", "mp3", "flac", "opus", "aac")


@dataclass(frozen=True)
class _Codec:
    container: str
    encoders: tuple[str, ...]  # FFmpeg encoder names, preferred first
    bit_rate: int | None
    options: dict[str, str] = field(default_factory=dict)


# Bit rates for mono speech at 24 kHz. Ogg flushes a page per 80 ms frame instead of once a second, so a
# streamed reply's bytes leave with the frame they carry.
_CODECS = {
    "mp3": _Codec("mp3", ("libmp3lame", "mp3"), 64_000),
    "flac": _Codec("flac", ("flac",), None),
    "opus": _Codec("ogg", ("libopus", "opus"), 32_000, {"page_duration": "80000"}),
    "aac": _Codec("adts", ("aac",), 64_000),
}


class AudioFormatError(ValueError):
    """A format this server cannot encode."""


@functools.cache
def _encoder_name(fmt: str) -> str | None:
    try:
        import av
    except ImportError:
        return None
    spec = _CODECS[fmt]
    if spec.container not in av.formats_available:
        return None
    for name in spec.encoders:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # not in this FFmpeg build
            continue
        return name
    return None


@functools.cache
def supported_formats() -> tuple[str, ...]:
    """The output formats this installation can encode (wav and pcm16 always)."""
    found = tuple(f for f in OUTPUT_FORMATS if f in ("wav", "pcm16") or _encoder_name(f) is not None)
    missing = sorted(set(OUTPUT_FORMATS) - set(found))
    if missing:
        log.info("reply audio formats without an encoder here (PyAV/FFmpeg): %s", ", ".join(missing))
    return found


class _Sink:
    """A write-only file for the muxer: what it writes is taken out after every frame."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer.extend(data)
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class AudioEncoder:
    """Encodes mono float32 samples into one file of `fmt`, piece by piece.

    `push` returns the bytes the container has ready (possibly none yet), `finish` the rest; their
    concatenation is the whole file. With `seekable=True` the container is written into memory and returned
    by `finish` only, so that FLAC and MP3 get their length headers (for whole replies).
    """

    def __init__(self, fmt: str, sample_rate: int, *, seekable: bool = False):
        if fmt not in supported_formats():
            raise AudioFormatError(f"cannot encode {fmt!r} here; supported: {', '.join(supported_formats())}")
        self.format, self.sample_rate, self.seekable = fmt, sample_rate, seekable
        self._pcm: list[np.ndarray] = []
        self._finished = False
        if fmt in ("wav", "pcm16"):
            self._out = None
            return
        import av

        spec = _CODECS[fmt]
        self._file: io.BytesIO | _Sink = io.BytesIO() if seekable else _Sink()
        self._out = av.open(self._file, mode="w", format=spec.container, options=dict(spec.options))
        self._stream = self._out.add_stream(_encoder_name(fmt), rate=sample_rate, layout="mono")
        if spec.bit_rate is not None:
            self._stream.bit_rate = spec.bit_rate

    def _encode(self, frame) -> None:
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def _ready(self) -> bytes:
        return b"" if self.seekable else self._file.take()

    def push(self, samples: np.ndarray) -> bytes:
        if self._finished:
            raise RuntimeError("the encoder is finished")
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._out is None:
            if self.format == "pcm16" and not self.seekable:
                return to_pcm16(samples)
            self._pcm.append(samples)
            return b""
        if samples.size == 0:
            return b""
        import av

        frame = av.AudioFrame.from_ndarray(np.clip(samples, -1.0, 1.0)[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        self._encode(frame)
        return self._ready()

    def finish(self) -> bytes:
        if self._finished:
            return b""
        self._finished = True
        if self._out is None:
            samples = np.concatenate(self._pcm) if self._pcm else np.zeros(0, dtype=np.float32)
            if self.format == "wav":
                return encode_wav(samples, self.sample_rate)
            return to_pcm16(samples)  # pcm16 when seekable (whole reply); streamed pcm16 left nothing here
        self._encode(None)  # flush the encoder
        self._out.close()
        return self._file.getvalue() if self.seekable else self._file.take()

    def close(self) -> None:
        """Release FFmpeg's state without finishing (a cancelled stream)."""
        if not self._finished and self._out is not None:
            self._finished = True
            try:
                self._out.close()
            except Exception:  # closing a half-written container may complain; nothing is kept
                log.debug("closing an unfinished %s encoder", self.format, exc_info=True)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole reply as one file of `fmt` (wav: 16-bit WAV; pcm16: raw 16-bit little-endian mono)."""
    encoder = AudioEncoder(fmt, sample_rate, seekable=True)
    encoder.push(samples)
    return encoder.finish()
