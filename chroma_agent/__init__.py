"""chroma-agent: real-time voice agents driven by FlashLabs Chroma 1.0.

The public API, in one import::

    from chroma_agent import Engine, SamplingParams

    engine = Engine.from_pretrained("FlashLabs/Chroma-4B", device="cuda", dtype="bfloat16")
    voice = await engine.create_voice("anna.wav", "Hi, I'm Anna from support.", name="anna")
    conv = await engine.open_conversation(voice, "You are a friendly support agent.")
    await conv.add_user_audio(pcm, 16000)
    async for event in conv.respond():
        ...  # AudioChunk (80 ms of 24 kHz audio), TextDelta, then ResponseDone or ResponseError

Names are imported lazily, on first use: ``import chroma_agent`` alone loads nothing heavy, so the realtime
protocol (:mod:`chroma_agent.realtime_protocol`), its client (:mod:`chroma_agent.realtime_client`) and the
LiveKit plugin in remote mode work without torch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chroma_agent.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(("Engine", "EngineBusyError", "EngineConfig"), "chroma_agent.engine.engine"),
    **dict.fromkeys(("Conversation", "ConversationError", "ContextView", "Pending", "Response", "TurnInfo",
                     "TurnRef"), "chroma_agent.engine.conversation"),
    **dict.fromkeys(("AudioChunk", "ResponseDone", "ResponseError", "ResponseEvent", "TextDelta", "Timings",
                     "Usage"), "chroma_agent.engine.events"),
    "SamplingParams": "chroma_agent.engine.params",
    **dict.fromkeys(("UnknownVoiceError", "VoiceError"), "chroma_agent.voices.names"),
    "VoiceProfile": "chroma_agent.voices.profile",
    "VoiceStore": "chroma_agent.voices.store",
    "AudioError": "chroma_agent.audio",
    "ConfigError": "chroma_agent.model.config",
    "CheckpointError": "chroma_agent.model.loading",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names resolve lazily (above)
    from chroma_agent.audio import AudioError  # noqa: F401
    from chroma_agent.engine.conversation import (  # noqa: F401
        ContextView,
        Conversation,
        ConversationError,
        Pending,
        Response,
        TurnInfo,
        TurnRef,
    )
    from chroma_agent.engine.engine import Engine, EngineBusyError, EngineConfig  # noqa: F401
    from chroma_agent.engine.events import (  # noqa: F401
        AudioChunk,
        ResponseDone,
        ResponseError,
        ResponseEvent,
        TextDelta,
        Timings,
        Usage,
    )
    from chroma_agent.engine.params import SamplingParams  # noqa: F401
    from chroma_agent.model.config import ConfigError  # noqa: F401
    from chroma_agent.model.loading import CheckpointError  # noqa: F401
    from chroma_agent.voices.names import UnknownVoiceError, VoiceError  # noqa: F401
    from chroma_agent.voices.profile import VoiceProfile  # noqa: F401
    from chroma_agent.voices.store import VoiceStore  # noqa: F401
