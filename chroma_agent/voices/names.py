"""Voice names and the errors of everything voice-related (no torch: a worker that only talks to a server
checks names too)."""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_CHARS", "UnknownVoiceError", "VoiceError", "validate_voice_name"]

MAX_NAME_CHARS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
