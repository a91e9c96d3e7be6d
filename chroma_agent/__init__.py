"""chroma-agent: real-time voice agents driven by FlashLabs Chroma 1.0."""

__version__ = "0.1.0"
