"""Cloned voices: made once from a reference clip and its transcript, then reused by name.

Cloning needs the clip only to compute its Mimi codes, and the backbone's voice prefix needs only those codes and
the transcript's token ids (see :meth:`ChromaModel.voice_prefix`). So a voice is stored as those two small tensors
plus a little metadata, in one ``<name>.safetensors`` file: reusing a voice never re-encodes audio, the raw
recording is not kept, and loading a file cannot run code (unlike pickles).

Codes are only meaningful for the codec and tokenizer that made them, so each profile carries a
:func:`fingerprint` of the model configuration it was made with.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from chroma_agent.audio import AudioSource
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.processor import ChromaProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CLIP_SECONDS",
    "MAX_TRANSCRIPT_CHARS",
    "MIN_CLIP_SECONDS",
    "UnknownVoiceError",
    "VoiceError",
    "VoiceProfile",
    "VoiceStore",
    "VoiceClip",
    "create_voice_profile",
    "finish_voice_profile",
    "prepare_voice_clip",
    "fingerprint",
    "validate_voice_name",
]

#: Shorter clips give the backbone too little of the voice to imitate.
MIN_CLIP_SECONDS = 1.0
#: Longer clips only lengthen every request's prefix; the reference uses short prompts.
MAX_CLIP_SECONDS = 30.0
#: Far more than 30 s of speech can hold; a longer "transcript" is a mistake and would bloat the prefix.
MAX_TRANSCRIPT_CHARS = 2000
#: A clip whose RMS or peak is below these is silence (or near-silent noise): nothing to clone.
SILENCE_RMS = 1e-4
SILENCE_PEAK = 1e-3

MAX_NAME_CHARS = 64
SUFFIX = ".safetensors"
FORMAT = "chroma-agent-voice"
FORMAT_VERSION = "1"
ENV_DIR = "CHROMA_VOICES_DIR"
DEFAULT_DIR = Path("~/.cache/chroma-agent/voices")

# A voice file holds two small int64 tensors (a 30 s clip is 32 x 375 codes at most); anything much bigger is
# not one of ours, and refusing it early avoids mapping a huge file.
_MAX_FILE_BYTES = 16 * 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_META_FIELDS = ("name", "transcript", "duration_s", "created_at", "model_fingerprint")
# codec_config keys that do not change which codes a clip gets (runtime dtype, bookkeeping).
_FINGERPRINT_IGNORED = frozenset(
    {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}
)


class VoiceError(ValueError):
    """A voice cannot be made, stored or loaded; the message says why and is safe to show to the client."""


class UnknownVoiceError(VoiceError, KeyError):
    """No voice of that name: a ``KeyError`` too, so servers can answer 404 and dict-like callers can catch it."""

    def __init__(self, name: str):
        super().__init__(f"unknown voice {name!r}")
        self.voice = name

    def __str__(self) -> str:  # KeyError's __str__ would quote the whole message
        return str(self.args[0])


def validate_voice_name(name: str) -> str:
    """The name unchanged if it is safe as a file name everywhere, else a :class:`VoiceError` naming the rule.

    Names become file names, so the rules are strict and ASCII-only: look-alike letters (``café``,
    Cyrillic ``а``) would let two voices appear to share a name, and separators or ``..`` could leave the folder.
    """
    if not isinstance(name, str):
        raise VoiceError(f"voice name must be a string, got {type(name).__name__}")
    if not name:
        raise VoiceError("voice name is empty")
    if "\x00" in name:
        raise VoiceError("voice name contains a NUL character")
    if "/" in name or "\\" in name:
        raise VoiceError(f"voice name {name!r} contains a path separator ('/' or '\\')")
    if not name.isascii():
        raise VoiceError(
            f"voice name {name!r} contains non-ASCII characters (use A-Z, a-z, 0-9, '_', '.', '-')"
        )
    if len(name) > MAX_NAME_CHARS:
        raise VoiceError(f"voice name is {len(name)} characters long (at most {MAX_NAME_CHARS})")
    if not name[0].isalnum():
        raise VoiceError(f"voice name {name!r} must start with a letter or digit")
    if ".." in name:
        raise VoiceError(f"voice name {name!r} contains '..'")
    if name.endswith("."):
        raise VoiceError(f"voice name {name!r} must not end with '.'")
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not (c.isalnum() or c in "_.-")})
        raise VoiceError(f"voice name {name!r} contains {''.join(bad)!r} (use A-Z, a-z, 0-9, '_', '.', '-')")
    return name


def fingerprint(config: ChromaConfig) -> str:
    """A short hash of what decides a clip's codes and a transcript's ids.

    Profiles made with a different codec or tokenizer would silently produce a wrong voice, so the engine can
    compare this with its own model's before using a stored profile.
    """
    raw = config.raw
    codec = {k: v for k, v in dict(raw.get("codec_config") or {}).items() if k not in _FINGERPRINT_IGNORED}
    payload = {
        "codec_config": codec,
        "text_vocab_size": config.text.vocab_size,
        "num_codebooks": config.num_codebooks,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _content_id(text_ids: torch.Tensor, codes: torch.Tensor) -> str:
    """Hash of the tensors' values and shapes (little-endian int64), independent of device and memory layout."""
    h = hashlib.sha256(b"chroma-voice-v1")
    for t in (text_ids, codes):
        arr = np.ascontiguousarray(t.detach().cpu().numpy().astype("<i8", copy=False))
        h.update(repr(tuple(arr.shape)).encode("ascii"))
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _as_cpu_long(t: Any, what: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise VoiceError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise VoiceError(f"{what} must be int64, got {t.dtype}")
    if t.ndim != ndim or t.numel() == 0:
        raise VoiceError(f"{what} must be a non-empty {ndim}-D tensor, got shape {tuple(t.shape)}")
    if bool((t < 0).any()):
        raise VoiceError(f"{what} contains negative values")
    # A private CPU copy: inference-mode tensors from the codec cannot be used in autograd code later, and the
    # profile must not change when the caller's tensor does.
    return t.detach().to("cpu").clone().contiguous()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, eq=False)
