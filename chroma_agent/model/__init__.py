"""Chroma 1.0 itself: configuration, modules, KV cache, checkpoint I/O and the processor (conversation -> tensors).

This package imports nothing of chroma-agent's beyond its own modules and the shared audio helpers; the loops
that drive the model live in :mod:`chroma_agent.engine`. Names are imported lazily, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chroma_agent.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("ChromaConfig", "ConfigError"), "chroma_agent.model.config"),
    "ChromaModel": "chroma_agent.model.chroma",
    "ChromaProcessor": "chroma_agent.model.processor",
    "KVCache": "chroma_agent.model.kv_cache",
    "CheckpointError": "chroma_agent.model.loading",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors (`X as X`: a re-export); at run time: lazily, above
    from chroma_agent.model.chroma import ChromaModel as ChromaModel
    from chroma_agent.model.config import ChromaConfig as ChromaConfig, ConfigError as ConfigError
    from chroma_agent.model.kv_cache import KVCache as KVCache
    from chroma_agent.model.loading import CheckpointError as CheckpointError
    from chroma_agent.model.processor import ChromaProcessor as ChromaProcessor
