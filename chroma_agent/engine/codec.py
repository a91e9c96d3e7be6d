"""Streaming Mimi decoding: codec frames in, 80 ms of 24 kHz audio out per frame, as soon as it arrives.

`transformers.MimiModel.decode` turns a whole code sequence into audio at once. A speech agent cannot wait for
the end of a reply, and re-decoding the growing sequence after every frame costs O(T) per frame. Mimi's
decoder path is causal (causal convolutions, causal transposed convolutions, a causal sliding-window
transformer), so the audio of frame t depends only on frames <= t: carrying a small state per layer between
calls gives the same samples as the whole-sequence decode, at a constant cost per frame.

The design follows moshi's streaming modules: each layer of the decoder path is wrapped by a small object that
owns its own state (input history for convolutions, overlap tail for transposed convolutions, a key/value
cache limited to the attention window for the transformer) and can clear it per batch row, so one conversation
in a batched engine can restart without touching the others. The wrappers hold references to the `MimiModel`
submodules, never copies of their weights.
"""

from __future__ import annotations

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


def _row_index(rows: list[int] | None, batch_size: int) -> list[int] | None:
    """Validated, de-duplicated rows, or None for "every row"; a plain list indexes state on any device."""
    if rows is None:
        return None
    for row in rows:
        if not 0 <= row < batch_size:
            raise IndexError(f"row {row} is outside the batch of {batch_size}")
    return sorted(set(rows))


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


class _RowState:
    """Per-row state that can be narrowed to some rows for a call and widened back afterwards.

    `_state` names the attributes holding state (tensors, or lists of tensors, with the batch on dim 0; None
    until first use) and the value an untouched row starts with. A batched engine decodes only the rows that
    made a frame this step; the other rows' streams must not move.
    """

    _state: dict[str, float | bool] = {}

    def narrow_state(self, rows: list[int]) -> dict[str, object]:
        full = {}
        for name in self._state:
            value = getattr(self, name)
            full[name] = value
            if isinstance(value, list):
                setattr(self, name, [v[rows] for v in value])
            elif value is not None:
                setattr(self, name, value[rows])
        return full

    def widen_state(self, rows: list[int], full: dict[str, object], batch: int) -> None:
        for name, fill in self._state.items():
            part = getattr(self, name)
            if part is None:
                setattr(self, name, full[name])
            elif isinstance(part, list):
                whole = full[name] or [None] * len(part)
                setattr(self, name, [_scatter(w, p, rows, batch, fill) for w, p in zip(whole, part, strict=True)])
            else:
                setattr(self, name, _scatter(full[name], part, rows, batch, fill))


def _scatter(whole: torch.Tensor | None, part: torch.Tensor, rows: list[int], batch: int, fill) -> torch.Tensor:
    if whole is None:  # first use happened on a subset: the other rows get a fresh stream's state
        whole = part.new_full((batch, *part.shape[1:]), fill)
    whole[rows] = part
    return whole


class _StreamingConv1d(_RowState):
    """A causal `MimiConv1d` keeping its last (kernel - 1) * dilation input samples as the next left context.

    The whole-sequence decode pads the start on the left; here only a stream's first chunk gets that padding,
    every later chunk is preceded by the real samples before it, so the concatenated outputs equal the offline
    output.
    """

    def __init__(self, layer: MimiConv1d):
        if not layer.causal:
            raise ValueError("streaming needs causal convolutions (config.use_causal_conv=True)")
        conv = layer.conv
        if conv.stride[0] != 1:
            # Mimi's decoder path has only stride-1 convolutions; a strided one would need phase tracking too
            raise ValueError(f"streaming supports stride-1 convolutions only, got stride {conv.stride[0]}")
        if conv.padding[0] != 0:
            raise ValueError("the inner nn.Conv1d is expected to have no padding of its own")
        self.conv = conv
        self.pad_mode = layer.pad_mode
        self.context = (conv.kernel_size[0] - 1) * conv.dilation[0]
        self.history: torch.Tensor | None = None  # [B, C_in, context], None until the first chunk
        self.fresh: torch.Tensor | None = None  # [B] bool: row has not seen a chunk since its reset

    _state = {"history": 0.0, "fresh": True}

    def reset(self, rows: list[int] | None) -> None:
        if rows is None or self.history is None:
            self.history = None
            self.fresh = None
            return
        self.history[rows] = 0
        self.fresh[rows] = True

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.context == 0:
            return self.conv(x)
        if self.history is None:
            self.history = x.new_zeros(x.shape[0], x.shape[1], self.context)
            self.fresh = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        history = self.history
        # zeros are already the start padding for "constant"; other modes need the first chunk itself
        if self.pad_mode != "constant" and bool(self.fresh.any()):
            start = _start_padding(x, self.context, self.pad_mode)
            history = torch.where(self.fresh[:, None, None], start, history)
        self.fresh.zero_()
        window = torch.cat([history, x], dim=-1)
        self.history = window[..., -self.context :].contiguous()
        return self.conv(window)


