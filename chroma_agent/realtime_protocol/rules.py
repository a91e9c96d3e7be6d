"""The protocol's rules about a session, as the server applies them: which dialect a connection speaks, the
audio formats and modalities it accepts, what output tokens mean, how a turn detection setting is completed,
the shortest turn. Pure functions of validated client events; a refusal is a :class:`ProtocolError` naming the
parameter."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from chroma_agent.realtime_protocol.client_events import AudioFormat, TurnDetection, VoiceRef
from chroma_agent.realtime_protocol.wire import (
    BETA_AUDIO_FORMAT,
    BETA_HEADER_VALUE,
    BETA_SUBPROTOCOL,
    DEFAULT_TURN_DETECTION,
    SAMPLE_RATE,
    Dialect,
    ErrorCode,
    Modality,
    ProtocolError,
)

__all__ = [
    "MIN_COMMIT_MS",
    "check_beta_format",
    "check_format",
    "dialect_of",
    "max_frames",
    "output_modality",
    "peek_event_id",
    "turn_detection_config",
    "voice_name",
]

MIN_COMMIT_MS = 100  # OpenAI refuses shorter input buffers (input_audio_buffer_commit_empty)


def dialect_of(openai_beta_header: str | None, subprotocols: Iterable[str]) -> Dialect:
    """Beta when the client says so (``OpenAI-Beta: realtime=v1`` or the beta subprotocol), else GA."""
    if BETA_HEADER_VALUE in (openai_beta_header or "").replace(" ", "").split(","):
        return "beta"
    return "beta" if BETA_SUBPROTOCOL in subprotocols else "ga"


def voice_name(voice: str | VoiceRef | None) -> str | None:
    """A voice given by name or as ``{"id": name}``."""
    return voice.id if isinstance(voice, VoiceRef) else voice


def check_format(fmt: AudioFormat | None, param: str, event_id: str | None) -> None:
    """GA format object: audio/pcm at 24 kHz (both may be omitted)."""
    if fmt is None:
        return
    if (fmt.type not in (None, "audio/pcm")) or (fmt.rate not in (None, SAMPLE_RATE)):
        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO_FORMAT,
                            f"unsupported audio format {fmt.model_dump(exclude_none=True)}: only "
                            f"{{'type': 'audio/pcm', 'rate': {SAMPLE_RATE}}} (PCM16 mono) is supported",
                            param=param, event_id=event_id)


def check_beta_format(value: str | None, param: str, event_id: str | None) -> None:
    if value not in (None, BETA_AUDIO_FORMAT):
        raise ProtocolError(ErrorCode.UNSUPPORTED_AUDIO_FORMAT,
                            f"unsupported audio format {value!r}: only 'pcm16' (24 kHz mono) is supported",
                            param=param, event_id=event_id)


def output_modality(mods: list[str] | None, param: str, event_id: str | None) -> Modality | None:
    """`output_modalities` / `modalities` -> "audio" (speech and its transcript) or "text" (text only)."""
    if mods is None:
        return None
    unknown = [m for m in mods if m not in ("audio", "text")]
    if unknown or not mods:
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"modalities must be ['audio'] or ['text'] (beta: ['audio', "
                            f"'text'] or ['text']), got {mods!r}", param=param, event_id=event_id)
    return "audio" if "audio" in mods else "text"


def max_frames(value: int | str | None, default: int) -> int | None:
    """Output tokens -> reply frames: one 80 ms audio frame per token; "inf" means the engine's own limit."""
    if value is None:
        return default
    return None if value == "inf" else int(value)


def turn_detection_config(td: TurnDetection | None, param: str, event_id: str | None) -> dict[str, Any] | None:
    """A session's turn detection: None (the client commits), or server VAD completed with OpenAI's defaults.

    ``semantic_vad`` has no counterpart here; it runs as server VAD with the default timings."""
    if td is None or td.type in (None, "none"):
        return None
    if td.type not in ("server_vad", "semantic_vad"):
        raise ProtocolError(ErrorCode.UNSUPPORTED, f"turn_detection type {td.type!r} is not supported "
                            "(use null for client-side commits, or 'server_vad')", param=f"{param}.type",
                            event_id=event_id)
    given = {k: getattr(td, k) for k in DEFAULT_TURN_DETECTION if k != "type" and getattr(td, k) is not None}
    return {**DEFAULT_TURN_DETECTION, **given}


def peek_event_id(text: str) -> str | None:
    """The event_id of a message that is not parsed in full (too big, rate-limited), when it is easy to find."""
    try:
        data = json.loads(text)
    except ValueError:
        start = text.find('"event_id"')
        if start < 0:
            return None
        rest = text[start + len('"event_id"'):].lstrip(" :")
        if rest.startswith('"'):
            end = rest.find('"', 1)
            return rest[1:end] if end > 0 else None
        return None
    value = data.get("event_id") if isinstance(data, Mapping) else None
    return value if isinstance(value, str) else None
