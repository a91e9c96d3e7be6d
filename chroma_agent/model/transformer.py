"""A Llama/Qwen2-style decoder stack written flat, gpt-fast style.

Used three times: the thinker's text model (Qwen2.5: q/k/v biases, rope theta 1e6), the backbone and the
depth decoder (Llama: no biases). Parameter names follow transformers' Llama/Qwen2 modules so checkpoints
load without renaming. Attention always goes through a static `KVCache`; queries see the cache slots at or
before their own slot, which is causal attention in slot order. Rotary positions are passed separately
from slots because Chroma's depth decoder puts two inputs at rotary position 0.

Nothing in a forward depends on Python state that changes between calls (no lazy tables, no pointer
checks), so a forward is traceable by `torch.compile(fullgraph=True)` and capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chroma_agent.model.config import StackConfig
from chroma_agent.model.kv_cache import KVCache


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


def rotary_tables(head_dim: int, theta: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for positions 0..length-1, float32 [length, head_dim].

    Stored as (cos, signed sin) so rotating a vector is `x * cos + x.roll(half) * sin`: the usual
    rotate-half layout of Llama/Qwen2 in four elementwise ops.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(length).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return emb.cos(), sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@torch.no_grad()
def fuse_linears(owner: nn.Module, prefix: str, linears: list[nn.Linear]) -> None:
    """Store several projections of one input as ONE weight (and bias), keeping each projection's name.

    The fused tensors are non-persistent buffers of `owner` (`{prefix}_weight`, `{prefix}_bias`); the named
    parameters become views into them, so loading a checkpoint into the parameters fills the fused tensors
    and nothing is stored twice. Anything that re-allocates parameters (`.to()`, `load_state_dict(assign=
    True)`) breaks the views; `ChromaModel.fuse_weights()` calls this again once, never inside a forward.
    """
    first = linears[0].weight
    weight = torch.cat([lin.weight.detach() for lin in linears]).to(first.device, first.dtype)
    owner.register_buffer(f"{prefix}_weight", weight, persistent=False)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.detach() for lin in linears]).to(first.device, first.dtype)
    owner.register_buffer(f"{prefix}_bias", bias, persistent=False)
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]
        if bias is not None:
            lin.bias.data = bias[start : start + rows]
        start += rows


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
        self.fuse()

    def fuse(self) -> None:
        fuse_linears(self, "qkv", [self.q_proj, self.k_proj, self.v_proj])

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
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
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
        self.fuse()

    def fuse(self) -> None:
        fuse_linears(self, "gate_up", [self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
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
        cos, sin = rotary_tables(cfg.head_dim, cfg.rope_theta, max(cfg.max_position_embeddings, 16384))
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

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
        """x [B, T, hidden]; positions and slots [B, T]; rows [B] indexes the cache (None: rows 0..B-1)."""
        all_rows = rows is None
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        cos = self.rotary_cos[positions].to(x.dtype)
        sin = self.rotary_sin[positions].to(x.dtype)
        mask = causal_slot_mask(slots, cache.capacity)
        for i, block in enumerate(self.layers):
            h = block.input_layernorm(x)
            x = x + block.self_attn(h, cos, sin, cache, i, rows, slots, mask, all_rows)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return self.norm(x)
