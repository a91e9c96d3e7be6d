"""Write a Chroma model as a FlashLabs-layout checkpoint folder (config.json + model.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.loading import SINGLE_FILE, TIED_AUDIO_TABLES, checkpoint_state_dict


def save_checkpoint(model: ChromaModel, folder: str | Path) -> Path:
    """Tensors go under checkpoint names; the tied audio table is stored once, like the reference does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().contiguous().cpu()
        for name, t in checkpoint_state_dict(model).items()
        if name != TIED_AUDIO_TABLES[0]
    }
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return folder
