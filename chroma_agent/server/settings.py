"""Server settings: limits and security knobs, validated at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # when set, every request needs it (Bearer header; `api-key` for WebSockets)
    assets_dir: Path | None = None  # only then may a request name an audio file, relative to this folder
    model_name: str = "chroma-4b"  # the id /v1/models reports and requests may name
    max_request_bytes: int = 50 * 1024 * 1024  # a whole HTTP request body
    max_audio_seconds: float = 300.0  # the audio of one turn: a chat message's parts together, a realtime item/commit
    # One audio file's decoded samples (frames x channels), checked from its header before decoding: 5 min of
    # 48 kHz stereo. Bounds the CPU a small, highly compressed file can cost.
    max_audio_samples: int = 300 * 48_000 * 2
    max_ws_message_bytes: int = 16 * 1024 * 1024
    ws_messages_per_second: float = 200.0  # per connection, averaged over a 1 s burst window
    session_wait_s: float = 5.0  # how long a request may wait for a free engine slot before 503
    default_max_frames: int = 750  # a reply's length when the request names none (60 s)
    # Other names /v1/models lists for the served model (any `model` is accepted; replies report model_name).
    model_aliases: tuple[str, ...] = ("chroma", "FlashLabs/Chroma-4B")
    # Chat replies with audio: how long a later request may refer to one by its audio id (OpenAI's
    # `{"role": "assistant", "audio": {"id": ...}}`), and how many such transcripts are kept in memory.
    audio_reply_ttl_s: float = 3600.0
    audio_reply_store_size: int = 10_000
    # Connections (enforced by the uvicorn protocol in server/connections.py): a request's headers must be
    # complete this long after its first byte (or after the connection opened), else 408; headers larger
    # than max_header_bytes get 431; connections beyond max_connections get 503 at once.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int | None = 1000
    docs: bool = True  # /docs, /redoc, /openapi.json (they need the API key when the server has one)
    # Work one request may ask for (docs/api.md, "Limits"): every refusal is a 4xx naming the setting. Text and
    # audio are counted before they are tokenized or featurized, so a refused request costs almost nothing.
    max_messages: int = 2048  # messages of one chat request
    max_turn_chars: int = 32_768  # text of one turn: a chat message's text parts, a realtime item, instructions
    max_request_chars: int = 1024 * 1024  # all text of one chat request
    max_request_audio_seconds: float = 600.0  # all audio of one chat request (the voice clip not counted)
    max_items: int = 1000  # items a realtime conversation holds (items whose turns left the context are forgotten)
    # Slots come back from clients that stop reading or never leave. A streamed reply (SSE) is cancelled when
    # its client falls stream_stall_s behind: the time the server waited for it to take data, minus the audio it
    # took (a listener playing in real time never falls behind; a slow server never counts against it).
    stream_stall_s: float = 5.0
    # Realtime sessions end (an `error` with OpenAI's code `session_expired`, then close 1001) after this long
    # without a client message or a delivered event, and after this long in all (OpenAI's limit: 60 minutes).
    # None: no limit.
    realtime_idle_timeout_s: float | None = 120.0
    realtime_max_session_s: float | None = 3600.0

    def __post_init__(self) -> None:
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key must be at least 8 characters")
        if self.assets_dir is not None and not Path(self.assets_dir).is_dir():
            raise ValueError(f"assets_dir {self.assets_dir} is not a folder")
        if self.max_request_bytes < 1024 or self.max_ws_message_bytes < 1024:
            raise ValueError("request size limits must be at least 1 KiB")
        if not self.header_timeout_s > 0 or self.max_header_bytes < 1024:
            raise ValueError("header_timeout_s must be > 0 and max_header_bytes at least 1 KiB")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1 (or None: no cap)")
        if self.max_audio_samples < 1:
            raise ValueError("max_audio_samples must be at least 1")
        if self.max_audio_seconds <= 0 or self.ws_messages_per_second <= 0 or self.session_wait_s < 0:
            raise ValueError("audio, rate and wait limits must be positive")
        if min(self.max_messages, self.max_turn_chars, self.max_request_chars, self.max_items) < 1:
            raise ValueError("max_messages, max_turn_chars, max_request_chars and max_items must be at least 1")
        if not self.max_request_audio_seconds > 0 or not self.stream_stall_s > 0:
            raise ValueError("max_request_audio_seconds and stream_stall_s must be > 0")
        for name in ("realtime_idle_timeout_s", "realtime_max_session_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None: no limit)")
        if self.audio_reply_ttl_s < 0 or self.audio_reply_store_size < 0:
            raise ValueError("audio_reply_ttl_s and audio_reply_store_size must be >= 0")
        if isinstance(self.model_aliases, str) or not all(isinstance(a, str) and a for a in self.model_aliases):
            raise ValueError("model_aliases must be a sequence of non-empty names")
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
