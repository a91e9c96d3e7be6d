"""StreamingMimiDecoder must give, frame by frame, the audio MimiModel.decode gives for the whole sequence.

Tolerances: in float32 the whole-sequence decode itself is only reproducible to a few 1e-5 here (decoding a
prefix vs the full sequence already differs by ~3e-5, because convolutions and matmuls of different lengths
round differently, and the random-weight fixture's waveform peaks near 75, where one float32 ulp is ~8e-6). So
float32 checks use 1e-4; float64 runs of the same models show the streaming algorithm is exact (differences
~1e-13).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import MimiConfig, MimiModel

from chroma_agent.engine.codec import StreamingMimiDecoder

FRAME = 1920
F32_TOL = 1e-4
F64_TOL = 1e-9

# transformers 5.x moved the decoder (and encoder) parts of MimiModel under `decoder.` / `encoder.`;
# checkpoints, the tiny fixture's included, keep the original flat names (from_pretrained renames them the
# same way).
_NESTED_LAYOUT = [
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
    ("downsample.", "encoder.downsample."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
]


def _to_model_names(state: dict[str, torch.Tensor], model: MimiModel) -> dict[str, torch.Tensor]:
    if not hasattr(model.decoder, "decoder_seanet"):
        return state
    renamed = {}
    for name, tensor in state.items():
        for flat, nested in _NESTED_LAYOUT:
            if name.startswith(flat):
                name = nested + name[len(flat) :]
                break
        renamed[name] = tensor
    return renamed


@pytest.fixture(scope="module")
def tiny_mimi(tiny_dir: Path) -> MimiModel:
    with open(tiny_dir / "config.json") as f:
        config = MimiConfig(**json.load(f)["codec_config"])
    assert config.frame_rate == 12.5 and config.latent_stride == 2  # `_frame_rate` is honoured
    model = MimiModel(config)
    prefix = "codec_model."
    state = {
        k[len(prefix) :]: v
        for k, v in load_file(tiny_dir / "model.safetensors").items()
        if k.startswith(prefix)
    }
    model.load_state_dict(_to_model_names(state, model), strict=True)
    return model.float().eval()


@pytest.fixture(scope="module")
def golden_codes(golden_outputs: dict[str, np.ndarray]) -> torch.Tensor:
    frames = torch.from_numpy(golden_outputs["frames"])
    assert frames.shape == (32, 8) and int(frames.max()) > 2047  # the clamp below is exercised
    return frames.clamp(0, 2047).T[None].contiguous()  # [1, 8, 32]


def _offline(mimi: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return mimi.decode(codes).audio_values[:, 0]


def _stream(decoder: StreamingMimiDecoder, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == codes.shape[-1]
    pieces = []
    for chunk in codes.split(sizes, dim=-1):
        audio = decoder.decode(chunk)
        # each frame's audio comes out in the call that brings the frame
        assert audio.shape == (codes.shape[0], chunk.shape[-1] * FRAME)
        pieces.append(audio)
    return torch.cat(pieces, dim=-1)


def _random_sizes(total: int, seed: int, largest: int = 7) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(1, largest + 1, (1,), generator=generator)), total - sum(sizes)))
    return sizes


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _random_codes(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, 8, frames), generator=torch.Generator().manual_seed(seed))


# --- tiny fixture checkpoint --------------------------------------------------------------------------------


def test_offline_decode_matches_reference_golden(tiny_mimi, golden_codes, golden_outputs):
    reference = torch.from_numpy(golden_outputs["waveform"])
    offline = _offline(tiny_mimi, golden_codes)
    assert offline.shape == (1, 32 * FRAME) and reference.shape == (32 * FRAME,)
    # golden made with transformers 5.0.0rc0; this checks the installed Mimi decodes the same
    assert _max_diff(offline[0], reference) < 1e-3


def test_frame_by_frame_equals_whole_sequence(tiny_mimi, golden_codes):
    offline = _offline(tiny_mimi, golden_codes)
    streamed = _stream(StreamingMimiDecoder(tiny_mimi), golden_codes, [1] * 32)
    assert streamed.dtype == torch.float32
    assert offline.abs().max() > 1.0  # non-trivial audio, so the tolerance below means something
    assert _max_diff(streamed, offline) < F32_TOL


@pytest.mark.parametrize(
    "sizes",
    [
        [1, 2, 3, 5, 8, 13],
        [32],
        [31, 1],
        [2] * 16,
        _random_sizes(32, seed=1),
        _random_sizes(32, seed=2, largest=12),
    ],
    ids=["fib", "whole", "31+1", "pairs", "random1", "random2"],
)
def test_any_split_equals_whole_sequence(tiny_mimi, golden_codes, sizes):
    offline = _offline(tiny_mimi, golden_codes)
    assert _max_diff(_stream(StreamingMimiDecoder(tiny_mimi), golden_codes, sizes), offline) < F32_TOL


def test_reset_all_restarts_the_stream(tiny_mimi, golden_codes):
    decoder = StreamingMimiDecoder(tiny_mimi)
    first = _stream(decoder, golden_codes, [4] * 8)
    decoder.reset()
    again = _stream(decoder, golden_codes, [1] * 32)
    assert _max_diff(first, again) < F32_TOL
    # without the reset, the stream would have continued instead: decoding the codes twice in a row differs
    continued = _stream(decoder, golden_codes[..., :4], [4])
    assert _max_diff(continued, first[:, : 4 * FRAME]) > 1e-2


def test_batch_rows_and_partial_reset(tiny_mimi):
    codes_a, codes_b, codes_c = _random_codes(1, 20, 11), _random_codes(1, 10, 12), _random_codes(1, 12, 13)
    decoder = StreamingMimiDecoder(tiny_mimi, batch_size=2)

    before = _stream(decoder, torch.cat([codes_a[..., :10], codes_b], dim=0), [1, 3, 6])
    assert _max_diff(before[0], _offline(tiny_mimi, codes_a[..., :10])[0]) < F32_TOL
    assert _max_diff(before[1], _offline(tiny_mimi, codes_b)[0]) < F32_TOL

    decoder.reset(rows=[1])  # row 1's next reply begins; row 0 is mid-reply
    after = _stream(decoder, torch.cat([codes_a[..., 10:], codes_c[..., :10]], dim=0), [2, 1, 7])

    # row 0 continues as if nothing happened
    row0 = torch.cat([before[0], after[0]])
    assert _max_diff(row0, _offline(tiny_mimi, codes_a)[0]) < F32_TOL
    # row 1 equals a fresh decoder (and the whole-sequence decode) on its new codes
    fresh = _stream(StreamingMimiDecoder(tiny_mimi), codes_c[..., :10], [10])
    assert _max_diff(after[1], fresh[0]) < F32_TOL
    assert _max_diff(after[1], _offline(tiny_mimi, codes_c[..., :10])[0]) < F32_TOL
    # and the reset mattered: continuing row 1's old stream would give different audio
    continued = _offline(tiny_mimi, torch.cat([codes_b, codes_c[..., :10]], dim=-1))[0, 10 * FRAME :]
    assert _max_diff(after[1], continued) > 1e-2

    with pytest.raises(IndexError):
        decoder.reset(rows=[2])
    with pytest.raises(ValueError):
        decoder.decode(codes_a[..., :1])  # one row for a two-row decoder


def test_masked_rows_keep_their_state_exactly(tiny_mimi):
    """A batched engine decodes every row every step; rows outside the mask must not move at all."""
    codes = [_random_codes(1, 30, 20 + r) for r in range(3)]
    decoder = StreamingMimiDecoder(tiny_mimi, batch_size=3)
    taken = [0, 0, 0]
    out: list[list[torch.Tensor]] = [[], [], []]
    garbage = _random_codes(3, 1, 99)  # what masked rows are fed: it must leave no trace
    # first use on a subset, rows skipped for a while, then all rows together
    schedule = [[2, 0], [2], [1, 2], [0, 1, 2], [1], [2, 1, 0], [0], [0, 2], [0, 1, 2]] * 3
    for rows in schedule:
        chunk = garbage.clone()
        for r in rows:
            chunk[r] = codes[r][0, :, taken[r] : taken[r] + 1]
        mask = torch.tensor([r in rows for r in range(3)])
        audio = decoder.decode(chunk, mask)
        assert audio.shape == (3, FRAME)
        for r in rows:
            out[r].append(audio[r])
            taken[r] += 1
    for r in range(3):
        streamed = torch.cat(out[r])
        assert streamed.shape[0] == taken[r] * FRAME and taken[r] > 5
        assert _max_diff(streamed, _offline(tiny_mimi, codes[r][..., : taken[r]])[0]) < F32_TOL

    decoder.reset(rows=[1])
    two = torch.cat([garbage[:, :, :1].expand(3, 8, 2)]).clone()
    two[1] = codes[1][0, :, :2]
    restarted = decoder.decode(two, torch.tensor([False, True, False]))
    assert _max_diff(restarted[1], _offline(tiny_mimi, codes[1][..., :2])[0]) < F32_TOL
    with pytest.raises(ValueError, match="mask"):
        decoder.decode(two, torch.tensor([True, False]))
    with pytest.raises(IndexError):
        decoder.reset(rows=[3])


def test_longer_than_sliding_window(tiny_mimi):
    window = tiny_mimi.config.sliding_window
    # the window counts transformer positions, which run at 25 Hz after the 2x upsampling: 2 per codec frame
    assert window == 16
    frames = 60
    assert 2 * frames > 3 * window
    codes = _random_codes(1, frames, 21)
    offline = _offline(tiny_mimi, codes)

    decoder = StreamingMimiDecoder(tiny_mimi)
    assert _max_diff(_stream(decoder, codes, [1] * frames), offline) < F32_TOL
    # the cache is capped at window - 1 positions: older keys are evicted, not kept
    assert all(keys.shape[2] == window - 1 for keys in decoder._transformer.keys)
    decoder.reset()
    assert _max_diff(_stream(decoder, codes, _random_sizes(frames, seed=3, largest=15)), offline) < F32_TOL

    # The fixture's layer scales are small, so its transformer (and window) barely moves the audio. The same
    # weights with layer scales of 1, in float64, show the window does matter and the streaming cache still
    # follows it.
    loud = _copy_of(tiny_mimi, torch.float64, layer_scale=1.0)
    loud_offline = _offline(loud, codes)
    assert _max_diff(_stream(StreamingMimiDecoder(loud), codes, [1] * frames), loud_offline) < F64_TOL
    unlimited = _copy_of(tiny_mimi, torch.float64, layer_scale=1.0, sliding_window=4 * frames)
    assert _max_diff(_offline(unlimited, codes), loud_offline) > 1e-2


def _copy_of(
    mimi: MimiModel, dtype: torch.dtype, layer_scale: float | None = None, **config_changes
) -> MimiModel:
    config = MimiConfig(**{**mimi.config.to_diff_dict(), **config_changes}) if config_changes else mimi.config
    copy = MimiModel(config)
    copy.load_state_dict(mimi.state_dict())
    if layer_scale is not None:
        with torch.no_grad():
            for name, param in copy.named_parameters():
                if name.endswith("layer_scale.scale"):
                    param.fill_(layer_scale)
    return copy.to(dtype).eval()


def test_float64_streaming_is_exact(tiny_mimi):
    mimi = _copy_of(tiny_mimi, torch.float64)
    codes = _random_codes(2, 40, 31)
    offline = _offline(mimi, codes)
    assert offline.dtype == torch.float64
    for sizes in ([1] * 40, _random_sizes(40, seed=4)):
        streamed = _stream(StreamingMimiDecoder(mimi, batch_size=2), codes, sizes)
        assert streamed.dtype == torch.float64
        assert _max_diff(streamed, offline) < F64_TOL


# --- transformers' default MimiConfig (Chroma-4B's codec settings), tiny sizes, random weights --------------


def _default_config_mimi(dtype: torch.dtype, **overrides) -> MimiModel:
    sizes = {
        "hidden_size": 32,
        "num_filters": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,  # the default 8 equals the default head count: plain multi-head attention
        "upsample_groups": 32,  # the default 512 needs hidden_size >= 512
        "num_quantizers": 8,  # as Chroma-4B
    }
    config = MimiConfig(**{**sizes, **overrides})
    torch.manual_seed(0)
    model = MimiModel(config)
    with torch.no_grad():
        # the init leaves every codebook at zero (all codes decode alike) and the layer scales at 0.01
        # (transformer nearly bypassed): make both matter, so a wrong code lookup or attention state shows in
        # the audio
        for name, buffer in model.named_buffers():
            if name.endswith("embed_sum"):
                buffer.normal_()
        for name, param in model.named_parameters():
            if name.endswith("layer_scale.scale"):
                param.fill_(0.5)
    return model.to(dtype).eval()


DEFAULT_VARIANTS = {
    "defaults": {},
    # optional pieces the default leaves off: a convolutional shortcut, grouped-query attention, replicate
    # padding
    "shortcut-gqa-replicate": {"use_conv_shortcut": True, "num_key_value_heads": 1, "pad_mode": "replicate"},
}


@pytest.mark.parametrize("variant", list(DEFAULT_VARIANTS))
def test_default_config(variant):
    overrides = DEFAULT_VARIANTS[variant]
    defaults = MimiConfig()
    assert defaults.pad_mode == "constant" and defaults.trim_right_ratio == 1.0 and defaults.use_causal_conv
    # 130 frames = 260 transformer positions > the default 250-position window, so eviction happens here too
    frames = 130
    assert 2 * frames > defaults.sliding_window
    codes = _random_codes(1, frames, 41)

    mimi32 = _default_config_mimi(torch.float32, **overrides)
    offline32 = _offline(mimi32, codes)
    assert offline32.abs().max() > 1.0
    assert _max_diff(_stream(StreamingMimiDecoder(mimi32), codes, [1] * frames), offline32) < F32_TOL

    # float64 (exactness) in random chunks only: float64 convolutions are slow on CPU, ~45 ms per call here
    mimi64 = _default_config_mimi(torch.float64, **overrides)
    sizes = _random_sizes(frames, seed=5, largest=20)
    assert _max_diff(_stream(StreamingMimiDecoder(mimi64), codes, sizes), _offline(mimi64, codes)) < F64_TOL


def test_reflect_padding_caveat():
    # "reflect" pads a stream's start with the samples that follow it. The first SEANet convolution (kernel 7,
    # 25 Hz) mirrors 6 samples = 3 frames ahead, so a stream whose first call has >= 4 frames is exact ...
    mimi = _default_config_mimi(torch.float64, pad_mode="reflect")
    codes = _random_codes(1, 24, 51)
    offline = _offline(mimi, codes)
    assert _max_diff(_stream(StreamingMimiDecoder(mimi), codes, [4] + [1] * 20), offline) < F64_TOL

    # ... while frame by frame the mirrored samples are not there yet (taken as zeros). Only that first
    # convolution's outputs 0..5 differ, and each later layer spreads a difference by a bounded amount (a
    # transposed conv maps input p to outputs p * stride .. p * stride + kernel - 1, a kernel-3 conv reaches 2
    # samples on): no sample after 7155 can be affected, inside the first 4 frames (7680 samples). From frame 4 on
    # the audio is exact; before it, it really differs.
    streamed = _stream(StreamingMimiDecoder(mimi), codes, [1] * 24)
    assert _max_diff(streamed[:, 4 * FRAME :], offline[:, 4 * FRAME :]) < F64_TOL
    assert _max_diff(streamed[:, : 4 * FRAME], offline[:, : 4 * FRAME]) > 1e-6


def test_refuses_non_streamable_configs():
    # trimming a transposed convolution on the left would delay the audio: not one frame out per frame in
    with pytest.raises(ValueError, match="trim_right_ratio"):
        StreamingMimiDecoder(_default_config_mimi(torch.float32, trim_right_ratio=0.5))
