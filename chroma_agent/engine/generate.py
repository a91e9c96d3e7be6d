"""Frame-by-frame generation of one reply (a batch of one), on the same step the engine runs.

Per step: the backbone reads its new inputs and picks codebook 0, the depth decoder completes the frame,
and the frame is yielded at once. The thinker's text is interleaved 1:2: on every other step the thinker
emits one token and two vectors (its last hidden state, the token's embedding) join the backbone's input.
The CLI and the benchmarks use this; the servers use the engine; both drive `DecodeBatch` + `StepRunner`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chroma_agent.engine.prefill import PrefillJob, encode_audio, prefill_tokens, prefill_voice
from chroma_agent.engine.runner import StepRunner
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.engine.step import DecodeBatch, Finish
from chroma_agent.model.chroma import ChromaModel


class PromptInputs(Protocol):
    input_ids: torch.Tensor
    input_features: torch.Tensor | None
    feature_attention_mask: torch.Tensor | None


@dataclass(frozen=True)
class TextToken:
    token_id: int
    step: int  # the backbone step whose input carries this token (the frame made at that step hears it)


@dataclass(frozen=True)
class AudioFrame:
    codes: torch.Tensor  # [K] int64 on CPU, values 0..vocab-1 (clamp to the codebook size for Mimi)
    index: int  # position among the kept frames
    step: int
    pcm16: bytes = b""  # the frame's audio, decoded on the device in the same step


@dataclass
class ReplyDone:
    reason: str  # "eos" (codebook end-of-audio) or "max_frames"
    frames: list[torch.Tensor] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)

    def codes(self) -> torch.Tensor:
        """All kept frames as [T, K] int64."""
        if not self.frames:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack(self.frames)


Event = TextToken | AudioFrame | ReplyDone


def backbone_capacity(prefix_len: int, max_frames: int) -> int:
    """Backbone slots for a reply: the prefix, the first text pair, one per step, two per text step.

    Two spare slots take the padding of width-3 steps (rows with 1 input padded to 3).
    """
    steps = max_frames + 1  # an all-zero frame is dropped but always ends the reply, so at most one extra
    return prefix_len + 2 + steps + 2 * ((steps + 1) // 2) + 2


_STEPS: dict[tuple, tuple[DecodeBatch, StepRunner]] = {}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _one_row(model: ChromaModel, thinker_slots: int, backbone_slots: int, mode: str | None) -> tuple[DecodeBatch, StepRunner]:
    """A one-row batch and its step runner, kept for the next reply of similar size: capacities are rounded
    up to 512 slots so replies share shapes, and a compiled or captured step is built once, not per reply."""
    key = (id(model), _round_up(thinker_slots, 512), _round_up(backbone_slots, 512), mode)
    if key not in _STEPS:
        while len(_STEPS) >= 2:  # each holds KV caches: keep the two latest shapes
            _STEPS.pop(next(iter(_STEPS)))
        batch = DecodeBatch(model, 1, key[1], key[2])
        _STEPS[key] = (batch, StepRunner(batch, mode))
    return _STEPS[key]


def feature_clips(prompt: PromptInputs) -> list[torch.Tensor]:
    """A prompt's Whisper features as one [mels, valid frames] tensor per clip."""
    if prompt.input_features is None:
        return []
    lengths = prompt.feature_attention_mask.sum(-1).tolist()
    return [f[:, : int(n)] for f, n in zip(prompt.input_features, lengths, strict=True)]


@torch.inference_mode()
def generate_reply(
    model: ChromaModel,
    prompt: PromptInputs,
    voice_prefix: torch.Tensor,
    *,
    max_frames: int,
    sampling: SamplingParams | None = None,
    step_mode: str | None = None,
    chunk_tokens: int = 512,
) -> Iterator[Event]:
    """Yield `TextToken`s and `AudioFrame`s as they are made, then one `ReplyDone`."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    cfg = model.config
    ids = prompt.input_ids.reshape(-1).tolist()
    max_text = (max_frames + 2) // 2 + 1
    prefix_len = voice_prefix.shape[0]
    batch, runner = _one_row(model, len(ids) + max_text, backbone_capacity(prefix_len, max_frames), step_mode)
    suffix = "" if (sampling or SamplingParams()).greedy else "+sampled"
    runner.warm_up(progress=False, kinds=("text" + suffix, "audio" + suffix))

    job = PrefillJob(0, ids, 0, feature_clips(prompt), cfg.audio_token_id, model.audio_window_frames)
    while not job.audio_done:
        job.audio.extend(encode_audio(model, job.take_windows(8)))
    while not job.done:
        prefill_tokens(model, batch.thinker_cache, [job], chunk_tokens)
    prefill_voice(model, voice_prefix, batch.backbone_cache, 0)
    batch.start_audio_row(0, job.hidden, job.token, len(ids), prefix_len, max_frames, sampling or SamplingParams())
    batch.set_active(0, True)

    k = cfg.num_codebooks
    done = ReplyDone(reason="max_frames")
    text = True
    try:
        while True:
            row = runner.launch(1, ("text" if text else "audio") + suffix).wait()[0]
            text = not text
            step = int(row[k + 4])
            token = int(row[k])
            if token >= 0:
                done.text_ids.append(token)
                yield TextToken(token, step)
            if row[k + 2]:
                codes = torch.from_numpy(row[:k].astype("int64"))
                done.frames.append(codes)
                yield AudioFrame(codes, len(done.frames) - 1, step, row[batch.header :].tobytes())
            finish = int(row[k + 3])
            if finish:
                if finish == Finish.NONFINITE:
                    batch.scrub_row(0)  # the row is reused by the next reply
                    raise FloatingPointError("the model produced a non-finite value")
                done.reason = "eos" if finish == Finish.EOS else "max_frames"
                break
    finally:
        batch.stop_row(0)  # the batch is kept for the next reply (see _one_row)
    yield done
