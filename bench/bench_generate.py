"""Inference-core benchmark: our frame-by-frame engine vs a `transformers` generate-per-frame baseline.

    python bench/bench_generate.py                  # tiny fixture, CPU float32, golden inputs, greedy
    python bench/bench_generate.py --full           # also: Chroma-4B shapes, random bf16 weights, CPU
    python bench/bench_generate.py --frames 32 --repeats 5

Tiny part. "ours" is `chroma_agent.engine.generate.generate_reply`. The baseline is written here and mirrors
what the FlashLabs reference does per reply: the thinker is transformers'
`Qwen2_5OmniThinkerForConditionalGeneration` with a `DynamicCache`, the backbone is a
`transformers.LlamaModel` (token embeddings replaced by identity) with a `DynamicCache`, the voice prompt is
Mimi-encoded inside the request, and every frame's codebooks 1..7 come from
`GenerationMixin.generate(max_new_tokens=7, min_new_tokens=7, do_sample=False)` on a small depth-decoder
model. Both hold the same weights and must give the golden frames before any time is reported. Runs of the
two are interleaved and medians are taken, so a busy machine slows both alike; compare the ratios.

Full part (`--full`): Chroma-4B shapes from `chroma-4b-config.json`, random bf16 weights, CPU; per-frame step
time through `generate_reply` and the thinker's prefill time on a short synthetic prompt.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    DynamicCache,
    GenerationConfig,
    GenerationMixin,
    LlamaConfig,
    LlamaModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

from chroma_agent.engine.generate import AudioFrame, ReplyDone, TextToken, generate_reply
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig

REPO = Path(__file__).resolve().parents[1]


FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_TINY = FIXTURES / "chroma-tiny"
DEFAULT_FULL_CONFIG = FIXTURES / "chroma-4b-config.json"
GOLDEN_CASE = Path("golden") / "public_single_turn"


# --------------------------------------------------------------------------------------------------
# machine info and small helpers
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --------------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------------


def run_ours(model: ChromaModel, prompt, prefix: torch.Tensor, frames: int) -> dict:
    """One reply through `generate_reply`; wall-clock stamps of every kept frame."""
    start = time.perf_counter()
    stamps: list[float] = []
    done = None
    for event in generate_reply(model, prompt, prefix, max_frames=frames):
        if isinstance(event, AudioFrame):
            stamps.append(time.perf_counter())
        elif isinstance(event, ReplyDone):
            done = event
        else:
            assert isinstance(event, TextToken)
    end = time.perf_counter()
    assert done is not None
    return {
        "ttff": stamps[0] - start,
        "per_frame": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
        "total": end - start,
        "codes": done.codes(),
        "text": list(done.text_ids),
    }


# --------------------------------------------------------------------------------------------------
# baseline: the reference's structure on transformers modules
# --------------------------------------------------------------------------------------------------


class DepthDecoderForGenerate(PreTrainedModel, GenerationMixin):
    """The reference's depth decoder shape, driven by `GenerationMixin.generate` once per frame.

    First call: input_ids [B, 1] = codebook 0 plus `backbone_last_hidden_state` [B, H]; the two inputs
    [hidden, A[c0]] go through `projection` at rotary position 0, causal (what the reference's `sdpa` run
    computes). Later calls: the newest code c_(k-1) embedded at row c + 2051 (k-1), rotary position k-1.
    Logits come from `codebook_head[k-1]` at the last position.
    """

    config_class = LlamaConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config: LlamaConfig, num_codebooks: int, audio_vocab: int, audio_dim: int):
        super().__init__(config)
        self.num_codebooks = num_codebooks
        self.audio_vocab = audio_vocab
        self.embed_audio_tokens = nn.Embedding(num_codebooks * audio_vocab, audio_dim)
        self.projection = nn.Linear(audio_dim, config.hidden_size, bias=False)
        self.model = LlamaModel(config)
        self.model.embed_tokens = nn.Identity()
        self.codebook_head = nn.Parameter(torch.empty(num_codebooks - 1, config.hidden_size, audio_vocab))
        self.post_init()

    def _init_weights(self, module):  # weights are copied in afterwards
        pass

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration:
            inputs.pop("backbone_last_hidden_state", None)
        return inputs

    def forward(
        self, input_ids, backbone_last_hidden_state=None, past_key_values=None, use_cache=True, **kwargs
    ) -> CausalLMOutputWithPast:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        codebook = max(past - 1, 0)  # which codebook input_ids[:, -1] belongs to
        x = self.embed_audio_tokens(input_ids[:, -1:] + codebook * self.audio_vocab)
        if backbone_last_hidden_state is not None:
            x = torch.cat([backbone_last_hidden_state[:, None].to(x.dtype), x], dim=1)
        x = self.projection(x)
        b, t = x.shape[:2]
        positions = torch.full((b, t), codebook, dtype=torch.long, device=x.device)
        mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        out = self.model(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        logits = out.last_hidden_state[:, -1] @ self.codebook_head[codebook]
        return CausalLMOutputWithPast(logits=logits[:, None].float(), past_key_values=out.past_key_values)


def _llama_config(section: dict, dtype: torch.dtype) -> LlamaConfig:
    raw = {
        k: v for k, v in section.items() if k not in ("model_type", "architectures", "dtype", "torch_dtype")
    }
    config = LlamaConfig(**raw)
    config._attn_implementation = "sdpa"
    config.dtype = dtype
    return config


class ReferenceLoop:
    """Generate-per-frame loop with transformers modules holding our model's weights (batch 1).

    Per reply, as the reference: Mimi-encode the voice clip, build the backbone prefix, thinker prefill over
    the whole prompt (audio encoder included), then per frame one backbone call on the new positions (the
    codebook-0 head on every position), one `decoder.generate`, and on every second frame one thinker token.
    The outer loop is plain Python, leaner than the reference's own `generate` override (no logits
    processors, stopping-criteria objects or model-kwargs bookkeeping), so if anything this baseline is fast.
    """

    def __init__(self, model: ChromaModel):
        cfg = model.config
        dtype = model.dtype
        self.cfg = cfg
        self.codec = model.codec_model  # the reference encodes the voice clip with Mimi in every request
        self.embed_text = model.thinker.model.embed_tokens
        self.audio_table = model.backbone.audio_embedding.embed_audio_tokens

        thinker_cfg = copy.deepcopy(cfg.thinker_config)
        self.thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(
            thinker_cfg, attn_implementation="sdpa", dtype=dtype
        ).eval()
        ours = model.thinker.state_dict()
        renamed = {}
        for name, tensor in ours.items():
            if name.startswith("model."):
                renamed["model.language_model." + name[len("model.") :]] = tensor
            elif name.startswith("audio_tower."):
                renamed["model." + name] = tensor
            elif name == "lm_head.weight":
                renamed[name] = tensor
        missing, unexpected = self.thinker.load_state_dict(renamed, strict=False)
        missing = [m for m in missing if not m.startswith("model.visual.")]
        assert not missing and not unexpected, (missing, unexpected)

        self.backbone = LlamaModel(_llama_config(cfg.raw["backbone_config"], dtype)).to(dtype).eval()
        self.backbone.embed_tokens = nn.Identity()
        self.backbone.load_state_dict(
            {k: v for k, v in model.backbone.model.state_dict().items() if not k.startswith("embed_tokens")}
        )
        self.codebook0_head = model.backbone.codebook0_head

        dec_cfg = _llama_config(cfg.raw["decoder_config"], dtype)
        self.decoder = (
            DepthDecoderForGenerate(
                dec_cfg, cfg.num_codebooks, cfg.audio_vocab_size, cfg.decoder_audio_embedding_dim
            )
            .to(dtype)
            .eval()
        )
        self.decoder.model.load_state_dict(
            {k: v for k, v in model.decoder.model.state_dict().items() if not k.startswith("embed_tokens")}
        )
        with torch.no_grad():
            self.decoder.projection.weight.copy_(model.decoder.projection.weight)
            self.decoder.codebook_head.copy_(model.decoder.codebook_head.weight)
            self.decoder.embed_audio_tokens.weight.copy_(
                model.decoder.audio_embedding.embed_audio_tokens.weight
            )
        self.decoder.generation_config = GenerationConfig(
            max_new_tokens=cfg.num_codebooks - 1,
            min_new_tokens=cfg.num_codebooks - 1,
            do_sample=False,
            pad_token_id=cfg.codebook_pad_id,
            eos_token_id=None,
            bos_token_id=None,
        )

    def embed_frame(self, frame: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(frame.shape[-1]) * self.cfg.audio_vocab_size
        return self.audio_table(frame + offsets).sum(dim=-2)

    @torch.inference_mode()
    def run(self, inputs: dict[str, torch.Tensor], frames: int) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        # voice prompt: Mimi-encode the clip, then [text start, transcript, text end, frames, zero]
        codes = self.codec.encode(inputs["input_values"]).audio_codes[0, : cfg.num_codebooks]
        voice_done = time.perf_counter()
        ids = torch.cat(
            [torch.tensor([cfg.text_start_id]), inputs["input_ids"][0], torch.tensor([cfg.text_end_id])]
        )
        prefix = torch.cat(
            [self.embed_text(ids), self.embed_frame(codes.T), torch.zeros(1, self.embed_text.embedding_dim)]
        )

        thinker_cache = DynamicCache(config=self.thinker.config.get_text_config())
        thinker_mask = inputs["thinker_attention_mask"]
        out = self.thinker(
            input_ids=inputs["thinker_input_ids"],
            input_features=inputs["thinker_input_features"],
            attention_mask=thinker_mask,
            feature_attention_mask=inputs["thinker_feature_attention_mask"],
            past_key_values=thinker_cache,
            use_cache=True,
            output_hidden_states=True,
            use_audio_in_video=False,
        )
        token = out.logits[:, -1].argmax(-1)
        step_in = torch.cat(
            [prefix[None], out.hidden_states[-1][:, -1:], self.embed_text(token)[:, None]], dim=1
        )
        text = [int(token)]
        thinker_live = int(token) != cfg.im_end_id
        text_due = False

        backbone_cache = DynamicCache(config=self.backbone.config)
        backbone_len = 0
        kept: list[torch.Tensor] = []
        stamps: list[float] = []
        while True:
            backbone_len += step_in.shape[1]
            bout = self.backbone(
                inputs_embeds=step_in,
                attention_mask=torch.ones(1, backbone_len, dtype=torch.long),
                past_key_values=backbone_cache,
                use_cache=True,
                output_hidden_states=True,
            )
            # like the reference: the head runs on every position, the last one is used
            logits = self.codebook0_head(bout.last_hidden_state)
            last = bout.hidden_states[-1][:, -1]
            code0 = logits[:, -1].float().argmax(-1, keepdim=True)
            frame = self.decoder.generate(
                input_ids=code0, backbone_last_hidden_state=last.clone(), use_cache=True
            )[0]
            if int(frame.sum()) != 0:
                kept.append(frame)
                stamps.append(time.perf_counter())
            if bool((frame[:-1] == cfg.codebook_eos_id).all()) or len(kept) >= frames:
                break
            step_in = self.embed_frame(frame)[None, None]
            if thinker_live and text_due:
                thinker_mask = torch.cat([thinker_mask, torch.ones(1, 1, dtype=thinker_mask.dtype)], dim=1)
                # text positions + the prefill's rope deltas, as transformers' generate passes them
                positions = torch.full((3, 1, 1), thinker_mask.shape[1] - 1) + self.thinker.model.rope_deltas
                out = self.thinker(
                    input_ids=token[:, None],
                    attention_mask=thinker_mask,
                    position_ids=positions,
                    past_key_values=thinker_cache,
                    use_cache=True,
                    output_hidden_states=True,
                )
                token = out.logits[:, -1].argmax(-1)
                text.append(int(token))
                step_in = torch.cat(
                    [step_in, out.hidden_states[-1][:, -1:], self.embed_text(token)[:, None]], dim=1
                )
                thinker_live = int(token) != cfg.im_end_id
                text_due = False
            else:
                text_due = thinker_live
        end = time.perf_counter()
        return {
            "voice_encode": voice_done - start,
            "ttff": stamps[0] - start,
            "ttff_no_voice": stamps[0] - voice_done,
            "per_frame": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
            "total": end - start,
            "codes": torch.stack(kept),
            "text": text,
        }


# --------------------------------------------------------------------------------------------------
# tiny fixture: ours vs baseline on the golden case
# --------------------------------------------------------------------------------------------------


def load_golden(fixture: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    case = fixture / GOLDEN_CASE
    with np.load(case / "inputs.npz") as data:
        inputs = {k: torch.from_numpy(data[k]) for k in data.files}
    with np.load(case / "outputs.npz") as data:
        outputs = {k: data[k] for k in data.files}
    return inputs, outputs


def check_frames(name: str, codes: torch.Tensor, text: list[int], golden: dict[str, np.ndarray]) -> None:
    """Frames must equal the golden ones (as far as both go), else timings compare different work."""
    n = min(codes.shape[0], golden["frames"].shape[0])
    if not np.array_equal(codes[:n].numpy(), golden["frames"][:n]):
        bad = int(np.argmax((codes[:n].numpy() != golden["frames"][:n]).any(axis=1)))
        raise AssertionError(f"{name}: frames differ from the golden frames from frame {bad} on")
    m = min(len(text), len(golden["thinker_text_ids"]))
    if text[:m] != golden["thinker_text_ids"][:m].tolist():
        raise AssertionError(f"{name}: thinker text differs from the golden text")


def stream_first_frame(model: ChromaModel, codes: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """Time one StreamingMimiDecoder.decode of the first frame (None if the streaming codec fails)."""
    frame = codes[:1].clamp(0, model.config.codebook_size - 1).T[None]  # [1, K, 1]
    try:  # the streaming codec is younger than the rest; a broken one must not stop the benchmark
        from chroma_agent.engine.codec import StreamingMimiDecoder

        decoder = StreamingMimiDecoder(model.codec_model)
        start = time.perf_counter()
        audio = decoder.decode(frame)
        return time.perf_counter() - start, audio[0]
    except Exception as exc:
        print(f"warning: streaming Mimi decode unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


@torch.inference_mode()
def whole_decode(model: ChromaModel, codes: torch.Tensor) -> tuple[float, torch.Tensor]:
    """What a non-streaming server does once the reply is complete: Mimi-decode every frame at once."""
    frames = codes.clamp(0, model.config.codebook_size - 1).T[None]
    start = time.perf_counter()
    audio = model.codec_model.decode(frames).audio_values[0, 0]
    return time.perf_counter() - start, audio


def bench_tiny(fixture: Path, frames: int, repeats: int) -> dict:
    model = ChromaModel.from_pretrained(fixture, progress=False)
    inputs, golden = load_golden(fixture)
    prompt = SimpleNamespace(
        input_ids=inputs["thinker_input_ids"],
        input_features=inputs["thinker_input_features"],
        feature_attention_mask=inputs["thinker_feature_attention_mask"],
    )
    # Ours keeps a voice's backbone prefix between requests; the baseline encodes the clip every time.
    voice_codes = model.encode_voice_codes(inputs["input_values"][0, 0])
    assert np.array_equal(voice_codes.numpy(), golden["voice_prompt_codes"]), "voice codes differ from golden"
    prefix = model.voice_prefix(inputs["input_ids"][0], voice_codes)
    baseline = ReferenceLoop(model)

    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    extra: dict[str, list[float]] = {"stream_first": [], "whole_decode": []}
    streaming_ok: bool | None = None
    for i in range(repeats + 1):  # run 0 warms both up and is not counted
        order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
        this: dict[str, dict] = {}
        for name in order:
            if name == "ours":
                this[name] = run_ours(model, prompt, prefix, frames)
            else:
                this[name] = baseline.run(inputs, frames)
            check_frames(name, this[name]["codes"], this[name]["text"], golden)
        if not torch.equal(this["ours"]["codes"], this["baseline"]["codes"]):
            raise AssertionError("ours and the baseline give different frames")
        codes = this["ours"]["codes"]
        streamed = stream_first_frame(model, codes)
        decode_s, audio = whole_decode(model, codes)
        if streamed is not None:
            first_s, first_audio = streamed
            same = torch.allclose(first_audio, audio[: first_audio.shape[0]], atol=1e-3)
            streaming_ok = same if streaming_ok is None else streaming_ok and same
        if i == 0:
            continue
        for name, result in this.items():
            runs[name].append(result)
        extra["whole_decode"].append(decode_s)
        if streamed is not None:
            extra["stream_first"].append(streamed[0])

    def med(name: str, key: str) -> float:
        return median([r[key] for r in runs[name]])

    out = {
        "frames": int(runs["ours"][0]["codes"].shape[0]),
        "golden_frames": int(golden["frames"].shape[0]),
        "repeats": repeats,
        "ours": {k: med("ours", k) for k in ("ttff", "per_frame", "total")},
        "baseline": {
            k: med("baseline", k) for k in ("voice_encode", "ttff", "ttff_no_voice", "per_frame", "total")
        },
        "whole_decode": median(extra["whole_decode"]),
        "stream_first": median(extra["stream_first"]) if extra["stream_first"] else None,
        "streaming_matches_whole_decode": streaming_ok,
    }
    del model, baseline
    gc.collect()
    return out


def tiny_table(r: dict) -> str:
    o, b = r["ours"], r["baseline"]
    rows = [
        ("time to first frame (thinker prefill included)", o["ttff"], b["ttff"]),
        ("  same, without the voice-prompt Mimi encode", o["ttff"], b["ttff_no_voice"]),
        ("per-frame step after the first (mean)", o["per_frame"], b["per_frame"]),
        (f"whole reply ({r['frames']} frames)", o["total"], b["total"]),
    ]
    lines = [
        "| metric | ours | baseline (transformers generate-per-frame) | ours / baseline | speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, ours, base in rows:
        lines.append(f"| {label} | {ms(ours)} | {ms(base)} | {ours / base:.3f} | {base / ours:.1f}x |")
    lines.append(
        f"| frames/s after the first | {1 / o['per_frame']:.1f} | {1 / b['per_frame']:.1f} | "
        f"{b['per_frame'] / o['per_frame']:.2f} (higher is better) | |"
    )
    lines.append(
        "| baseline: voice-prompt Mimi encode per request | 0 (cached per voice) | "
        f"{ms(b['voice_encode'])} | | |"
    )
    if r["stream_first"] is not None:
        ours_audio = o["ttff"] + r["stream_first"]
        ours_label = "first frame + 1 streaming Mimi decode"
    else:
        ours_audio = o["ttff"]
        ours_label = "first frame (streaming codec unavailable)"
    base_audio = b["total"] + r["whole_decode"]
    lines.append(
        f"| time to first audio: ours {ours_label}; baseline whole reply + whole-sequence Mimi decode | "
        f"{ms(ours_audio)} | {ms(base_audio)} | {ours_audio / base_audio:.3f} | "
        f"{base_audio / ours_audio:.1f}x |"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# full size: Chroma-4B shapes, random bf16 weights
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_random(model: ChromaModel, std: float = 0.02, chunk: int = 1 << 24, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        flat = p.data.view(-1)
        for start in range(0, flat.numel(), chunk):
            flat[start : start + chunk].normal_(0.0, std, generator=gen)
    for module in model.codec_model.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            module.embed_sum.normal_(0.0, 1.0, generator=gen)
            module.cluster_usage.fill_(1.0)
            if hasattr(module, "initialized"):
                module.initialized.fill_(1.0)
            module._embed = None


def bench_full(config_path: Path, frames: int, threads: int) -> dict:

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    config = ChromaConfig.from_json_file(config_path)
    model = ChromaModel.empty(config, device="cpu", dtype=torch.bfloat16, with_vision=False)
    fill_random(model)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(1)
    text_vocab = config.text_start_id - 32  # ordinary text ids, below the special ones
    input_ids = torch.randint(0, text_vocab, (1, 30), generator=gen)
    prompt = SimpleNamespace(input_ids=input_ids, input_features=None, feature_attention_mask=None)
    voice_codes = torch.randint(0, config.codebook_size, (config.num_codebooks, 20), generator=gen)
    prefix = model.voice_prefix(torch.randint(0, text_vocab, (10,), generator=gen), voice_codes)

    prefill: list[float] = []
    with torch.inference_mode():
        for _ in range(3):  # the first also pays one-time costs (fusing projections, kernel set-up)
            cache = model.thinker.model.new_cache(1, input_ids.shape[1], dtype=model.dtype, device="cpu")
            start = time.perf_counter()
            embeds = model.thinker.embed(input_ids, None)
            model.thinker_forward(embeds, torch.arange(input_ids.shape[1])[None], cache)
            prefill.append(time.perf_counter() - start)
            del cache

    start = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    cpu_stamps: list[float] = []
    text_steps: set[int] = set()
    for event in generate_reply(model, prompt, prefix, max_frames=frames + 1):
        if isinstance(event, AudioFrame):
            stamps.append((time.perf_counter(), event.step))
            cpu_stamps.append(time.process_time())
        elif isinstance(event, TextToken):
            text_steps.add(event.step)
    intervals = [(b[0] - a[0], b[1]) for a, b in zip(stamps, stamps[1:], strict=False)]
    audio_only = [t for t, step in intervals if step not in text_steps]
    with_text = [t for t, step in intervals if step in text_steps]
    out = {
        "params": n_params,
        "build_s": build_s,
        "prefill_tokens": int(input_ids.shape[1]),
        "prefill_first": prefill[0],
        "prefill": median(prefill[1:]),
        "first_frame": stamps[0][0] - start,
        "frames_timed": len(intervals),
        "per_frame": statistics.mean(t for t, _ in intervals) if intervals else float("nan"),
        # process CPU seconds per wall second over the timed frames; well under `threads` means we were
        # waiting for cores that other processes held (or for memory)
        "cpu_busy": (cpu_stamps[-1] - cpu_stamps[0]) / (stamps[-1][0] - stamps[0][0]) if intervals else None,
        "audio_only": median(audio_only) if audio_only else None,
        "with_text": median(with_text) if with_text else None,
        "threads": threads,
    }
    del model, prefix
    gc.collect()
    return out


def full_table(r: dict) -> str:
    lines = [
        "| metric | value |",
        "| --- | ---: |",
        f"| parameters built (no vision tower) | {r['params'] / 1e9:.2f} B |",
        f"| build + random fill | {r['build_s']:.1f} s |",
        f"| thinker prefill, {r['prefill_tokens']} text tokens (median of runs 2-3; run 1: "
        f"{ms(r['prefill_first'])}) | "
        f"{ms(r['prefill'])} |",
        f"| first frame via generate_reply (prefill + backbone prefix + 1 step) | {ms(r['first_frame'])} |",
        f"| per-frame step, mean of {r['frames_timed']} after the first | {ms(r['per_frame'])} |",
    ]
    if r["audio_only"] is not None:
        lines.append(
            f"|   audio-only steps, median (backbone 1 position + depth decoder) | {ms(r['audio_only'])} |"
        )
    if r["with_text"] is not None:
        lines.append(
            f"|   text steps, median (+ 1 thinker token, backbone 3 positions) | {ms(r['with_text'])} |"
        )
    lines.append(f"| real-time factor (per-frame step / 80 ms) | {r['per_frame'] / 0.08:.1f} |")
    if r["cpu_busy"] is not None:
        lines.append(
            f"| cores kept busy during the timed frames (process CPU s / wall s, of {r['threads']}) | "
            f"{r['cpu_busy']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fixture",
        type=Path,
        default=Path(os.environ.get("CHROMA_TINY_FIXTURE") or DEFAULT_TINY),
        help="chroma-tiny folder (default: $CHROMA_TINY_FIXTURE or tests/fixtures/chroma-tiny)",
    )
    parser.add_argument(
        "--frames", type=int, default=32, help="frames per reply on the tiny fixture (default 32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each, after one warm-up (default 5)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the tiny part (default 1: its matrices are too small to share)",
    )
    parser.add_argument(
        "--full", action="store_true", help="also time Chroma-4B shapes with random bf16 weights"
    )
    parser.add_argument("--full-config", type=Path, default=DEFAULT_FULL_CONFIG)
    parser.add_argument("--full-frames", type=int, default=8, help="timed frames after one warm-up frame")
    parser.add_argument("--full-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-tiny", action="store_true", help="only the --full part")
    args = parser.parse_args(argv)
    if args.frames < 2 or args.repeats < 1:
        parser.error("--frames must be >= 2 and --repeats >= 1")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- command: python bench/bench_generate.py {' '.join(argv if argv is not None else sys.argv[1:])}")

    if not args.skip_tiny:
        r = bench_tiny(args.fixture, args.frames, args.repeats)
        print(
            f"\n## Tiny fixture, CPU float32, golden inputs, greedy, {r['frames']} frames, "
            f"{args.threads} thread(s), median of {r['repeats']} interleaved runs\n"
        )
        print(
            f"Both give the golden frames and text (the golden case has {r['golden_frames']}) and the same "
            "frames as each other, checked on every run.\n"
        )
        print(tiny_table(r))
        if r["streaming_matches_whole_decode"] is not None:
            print(
                f"\nStreaming first-frame audio equals the whole-sequence decode's first 1920 samples "
                f"(atol 1e-3): {r['streaming_matches_whole_decode']}"
            )
    if args.full:
        r = bench_full(args.full_config, args.full_frames, args.full_threads)
        print(f"\n## Chroma-4B shapes, random weights, CPU bfloat16, {r['threads']} thread(s)\n")
        print(full_table(r))
    print(f"\nload average (1/5/15 min) at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
