"""One configuration for every ``chroma-agent`` command: a flag, else its ``CHROMA_*`` variable, else the default.

Each setting is named once here (:data:`SOURCES`: flag, environment variables, help) and validated once (the
pydantic classes below), so ``--model`` means the same in ``generate``, ``serve``, ``playground`` and the
LiveKit worker. A command's class lists the settings it takes and their defaults; :func:`add_flags` turns a
class into argparse flags and :meth:`Settings.from_sources` reads them back with the environment under them.
:func:`markdown_table` renders the README's configuration table from the same definitions.

Nothing here imports torch: the worker in remote mode (``--server-url``) never loads it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chroma_agent.server.settings import ServerSettings  # a plain dataclass: imports nothing heavy

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine, EngineConfig
    from chroma_agent.voices import VoiceProfile

log = logging.getLogger(__name__)

DEFAULT_MODEL = "FlashLabs/Chroma-4B"
TINY = "tiny"
CACHE_DIR = Path("~/.cache/chroma-agent")
DEFAULT_VOICES_DIR = CACHE_DIR / "voices"
#: Where ``--model tiny`` builds its random checkpoint once, then reuses it.
TINY_DIR = CACHE_DIR / "tiny"
#: Random weights almost never end a reply by themselves: cap the tiny model's replies.
TINY_MAX_REPLY_S = 5.0
#: What the tiny model's synthetic voice clip "says" (it is a test signal: any transcript clones it).
TINY_VOICE_TEXT = "Hello, this is the voice to clone."
DTYPES = ("auto", "float32", "bfloat16", "float16")

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_URL_PREFIXES = ("ws://", "wss://", "http://", "https://")


class SettingsError(ValueError):
    """Settings that cannot work; the message names the variable or flag to fix."""


@dataclass(frozen=True)
class Source:
    """Where one setting comes from, and what it means (the same in every command that takes it)."""

    flag: str
    env: tuple[str, ...]  # the first is documented; later ones are accepted aliases
    help: str
    unset: str = "none"  # what leaving it unset means, when its default is None
    secret: bool = False
    note: str = ""  # said in --help and in the table, e.g. when LiveKit's CLI fixes the name


SOURCES: dict[str, Source] = {
    "model": Source("--model", ("CHROMA_MODEL", "CHROMA_MODEL_PATH"),
                    "checkpoint folder, Hugging Face repo id, or `tiny` (random weights built once in "
                    "~/.cache/chroma-agent/tiny: it speaks noise)"),
    "device": Source("--device", ("CHROMA_DEVICE",), "auto (CUDA when torch sees a GPU), cpu, cuda, cuda:N, mps"),
    "dtype": Source("--dtype", ("CHROMA_DTYPE",), "auto (bfloat16 on CUDA, else float32), float32, bfloat16, "
                    "float16"),
    "step_mode": Source("--step-mode", ("CHROMA_STEP_MODE",),
                        "how the per-frame step runs: auto (CUDA graphs on a GPU, else eager), eager, compile "
                        "(inductor; the fast CPU path, about a minute of compiling at first use), cuda_graph, "
                        "compile+cuda_graph"),
    "voice": Source("--voice", ("CHROMA_VOICE",),
                    "default voice: a stored voice's name (with --voice-audio: the name to store the clone "
                    "under)"),
    "voice_audio": Source("--voice-audio", ("CHROMA_VOICE_AUDIO",),
                          "clip to clone the default voice from, once at start (with --voice-text)"),
    "voice_text": Source("--voice-text", ("CHROMA_VOICE_TEXT",), "the exact words spoken in --voice-audio"),
    "voices_dir": Source("--voices-dir", ("CHROMA_VOICES_DIR",), "folder of stored voices"),
    "max_sessions": Source("--max-sessions", ("CHROMA_MAX_SESSIONS",),
                           "conversations at once (engine slots; each holds a KV cache)"),
    "host": Source("--host", ("CHROMA_HOST",), "address to listen on (0.0.0.0: every interface)"),
    "port": Source("--port", ("CHROMA_PORT",), "port to listen on"),
    "api_key": Source("--api-key", ("CHROMA_API_KEY",),
                      "require this key (Bearer) on every request but /health and /metrics; 8+ characters",
                      unset="none (open)", secret=True),
    "assets_dir": Source("--assets-dir", ("CHROMA_ASSETS_DIR",),
                         "folder whose files requests may name as audio (FlashLabs' `assets/...` paths)",
                         unset="none (paths are refused)"),
    "max_request_mb": Source("--max-request-mb", ("CHROMA_MAX_REQUEST_MB",), "largest request body, in MB"),
    "max_audio_samples": Source("--max-audio-samples", ("CHROMA_MAX_AUDIO_SAMPLES",),
                                "most samples (frames x channels) one audio file may decode to"),
    "header_timeout_s": Source("--header-timeout-s", ("CHROMA_HEADER_TIMEOUT_S",),
                               "seconds a request's headers may take to arrive, else 408"),
    "max_header_kb": Source("--max-header-kb", ("CHROMA_MAX_HEADER_KB",), "largest request headers, else 431"),
    "max_connections": Source("--max-connections", ("CHROMA_MAX_CONNECTIONS",),
                              "open connections beyond this get 503 at once; 0: no cap"),
    "max_messages": Source("--max-messages", ("CHROMA_MAX_MESSAGES",), "messages of one chat request, else 400"),
    "max_turn_chars": Source("--max-turn-chars", ("CHROMA_MAX_TURN_CHARS",),
                             "characters of text in one message, realtime item or instructions, else 400"),
    "max_items": Source("--max-items", ("CHROMA_MAX_ITEMS",), "items a realtime conversation holds"),
    "stream_stall_s": Source("--stream-stall-s", ("CHROMA_STREAM_STALL_S",),
                             "a streamed reply whose client falls this many seconds behind is cancelled"),
    "realtime_idle_timeout_s": Source("--realtime-idle-timeout-s", ("CHROMA_REALTIME_IDLE_TIMEOUT_S",),
                                      "a realtime session idle this many seconds ends; 0: never"),
    "realtime_max_session_s": Source("--realtime-max-session-s", ("CHROMA_REALTIME_MAX_SESSION_S",),
                                     "a realtime session ends after this many seconds (OpenAI: 3600); 0: never"),
    "no_docs": Source("--no-docs", ("CHROMA_NO_DOCS",), "do not serve /docs, /redoc and /openapi.json"),
    "server_url": Source("--server-url", ("CHROMA_SERVER_URL",),
                         "a `chroma-agent serve` to talk to over /v1/realtime instead of loading the model "
                         "in the worker", unset="none (the model runs in the worker)"),
    "server_api_key": Source("--server-api-key", ("CHROMA_API_KEY",), "the --server-url server's --api-key",
                             unset="none", secret=True),
    "agent_name": Source("--agent-name", ("CHROMA_AGENT_NAME",), "name for explicit dispatch",
                         unset="automatic dispatch"),
    "instructions": Source("--instructions", ("CHROMA_INSTRUCTIONS",), "default system prompt"),
    "greeting": Source("--greeting", ("CHROMA_GREETING",),
                       "instructions for a first reply when a call starts", unset="none (wait for the caller)"),
    "max_reply_seconds": Source("--max-reply-seconds", ("CHROMA_MAX_REPLY_SECONDS",), "longest reply"),
    "load_timeout": Source("--load-timeout", ("CHROMA_LOAD_TIMEOUT",),
                           "seconds the model (or the --server-url server) may take to be ready"),
    "livekit_url": Source("--url", ("LIVEKIT_URL",), "LiveKit server URL", unset="none",
                          note="LiveKit's CLI name"),
    "livekit_api_key": Source("--api-key", ("LIVEKIT_API_KEY",), "LiveKit API key", secret=True,
                              note="LiveKit's CLI name: here --api-key is LiveKit's key; the Chroma server's "
                              "is --server-api-key"),
    "livekit_api_secret": Source("--api-secret", ("LIVEKIT_API_SECRET",), "LiveKit API secret", secret=True,
                                 note="LiveKit's CLI name"),
}


def optional_voice_name(value: str | None) -> str | None:
    """A voice name as every setting takes it: None, or a name the voice store accepts."""
    if value is None:
        return None
    from chroma_agent.voices import validate_voice_name  # the voices package is heavier than configuration

    return validate_voice_name(value)


def _blank_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


class Settings(BaseModel):
    """Base of every command's settings: frozen, no unknown keys, errors that name the flag and variable."""

    # validate_default: defaults pass the same checks (and get `~` expanded) as given values
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    command: ClassVar[str] = ""  # the command(s) these settings are for, as the docs name them

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
        """Flags (the non-None keyword arguments) over the environment (default: os.environ) over defaults."""
        env = os.environ if env is None else env
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            for var in SOURCES[name].env:
                value = env.get(var)
                if value is not None and value.strip():
                    data[name] = value.strip()
                    break
        for name, value in flags.items():
            if name not in cls.model_fields:
                raise TypeError(f"unknown setting {name!r} for {cls.__name__}")
            if value is not None:
                data[name] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SettingsError(_explain(exc, data)) from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from an argparse namespace made by :func:`add_flags` (unset flags are None)."""
        return cls.from_sources(env, **{name: getattr(args, name, None) for name in cls.model_fields})


def _explain(exc: ValidationError, data: Mapping[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if name in SOURCES:
            source = SOURCES[name]
            shown = "<hidden>" if source.secret else repr(data.get(name))
            lines.append(f"{source.env[0]} / {source.flag} = {shown}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)


def describe(name: str) -> str:
    """``CHROMA_X / --x``: how messages name a setting."""
    return f"{SOURCES[name].env[0]} / {SOURCES[name].flag}"


# --- the settings, grouped as the commands take them ----------------------------------------------------------


class ModelSettings(Settings):
    """Which checkpoint, on which device, in which precision."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    step_mode: Literal["auto", "eager", "compile", "cuda_graph", "compile+cuda_graph"] = "auto"

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value == TINY:
            return value
        path = Path(value).expanduser()
        if path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ValueError(f"{path} holds no Chroma checkpoint (config.json missing)")
            return str(path)
        if value.startswith((".", "/", "~")) or value.count("/") > 1:
            raise ValueError(f"checkpoint folder not found: {path}")
        if not _REPO_ID_RE.match(value):
            raise ValueError("is neither an existing checkpoint folder nor a Hugging Face repo id "
                             "(owner/name), nor `tiny`")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY

    @property
    def engine_step_mode(self) -> str | None:
        """The step mode for the engine (None: its default for the device)."""
        return None if self.step_mode == "auto" else self.step_mode

    def checkpoint(self) -> str:
        """The folder or repo id to load: `tiny` is built into the cache the first time."""
        return str(ensure_tiny_checkpoint(TINY_DIR)) if self.is_tiny else self.model

    def torch_device(self) -> tuple[str, str]:
        """(device, dtype) with `auto` resolved; a device this machine lacks is a SettingsError."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            log.debug("device auto: %s", device)
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise SettingsError(f"{describe('device')} = {device!r}: CUDA is not available in this torch build "
                                "or on this machine (use auto or cpu)")
        elif device == "mps" and not torch.backends.mps.is_available():
            raise SettingsError(f"{describe('device')} = 'mps': MPS is not available on this machine")
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return device, dtype


class VoiceSettings(Settings):
    """The default voice (used when a request or call names none) and the stored voices."""

    voice: str | None = None
    voice_audio: Path | None = None
    voice_text: str | None = None
    voices_dir: Path = DEFAULT_VOICES_DIR

    @field_validator("voice", "voice_text", "voice_audio", mode="before")
    @classmethod
    def _blank_voice(cls, value: Any) -> Any:
        return _blank_to_none(value)

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str | None) -> str | None:
        return optional_voice_name(value)

    @field_validator("voice_audio")
    @classmethod
    def _clip(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("voices_dir")
    @classmethod
    def _folder(cls, value: Path) -> Path:
        value = value.expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is not a folder")
        return value

    @model_validator(mode="after")
    def _pair(self) -> VoiceSettings:
        if (self.voice_audio is None) != (self.voice_text is None):
            missing = "voice_text" if self.voice_text is None else "voice_audio"
            raise ValueError(f"{describe('voice_audio')} and {describe('voice_text')} go together: "
                             f"{describe(missing)} is missing (the clip, and the exact words spoken in it)")
        return self

    def stored_voice(self) -> VoiceProfile | None:
        """The stored voice ``--voice`` names when nothing is to be cloned; checked before the model loads."""
        if self.voice is None or self.voice_audio is not None:
            return None
        from chroma_agent.voices import VoiceError, VoiceStore

        store = VoiceStore(self.voices_dir)
        try:
            return store.get(self.voice)
        except VoiceError as exc:
            known = ", ".join(store.names()) or "none"
            raise SettingsError(f"{describe('voice')} = {self.voice!r}: {exc} in {store.folder} "
                                f"(stored voices: {known}; clone one with --voice-audio + --voice-text)") from None

    def default_voice(self, engine: Engine) -> VoiceProfile | None:
        """The default voice on a loaded engine: cloned from ``--voice-audio`` (stored when ``--voice`` names
        it), or the stored ``--voice``, or None."""
        from chroma_agent.voices import VoiceError

        if self.voice_audio is not None:
            try:
                profile = engine.create_voice(self.voice_audio, self.voice_text or "", name=self.voice or "default",
                                              save=self.voice is not None).result()
            except VoiceError as exc:
                raise SettingsError(f"{describe('voice_audio')} = '{self.voice_audio}': {exc}") from None
            log.info("default voice cloned from %s%s", self.voice_audio,
                     f" and stored as {self.voice!r}" if self.voice else "")
            return profile
        profile = self.stored_voice()
        if profile is not None:
            try:
                profile.require_compatible(engine.model.config)
            except VoiceError as exc:
                raise SettingsError(f"{describe('voice')} = {self.voice!r}: {exc}") from None
        return profile


class SessionSettings(Settings):
    max_sessions: int = Field(4, ge=1, le=1024)


class ListenSettings(Settings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


class GenerateSettings(ModelSettings, VoiceSettings):
    command: ClassVar[str] = "generate"


class DemoSettings(ModelSettings):
    command: ClassVar[str] = "demo"
    model: str = TINY


class EngineSettings(ModelSettings, VoiceSettings, SessionSettings):
    """What every command that runs the engine for many conversations takes."""

    def engine_config(self, **overrides: Any) -> EngineConfig:
        from chroma_agent.engine.engine import EngineConfig

        settings: dict[str, Any] = {"max_sessions": self.max_sessions, "step_mode": self.engine_step_mode}
        if self.is_tiny:
            settings["max_reply_s"] = TINY_MAX_REPLY_S
        return EngineConfig(**{**settings, **overrides})

    def speaking_voice(self, engine: Engine) -> VoiceProfile:
        """The voice of a command that cannot run without one (the worker, the playground): the default voice
        (:meth:`default_voice`), else the only voice stored (when it suits this model), else for the tiny model
        a synthetic clip. Else a :class:`SettingsError` naming the settings. (The server has no such fallback: it
        starts without a voice and says which field or flag gives one.)"""
        profile = engine.default_voice or self.default_voice(engine)
        if profile is not None:
            return profile
        names = engine.voices.names()
        if len(names) == 1:
            only = engine.voices.get(names[0])
            if only.is_compatible(engine.model.config):
                log.info("default voice: %s (the only stored voice)", names[0])
                return only
        if self.is_tiny:
            from chroma_agent.model.tiny import synthetic_speech

            rate = engine.model.config.sample_rate
            clip = synthetic_speech(3.0, rate, 180.0, 1)
            return engine.create_voice(clip, TINY_VOICE_TEXT, name="tiny-demo", sample_rate=rate).result()
        raise SettingsError("no default voice: set CHROMA_VOICE to a stored voice"
                            + (f" ({', '.join(names)})" if names else f" (none in {engine.voices.folder})")
                            + " or CHROMA_VOICE_AUDIO + CHROMA_VOICE_TEXT to clone one")

    def load_engine(self, checkpoint: str | Path | None = None) -> Engine:
        """The engine for these settings (or on `checkpoint` instead of ``--model``'s), with its default voice
        set. Blocking: it loads the model."""
        from chroma_agent.engine.engine import Engine

        device, dtype = self.torch_device()
        engine = Engine.from_pretrained(checkpoint or self.checkpoint(), device=device, dtype=dtype,
                                        config=self.engine_config(), voices_dir=self.voices_dir)
        try:
            engine.default_voice = self.default_voice(engine)
        except BaseException:
            engine.close()
            raise
        return engine


_SERVER_DEFAULTS = ServerSettings()


class ServeSettings(EngineSettings, ListenSettings):
    command: ClassVar[str] = "serve"

    api_key: str | None = Field(None, repr=False)
    assets_dir: Path | None = None
    max_request_mb: float = Field(50.0, gt=0)
    # Connection and decoding limits (docs/api.md, "Limits"): ServerSettings' own defaults.
    max_audio_samples: int = Field(_SERVER_DEFAULTS.max_audio_samples, ge=1)
    header_timeout_s: float = Field(_SERVER_DEFAULTS.header_timeout_s, gt=0)
    max_header_kb: int = Field(_SERVER_DEFAULTS.max_header_bytes // 1024, ge=1)
    max_connections: int = Field(_SERVER_DEFAULTS.max_connections or 0, ge=0)
    # Work per request and slots that come back (docs/api.md, "Limits"; docs/realtime.md).
    max_messages: int = Field(_SERVER_DEFAULTS.max_messages, ge=1)
    max_turn_chars: int = Field(_SERVER_DEFAULTS.max_turn_chars, ge=1)
    max_items: int = Field(_SERVER_DEFAULTS.max_items, ge=1)
    stream_stall_s: float = Field(_SERVER_DEFAULTS.stream_stall_s, gt=0)
    realtime_idle_timeout_s: float = Field(_SERVER_DEFAULTS.realtime_idle_timeout_s or 0, ge=0)
    realtime_max_session_s: float = Field(_SERVER_DEFAULTS.realtime_max_session_s or 0, ge=0)
    no_docs: bool = False

    @field_validator("api_key", "assets_dir", mode="before")
    @classmethod
    def _blank_serve(cls, value: Any) -> Any:
        return _blank_to_none(value)

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 8:
            raise ValueError("must be at least 8 characters")
        return value

    @field_validator("assets_dir")
    @classmethod
    def _assets(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_dir():
            raise ValueError(f"{value} is not a folder")
        return None if value is None else value.expanduser()


class PlaygroundSettings(EngineSettings, ListenSettings):
    command: ClassVar[str] = "playground"

    model: str = TINY
    port: int = Field(8080, ge=0, le=65535)


def validate_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(_URL_PREFIXES):
        raise ValueError("must start with wss://, ws://, https:// or http://")
    return value


# --- the tiny checkpoint ---------------------------------------------------------------------------------------


def ensure_tiny_checkpoint(folder: str | Path = TINY_DIR) -> Path:
    """The tiny random checkpoint in `folder`, built there the first time (atomically: processes racing to
    build it each write a private copy and the first rename wins)."""
    folder = Path(folder).expanduser()
    if (folder / "config.json").is_file():
        return folder
    from chroma_agent.model.tiny import build_tiny_checkpoint

    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the tiny random checkpoint in %s (once)", folder)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build_tiny_checkpoint(scratch)
        try:
            scratch.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


# --- argparse and the docs -------------------------------------------------------------------------------------


def default_cell(cls: type[Settings], name: str) -> str:
    default = cls.model_fields[name].default
    return SOURCES[name].unset if default in (None, "") else f"`{default}`"


def add_flags(parser: argparse.ArgumentParser, cls: type[Settings], names: Iterable[str] | None = None) -> None:
    """One flag per setting of `cls` (or of `names`), default None so that the environment shows through."""
    for name in names if names is not None else [n for n in SOURCES if n in cls.model_fields]:
        source = SOURCES[name]
        env = " or ".join(source.env)
        note = f"; {source.note}" if source.note else ""
        kwargs: dict[str, Any] = {"metavar": source.env[0]}
        if name == "dtype":
            kwargs["choices"] = DTYPES
        if cls.model_fields[name].annotation is bool:  # a switch: present means true (else the variable says)
            kwargs = {"action": "store_const", "const": True}
        parser.add_argument(source.flag, dest=name, default=None, **kwargs,
                            help=f"{source.help} [{env}; default: {default_cell(cls, name).strip('`')}{note}]")
