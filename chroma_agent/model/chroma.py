"""Chroma 1.0: thinker (Qwen2.5-Omni), backbone and depth decoder (Llama-style), Mimi codec.

Module and parameter names mirror the FlashLabs checkpoint (`thinker.audio_tower.*`, `thinker.model.*`,
`thinker.lm_head`, `backbone.*`, `decoder.*`, `codec_model.*`) so its safetensors load as they are. The
methods here are the per-step building blocks; the loops that drive them live in `chroma_agent.engine`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import MimiModel
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniAudioEncoder,
    Qwen2_5OmniVisionEncoder,
)

from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.kv_cache import KVCache
from chroma_agent.model.loading import (
    CheckpointError,
    iter_tensors,
    load_weights,
    parse_dtype,
    resolve_checkpoint,
    weight_files,
)
from chroma_agent.model.transformer import MLP, Attention, Transformer

log = logging.getLogger(__name__)

# Picks one code per row from one codebook's logits: (logits [B, vocab] float32, codebook index) -> [B].
Sampler = Callable[[torch.Tensor, int], torch.Tensor]


class AudioEmbedding(nn.Module):
    """One table for all codebooks: code c of codebook k lives at row c + k * vocab."""

    def __init__(self, num_codebooks: int, vocab_size: int, dim: int):
        super().__init__()
        self.embed_audio_tokens = nn.Embedding(num_codebooks * vocab_size, dim)
        self.vocab_size = vocab_size

    def codebook(self, codes: torch.Tensor, index: int) -> torch.Tensor:
        return self.embed_audio_tokens(codes + index * self.vocab_size)

    def frames(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., K] -> the sum of the K codebook embeddings [..., dim] (one backbone input per frame)."""
        k = codes.shape[-1]
        offsets = torch.arange(k, device=codes.device) * self.vocab_size
        return self.embed_audio_tokens(codes + offsets).sum(dim=-2)


