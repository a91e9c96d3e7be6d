"""Audio a request carries: inline (base64 or a data URL) or, only when the server has an assets folder, a file
inside that folder. A path a client names is never read outside it (absolute paths, `..` and symlinks out
are refused), and every refusal is a 400 naming the request field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chroma_agent.audio import AudioError, load_audio
from chroma_agent.server.errors import APIError
from chroma_agent.server.settings import ServerSettings

# Longer strings are never file names; treating them as paths would only turn bad base64 into "not found".
_MAX_PATH_CHARS = 1024


def _invalid_audio(where: str, exc: Exception) -> APIError:
    return APIError(400, f"{where}: {exc}", param=where, code="invalid_audio")


def _asset_path(text: str, root: Path, where: str) -> Path:
    """`text` as a file inside the assets folder; anything that could leave it is refused."""
    escape = APIError(400, f"{where}: audio paths must be relative to the assets folder and stay inside it",
                      param=where, code="path_not_allowed")
    candidate = Path(text)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise escape
    root = root.resolve()
    try:
        resolved = (root / candidate).resolve()
    except (OSError, RuntimeError):  # symlink loops
        raise escape from None
    if not resolved.is_relative_to(root):  # a symlink pointing out
        raise escape
    try:
        is_file = resolved.is_file()
    except OSError as exc:  # a component longer than the file system allows, permissions: the client's path
        raise APIError(400, f"{where}: audio path cannot be used: {exc.strerror or exc}", param=where,
                       code="audio_not_found") from None
    if not is_file:
        raise APIError(400, f"{where}: audio file not found in the assets folder: {text[:200]}", param=where,
                       code="audio_not_found")
    return resolved


def load_request_audio(source: str, target_rate: int, where: str, settings: ServerSettings, *,
                       allow_paths: bool = True, max_seconds: float | None = None) -> np.ndarray:
    """Audio a request sent (base64, data URL, or a file in the assets folder) as mono float32 at `target_rate`.

    Inline audio is tried first; a string that is not inline audio is a path only when the server has an
    assets folder, and then it must resolve inside it. Errors name `where` (e.g. `messages[1].content[0]`).
    """
    limit = settings.max_audio_seconds if max_seconds is None else min(max_seconds, settings.max_audio_seconds)
    samples = settings.max_audio_samples
    try:
        return load_audio(source, target_rate, allow_paths=False, max_seconds=limit, max_samples=samples)
    except AudioError as exc:
        text = source.strip()
        # Audio recognised as inline (a known container's base64) and then refused is never retried as a path.
        maybe_path = (allow_paths and settings.assets_dir is not None and 0 < len(text) <= _MAX_PATH_CHARS
                      and not exc.inline and "\x00" not in text
                      and not text.lower().startswith(("data:", "http://", "https://")))
        if not maybe_path:
            raise _invalid_audio(where, exc) from None
    path = _asset_path(text, Path(settings.assets_dir), where)
    try:
        return load_audio(path, target_rate, max_seconds=limit, max_samples=samples)
    except AudioError as exc:
        raise _invalid_audio(where, exc) from None
