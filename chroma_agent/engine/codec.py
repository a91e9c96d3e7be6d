"""Streaming Mimi decoding: codec frames in, 80 ms of 24 kHz audio out per frame, as soon as it arrives.

`transformers.MimiModel.decode` turns a whole code sequence into audio at once. A speech agent cannot wait for
the end of a reply, and re-decoding the growing sequence after every frame costs O(T) per frame. Mimi's
decoder path is causal (causal convolutions, causal transposed convolutions, a causal sliding-window
transformer), so the audio of frame t depends only on frames <= t: carrying a small state per layer between
calls gives the same samples as the whole-sequence decode, at a constant cost per frame.

The design follows moshi's streaming modules: each layer of the decoder path is wrapped by a small object that
owns its own state (input history for convolutions, overlap tail for transposed convolutions, a key/value
window for the transformer). Every state tensor is allocated once for the whole batch and never changes
shape: each call decodes every row, and rows outside the call's `mask` keep their state exactly (moshi's exec
mask: the new state is selected per row with `torch.where` and copied in place). So a batched engine decodes
all conversations in one call with the same shapes every step, which `torch.compile` and CUDA graphs need, and
one conversation can restart (`reset`) without touching the others. The wrappers hold references to the
`MimiModel` submodules, never copies of their weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiModel,
    MimiResnetBlock,
    MimiTransformerModel,
)

__all__ = ["StreamingMimiDecoder"]

# Marks an empty key/value cache slot: no query position can be at or after it, so it is always masked out.
_EMPTY_POSITION = -1


def _start_padding(x: torch.Tensor, width: int, mode: str) -> torch.Tensor:
    """The `width` samples the whole-sequence decode puts before a stream's start, built from its first chunk.

    For "constant" and "replicate" this is exact. "reflect" mirrors samples 1..width, which the first chunk
    may not hold yet; like the offline padding of a too-short input, the missing ones are taken as zeros.
    """
    if mode == "constant":
        return x.new_zeros(*x.shape[:-1], width)
    if mode == "replicate":
        return x[..., :1].expand(*x.shape[:-1], width)
    if mode == "reflect":
        short = width + 1 - x.shape[-1]
        if short > 0:
            x = F.pad(x, (0, short))
        # sample 1..width, reversed, sits left of sample 0
        return x[..., 1 : width + 1].flip(-1)
    raise ValueError(f"unsupported pad_mode {mode!r} for streaming")


def _conv1d(window: torch.Tensor, conv: nn.Conv1d, weight: torch.Tensor) -> torch.Tensor:
    """A stride-1 causal convolution of `window` [B, C_in, T + context] as one matmul over its K shifted views.

    The same sums as `nn.Conv1d` in another order: at one frame per call the inputs are a few samples wide,
    where a convolution primitive's setup costs more than the arithmetic, and a matmul also fuses under
    `torch.compile`. `weight` is the kernel as [C_out, C_in * K] (a view of the parameter).
    """
    k, d = conv.kernel_size[0], conv.dilation[0]
    length = window.shape[-1] - (k - 1) * d
    if k == 1:
        taps = window
    else:  # [B, C_in, K, T] -> [B, C_in * K, T], in the kernel's own (channel, tap) order
        taps = torch.stack([window[..., i * d : i * d + length] for i in range(k)], dim=2).flatten(1, 2)
    out = torch.matmul(weight, taps)
    return out if conv.bias is None else out + conv.bias[:, None]


def _conv_transpose1d(x: torch.Tensor, conv: nn.ConvTranspose1d, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """`F.conv_transpose1d(x, weight)` without bias, as a matmul (or a product, depthwise) plus overlap-add.

    Each input sample spreads over K outputs, K = blocks * stride (the kernel is zero-padded up to that): the
    per-sample contributions [B, C_out, T, K] are cut into `blocks` slabs of one stride each, and slab j lands
    j strides to the right. `weight` is [groups, C_in/groups, C_out/groups * K] for a matmul, or [C, K] for a
    depthwise layer.
    """
    b, _, t = x.shape
    stride, groups = conv.stride[0], conv.groups
    if weight.dim() == 2:  # depthwise: one output channel per input channel
        parts = x[..., None] * weight[None, :, None, :]  # [B, C, T, K]
    else:
        per = x.view(b, groups, x.shape[1] // groups, t).transpose(2, 3)  # [B, g, T, C_in/g]
        parts = torch.matmul(per, weight).view(b, groups, t, -1, blocks * stride)  # [B, g, T, C_out/g, K]
        parts = parts.permute(0, 1, 3, 2, 4).reshape(b, -1, t, blocks * stride)  # [B, C_out, T, K]
    slabs = parts.view(b, parts.shape[1], t, blocks, stride)
    width = (t + blocks - 1) * stride
    out = None
    for j in range(blocks):
        slab = slabs[:, :, :, j].reshape(b, -1, t * stride)
        slab = F.pad(slab, (j * stride, width - t * stride - j * stride))
        out = slab if out is None else out + slab
    full = (t - 1) * stride + (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
    return out[..., :full]


def _keep(mask: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> None:
    """old <- new on the rows of `mask` (all rows when None), in place: the buffer keeps its address."""
    if mask is None:
        old.copy_(new)
    else:
        old.copy_(torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old))


class _StreamingConv1d:
    """A causal `MimiConv1d` keeping its last (kernel - 1) * dilation input samples as the next left context.

    The whole-sequence decode pads the start on the left; here only a stream's first chunk gets that padding,
    every later chunk is preceded by the real samples before it, so the concatenated outputs equal the offline
    output.
    """

    def __init__(self, layer: MimiConv1d, batch: int):
        if not layer.causal:
            raise ValueError("streaming needs causal convolutions (config.use_causal_conv=True)")
        conv = layer.conv
        if conv.stride[0] != 1:
            # Mimi's decoder path has only stride-1 convolutions; a strided one would need phase tracking too
            raise ValueError(f"streaming supports stride-1 convolutions only, got stride {conv.stride[0]}")
        if conv.padding[0] != 0:
            raise ValueError("the inner nn.Conv1d is expected to have no padding of its own")
        if conv.groups != 1:
            raise ValueError(f"streaming supports ungrouped convolutions only, got groups={conv.groups}")
        self.conv = conv
        self.pad_mode = layer.pad_mode
        self.context = (conv.kernel_size[0] - 1) * conv.dilation[0]
        weight = conv.weight
        self.history = weight.new_zeros(batch, conv.in_channels, self.context)
        # rows that have not seen a chunk since their reset (only "replicate"/"reflect" pad from the chunk)
        self.fresh = torch.ones(batch, dtype=torch.bool, device=weight.device)

    def reset(self, rows: list[int] | None) -> None:
        target = slice(None) if rows is None else rows
        self.history[target] = 0
        self.fresh[target] = True

    def head(self, n: int) -> _StreamingConv1d:
        part = copy.copy(self)
        part.history, part.fresh = self.history[:n], self.fresh[:n]
        return part

    def _weight(self) -> torch.Tensor:
        return self.conv.weight.view(self.conv.out_channels, -1)  # [C_out, C_in * K]: a view, never stale

    def step(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.context == 0:
            return _conv1d(x, self.conv, self._weight())
        history = self.history
        # zeros are already the start padding for "constant"; other modes need the first chunk itself
        if self.pad_mode != "constant":
            start = _start_padding(x, self.context, self.pad_mode)
            history = torch.where(self.fresh[:, None, None], start, history)
            _keep(mask, torch.zeros_like(self.fresh), self.fresh)
        window = torch.cat([history, x], dim=-1)
        _keep(mask, window[..., -self.context :], self.history)
        return _conv1d(window, self.conv, self._weight())


class _StreamingConvTranspose1d:
    """A causal `MimiConvTranspose1d` that carries its overlap-add tail into the next chunk.

    A transposed convolution spreads each input sample over `kernel` outputs, so the last (kernel - stride)
    outputs of a chunk are incomplete until the next chunk's contribution is added. The offline layer trims
    exactly that many samples on the right (trim_right_ratio = 1), so emitting stride * length samples per
    chunk and keeping the rest as the tail reproduces it. The bias is added on emission only, so the tail's
    overlap does not count it twice.
    """

    def __init__(self, layer: MimiConvTranspose1d, batch: int):
        if not layer.causal or layer.padding_left != 0:
            # trimming on the left would delay the output by padding_left samples: not 80 ms out per frame in
            raise ValueError("streaming needs causal transposed convolutions with trim_right_ratio=1.0")
        conv = layer.conv
        if conv.padding[0] != 0 or conv.output_padding[0] != 0:
            raise ValueError("the inner nn.ConvTranspose1d is expected to have no padding of its own")
        if conv.dilation[0] != 1:
            raise ValueError("streaming supports undilated transposed convolutions only")
        self.conv = conv
        self.stride = conv.stride[0]
        kernel = conv.kernel_size[0]
        self.blocks = -(-kernel // self.stride)
        overlap = kernel - self.stride
        self.tail = conv.weight.new_zeros(batch, conv.out_channels, max(overlap, 0))

    def reset(self, rows: list[int] | None) -> None:
        self.tail[slice(None) if rows is None else rows] = 0

    def head(self, n: int) -> _StreamingConvTranspose1d:
        part = copy.copy(self)
        part.tail = self.tail[:n]
        return part

    def _weight(self) -> torch.Tensor:
        """The kernel as `_conv_transpose1d` takes it, zero-padded to whole strides (rebuilt per call: it is
        small, and a cached copy would go stale if the weights changed)."""
        conv = self.conv
        w = F.pad(conv.weight, (0, self.blocks * self.stride - conv.kernel_size[0]))  # [C_in, C_out/g, K']
        groups = conv.groups
        if groups == conv.in_channels and w.shape[1] == 1:
            return w[:, 0]
        return w.view(groups, conv.in_channels // groups, -1)

    def step(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        conv = self.conv
        y = _conv_transpose1d(x, conv, self._weight(), self.blocks)
        emitted = x.shape[-1] * self.stride
        overlap = self.tail.shape[-1]
        if overlap:
            y = torch.cat([y[..., :overlap] + self.tail, y[..., overlap:]], dim=-1)
            _keep(mask, y[..., emitted:], self.tail)
        out = y[..., :emitted]
        if conv.bias is not None:
            out = out + conv.bias[None, :, None]
        return out


class _StreamingResnetBlock:
    """A `MimiResnetBlock` whose convolutions (and optional convolutional shortcut) stream."""

    def __init__(self, block: MimiResnetBlock, batch: int):
        self.steps = _streaming_steps(block.block, batch)
        self.shortcut = _StreamingConv1d(block.shortcut, batch) if isinstance(block.shortcut, MimiConv1d) else None
        if self.shortcut is None and not isinstance(block.shortcut, nn.Identity):
            raise TypeError(f"unexpected shortcut {type(block.shortcut).__name__}")

    def reset(self, rows: list[int] | None) -> None:
        for step in self.steps:
            if not isinstance(step, nn.Module):
                step.reset(rows)
        if self.shortcut is not None:
            self.shortcut.reset(rows)

    def head(self, n: int) -> _StreamingResnetBlock:
        part = copy.copy(self)
        part.steps = _heads(self.steps, n)
        part.shortcut = self.shortcut.head(n) if self.shortcut is not None else None
        return part

    def step(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        residual = self.shortcut.step(x, mask) if self.shortcut is not None else x
        return residual + _run_steps(self.steps, x, mask)


_Step = nn.Module | _StreamingConv1d | _StreamingConvTranspose1d | _StreamingResnetBlock


def _streaming_steps(layers: nn.ModuleList, batch: int) -> list[_Step]:
    """Wrap each layer of a SEANet stack; stateless activations are used as they are.

    Unknown layer types are refused rather than run as-is: a stateful layer run chunk by chunk without its
    state would give audio that is silently wrong at every chunk boundary.
    """
    steps: list[_Step] = []
    for layer in layers:
        if isinstance(layer, MimiConv1d):
            steps.append(_StreamingConv1d(layer, batch))
        elif isinstance(layer, MimiConvTranspose1d):
            steps.append(_StreamingConvTranspose1d(layer, batch))
        elif isinstance(layer, MimiResnetBlock):
            steps.append(_StreamingResnetBlock(layer, batch))
        elif isinstance(layer, nn.ELU | nn.Identity):
            steps.append(layer)
        else:
            raise TypeError(f"no streaming version of {type(layer).__name__}")
    return steps


def _heads(steps: list[_Step], n: int) -> list[_Step]:
    return [step if isinstance(step, nn.Module) else step.head(n) for step in steps]


def _run_steps(steps: list[_Step], x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    for step in steps:
        x = step(x) if isinstance(step, nn.Module) else step.step(x, mask)
    return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout Mimi uses: (a, b) -> (a cos - b sin, b cos + a sin)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class _StreamingTransformer:
    """The decoder's `MimiTransformerModel` run a few positions at a time over a key/value window.

    The offline model lets position p attend to positions p - window + 1 .. p, so the cache keeps the last
    window - 1 keys and values per row. It always holds that many slots, so every call of a given length has
    the same shapes; empty slots carry position -1 and are masked. Positions are counted per row, so
    restarting one row starts its positions (and RoPE phases) at 0 exactly as a fresh stream would, while the
    other rows keep counting.
    """

    def __init__(self, model: MimiTransformerModel, batch: int):
        self.model = model
        window = getattr(model.config, "sliding_window", None)
        if window is None:
            raise ValueError("streaming needs a sliding-window decoder transformer (config.sliding_window)")
        self.window = int(window)
        slots = self.window - 1
        weight = next(model.parameters())
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in model.layers:
            attn = layer.self_attn
            shape = (batch, attn.num_key_value_heads, slots, attn.head_dim)
            self.keys.append(weight.new_zeros(shape))
            self.values.append(weight.new_zeros(shape))
        self.key_positions = torch.full((batch, slots), _EMPTY_POSITION, dtype=torch.long, device=weight.device)
        self.offset = torch.zeros(batch, dtype=torch.long, device=weight.device)
        rotary = model.rotary_emb
        self.inv_freq = rotary.inv_freq
        self.rotary_scale = float(rotary.attention_scaling)

    def reset(self, rows: list[int] | None) -> None:
        target = slice(None) if rows is None else rows
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target] = 0
            values[target] = 0
        self.key_positions[target] = _EMPTY_POSITION
        self.offset[target] = 0

    def head(self, n: int) -> _StreamingTransformer:
        part = copy.copy(self)
        part.keys = [k[:n] for k in self.keys]
        part.values = [v[:n] for v in self.values]
        part.key_positions, part.offset = self.key_positions[:n], self.offset[:n]
        return part

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # transformers' MimiRotaryEmbedding, without its Python-side dynamic-rope hook
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rotary_scale).to(dtype), (emb.sin() * self.rotary_scale).to(dtype)

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """hidden: [B, L, hidden_size] -> [B, L, hidden_size]."""
        batch, length, _ = hidden.shape
        positions = self.offset[:, None] + torch.arange(length, device=hidden.device)  # [B, L]
        cos, sin = self._rotary(positions, hidden.dtype)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads

        all_positions = torch.cat([self.key_positions, positions], dim=1)  # [B, slots + L]
        distance = positions[:, :, None] - all_positions[:, None, :]
        allowed = (distance >= 0) & (distance < self.window) & (all_positions[:, None, :] >= 0)
        # [B, 1, L, slots + L]; every query sees at least itself, so no row is all-masked (which would give NaN)
        attn_mask = allowed[:, None]
        slots = self.key_positions.shape[1]

        for index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys = torch.cat([self.keys[index], k], dim=2)
            values = torch.cat([self.values[index], v], dim=2)
            _keep(mask, keys[:, :, keys.shape[2] - slots :], self.keys[index])
            _keep(mask, values[:, :, values.shape[2] - slots :], self.values[index])
            groups = attn.num_key_value_groups
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            context = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=attn.scaling)
            context = context.transpose(1, 2).reshape(batch, length, -1)
            hidden = hidden + layer.self_attn_layer_scale(attn.o_proj(context))
            hidden = hidden + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(hidden)))

        _keep(mask, all_positions[:, all_positions.shape[1] - slots :], self.key_positions)
        _keep(mask, self.offset + length, self.offset)
        return hidden


class _Dequantizer:
    """Codes [B, K, T] -> latents [B, hidden, T], as Mimi's split residual quantizer decodes them.

    The codebook tables are materialised once here (Mimi memoises them on first use and never refreshes the
    memo), and each group is summed and projected in the same order as transformers does it.
    """

    def __init__(self, quantizer: nn.Module):
        self.groups: list[tuple[list[torch.Tensor], nn.Module | None, int]] = []
        start = 0
        for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
            tables = []
            for layer in rvq.layers:
                book = layer.codebook
                tables.append(book.embed_sum / book.cluster_usage.clamp(min=book.epsilon)[:, None])
            self.groups.append((tables, rvq.output_proj, start))
            start += len(tables)
        self.num_codebooks = start

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        out = None
        for tables, proj, start in self.groups:
            if start >= codes.shape[1]:
                break
            group = None
            for i, table in enumerate(tables[: codes.shape[1] - start]):
                part = F.embedding(codes[:, start + i], table).permute(0, 2, 1)
                group = part if group is None else group + part
            if proj is not None:
                group = proj(group)
            out = group if out is None else out + group
        return out


class StreamingMimiDecoder:
    """Decodes Mimi codec frames incrementally, giving each frame's 1920 samples (80 ms at 24 kHz) right away.

    Output equals `mimi.decode(all_codes).audio_values` up to float rounding, for any split of the frames into
    calls, because every layer of Mimi's decoder path is causal and keeps the state it needs between calls.

    Caveat, `pad_mode="reflect"` only: the offline decode pads the start of each convolution by mirroring the
    samples that follow it, which the stream may not have yet. It is exact when a stream's first call carries
    at least 4 frames (the first SEANet convolution, kernel 7 at 25 Hz, mirrors 6 samples and needs 7 = 3.5
    frames); with fewer, the missing samples are taken as zeros and the first few frames of audio differ,
    after which the output is exact again (every layer has a finite receptive field). Both the tiny fixture
    and Chroma-4B (transformers' default MimiConfig) use "constant", which is exact for any split; "replicate"
    is exact too.
    """

    def __init__(self, mimi: MimiModel, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config = mimi.config
        if config.audio_channels != 1:
            raise ValueError(f"only mono Mimi is supported, got {config.audio_channels} audio channels")
        upsample, transformer, seanet = self._decoder_parts(mimi)
        self.mimi = mimi
        self.batch_size = batch_size
        self._dequantize = _Dequantizer(mimi.quantizer)
        self._upsample = _StreamingConvTranspose1d(upsample, batch_size) if upsample is not None else None
        self._transformer = _StreamingTransformer(transformer, batch_size)
        self._seanet = _streaming_steps(seanet.layers, batch_size)
        latent_stride = upsample.conv.stride[0] if upsample is not None else 1
        #: audio samples produced per codec frame (1920 for Mimi at 24 kHz / 12.5 Hz)
        self.samples_per_frame = latent_stride * math.prod(config.upsampling_ratios)

    @staticmethod
    def _decoder_parts(mimi: MimiModel) -> tuple[MimiConvTranspose1d | None, MimiTransformerModel, nn.Module]:
        """(upsample, decoder transformer, SEANet decoder) in either transformers layout.

        Since 5.x, `MimiModel.decoder` is a `MimiDecoderModel` holding all three (the flat attributes are
        deprecated aliases); before, they were attributes of `MimiModel` and `decoder` was the SEANet stack
        itself.
        """
        decoder = mimi.decoder
        if decoder is None:
            raise ValueError("this MimiModel was built without a decoder")
        if hasattr(decoder, "decoder_seanet"):
            return decoder.upsample, decoder.decoder_transformer, decoder.decoder_seanet
        return mimi.upsample, mimi.decoder_transformer, decoder

    def head(self, n: int) -> StreamingMimiDecoder:
        """The first `n` rows as a decoder of their own, sharing this one's state (a smaller batch bucket)."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"head({n}) of a {self.batch_size}-row decoder")
        part = copy.copy(self)
        part.batch_size = n
        part._upsample = self._upsample.head(n) if self._upsample is not None else None
        part._transformer = self._transformer.head(n)
        part._seanet = _heads(self._seanet, n)
        return part

    def _stateful(self) -> list:
        parts = [self._upsample, self._transformer, *self._seanet]
        return [part for part in parts if part is not None and not isinstance(part, nn.Module)]

    @torch.inference_mode()
    def reset(self, rows: list[int] | None = None) -> None:
        """Start new streams: all rows, or only `rows`, leaving the others' streams untouched.

        A batched engine runs many conversations in one batch and restarts a row when its next reply begins;
        the restarted row then decodes exactly as a freshly built decoder would.
        """
        if rows is not None:
            rows = sorted(set(rows))
            for row in rows:
                if not 0 <= row < self.batch_size:
                    raise IndexError(f"row {row} is outside the batch of {self.batch_size}")
            if not rows:
                return
        for part in self._stateful():
            part.reset(rows)

    @torch.inference_mode()
    def decode(self, codes: torch.LongTensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Audio for the next frames of every row: codes [B, K, T] -> waveform [B, T * 1920].

        With `mask` ([B] bool), only those rows' streams advance; the others' output is computed and ignored,
        and their state stays exactly where it was. Only the new frames are passed; what earlier frames
        contribute is in the carried state. Codes must already be valid codebook indices (0..2047): Chroma's
        special values (2048+) are the caller's to strip or clamp.
        """
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, codebooks, frames], got shape {tuple(codes.shape)}")
        if codes.shape[0] != self.batch_size:
            raise ValueError(f"codes have {codes.shape[0]} rows, the decoder was built for {self.batch_size}")
        if codes.shape[-1] < 1:
            raise ValueError("decode needs at least one frame")
        if mask is not None and tuple(mask.shape) != (self.batch_size,):
            raise ValueError(f"mask must be [{self.batch_size}] bool, got shape {tuple(mask.shape)}")
        return self.step(codes, mask)

    def step(self, codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`decode` without the checks: the traceable body a compiled engine step calls."""
        latents = self._dequantize(codes.long())  # [B, hidden, T]
        hidden = self._upsample.step(latents, mask) if self._upsample is not None else latents
        hidden = self._transformer.step(hidden.transpose(1, 2), mask).transpose(1, 2)
        audio = _run_steps(self._seanet, hidden, mask)  # [B, 1, T * samples_per_frame]
        return audio[:, 0]
