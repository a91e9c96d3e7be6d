"""Checkpoint I/O: a local folder or a Hugging Face repo id, single or sharded safetensors, and the names its
tensors have. Building the model is `ChromaModel.from_pretrained`'s job; this module only finds, reads and
copies tensors (so it never imports the model's modules)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from chroma_agent.model.chroma import ChromaModel

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a Chroma checkpoint folder needs besides the weights (the processor checks its own in detail).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]

# transformers >= 5.1 nests the Qwen2.5-Omni thinker as thinker.model.{language_model,audio_tower,visual};
# the FlashLabs checkpoint was saved with the older flat layout, which is what our modules use.
_NEW_THINKER_LAYOUT = [
    (re.compile(r"^thinker\.model\.language_model\."), "thinker.model."),
    (re.compile(r"^thinker\.model\.audio_tower\."), "thinker.audio_tower."),
    (re.compile(r"^thinker\.model\.visual\."), "thinker.visual."),
]
# Newer transformers also nest Mimi's halves (encoder.encoder_seanet, decoder.decoder_transformer, ...).
# Checkpoint names stay in the flat layout FlashLabs saved; these pairs map flat <-> nested.
_MIMI_NESTING = [
    ("codec_model.encoder.layers.", "codec_model.encoder.encoder_seanet.layers."),
    ("codec_model.encoder_transformer.", "codec_model.encoder.encoder_transformer."),
    ("codec_model.downsample.", "codec_model.encoder.downsample."),
    ("codec_model.upsample.", "codec_model.decoder.upsample."),
    ("codec_model.decoder_transformer.", "codec_model.decoder.decoder_transformer."),
    ("codec_model.decoder.layers.", "codec_model.decoder.decoder_seanet.layers."),
]
TIED_AUDIO_TABLES = ("backbone.audio_embedding.embed_audio_tokens.weight", "decoder.audio_embedding.embed_audio_tokens.weight")


def _mimi_is_nested(model: ChromaModel) -> bool:
    return hasattr(model.codec_model, "decoder") and hasattr(model.codec_model.decoder, "decoder_seanet")


def checkpoint_name(model: ChromaModel, name: str) -> str:
    """The name a parameter of `model` has in a FlashLabs checkpoint."""
    if _mimi_is_nested(model):
        for flat, nested in _MIMI_NESTING:
            if name.startswith(nested):
                return flat + name[len(nested):]
    return name


def model_name(model: ChromaModel, name: str) -> str:
    """The parameter of `model` that a checkpoint tensor (either transformers layout) goes to."""
    for pattern, replacement in _NEW_THINKER_LAYOUT:
        name = pattern.sub(replacement, name)
    if _mimi_is_nested(model):
        for flat, nested in _MIMI_NESTING:
            if name.startswith(flat):
                return nested + name[len(flat):]
    return name


def checkpoint_state_dict(model: ChromaModel) -> dict[str, torch.Tensor]:
    """`model.state_dict()` under checkpoint names (tied tensors under both names, like the reference)."""
    return {checkpoint_name(model, k): v for k, v in model.state_dict().items()}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file or tensor at fault."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    try:
        return names[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}") from None


def resolve_checkpoint(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hugging Face repo id downloaded to the local cache (with progress)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"checkpoint folder not found: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    log.info("downloading %s from the Hugging Face Hub", text)
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not download {text!r} from the Hugging Face Hub: {exc}") from exc


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing weight shard(s) {', '.join(missing)}")
    return files


def iter_tensors(files: list[Path], progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    handles = []
    total = 0
    for f in files:
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from exc
        handles.append(h)
        total += len(list(h.keys()))
    bar = tqdm(total=total, desc="loading Chroma weights", unit="tensor", disable=not progress, leave=False)
    with bar:
        for h in handles:
            names = h.keys()  # a safetensors handle is not iterable itself
            for key in names:
                yield key, h.get_tensor(key)
                bar.update(1)


def load_weights(model: ChromaModel, tensors: Iterator[tuple[str, torch.Tensor]], *, source: str) -> None:
    """Copy named tensors into the model; any missing, unexpected or misshapen tensor is an error."""
    targets = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    unexpected: list[str] = []
    skipped_vision = 0
    with torch.no_grad():
        for raw_name, tensor in tensors:
            name = model_name(model, raw_name)
            if name not in targets:
                if name.startswith("thinker.visual.") and not model.with_vision:
                    skipped_vision += 1
                    continue
                unexpected.append(raw_name)
                continue
            target = targets[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{source}: tensor {raw_name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add(name)
    if TIED_AUDIO_TABLES[1] in seen and TIED_AUDIO_TABLES[0] not in seen:
        seen.add(TIED_AUDIO_TABLES[0])  # stored once: the backbone shares the decoder's table
    elif TIED_AUDIO_TABLES[0] in seen and TIED_AUDIO_TABLES[1] not in seen:
        seen.add(TIED_AUDIO_TABLES[1])
    missing = sorted(checkpoint_name(model, name) for name in set(targets) - seen)  # as the file names them
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise CheckpointError(f"{source}: checkpoint does not match the Chroma model: " + "; ".join(parts))
    if skipped_vision:
        log.info("skipped %d vision-tower tensors (Chroma takes no images)", skipped_vision)