class _StreamingConvTranspose1d(_RowState):
    """A causal `MimiConvTranspose1d` that carries its overlap-add tail into the next chunk.

    A transposed convolution spreads each input sample over `kernel` outputs, so the last (kernel - stride)
    outputs of a chunk are incomplete until the next chunk's contribution is added. The offline layer trims
    exactly that many samples on the right (trim_right_ratio = 1), so emitting stride * length samples per
    chunk and keeping the rest as the tail reproduces it. The bias is added on emission only, so the tail's
    overlap does not count it twice.
    """

    def __init__(self, layer: MimiConvTranspose1d):
        if not layer.causal or layer.padding_left != 0:
            # trimming on the left would delay the output by padding_left samples: not 80 ms out per frame in
            raise ValueError("streaming needs causal transposed convolutions with trim_right_ratio=1.0")
        conv = layer.conv
        if conv.padding[0] != 0 or conv.output_padding[0] != 0:
            raise ValueError("the inner nn.ConvTranspose1d is expected to have no padding of its own")
        self.conv = conv
        self.stride = conv.stride[0]
        self.tail: torch.Tensor | None = None  # [B, C_out, overlap], None until the first chunk

    _state = {"tail": 0.0}

    def reset(self, rows: list[int] | None) -> None:
        if rows is None or self.tail is None:
            self.tail = None
            return
        self.tail[rows] = 0

    def step(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        y = F.conv_transpose1d(
            x, conv.weight, None, stride=self.stride, groups=conv.groups, dilation=conv.dilation[0]
        )
        emitted = x.shape[-1] * self.stride
        if self.tail is not None:
            overlap = self.tail.shape[-1]
            y[..., :overlap] += self.tail
        self.tail = y[..., emitted:].contiguous()
        out = y[..., :emitted]
        if conv.bias is not None:
            out = out + conv.bias[None, :, None]
        return out


class _StreamingResnetBlock:
    """A `MimiResnetBlock` whose convolutions (and optional convolutional shortcut) stream."""

    def __init__(self, block: MimiResnetBlock):
        self.steps = _streaming_steps(block.block)
        self.shortcut = _StreamingConv1d(block.shortcut) if isinstance(block.shortcut, MimiConv1d) else None
        if self.shortcut is None and not isinstance(block.shortcut, nn.Identity):
            raise TypeError(f"unexpected shortcut {type(block.shortcut).__name__}")

    def reset(self, rows: list[int] | None) -> None:
        for step in self.steps:
            if not isinstance(step, nn.Module):
                step.reset(rows)
        if self.shortcut is not None:
            self.shortcut.reset(rows)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut.step(x) if self.shortcut is not None else x
        return residual + _run_steps(self.steps, x)


_Step = nn.Module | _StreamingConv1d | _StreamingConvTranspose1d | _StreamingResnetBlock


def _streaming_steps(layers: nn.ModuleList) -> list[_Step]:
    """Wrap each layer of a SEANet stack; stateless activations are used as they are.

    Unknown layer types are refused rather than run as-is: a stateful layer run chunk by chunk without its
    state would give audio that is silently wrong at every chunk boundary.
    """
    steps: list[_Step] = []
    for layer in layers:
        if isinstance(layer, MimiConv1d):
            steps.append(_StreamingConv1d(layer))
        elif isinstance(layer, MimiConvTranspose1d):
            steps.append(_StreamingConvTranspose1d(layer))
        elif isinstance(layer, MimiResnetBlock):
            steps.append(_StreamingResnetBlock(layer))
        elif isinstance(layer, nn.ELU | nn.Identity):
            steps.append(layer)
        else:
            raise TypeError(f"no streaming version of {type(layer).__name__}")
    return steps


def _run_steps(steps: list[_Step], x: torch.Tensor) -> torch.Tensor:
    for step in steps:
        x = step(x) if isinstance(step, nn.Module) else step.step(x)
    return x


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout Mimi uses: (a, b) -> (a cos - b sin, b cos + a sin)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class _StreamingTransformer(_RowState):
    """The decoder's `MimiTransformerModel` run a few positions at a time over a key/value cache.

    The offline model lets position p attend to positions p - window + 1 .. p, so the cache keeps the last
    window - 1 keys and values per row. It always holds that many slots, so every call of a given length has
    the same shapes; empty slots carry position -1 and are masked. Positions are counted per row, so
    restarting one row starts its positions (and RoPE phases) at 0 exactly as a fresh stream would, while the
    other rows keep counting.
    """

    def __init__(self, model: MimiTransformerModel):
        self.model = model
        config = model.config
        window = getattr(config, "sliding_window", None)
        self.window: int | None = int(window) if window is not None else None
        self.capacity: int | None = self.window - 1 if self.window is not None else None
        self.keys: list[torch.Tensor] | None = None  # per layer [B, kv_heads, slots, head_dim]
        self.values: list[torch.Tensor] | None = None
        self.key_positions: torch.Tensor | None = None  # [B, slots]
        self.offset: torch.Tensor | None = None  # [B] next position per row

    _state = {"keys": 0.0, "values": 0.0, "key_positions": _EMPTY_POSITION, "offset": 0}

    def reset(self, rows: list[int] | None) -> None:
        if rows is None or self.keys is None:
            self.keys = self.values = self.key_positions = self.offset = None
            return
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[rows] = 0
            values[rows] = 0
        self.key_positions[rows] = _EMPTY_POSITION
        self.offset[rows] = 0

    def _allocate(self, hidden: torch.Tensor) -> None:
        batch = hidden.shape[0]
        slots = self.capacity if self.capacity is not None else 0
        self.keys, self.values = [], []
        for layer in self.model.layers:
            attn = layer.self_attn
            shape = (batch, attn.num_key_value_heads, slots, attn.head_dim)
            self.keys.append(hidden.new_zeros(shape))
            self.values.append(hidden.new_zeros(shape))
        self.key_positions = torch.full(
            (batch, slots), _EMPTY_POSITION, dtype=torch.long, device=hidden.device
        )
        self.offset = torch.zeros(batch, dtype=torch.long, device=hidden.device)

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, L, hidden_size] -> [B, L, hidden_size]."""
        if self.keys is None:
            self._allocate(hidden)
        batch, length, _ = hidden.shape
        positions = self.offset[:, None] + torch.arange(length, device=hidden.device)  # [B, L]
        cos, sin = self.model.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads

        all_positions = torch.cat([self.key_positions, positions], dim=1)  # [B, slots + L]
        distance = positions[:, :, None] - all_positions[:, None, :]
        allowed = (distance >= 0) & (all_positions[:, None, :] >= 0)
        if self.window is not None:
            allowed &= distance < self.window
        # [B, 1, L, slots + L]; every query sees at least itself, so no row is all-masked (which would give
        # NaN)
        mask = allowed[:, None]

        for index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys = torch.cat([self.keys[index], k], dim=2)
            values = torch.cat([self.values[index], v], dim=2)
            self.keys[index] = self._keep(keys, dim=2)
            self.values[index] = self._keep(values, dim=2)
            groups = attn.num_key_value_groups
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            context = context.transpose(1, 2).reshape(batch, length, -1)
            hidden = hidden + layer.self_attn_layer_scale(attn.o_proj(context))
            hidden = hidden + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(hidden)))

        self.key_positions = self._keep(all_positions, dim=1)
        self.offset = self.offset + length
        return hidden

    def _keep(self, cache: torch.Tensor, dim: int) -> torch.Tensor:
        """The most recent `capacity` entries along the slot axis `dim` (all of them without a window)."""
        if self.capacity is None:
            return cache
        return cache.narrow(dim, cache.shape[dim] - self.capacity, self.capacity).contiguous()


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
        # Mimi codebooks memoise their embedding table on first use and never refresh it, so a model decoded
        # once and then moved to another dtype/device (or reloaded) would look codes up in the stale table.
        # Dropping the memo only makes the next lookup rebuild it from the current buffers.
        for module in mimi.quantizer.modules():
            if hasattr(module, "_embed"):
                module._embed = None
        self._quantizer = mimi.quantizer
        self._upsample = _StreamingConvTranspose1d(upsample) if upsample is not None else None
        self._transformer = _StreamingTransformer(transformer)
        self._seanet = _streaming_steps(seanet.layers)
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

    def _stateful(self) -> list:
        parts = [self._upsample, self._transformer, *self._seanet]
        return [part for part in parts if part is not None and not isinstance(part, nn.Module)]

    def _leaves(self) -> list[_RowState]:
        leaves: list[_RowState] = []
        for part in self._stateful():
            if isinstance(part, _StreamingResnetBlock):
                leaves += [s for s in part.steps if isinstance(s, _RowState)]
                if part.shortcut is not None:
                    leaves.append(part.shortcut)
            else:
                leaves.append(part)
        return leaves

    @torch.inference_mode()
    def reset(self, rows: list[int] | None = None) -> None:
        """Start new streams: all rows, or only `rows`, leaving the others' streams untouched.

        A batched engine runs many conversations in one batch and restarts a row when its next reply begins;
        the restarted row then decodes exactly as a freshly built decoder would.
        """
        index = _row_index(rows, self.batch_size)
        if index is not None and not index:
            return
        for part in self._stateful():
            part.reset(index)

    @torch.inference_mode()
    def decode(self, codes: torch.LongTensor, rows: list[int] | None = None) -> torch.Tensor:
        """Audio for the next frames of the streams: codes [B, K, T] -> waveform [B, T * 1920].

        With `rows`, codes hold only those rows (in that order) and every other row's stream stays where it
        was, so a batched engine decodes just the conversations that made a frame this step in one call.
        Only the new frames are passed; what earlier frames contribute is in the carried state. Codes must
        already be valid codebook indices (0..2047): Chroma's special values (2048+) are the caller's to strip
        or clamp.
        """
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, codebooks, frames], got shape {tuple(codes.shape)}")
        if codes.shape[-1] < 1:
            raise ValueError("decode needs at least one frame")
        if rows is None:
            if codes.shape[0] != self.batch_size:
                raise ValueError(f"codes have {codes.shape[0]} rows, the decoder was built for {self.batch_size}")
            return self._decode(codes)
        rows = list(rows)
        if len(set(rows)) != len(rows) or len(rows) != codes.shape[0]:
            raise ValueError(f"rows {rows} must be distinct and match the {codes.shape[0]} rows of codes")
        _row_index(rows, self.batch_size)
        if len(rows) == self.batch_size and rows == sorted(rows):
            return self._decode(codes)
        leaves = self._leaves()
        saved = [leaf.narrow_state(rows) for leaf in leaves]
        try:
            return self._decode(codes)
        finally:
            for leaf, full in zip(leaves, saved, strict=True):
                leaf.widen_state(rows, full, self.batch_size)

    def _decode(self, codes: torch.LongTensor) -> torch.Tensor:
        codes = codes.to(device=self._quantizer_device(), dtype=torch.long)
        latents = self._quantizer.decode(codes)  # [B, hidden, T]
        hidden = self._upsample.step(latents) if self._upsample is not None else latents
        hidden = self._transformer.step(hidden.transpose(1, 2)).transpose(1, 2)
        audio = _run_steps(self._seanet, hidden)  # [B, 1, T * samples_per_frame]
        return audio[:, 0]

    def _quantizer_device(self) -> torch.device:
        for tensor in self._quantizer.buffers():
            return tensor.device
        return next(self.mimi.parameters()).device