class Thinker(nn.Module):
    def __init__(self, config: ChromaConfig, *, with_vision: bool):
        super().__init__()
        thinker_cfg = config.thinker_config
        audio_cfg = copy.deepcopy(thinker_cfg.audio_config)
        audio_cfg._attn_implementation = "sdpa"
        self.audio_tower = Qwen2_5OmniAudioEncoder(audio_cfg)
        if with_vision:
            # Never run: Chroma takes no images. Built only so the full parameter list matches the checkpoint.
            vision_cfg = copy.deepcopy(thinker_cfg.vision_config)
            vision_cfg._attn_implementation = "sdpa"
            self.visual = Qwen2_5OmniVisionEncoder(vision_cfg)
        self.model = Transformer(config.text, with_token_embeddings=True)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.audio_token_id = config.audio_token_id

    def encode_audio(self, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
        """Whisper features [n, mels, frames] + mask [n, frames] -> one vector per <|AUDIO|> id [N, hidden]."""
        mask = feature_mask.bool()
        lengths = mask.sum(dim=1)
        flat = features.permute(0, 2, 1)[mask].permute(1, 0)
        after_cnn, _ = self.audio_tower._get_feat_extract_output_lengths(lengths)
        dtype = self.audio_tower.conv1.weight.dtype
        out = self.audio_tower(flat.to(dtype), feature_lens=lengths, aftercnn_lens=after_cnn)
        return out.last_hidden_state

    def embed(self, input_ids: torch.Tensor, audio_embeds: torch.Tensor | None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        is_audio = input_ids == self.audio_token_id
        n_placeholders = int(is_audio.sum())
        n_audio = 0 if audio_embeds is None else audio_embeds.shape[0]
        if n_placeholders != n_audio:
            raise ValueError(f"prompt has {n_placeholders} audio placeholders but the audio gave {n_audio} vectors")
        if n_audio:
            embeds = embeds.masked_scatter(is_audio[..., None], audio_embeds.to(embeds.dtype))
        return embeds


class CodebookHeads(nn.Module):
    """Depth-decoder heads for codebooks 1..K-1, stored as one [K-1, hidden, vocab] weight."""

    def __init__(self, num_heads: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, hidden_size, vocab_size))

    def logits(self, hidden: torch.Tensor, codebook: int) -> torch.Tensor:
        return hidden @ self.weight[codebook - 1]


class Backbone(nn.Module):
    def __init__(self, config: ChromaConfig, audio_embedding: AudioEmbedding):
        super().__init__()
        self.model = Transformer(config.backbone)
        self.codebook0_head = nn.Linear(config.backbone.hidden_size, config.audio_vocab_size, bias=False)
        self.audio_embedding = audio_embedding


class DepthDecoder(nn.Module):
    def __init__(self, config: ChromaConfig, audio_embedding: AudioEmbedding):
        super().__init__()
        self.projection = nn.Linear(config.decoder_audio_embedding_dim, config.decoder.hidden_size, bias=False)
        self.model = Transformer(config.decoder)
        self.codebook_head = CodebookHeads(
            config.num_codebooks - 1, config.decoder.hidden_size, config.audio_vocab_size
        )
        self.audio_embedding = audio_embedding


class ChromaModel(nn.Module):
    def __init__(self, config: ChromaConfig, *, with_vision: bool = False):
        super().__init__()
        self.config = config
        self.with_vision = with_vision
        self.thinker = Thinker(config, with_vision=with_vision)
        # The backbone's and the decoder's audio tables are one tensor in the checkpoint (tied).
        audio_embedding = AudioEmbedding(config.num_codebooks, config.audio_vocab_size, config.backbone.hidden_size)
        self.backbone = Backbone(config, audio_embedding)
        self.decoder = DepthDecoder(config, audio_embedding)
        self.codec_model = MimiModel(config.codec_config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        with_vision: bool = False,
        revision: str | None = None,
        progress: bool = True,
    ) -> ChromaModel:
        """The model of a checkpoint folder or Hugging Face repo id, weights loaded, in eval mode."""
        folder = resolve_checkpoint(name_or_path, revision=revision)
        config = ChromaConfig.from_pretrained(folder)
        dtype = parse_dtype(dtype)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError("device 'cuda' requested but CUDA is not available in this torch build")
        files = weight_files(folder)
        model = cls.empty(config, device=device, dtype=dtype, with_vision=with_vision)
        load_weights(model, iter_tensors(files, progress), source=str(folder))
        model.eval()
        log.info("loaded Chroma from %s (device=%s, dtype=%s)", folder, device, dtype)
        return model

    @classmethod
    def empty(cls, config: ChromaConfig, *, device: torch.device | str, dtype: torch.dtype,
              with_vision: bool = False) -> ChromaModel:
        """Allocate the model on `device` without running any weight init (every tensor is then overwritten)."""
        with torch.device(device), no_init_weights(), _default_dtype(dtype):
            model = cls(config, with_vision=with_vision)
        # Mimi is small and sensitive to rounding; it stays in float32 whatever the LM dtype.
        model.codec_model.float()
        return model

    def fuse_weights(self) -> ChromaModel:
        """Re-link fused projections (qkv, gate/up) after anything re-allocated the parameters (`.to()`)."""
        for module in self.modules():
            if isinstance(module, Attention | MLP):
                module.fuse()
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.codebook0_head.weight.device

    @property
    def audio_window_frames(self) -> int:
        """Mel frames per audio-encoder attention window (Qwen2.5-Omni: 2 x n_window); windows encode alone."""
        return 2 * int(self.thinker.audio_tower.n_window)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.codebook0_head.weight.dtype

    # --- embeddings -------------------------------------------------------------------------------

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.thinker.model.embed_tokens(ids)

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        return self.backbone.audio_embedding.frames(codes)

    # --- voice prompt -----------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_voice_codes(self, waveform: torch.Tensor) -> torch.Tensor:
        """24 kHz mono waveform [samples] -> Mimi codes [K, frames] (first K codebooks, like the reference)."""
        codec = self.codec_model
        x = waveform.to(device=self.device, dtype=codec.dtype).reshape(1, 1, -1)
        codes = codec.encode(x).audio_codes
        return codes[0, : self.config.num_codebooks]

    @torch.inference_mode()
    def voice_prefix(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The backbone's fixed start [P, hidden]: text start, transcript, text end, voice frames, empty frame."""
        cfg = self.config
        ids = torch.cat(
            [
                torch.tensor([cfg.text_start_id], device=self.device),
                text_ids.reshape(-1).to(self.device),
                torch.tensor([cfg.text_end_id], device=self.device),
            ]
        )
        text = self.embed_text(ids)
        frames = self.embed_frames(codes.to(self.device).T)
        end_of_audio = torch.zeros(1, text.shape[-1], dtype=text.dtype, device=self.device)
        return torch.cat([text, frames, end_of_audio], dim=0)

    # --- per-step pieces --------------------------------------------------------------------------

    def thinker_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Thinker text model on embeds [B, T, H] -> (final-norm hidden at `last` [B] or the last position,
        its logits). `slots` default to `positions`."""
        hidden = self.thinker.model(embeds, positions, cache, positions if slots is None else slots, rows)
        hidden = _at(hidden, last)
        return hidden, self.thinker.lm_head(hidden).float()

    def backbone_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone on embeds [B, T, H] -> (final-norm hidden at `last` [B] or the last position, codebook-0
        logits). `slots` default to `positions`."""
        hidden = self.backbone.model(embeds, positions, cache, positions if slots is None else slots, rows)
        hidden = _at(hidden, last)
        return hidden, self.backbone.codebook0_head(hidden).float()

    def depth_decode(
        self, backbone_hidden: torch.Tensor, code0: torch.Tensor, cache: KVCache, sample: Sampler
    ) -> torch.Tensor:
        """Codebooks 1..K-1 of one frame for every row: [B, hidden], [B] -> codes [B, K].

        Matches the reference's `sdpa` semantics: the first call feeds [backbone hidden, codebook 0] at
        rotary position 0 twice (causal between them), then codebook k-1 at position k-1.
        """
        dec = self.decoder
        b = code0.shape[0]
        device = code0.device
        first = torch.stack([backbone_hidden, dec.audio_embedding.codebook(code0, 0)], dim=1)
        x = dec.projection(first)
        positions = torch.zeros(b, 2, dtype=torch.long, device=device)
        slots = torch.arange(2, device=device).expand(b, 2)
        codes = [code0]
        for k in range(1, self.config.num_codebooks):
            hidden = dec.model(x, positions, cache, slots)[:, -1]
            code = sample(dec.codebook_head.logits(hidden, k).float(), k)
            codes.append(code)
            if k + 1 < self.config.num_codebooks:
                x = dec.projection(dec.audio_embedding.codebook(code, k))[:, None]
                positions = torch.full((b, 1), k, dtype=torch.long, device=device)
                slots = torch.full((b, 1), k + 1, dtype=torch.long, device=device)
        return torch.stack(codes, dim=1)


def _at(hidden: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """hidden [B, T, H] at index `last` [B] of each row (the last position when None), as [B, H]."""
    if last is None:
        return hidden[:, -1]
    b, _, h = hidden.shape
    return hidden.gather(1, last.view(b, 1, 1).expand(b, 1, h))[:, 0]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
