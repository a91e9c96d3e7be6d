"""The one sampler: greedy, or temperature + top-k + top-p, for a whole batch of rows at once.

Every row carries its own parameters as tensors, so rows of one batch may differ and one call serves
them all with a fixed number of device ops (no per-row Python, no host sync). Greedy rows are exactly
argmax. Sampled rows use the exponential race (Gumbel-max): the token is argmax(logits / T + G) over the
kept tokens, which draws exactly from their softmax. The noise G is a pure function of (seed, step,
codebook, token id) computed by an integer hash on the device, so a seeded row is reproducible across
runs and independent of which other rows share its batch, without a `torch.Generator` per row.
"""

from __future__ import annotations

import torch

from chroma_agent.engine.params import MAX_TEMPERATURE, SamplingParams

__all__ = ["MAX_TEMPERATURE", "SamplingParams", "SamplingRows", "race_noise", "sample"]

_MASK32 = 0xFFFFFFFF


class SamplingRows:
    """Per-row sampling parameters as device tensors (one entry per engine row)."""

    def __init__(self, rows: int, device: torch.device | str):
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)

    def set_row(self, row: int, params: SamplingParams) -> None:
        # Python scalars go in as fill values: no host buffer, no sync.
        self.temperature[row] = 1.0 if params.greedy else float(params.temperature)
        self.top_k[row] = int(params.top_k)
        self.top_p[row] = float(params.top_p)
        self.seed[row] = params.row_seed()
        self.greedy[row] = params.greedy

    def head(self, rows: int) -> SamplingRows:
        view = SamplingRows.__new__(SamplingRows)
        for name in ("temperature", "top_k", "top_p", "seed", "greedy"):
            setattr(view, name, getattr(self, name)[:rows])
        return view


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors; multipliers < 2^31 keep it overflow-free."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def race_noise(seed: torch.Tensor, step: torch.Tensor, codebooks: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, codebooks, vocab] (float32) for one step of every row, in one pass: a pure function
    of (seed, step, codebook, token id) per row."""
    key = _mix32(_mix32(seed ^ (seed >> 32)) ^ _mix32(step))  # [B]
    ids = torch.arange(codebooks * vocab, device=seed.device).view(1, codebooks, vocab)
    bits = _mix32(key[:, None, None] + ids * 0x2545F491)
    # 24 bits -> u strictly inside (0, 1), exactly representable in float32.
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, rows: SamplingRows, noise: torch.Tensor) -> torch.Tensor:
    """One token per row from logits [B, vocab] (float32); `noise` [B, vocab] is this draw's `race_noise`."""
    vocab = logits.shape[-1]
    greedy_ids = logits.argmax(dim=-1)
    scaled = logits / rows.temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None]
    k = torch.where(rows.top_k > 0, rows.top_k, vocab)
    keep = rank < k[:, None]
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p; the top token always
    # stays, so a p too small for float32 (it rounds to 0) still leaves one token to pick.
    probs = torch.where(keep, ordered, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    keep = keep & ((before < rows.top_p[:, None]) | (rank == 0))
    pick = torch.where(keep, ordered + noise.gather(-1, order), float("-inf")).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(rows.greedy, greedy_ids, sampled)
