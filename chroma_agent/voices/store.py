"""The voices folder: one file per voice name, shared by the CLI, the servers and the workers."""

from __future__ import annotations

import builtins
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from chroma_agent.voices.names import UnknownVoiceError, VoiceError, validate_voice_name
from chroma_agent.voices.profile import SUFFIX, VoiceProfile

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_DIR", "ENV_DIR", "VoiceStore"]

ENV_DIR = "CHROMA_VOICES_DIR"
DEFAULT_DIR = Path("~/.cache/chroma-agent/voices")


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
