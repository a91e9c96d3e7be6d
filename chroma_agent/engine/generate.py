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
    """Backbone slots for a reply: the prefix, the first text pair, one per step, two per text step."""
    steps = max_frames + 1  # an all-zero frame is dropped but always ends the reply, so at most one extra
    return prefix_len + 2 + steps + 2 * ((steps + 1) // 2)


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
    sample = Sampler(sampling or SamplingParams(), device=device)

    # Thinker prefill over the whole prompt; its text is always greedy, as in the reference.
    input_ids = prompt.input_ids.to(device)
    audio = None
    if prompt.input_features is not None:
        audio = model.thinker.encode_audio(prompt.input_features.to(device), prompt.feature_attention_mask.to(device))
    embeds = model.thinker.embed(input_ids, audio)
    n_prompt = input_ids.shape[1]
    max_text = (max_frames + 2) // 2 + 1
    thinker_cache = model.thinker.model.new_cache(1, n_prompt + max_text, dtype=dtype, device=device)
    positions = torch.arange(n_prompt, device=device)[None]
    hidden, logits = model.thinker_forward(embeds, positions, thinker_cache)
    thinker_pos = n_prompt

    prefix = voice_prefix.to(device=device, dtype=dtype)
    backbone_cache = model.backbone.model.new_cache(
        1, backbone_capacity(prefix.shape[0], max_frames), dtype=dtype, device=device
    )
    decoder_cache = model.decoder.model.new_cache(1, cfg.num_codebooks, dtype=dtype, device=device)

    done = ReplyDone(reason="max_frames")
    token = int(logits.argmax(-1))
    step_inputs = [prefix, hidden, model.embed_text(torch.tensor([token], device=device))]
    done.text_ids.append(token)
    yield TextToken(token, 0)
    thinker_live = token != cfg.im_end_id
    text_due = False  # the first pair went in with the prefix; the next comes two steps later
    backbone_pos = 0
    step = 0
    while True:
        x = torch.cat(step_inputs, dim=0)[None]
        positions = torch.arange(backbone_pos, backbone_pos + x.shape[1], device=device)[None]
        backbone_pos += x.shape[1]
        hidden, logits = model.backbone_forward(x, positions, backbone_cache)
        code0 = sample(logits)
        frame = model.depth_decode(hidden, code0, decoder_cache, sample)[0]
        frame_cpu = frame.cpu()
        if int(frame_cpu.sum()) != 0:
            done.frames.append(frame_cpu)
            yield AudioFrame(frame_cpu, len(done.frames) - 1, step)
        if bool((frame_cpu[:-1] == cfg.codebook_eos_id).all()):
            done.reason = "eos"
            break
        if len(done.frames) >= max_frames:
            break
        step += 1
        step_inputs = [model.embed_frames(frame)[None]]
        if thinker_live and text_due:
            pos = torch.tensor([[thinker_pos]], device=device)
            thinker_pos += 1
            hidden, logits = model.thinker_forward(model.embed_text(torch.tensor([[token]], device=device)), pos,
                                                   thinker_cache)
            token = int(logits.argmax(-1))
            step_inputs += [hidden, model.embed_text(torch.tensor([token], device=device))]
            done.text_ids.append(token)
            yield TextToken(token, step)
            thinker_live = token != cfg.im_end_id
            text_due = False
        else:
            text_due = thinker_live
    yield done
