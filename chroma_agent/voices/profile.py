"""The voice profile and its file format: what a cloned voice is, and how it is stored.

Cloning needs the clip only to compute its Mimi codes, and the backbone's voice prefix needs only those codes and
the transcript's token ids (see :meth:`ChromaModel.voice_prefix`). So a voice is stored as those two small tensors
plus a little metadata, in one ``<name>.safetensors`` file: reusing a voice never re-encodes audio, the raw
recording is not kept, and loading a file cannot run code (unlike pickles).

Codes are only meaningful for the codec and tokenizer that made them, so each profile carries a
:func:`fingerprint` of the model configuration it was made with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from chroma_agent.model.config import ChromaConfig
from chroma_agent.voices.names import VoiceError, validate_voice_name

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "SUFFIX", "VoiceProfile", "content_id", "fingerprint"]

SUFFIX = ".safetensors"
FORMAT = "chroma-agent-voice"
FORMAT_VERSION = "1"

# A voice file holds two small int64 tensors (a 30 s clip is 32 x 375 codes at most); anything much bigger is
# not one of ours, and refusing it early avoids mapping a huge file.
_MAX_FILE_BYTES = 16 * 1024 * 1024
_META_FIELDS = ("name", "transcript", "duration_s", "created_at", "model_fingerprint")
# codec_config keys that do not change which codes a clip gets (runtime dtype, bookkeeping).
_FINGERPRINT_IGNORED = frozenset(
    {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}
)


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


def content_id(text_ids: torch.Tensor, codes: torch.Tensor) -> str:
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
        return content_id(self.text_ids, self.codes)

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
