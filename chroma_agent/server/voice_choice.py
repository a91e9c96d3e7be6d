"""Which voice a request speaks with: one rule for chat completions and the realtime endpoint.

* A name that is a stored voice (or the configured default's name) is that voice.
* OpenAI's stock names (`alloy`, `marin`, ...) are what OpenAI clients send by default: they mean "the server's
  voice", i.e. the configured default, and never a stored voice of the same name (anyone who may store a voice
  could otherwise take over every stock-named session).
* No name is the configured default. The default is what the operator configured (`--voice`, or `--voice-audio`
  + `--voice-text`) and nothing else: never a voice picked from the store, whose contents any API client may
  change.

Without a configured default, a reply that must speak and names no voice is refused (`voice_required`, by the
caller: chat completions answer 400, the realtime endpoint an error event). A reply that need not speak
(text only) runs in a conversation without a voice.
"""

from __future__ import annotations

from chroma_agent.engine.engine import Engine
from chroma_agent.realtime_protocol import OPENAI_VOICES
from chroma_agent.voices import UnknownVoiceError, VoiceProfile

#: The operator's setting a missing default voice is named by, in error messages.
DEFAULT_VOICE_SETTING = "--voice or --voice-audio"



class VoiceNotFound(LookupError):
    """A name that is neither a stored voice, the default's name nor an OpenAI stock name."""


def is_stock_voice(name: str) -> bool:
    return name.lower() in OPENAI_VOICES


def resolve_voice(engine: Engine, name: str | None) -> VoiceProfile | None:
    """The voice `name` stands for; None when it stands for the default and there is none configured.

    Raises VoiceNotFound for an unknown name and VoiceError for a stored voice that cannot be used here.
    Reads the voices folder, so call it from a worker thread.
    """
    default = engine.default_voice
    if name is None or is_stock_voice(name):
        return default
    if default is not None and name == default.name:
        return default
    try:
        profile = engine.voices.get(name)
    except UnknownVoiceError:
        raise VoiceNotFound(name) from None
    profile.require_compatible(engine.model.config)
    return profile


def known_voices(engine: Engine) -> list[str]:
    """Names a client may use, for error messages."""
    names = set(engine.voices.names())
    if engine.default_voice is not None:
        names.add(engine.default_voice.name)
    return sorted(names)


__all__ = ["DEFAULT_VOICE_SETTING", "VoiceNotFound", "is_stock_voice", "known_voices", "resolve_voice"]
