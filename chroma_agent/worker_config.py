"""Settings of the LiveKit worker (`chroma-agent start|dev|console|connect`) and of each call.

Worker settings come from flags and environment variables (``CHROMA_*`` and ``LIVEKIT_*``) and are checked at
start, before anything is loaded, with messages that name the variable or flag to fix.

Per-call settings come from the job's dispatch metadata, the room's metadata and the caller's participant
attributes (later ones win), as JSON; see :class:`CallSettings`. Bad values are logged and replaced by the
worker's defaults: a call never fails because of its metadata.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("chroma_agent.worker")

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, helpful voice assistant. Answer briefly and naturally, in spoken language."
)
COMMANDS = ("start", "dev", "console", "connect")
NEEDS_LIVEKIT = ("start", "dev", "connect")  # console runs without a LiveKit server

# field -> (environment variable, flag)
SOURCES: dict[str, tuple[str, str]] = {
    "model": ("CHROMA_MODEL", "--model"),
    "device": ("CHROMA_DEVICE", "--device"),
    "dtype": ("CHROMA_DTYPE", "--dtype"),
    "voice": ("CHROMA_VOICE", "--voice"),
    "voice_audio": ("CHROMA_VOICE_AUDIO", "--voice-audio"),
    "voice_text": ("CHROMA_VOICE_TEXT", "--voice-text"),
    "voices_dir": ("CHROMA_VOICES_DIR", "--voices-dir"),
    "max_sessions": ("CHROMA_MAX_SESSIONS", "--max-sessions"),
    "agent_name": ("CHROMA_AGENT_NAME", "--agent-name"),
    "instructions": ("CHROMA_INSTRUCTIONS", "--instructions"),
    "greeting": ("CHROMA_GREETING", "--greeting"),
    "max_reply_seconds": ("CHROMA_MAX_REPLY_SECONDS", "--max-reply-seconds"),
    "load_timeout": ("CHROMA_LOAD_TIMEOUT", "--load-timeout"),
    "livekit_url": ("LIVEKIT_URL", "--url"),
    "livekit_api_key": ("LIVEKIT_API_KEY", "--api-key"),
    "livekit_api_secret": ("LIVEKIT_API_SECRET", "--api-secret"),
}

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(ValueError):
    """Worker settings that cannot work; the message names what to fix."""


def _voice_name(value: str | None) -> str | None:
    if value is None:
        return None
    from chroma_agent.voices import validate_voice_name

    return validate_voice_name(value)


class WorkerConfig(BaseModel):
    """Everything the worker needs; build it with :meth:`from_env` (flags override the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None  # checkpoint folder or Hugging Face repo id
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N, mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    voice: str | None = None  # default voice (a stored voice, or the name to store a cloned one under)
    voice_audio: Path | None = None  # clone the default voice from this clip at start...
    voice_text: str | None = None  # ...which says this
    voices_dir: Path | None = None
    max_sessions: int = Field(8, ge=1, le=1024)  # conversations at once (engine slots)
    agent_name: str = ""  # set it for explicit dispatch
    instructions: str = DEFAULT_INSTRUCTIONS
    greeting: str | None = None  # what to tell the model to say first; None: wait for the caller
    max_reply_seconds: float = Field(30.0, gt=0, le=600)
    load_timeout: float = Field(900.0, gt=0)  # seconds the model may take to load
    livekit_url: str | None = None
    livekit_api_key: str | None = Field(None, repr=False)
    livekit_api_secret: str | None = Field(None, repr=False)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str | None) -> str | None:
        return _voice_name(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ValueError(f"folder {path} holds no Chroma checkpoint (config.json missing)")
            return str(path)
        if not _REPO_ID_RE.match(value):
            raise ValueError("is neither an existing checkpoint folder nor a Hugging Face repo id "
                             "(owner/name)")
        return value

    @field_validator("voice_audio", "voices_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("livekit_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("ws://", "wss://", "http://", "https://")):
            raise ValueError("must start with wss://, ws://, https:// or http://")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WorkerConfig:
        if self.voice_audio is not None:
            if not self.voice_audio.is_file():
                raise ValueError(f"voice_audio: file not found: {self.voice_audio}")
            if not (self.voice_text and self.voice_text.strip()):
                raise ValueError("voice_audio needs voice_text (CHROMA_VOICE_TEXT / --voice-text): "
                                 "the exact words spoken in the clip")
        if self.voices_dir is not None and self.voices_dir.exists() and not self.voices_dir.is_dir():
            raise ValueError(f"voices_dir: {self.voices_dir} is not a folder")
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        """Settings from `env` (default: os.environ), overridden by the non-None keyword arguments (flags)."""
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        for name, (var, _flag) in SOURCES.items():
            value = env.get(var)
            if value is not None and value.strip():
                data[name] = value.strip()
        for name, value in overrides.items():
            if name not in SOURCES:
                raise TypeError(f"unknown worker setting {name!r}")
            if value is not None:
                data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, data)) from None

    def check_for(self, command: str) -> None:
        """What `command` needs beyond valid values: a model, and LiveKit credentials to reach a server."""
        problems = []
        if self.model is None:
            problems.append("no model: set CHROMA_MODEL or pass --model "
                            "(FlashLabs/Chroma-4B or a checkpoint folder)")
        if command in NEEDS_LIVEKIT:
            for name in ("livekit_url", "livekit_api_key", "livekit_api_secret"):
                if not getattr(self, name):
                    var, flag = SOURCES[name]
                    problems.append(f"{var} is not set (or pass {flag}): "
                                    f"`{command}` connects to a LiveKit server")
        if problems:
            raise ConfigError("; ".join(problems))


