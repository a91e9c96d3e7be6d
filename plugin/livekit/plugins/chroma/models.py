"""Literal types for the options of the Chroma plugin (editors complete them; any string is accepted)."""

from __future__ import annotations

from typing import Literal

ChromaModels = Literal["FlashLabs/Chroma-4B"]
"""Checkpoints the plugin knows by name; a local checkpoint folder works as well."""

ChromaDevices = Literal["auto", "cpu", "cuda", "mps"]
"""Where an in-process engine runs (``"cuda:1"`` and the like too); ``auto``: CUDA when present."""

ChromaDtypes = Literal["auto", "float32", "bfloat16", "float16"]
"""Weights' dtype for an in-process engine. ``auto``: bfloat16 on CUDA, float32 elsewhere."""

DEFAULT_MODEL: ChromaModels = "FlashLabs/Chroma-4B"
