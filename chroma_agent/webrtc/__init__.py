"""Browser playground: a page talks to the engine over WebRTC (aiortc in this process, no LiveKit server)."""

from chroma_agent.webrtc.playground import create_app, open_engine

__all__ = ["create_app", "open_engine"]