def _explain(exc: ValidationError, data: Mapping[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if name in SOURCES:
            var, flag = SOURCES[name]
            shown = "<hidden>" if "secret" in name or "key" in name else repr(data.get(name))
            lines.append(f"{var} / {flag} = {shown}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)


def compute_load(live_sessions: int, active_jobs: int, max_sessions: int) -> float:
    """The worker's load for LiveKit dispatch: busy slots / slots, in [0, 1].

    Jobs accepted but whose conversation has not opened yet count too, so two calls arriving together do
    not both take the last slot. With ``load_threshold=1.0`` the worker stops taking calls exactly when
    every slot is busy, and LiveKit spreads calls across workers by this number.
    """
    if max_sessions < 1:
        raise ValueError("max_sessions must be >= 1")
    busy = max(int(live_sessions), int(active_jobs), 0)
    return min(1.0, busy / max_sessions)


# --- per-call settings ------------------------------------------------------------------------------------


class CallSettings(BaseModel):
    """Per-call settings, as a JSON object: ``{"voice": "support-anna", "instructions": "...", ...}``.

    Read from the job's dispatch metadata, the room's metadata (either the object itself or under a
    ``"chroma"`` key) and the caller's participant attributes (``chroma.voice``, ``chroma.instructions``,
    ``chroma.greeting``, ``chroma.temperature``, or a whole object in ``chroma``). Later sources win:
    room < job < participant. Unknown keys are ignored.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    voice: str | None = None
    instructions: str | None = Field(None, min_length=1, max_length=20_000)
    greeting: str | None = Field(None, min_length=1, max_length=2_000)
    temperature: float | None = Field(None, ge=0, le=2)

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str | None) -> str | None:
        return _voice_name(value)

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


def _object_from(raw: str | None, source: str) -> dict[str, Any]:
    if raw is None or not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        log.warning("%s is not JSON (%s); using the defaults", source, exc)
        return {}
    if not isinstance(obj, dict):
        log.warning("%s is JSON but not an object; using the defaults", source)
        return {}
    inner = obj.get("chroma")
    return inner if isinstance(inner, dict) else obj


def _valid_fields(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of `obj` that are valid call settings; each bad one is logged and dropped."""
    known = {k: v for k, v in obj.items() if k in CallSettings.model_fields}
    try:
        return CallSettings.model_validate(known).model_dump(exclude_none=True)
    except ValidationError as exc:
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            log.warning("%s: %s=%r is invalid (%s); using the default", source, field, known.get(field),
                        err["msg"].removeprefix("Value error, "))
        rest = {k: v for k, v in known.items() if k not in bad}
        return CallSettings.model_validate(rest).model_dump(exclude_none=True)


def _attributes_object(attributes: Mapping[str, str] | None) -> dict[str, Any]:
    if not attributes:
        return {}
    obj = dict(_object_from(attributes.get("chroma"), "participant attribute 'chroma'"))
    for key, value in attributes.items():
        if key.startswith("chroma.") and key[len("chroma."):] in CallSettings.model_fields:
            obj[key[len("chroma."):]] = value
    return obj


def resolve_call_settings(
    *,
    job_metadata: str | None = None,
    room_metadata: str | None = None,
    attributes: Mapping[str, str] | None = None,
    voice_exists: Callable[[str], bool] | None = None,
) -> CallSettings:
    """This call's settings from its metadata and attributes (room < job < participant)."""
    merged: dict[str, Any] = {}
    merged.update(_valid_fields(_object_from(room_metadata, "room metadata"), "room metadata"))
    merged.update(_valid_fields(_object_from(job_metadata, "job metadata"), "job metadata"))
    merged.update(_valid_fields(_attributes_object(attributes), "participant attributes"))
    voice = merged.get("voice")
    if voice is not None and voice_exists is not None and not voice_exists(voice):
        log.warning("voice %r is not a stored voice; using the default voice", voice)
        merged.pop("voice")
    return CallSettings.model_validate(merged)
