"""Chroma plugin for LiveKit Agents: FlashLabs Chroma 1.0, self-hosted speech-to-speech with voice cloning.

    from livekit.agents import AgentSession
    from livekit.plugins import chroma, silero

    session = AgentSession(llm=chroma.RealtimeModel(voice="support-anna"), vad=silero.VAD.load())

See README.md beside this file.
"""

from . import realtime
from .models import ChromaDevices, ChromaDtypes, ChromaModels
from .realtime import (
    RealtimeModel,
    RealtimeOptions,
    RealtimeSession,
    close_engines,
    load_engine,
    loaded_engines,
)
from .version import __version__

__all__ = [
    "ChromaDevices",
    "ChromaDtypes",
    "ChromaModels",
    "RealtimeModel",
    "RealtimeOptions",
    "RealtimeSession",
    "close_engines",
    "load_engine",
    "loaded_engines",
    "realtime",
    "__version__",
]

from livekit.agents import Plugin

from .log import logger


class ChromaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(ChromaPlugin())

# Cleanup docs of unexported modules
_module = dir()
NOT_IN_ALL = [m for m in _module if m not in __all__]

__pdoc__ = {}

for n in NOT_IN_ALL:
    __pdoc__[n] = False
