"""The one KV-cache type: static, preallocated, one row per batch slot.

Shapes never change after allocation, so decode steps have fixed shapes (CUDA graphs, torch.compile).
Each row is written at explicit slot indices; attention masks are derived from slot order, which lets a
row hold a conversation of any length up to `capacity` while other rows hold others. Storage is
slot-major ([layers, rows, slots, heads, dim]) so a write of any rows and slots is one `index_copy_`, and
the first n rows of every layer are one contiguous block (`head(n)` is a view, never a copy).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, batch_size, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def _of(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def head(self, rows: int) -> KVCache:
        """The first `rows` rows, sharing storage (a smaller batch bucket of the same cache)."""
        return KVCache._of(self.k[:, :rows], self.v[:, :rows])

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, H, T, D] of cache rows `rows` [B] at `slots` [B, T]."""
        b, h, t, d = k.shape
        index = (rows[:, None] * self.capacity + slots).reshape(-1)
        self.k[layer].view(-1, h, d).index_copy_(0, index, k.transpose(1, 2).reshape(b * t, h, d))
        self.v[layer].view(-1, h, d).index_copy_(0, index, v.transpose(1, 2).reshape(b * t, h, d))

    def layer(self, layer: int, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as [B, H, capacity, D] views (or gathered copies when `rows` picks a subset)."""
        k, v = self.k[layer], self.v[layer]
        if rows is not None:
            k, v = k.index_select(0, rows), v.index_select(0, rows)
        return k.transpose(1, 2), v.transpose(1, 2)

    def copy_rows(self, src: KVCache, src_row: int, dst_row: int, length: int) -> None:
        """Copy the first `length` slots of one row of `src` into a row of this cache (voice prefixes)."""
        self.k[:, dst_row, :length] = src.k[:, src_row, :length]
        self.v[:, dst_row, :length] = src.v[:, src_row, :length]

    def clear_row(self, row: int) -> None:
        """Zero one row. Masked attention still multiplies every slot by its (zero) weight, and 0 x NaN is NaN,
        so a row that ever held a non-finite value must be scrubbed before anyone uses it again."""
        self.k[:, row].zero_()
        self.v[:, row].zero_()
