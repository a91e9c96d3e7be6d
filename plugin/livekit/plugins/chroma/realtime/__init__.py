from .backend import (
    Backend,
    BackendConversation,
    InProcessBackend,
    SamplingOverrides,
    VoiceSpec,
    close_engines,
    load_engine,
    loaded_engines,
)
from .options import RealtimeOptions
from .realtime_model import RealtimeModel
from .session import RealtimeSession

__all__ = [
    "Backend",
    "BackendConversation",
    "InProcessBackend",
    "RealtimeModel",
    "RealtimeOptions",
    "RealtimeSession",
    "SamplingOverrides",
    "VoiceSpec",
    "close_engines",
    "load_engine",
    "loaded_engines",
]
