"""Chroma 1.0 configuration: reads the `config.json` of a FlashLabs/Chroma-4B style checkpoint."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import MimiConfig
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a field or holds a value we cannot use."""


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section or section[key] is None:
        raise ConfigError(f"config.json: missing field {where}.{key}")
    return section[key]


def _rope_theta(section: dict[str, Any], where: str) -> float:
    rope = section.get("rope_parameters") or {}
    theta = rope.get("rope_theta", section.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"config.json: missing field {where}.rope_parameters.rope_theta")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"config.json: {where} uses rope_type {rope_type!r}; only 'default' is supported")
    return float(theta)


@dataclass(frozen=True)
class StackConfig:
    """Shape of one Llama/Qwen2-style decoder stack (thinker text model, backbone or depth decoder)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    vocab_size: int
    max_position_embeddings: int

    @classmethod
    def from_section(cls, section: dict[str, Any], where: str, *, qkv_bias: bool) -> StackConfig:
        hidden = int(_require(section, "hidden_size", where))
        heads = int(_require(section, "num_attention_heads", where))
        head_dim = section.get("head_dim") or hidden // heads
        if section.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: {where}.hidden_act must be 'silu'")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_require(section, "intermediate_size", where)),
            num_layers=int(_require(section, "num_hidden_layers", where)),
            num_heads=heads,
            num_kv_heads=int(section.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(_require(section, "rms_norm_eps", where)),
            rope_theta=_rope_theta(section, where),
            qkv_bias=qkv_bias,
            vocab_size=int(_require(section, "vocab_size", where)),
            max_position_embeddings=int(section.get("max_position_embeddings") or 0),
        )


class ChromaConfig:
    """Parsed `config.json` (`model_type: "chroma"`).

    The raw dict is kept so a checkpoint we save round-trips; the typed views are what the model uses.
    """

    def __init__(self, raw: dict[str, Any]):
        if raw.get("model_type") != "chroma":
            raise ConfigError(f"config.json: model_type is {raw.get('model_type')!r}, expected 'chroma'")
        self.raw = copy.deepcopy(raw)
        thinker = _require(raw, "thinker_config", "")
        text = _require(thinker, "text_config", "thinker_config")
        _require(thinker, "audio_config", "thinker_config")
        backbone = _require(raw, "backbone_config", "")
        decoder = _require(raw, "decoder_config", "")
        codec = _require(raw, "codec_config", "")

        self.text = StackConfig.from_section(text, "thinker_config.text_config", qkv_bias=True)
        self.backbone = StackConfig.from_section(backbone, "backbone_config", qkv_bias=False)
        self.decoder = StackConfig.from_section(decoder, "decoder_config", qkv_bias=False)
        self.decoder_audio_embedding_dim = int(_require(decoder, "audio_embedding_dim", "decoder_config"))
        self.tie_text_embeddings = bool(text.get("tie_word_embeddings", thinker.get("tie_word_embeddings", False)))

        self.num_codebooks = int(_require(raw, "audio_num_codebooks", ""))
        self.codebook_pad_id = int(_require(raw, "codebook_pad_token_id", ""))
        self.codebook_eos_id = int(_require(raw, "codebook_eos_token_id", ""))
        self.text_start_id = int(_require(raw, "text_start_token_id", ""))
        self.text_end_id = int(_require(raw, "text_end_token_id", ""))
        self.im_end_id = int(_require(raw, "im_end_token_id", ""))
        self.samples_per_frame = int(_require(raw, "audio_frame_freq", ""))
        self.audio_token_id = int(_require(thinker, "audio_token_index", "thinker_config"))

        for name, stack in (("backbone_config", backbone), ("decoder_config", decoder)):
            if int(stack.get("audio_num_codebooks", self.num_codebooks)) != self.num_codebooks:
                raise ConfigError(f"config.json: {name}.audio_num_codebooks differs from audio_num_codebooks")
        if self.backbone.vocab_size != self.decoder.vocab_size:
            raise ConfigError("config.json: backbone and decoder audio vocab sizes differ")
        if self.decoder_audio_embedding_dim != self.backbone.hidden_size:
            raise ConfigError(
                "config.json: decoder_config.audio_embedding_dim must equal backbone hidden_size "
                "(the audio embedding table is shared)"
            )

        self.thinker_config = Qwen2_5OmniThinkerConfig(**thinker)
        self.codec_config = MimiConfig(**codec)
        self.sample_rate = int(self.codec_config.sampling_rate)

    @property
    def audio_vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def codebook_size(self) -> int:
        return int(self.codec_config.codebook_size)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ChromaConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls(raw)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ChromaConfig:
        return cls.from_json_file(Path(folder) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)
