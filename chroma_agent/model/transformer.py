"""A Llama/Qwen2-style decoder stack written flat, gpt-fast style.

Used three times: the thinker's text model (Qwen2.5: q/k/v biases, rope theta 1e6), the backbone and the
depth decoder (Llama: no biases). Parameter names follow transformers' Llama/Qwen2 modules so checkpoints
load without renaming. Attention always goes through a static `KVCache`; queries see the cache slots at or
before their own slot, which is causal attention in slot order. Rotary positions are passed separately
from slots because Chroma's depth decoder puts two inputs at rotary position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chroma_agent.engine.kv_cache import KVCache
from chroma_agent.model.config import StackConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like transformers does, so bf16 runs match the reference's rounding.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos/sin [B, T, head_dim] for integer positions [B, T] (computed in float32, then cast)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def causal_slot_mask(slots: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, 1, T, capacity] boolean mask: a query at slot s sees cache slots 0..s."""
    keys = torch.arange(capacity, device=slots.device)
    return (keys <= slots[..., None]).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        rows: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        all_rows: bool,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.write(layer, rows, slots, k, v)
        k_all, v_all = cache.layer(layer, None if all_rows else rows)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Transformer(nn.Module):
    """Embeddings in, final-norm hidden states out (the heads live with their owners)."""

    def __init__(self, cfg: StackConfig, *, with_token_embeddings: bool = False):
        super().__init__()
        self.cfg = cfg
        if with_token_embeddings:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, batch_size: int, capacity: int, *, dtype: torch.dtype, device) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch_size, c.num_kv_heads, capacity, c.head_dim, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]; positions and slots [B, T]; rows [B] indexes the cache (None: all rows)."""
        all_rows = rows is None
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = causal_slot_mask(slots, cache.capacity)
        for i, block in enumerate(self.layers):
            h = block.input_layernorm(x)
            x = x + block.self_attn(h, cos, sin, cache, i, rows, slots, mask, all_rows)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return self.norm(x)
