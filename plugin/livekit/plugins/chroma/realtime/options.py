"""The options of a Chroma `RealtimeModel` and their checks (the engine's own sampling rules)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livekit.agents.utils import is_given

from chroma_agent.engine.params import check_temperature, check_top_k, check_top_p
from chroma_agent.realtime_client import realtime_url

from ..models import DEFAULT_MODEL
from .backend import SamplingOverrides, VoiceSpec

if TYPE_CHECKING:
    from chroma_agent.voices import VoiceProfile

__all__ = ["RealtimeOptions", "updated_options"]


@dataclass
class RealtimeOptions:
    """What a `RealtimeModel` was configured with (and what new sessions start from)."""

    model: str = DEFAULT_MODEL
    voice: str | VoiceProfile | None = None
    voice_audio: Any = None
    voice_text: str | None = None
    voice_sample_rate: int | None = None
    instructions: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_reply_seconds: float = 30.0
    max_turn_seconds: float = 30.0
    device: str | None = None
    dtype: str | None = None
    voices_dir: str | Path | None = None
    max_sessions: int | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def validate(self) -> None:
        if self.voice is not None and self.voice_audio is not None:
            raise ValueError("give either voice= (a stored voice or a VoiceProfile) or voice_audio=, "
                             "not both")
        has_text = isinstance(self.voice_text, str) and bool(self.voice_text.strip())
        if self.voice_audio is not None and not has_text:
            raise ValueError("voice_audio needs voice_text: the exact words spoken in the clip")
        if self.voice is not None and not isinstance(self.voice, str):
            from chroma_agent.voices import VoiceProfile

            if not isinstance(self.voice, VoiceProfile):
                raise ValueError("voice must be a voice name or a VoiceProfile, "
                                 f"got {type(self.voice).__name__}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        for name in ("max_reply_seconds", "max_turn_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 3600):
                raise ValueError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
        sessions = self.max_sessions
        if sessions is not None and not (isinstance(sessions, int) and sessions >= 1):
            raise ValueError(f"max_sessions must be an integer >= 1, got {self.max_sessions!r}")
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.base_url:
            self._validate_remote()

    def _validate_remote(self) -> None:
        realtime_url(self.base_url)
        if self.voice_audio is not None or not isinstance(self.voice, str | None):
            raise ValueError("remote mode speaks with voices stored on the server: give voice=<name> "
                             "(the server's voices API creates them)")
        if self.top_k is not None or self.top_p is not None:
            raise ValueError("remote mode: top_k and top_p are the server's settings; only temperature can "
                             "be set")
        local = [n for n in ("device", "dtype", "voices_dir", "max_sessions") if getattr(self, n) is not None]
        if local:
            raise ValueError(f"remote mode: {', '.join(local)} configure an in-process engine; the server "
                             "has its own")

    def voice_spec(self) -> VoiceSpec:
        if self.voice_audio is not None:
            return VoiceSpec(audio=self.voice_audio, text=self.voice_text, sample_rate=self.voice_sample_rate)
        if self.voice is None or isinstance(self.voice, str):
            return VoiceSpec(name=self.voice)
        return VoiceSpec(profile=self.voice)

    def sampling(self) -> SamplingOverrides:
        return SamplingOverrides(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def check_sampling(temperature: float | None, top_k: int | None, top_p: float | None) -> None:
    """The engine's own sampling rules (`SamplingParams`), for the values given."""
    if temperature is not None:
        check_temperature(temperature)
    if top_k is not None:
        check_top_k(top_k)
    if top_p is not None:
        check_top_p(top_p)


def updated_options(opts: RealtimeOptions, **changes: Any) -> RealtimeOptions:
    given = {k: v for k, v in changes.items() if is_given(v)}
    if "voice" in given:
        given.update(voice_audio=None, voice_text=None, voice_sample_rate=None)
    new = replace(opts, **given)
    new.validate()
    return new
