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
        if x.dtype == torch.float32:
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryTable:
    """cos and sin for every position up to `length`, built once per device and dtype.

    Stored as (cos, signed sin) so rotating a vector is `x * cos + x.roll(half) * sin`: the usual
    rotate-half layout of Llama/Qwen2 in four elementwise ops.
    """

    def __init__(self, head_dim: int, theta: float, length: int):
        self.head_dim, self.theta, self.length = head_dim, theta, length
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (positions.device, dtype)
        if key not in self._tables:
            half = self.head_dim // 2
            inv_freq = 1.0 / (
                self.theta ** (torch.arange(0, self.head_dim, 2, device=positions.device).float() / self.head_dim)
            )
            freqs = torch.arange(self.length, device=positions.device).float()[:, None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            sin[:, :half] = -sin[:, :half]
            self._tables[key] = (emb.cos().to(dtype), sin.to(dtype))
        cos, sin = self._tables[key]
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input, without a second copy.

    The parameters keep their checkpoint names but become views into one tensor, so a step runs one
    matmul instead of three. If anything re-allocated a parameter since (`.to()`, `load_state_dict(assign=
    True)`), the views no longer line up and the fused tensor is rebuilt.
    """
    first = linears[0].weight
    offset = first.data_ptr()
    aligned = True
    for lin in linears:
        w = lin.weight
        if w.data_ptr() != offset or not w.is_contiguous():
            aligned = False
            break
        offset += w.numel() * w.element_size()
    fused = getattr(linears[0], "_fused", None)
    if aligned and fused is not None and fused[0].data_ptr() == first.data_ptr() and fused[0].dtype == first.dtype:
        return fused
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = None
        if linears[0].bias is not None:
            bias = torch.cat([lin.bias.detach() for lin in linears])
        start = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[start : start + rows]
            if bias is not None:
                lin.bias.data = bias[start : start + rows]
            start += rows
    linears[0]._fused = (weight, bias)
    return weight, bias


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
        weight, bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        qkv = F.linear(x, weight, bias)
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[..., :nq].view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., nq : nq + nkv].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = qkv[..., nq + nkv :].view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
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
        weight, _ = fuse_linears([self.gate_proj, self.up_proj])
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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
        # Positions past the trained range still work (rope has no hard limit); the table just has to cover them.
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, max(cfg.max_position_embeddings, 16384))

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
        cos, sin = self.rotary.lookup(positions, x.dtype)
        mask = causal_slot_mask(slots, cache.capacity)
        for i, block in enumerate(self.layers):
            h = block.input_layernorm(x)
            x = x + block.self_attn(h, cos, sin, cache, i, rows, slots, mask, all_rows)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return self.norm(x)
