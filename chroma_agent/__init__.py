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

if TYPE_CHECKING:  # for type checkers and editors (`X as X`: a re-export); at run time: lazily, above
    from chroma_agent.audio import AudioError as AudioError
    from chroma_agent.engine.conversation import (
        ContextView as ContextView,
        Conversation as Conversation,
        ConversationError as ConversationError,
        Pending as Pending,
        Response as Response,
        TurnInfo as TurnInfo,
        TurnRef as TurnRef,
    )
    from chroma_agent.engine.engine import (
        Engine as Engine,
        EngineBusyError as EngineBusyError,
        EngineConfig as EngineConfig,
    )
    from chroma_agent.engine.events import (
        AudioChunk as AudioChunk,
        ResponseDone as ResponseDone,
        ResponseError as ResponseError,
        ResponseEvent as ResponseEvent,
        TextDelta as TextDelta,
        Timings as Timings,
        Usage as Usage,
    )
    from chroma_agent.engine.params import SamplingParams as SamplingParams
    from chroma_agent.model.config import ConfigError as ConfigError
    from chroma_agent.model.loading import CheckpointError as CheckpointError
    from chroma_agent.voices.names import UnknownVoiceError as UnknownVoiceError, VoiceError as VoiceError
    from chroma_agent.voices.profile import VoiceProfile as VoiceProfile
    from chroma_agent.voices.store import VoiceStore as VoiceStore