class VoiceProfile:
    """One cloned voice: everything the backbone prefix needs, without the recording.

    Tensors are private CPU copies; treat them as read-only (the :attr:`id` is computed once and cached).
    """

    name: str
    transcript: str
    text_ids: torch.Tensor  # int64 [T], transcript ids without special tokens
    codes: torch.Tensor  # int64 [K, frames], the clip's first K Mimi codebooks
    duration_s: float
    created_at: str = field(default_factory=_utc_now)  # ISO 8601, UTC
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        validate_voice_name(self.name)
        if not isinstance(self.transcript, str) or not self.transcript.strip():
            raise VoiceError(f"voice {self.name!r}: transcript is empty")
        object.__setattr__(self, "text_ids", _as_cpu_long(self.text_ids, "text_ids", 1))
        object.__setattr__(self, "codes", _as_cpu_long(self.codes, "codes", 2))
        try:
            duration = float(self.duration_s)
        except (TypeError, ValueError):
            raise VoiceError(f"voice {self.name!r}: duration_s {self.duration_s!r} is not a number") from None
        if not math.isfinite(duration) or duration <= 0:
            raise VoiceError(f"voice {self.name!r}: duration_s {self.duration_s!r} must be positive")
        object.__setattr__(self, "duration_s", duration)
        try:
            when = datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise VoiceError(f"voice {self.name!r}: created_at {self.created_at!r} is not ISO 8601") from None
        if when.utcoffset() is None:
            raise VoiceError(f"voice {self.name!r}: created_at {self.created_at!r} has no UTC offset")
        if not isinstance(self.model_fingerprint, str):
            raise VoiceError(f"voice {self.name!r}: model_fingerprint must be a string")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VoiceProfile):
            return NotImplemented
        return (
            self.name == other.name
            and self.transcript == other.transcript
            and self.duration_s == other.duration_s
            and self.created_at == other.created_at
            and self.model_fingerprint == other.model_fingerprint
            and torch.equal(self.text_ids, other.text_ids)
            and torch.equal(self.codes, other.codes)
        )

    def __hash__(self) -> int:
        return hash((self.name, self.id))

    def __repr__(self) -> str:
        return (
            f"VoiceProfile(name={self.name!r}, id={self.id!r}, frames={self.frames}, "
            f"duration_s={self.duration_s:.2f}, created_at={self.created_at!r})"
        )

    @cached_property
    def id(self) -> str:
        """Stable hash of the codes and transcript ids: the key for caching this voice's backbone prefix.

        Depends on content only, so renaming a voice or re-saving it keeps the cache warm, and two names for the
        same clip share one cached prefix.
        """
        return _content_id(self.text_ids, self.codes)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_codebooks(self) -> int:
        return int(self.codes.shape[0])

    def is_compatible(self, config: ChromaConfig) -> bool:
        """Whether ``config``'s codec and tokenizer are the ones these codes and ids were made with."""
        return self.model_fingerprint == fingerprint(config)

    def require_compatible(self, config: ChromaConfig) -> None:
        """Refuse a profile made for another codec/tokenizer: it would load fine and sound wrong."""
        expected = fingerprint(config)
        if self.model_fingerprint != expected:
            raise VoiceError(
                f"voice {self.name!r} was made for model {self.model_fingerprint or '(unknown)'}, "
                f"not this model ({expected}); clone it again from its clip"
            )
        if self.num_codebooks != config.num_codebooks:
            raise VoiceError(
                f"voice {self.name!r} has {self.num_codebooks} codebooks; the model uses {config.num_codebooks}"
            )

    def to_json(self) -> dict[str, Any]:
        """What an API may show about a voice; the tensors stay server-side."""
        return {
            "name": self.name,
            "transcript": self.transcript,
            "duration_s": self.duration_s,
            "frames": self.frames,
            "created_at": self.created_at,
        }

    def _metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "transcript": self.transcript,
            "duration_s": repr(self.duration_s),  # repr round-trips a float exactly
            "created_at": self.created_at,
            "model_fingerprint": self.model_fingerprint,
        }

    def save(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write ``<folder>/<name>.safetensors`` so readers see either the old file or the new one, never half.

        With ``overwrite=False`` the final step is a hard link, which fails atomically if the name was taken in
        the meantime (even by another process).
        """
        folder = Path(folder).expanduser()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{validate_voice_name(self.name)}{SUFFIX}"
        data = save_safetensors({"text_ids": self.text_ids, "codes": self.codes}, metadata=self._metadata())
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise VoiceError(f"voice {self.name!r} already exists") from None
                except OSError:  # filesystems without hard links: best effort, the store's lock still holds
                    if path.exists() or path.is_symlink():
                        raise VoiceError(f"voice {self.name!r} already exists") from None
                    os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info(
            "voice %r: saved %d frames to %s", self.name, self.frames, path, extra={"voice": self.name}
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> VoiceProfile:
        """Read a voice file; everything in it is validated, and its ``name`` is never used to build a path."""
        path = Path(path)
        shown = path.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise VoiceError(f"voice file not found: {shown}") from None
        except OSError as exc:
            raise VoiceError(f"cannot read voice file {shown}: {exc.strerror or exc}") from None
        if size > _MAX_FILE_BYTES:
            raise VoiceError(
                f"voice file {shown} is {size} bytes; not a voice file (at most {_MAX_FILE_BYTES})"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in ("text_ids", "codes") if k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            logger.debug("voice file %s does not load: %s", path, exc)
            raise VoiceError(f"voice file {shown} is corrupt or not a safetensors file") from None
        return cls._from_parts(shown, metadata, tensors)

    @classmethod
    def _from_parts(
        cls, shown: str, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]
    ) -> VoiceProfile:
        if metadata.get("format") != FORMAT:
            raise VoiceError(
                f"voice file {shown} is not a chroma-agent voice (format {metadata.get('format')!r})"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise VoiceError(
                f"voice file {shown} has format version {metadata.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}"
            )
        missing = [k for k in _META_FIELDS if k not in metadata] + [
            k for k in ("text_ids", "codes") if k not in tensors
        ]
        if missing:
            raise VoiceError(f"voice file {shown} is missing {', '.join(missing)}")
        try:
            return cls(
                name=metadata["name"],
                transcript=metadata["transcript"],
                text_ids=tensors["text_ids"],
                codes=tensors["codes"],
                duration_s=metadata["duration_s"],  # type: ignore[arg-type]  # checked and converted in __post_init__
                created_at=metadata["created_at"],
                model_fingerprint=metadata["model_fingerprint"],
            )
        except VoiceError as exc:
            raise VoiceError(f"voice file {shown}: {exc}") from None


@dataclass(frozen=True)
class VoiceClip:
    """A voice clip checked and resampled to the codec rate, with its transcript's ids: ready to encode."""

    name: str | None
    transcript: str
    text_ids: torch.Tensor  # int64 [T]
    waveform: torch.Tensor  # float32 [samples] at the codec rate
    duration_s: float


def prepare_voice_clip(
    config: ChromaConfig,
    processor: ChromaProcessor,
    audio: AudioSource,
    transcript: str,
    *,
    name: str | None = None,
    sample_rate: int | None = None,
    allow_paths: bool = True,
) -> VoiceClip:
    """Everything of cloning but the Mimi encode: checks, decoding, resampling, tokenizing (any thread)."""
    if name is not None:
        validate_voice_name(name)
    if not isinstance(transcript, str) or not transcript.strip():
        raise VoiceError("transcript is empty: give the exact words spoken in the clip")
    transcript = transcript.strip()
    if len(transcript) > MAX_TRANSCRIPT_CHARS:
        raise VoiceError(
            f"transcript is {len(transcript)} characters; at most {MAX_TRANSCRIPT_CHARS} for a "
            f"{MAX_CLIP_SECONDS:g} s clip"
        )
    rate = int(config.sample_rate)
    if processor.voice_sample_rate != rate:
        raise VoiceError(
            f"processor resamples voices to {processor.voice_sample_rate} Hz but the codec runs at {rate} Hz: "
            "model and processor come from different checkpoints"
        )
    try:
        prompt = processor.encode_voice_prompt(
            transcript, audio, sample_rate=sample_rate, allow_paths=allow_paths, max_seconds=MAX_CLIP_SECONDS
        )
    except ValueError as exc:  # AudioError included
        # load_audio checks the length before resampling, so an hour-long upload is refused cheaply.
        raise VoiceError(f"voice clip: {exc}") from exc

    wave = prompt.waveform.reshape(-1)
    duration = wave.numel() / rate
    if duration < MIN_CLIP_SECONDS:
        raise VoiceError(f"voice clip is {duration:.2f} s long; at least {MIN_CLIP_SECONDS:g} s is needed")
    if duration > MAX_CLIP_SECONDS + 1.0 / rate:  # resampling may round the length up by one sample
        raise VoiceError(f"voice clip is {duration:.1f} s long; at most {MAX_CLIP_SECONDS:g} s is accepted")
    if not bool(torch.isfinite(wave).all()):
        raise VoiceError("voice clip has non-finite samples (NaN or infinity)")
    rms = float(wave.double().pow(2).mean().sqrt())
    peak = float(wave.abs().max())
    if rms < SILENCE_RMS or peak < SILENCE_PEAK:
        raise VoiceError(f"voice clip is silent (RMS {rms:.1e}, peak {peak:.1e}): nothing to clone")
    return VoiceClip(name, transcript, prompt.text_ids.reshape(-1), wave, duration)


def finish_voice_profile(config: ChromaConfig, clip: VoiceClip, codes: torch.Tensor) -> VoiceProfile:
    """The profile of a prepared clip, given its Mimi codes [K, frames]."""
    if codes.ndim != 2 or codes.shape[0] != config.num_codebooks or codes.shape[1] == 0:
        raise VoiceError(f"the codec returned codes of shape {tuple(codes.shape)}; expected [K, frames]")
    voice_name = clip.name if clip.name is not None else f"voice-{_content_id(clip.text_ids, codes)[:8]}"
    profile = VoiceProfile(
        name=voice_name,
        transcript=clip.transcript,
        text_ids=clip.text_ids,
        codes=codes,
        duration_s=clip.duration_s,
        model_fingerprint=fingerprint(config),
    )
    logger.info(
        "voice %r: cloned %.2f s clip into %d frames x %d codebooks (id %s)",
        profile.name,
        clip.duration_s,
        profile.frames,
        profile.num_codebooks,
        profile.id,
        extra={"voice": profile.name},
    )
    return profile


def create_voice_profile(
    model: ChromaModel,
    processor: ChromaProcessor,
    audio: AudioSource,
    transcript: str,
    *,
    name: str | None = None,
    sample_rate: int | None = None,
    allow_paths: bool = True,
) -> VoiceProfile:
    """Clone a voice once: the clip's codes and the transcript's ids, ready to be stored and reused.

    ``audio`` is anything :func:`chroma_agent.audio.load_audio` accepts, at any rate, mono or multi-channel.
    The transcript must be what the clip says: the backbone learns the voice from the pairing. (A running
    engine clones with `Engine.create_voice`, which does the same off its step loop.)
    """
    clip = prepare_voice_clip(model.config, processor, audio, transcript, name=name, sample_rate=sample_rate,
                              allow_paths=allow_paths)
    return finish_voice_profile(model.config, clip, model.encode_voice_codes(clip.waveform).to("cpu"))


class VoiceStore:
    """A folder of voice files, one per name, shared by the CLI and the servers.

    Writes and deletes take a lock so concurrent requests cannot interleave; reads need none because every
    write replaces the file atomically.
    """

    def __init__(self, folder: str | Path | None = None):
        if folder is None:
            env = os.environ.get(ENV_DIR, "").strip()
            folder = Path(env) if env else DEFAULT_DIR
        self.folder = Path(folder).expanduser()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VoiceStore({str(self.folder)!r})"

    def path_for(self, name: str) -> Path:
        """Where voice ``name`` lives; refuses names and symlinks that could point outside the folder."""
        validate_voice_name(name)
        path = self.folder / f"{name}{SUFFIX}"
        if path.is_symlink():
            raise VoiceError(f"voice {name!r}: {path.name} is a symlink; refusing to follow it")
        root = self.folder.resolve()
        if path.resolve().parent != root:
            raise VoiceError(f"voice {name!r} resolves outside the voice folder")
        return path

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            return self.path_for(name).is_file()
        except VoiceError:
            return False

    def names(self) -> builtins.list[str]:
        """Names with a file in the folder, sorted; nothing is read or validated beyond the file name."""
        if not self.folder.is_dir():
            return []
        out = []
        for entry in self.folder.iterdir():
            if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                continue
            out.append(entry.name[: -len(SUFFIX)])
        return sorted(out)

    def list(self) -> builtins.list[VoiceProfile]:
        """Every readable voice, sorted by name; one bad file must not hide the others, so it is only logged."""
        profiles = []
        for name in self.names():
            try:
                profiles.append(self._load(name))
            except VoiceError as exc:
                logger.warning("voice %r: skipped: %s", name, exc, extra={"voice": name})
        return profiles

    def get(self, name: str) -> VoiceProfile:
        path = self.path_for(name)
        if not path.is_file():
            raise UnknownVoiceError(name)
        return self._load(name)

    def _load(self, name: str) -> VoiceProfile:
        path = self.path_for(name)
        try:
            profile = VoiceProfile.load(path)
        except VoiceError as exc:
            if not path.exists():  # deleted between the listing and the read
                raise UnknownVoiceError(name) from exc
            raise
        if profile.name != name:
            # The store is keyed by file name (a renamed file is a renamed voice); the name inside is a label.
            logger.warning(
                "voice %r: file says its name is %r; using the file name",
                name,
                profile.name,
                extra={"voice": name},
            )
            profile = replace(profile, name=name)
        return profile

    def save(self, profile: VoiceProfile, *, overwrite: bool = False) -> Path:
        """Store ``profile`` under its name; an existing voice is only replaced when asked."""
        if not isinstance(profile, VoiceProfile):
            raise VoiceError(f"expected a VoiceProfile, got {type(profile).__name__}")
        with self._lock:
            path = self.path_for(profile.name)
            if not overwrite and path.exists():
                raise VoiceError(f"voice {profile.name!r} already exists")
            return profile.save(self.folder, overwrite=overwrite)

    def delete(self, name: str) -> None:
        with self._lock:
            path = self.path_for(name)
            try:
                path.unlink()
            except FileNotFoundError:
                raise UnknownVoiceError(name) from None
        logger.info("voice %r: deleted", name, extra={"voice": name})
