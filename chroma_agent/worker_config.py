"""Settings of the LiveKit worker (`chroma-agent start|dev|console|connect`) and of each call.

Worker settings are the shared ones of every command (`chroma_agent.config`: model, device, voice, ...) plus
the worker's own, from flags and environment variables (``CHROMA_*`` and ``LIVEKIT_*``); they are checked at
start, before anything is loaded, with messages that name the variable or flag to fix.

Per-call settings come from the job's dispatch metadata, the room's metadata and the caller's participant
attributes (later ones win), as JSON; see :class:`CallSettings`. Bad values are logged and replaced by the
worker's defaults: a call never fails because of its metadata.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chroma_agent.config import (
    SOURCES as ALL_SOURCES,
    EngineSettings,
    SettingsError,
    describe,
    optional_voice_name,
    validate_url,
)
from chroma_agent.engine.params import MAX_TEMPERATURE, check_temperature

log = logging.getLogger("chroma_agent.worker")

DEFAULT_INSTRUCTIONS = (
    "You are a friendly, helpful voice assistant. Answer briefly and naturally, in spoken language."
)
COMMANDS = ("start", "dev", "console", "connect")
NEEDS_LIVEKIT = ("start", "dev", "connect")  # console runs without a LiveKit server

ConfigError = SettingsError  # the name this module's callers know


class WorkerConfig(EngineSettings):
    """Everything the worker needs; build it with :meth:`from_env` (flags override the environment).

    With ``server_url`` the worker is a thin client: each call talks to that ``chroma-agent serve`` over
    ``/v1/realtime`` (the plugin's remote mode), and the model settings are the server's business.
    """

    command: ClassVar[str] = "start/dev/console/connect"

    server_url: str | None = None
    server_api_key: str | None = Field(None, repr=False)
    agent_name: str = ""  # set it for explicit dispatch
    instructions: str = DEFAULT_INSTRUCTIONS
    greeting: str | None = None  # what to tell the model to say first; None: wait for the caller
    max_reply_seconds: float = Field(30.0, gt=0, le=600)
    load_timeout: float = Field(900.0, gt=0)  # seconds the model (or the server) may take to be ready
    livekit_url: str | None = None
    livekit_api_key: str | None = Field(None, repr=False)
    livekit_api_secret: str | None = Field(None, repr=False)

    @field_validator("server_url", "server_api_key", "greeting", mode="before")
    @classmethod
    def _blank_worker(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("livekit_url", "server_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return validate_url(value)

    @model_validator(mode="after")
    def _remote(self) -> WorkerConfig:
        if self.server_url is not None and self.voice_audio is not None:
            raise ValueError(f"{describe('voice_audio')}: with {describe('server_url')} the worker loads no model "
                             "and cannot clone; clone the voice on the server (`chroma-agent serve --voice-audio`, "
                             f"or POST /v1/voices) and name it with {describe('voice')}")
        return self

    @property
    def remote(self) -> bool:
        return self.server_url is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        """Settings from `env` (default: os.environ), overridden by the non-None keyword arguments (flags)."""
        return cls.from_sources(env, **overrides)  # type: ignore[return-value]

    def check_for(self, command: str) -> None:
        """What `command` needs beyond valid values: LiveKit credentials to reach a server."""
        problems = []
        if command in NEEDS_LIVEKIT:
            for name in ("livekit_url", "livekit_api_key", "livekit_api_secret"):
                if not getattr(self, name):
                    var, flag = SOURCES[name]
                    problems.append(f"{var} is not set (or pass {flag}): "
                                    f"`{command}` connects to a LiveKit server")
        if problems:
            raise ConfigError("; ".join(problems))


# field -> (environment variable, flag), for the worker's settings
SOURCES: dict[str, tuple[str, str]] = {
    name: (ALL_SOURCES[name].env[0], ALL_SOURCES[name].flag) for name in WorkerConfig.model_fields
}


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
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str | None) -> str | None:
        return optional_voice_name(value)

    @field_validator("temperature")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return None if value is None else check_temperature(value)


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
