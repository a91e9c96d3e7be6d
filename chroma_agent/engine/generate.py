"""Frame-by-frame generation of one reply (batch 1), exactly as the reference decides each token.

Per step: the backbone reads its new inputs and picks codebook 0, the depth decoder completes the frame,
and the frame is yielded at once. The thinker's text is interleaved 1:2: on every other step the thinker
emits one token and two vectors (its last hidden state, the token's embedding) join the backbone's input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chroma_agent.engine.sampling import Sampler, SamplingParams
from chroma_agent.engine.step import prefill_voice, run_step, start_reply, thinker_prefill
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

    Two spare slots take the padding of batched steps (rows with 1 input padded to 3).
    """
    steps = max_frames + 1  # an all-zero frame is dropped but always ends the reply, so at most one extra
    return prefix_len + 2 + steps + 2 * ((steps + 1) // 2) + 2


@torch.inference_mode()
def generate_reply(
    model: ChromaModel,
    prompt: PromptInputs,
    voice_prefix: torch.Tensor,
    *,
    max_frames: int,
    sampling: SamplingParams | None = None,
) -> Iterator[Event]:
    """Yield `TextToken`s and `AudioFrame`s as they are made, then one `ReplyDone`."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    cfg = model.config
    device, dtype = model.device, model.dtype
    sampler = Sampler(sampling or SamplingParams(), device=device)

    n_prompt = prompt.input_ids.shape[1]
    max_text = (max_frames + 2) // 2 + 1
    thinker_cache = model.thinker.model.new_cache(1, n_prompt + max_text, dtype=dtype, device=device)
    prefix_len = voice_prefix.shape[0]
    backbone_cache = model.backbone.model.new_cache(
        1, backbone_capacity(prefix_len, max_frames), dtype=dtype, device=device
    )
    decoder_cache = model.decoder.model.new_cache(1, cfg.num_codebooks, dtype=dtype, device=device)

    hidden, logits = thinker_prefill(
        model, prompt.input_ids, prompt.input_features, prompt.feature_attention_mask, thinker_cache, 0, 0
    )
    prefill_voice(model, voice_prefix, backbone_cache, 0)
    state = start_reply(model, 0, hidden, logits, n_prompt, prefix_len, sampler, max_frames)
    done = ReplyDone(reason="max_frames")
    done.text_ids.append(state.token)
    yield TextToken(state.token, 0)
    while state.finished is None:
        (out,) = run_step(model, [state], thinker_cache, backbone_cache, decoder_cache)
        if out.new_token is not None:
            done.text_ids.append(out.new_token)
            yield TextToken(out.new_token, out.step)
        if out.frame is not None:
            done.frames.append(out.frame)
            yield AudioFrame(out.frame, len(done.frames) - 1, out.step)
    done.reason = state.finished
    yield done
