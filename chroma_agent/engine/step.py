"""One generation step for a batch of replies: thinker (where text is due), backbone, depth decoder.

This is the reference's per-frame decision procedure, batched over rows of static KV caches. Rows join
(`start_reply`) and leave between steps; each row carries its own `ReplyState`. Both the single-reply
generator (`generate.py`) and the engine's shared step loop run exactly this code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chroma_agent.engine.kv_cache import KVCache
from chroma_agent.engine.sampling import Sampler
from chroma_agent.model.chroma import ChromaModel


@dataclass
class ReplyState:
    """Where one reply stands. Created by `start_reply`, advanced by `run_step`."""

    row: int
    sampler: Sampler
    max_frames: int
    token: int  # the thinker's latest token (fed to it on the next text step)
    thinker_pos: int  # next thinker slot (== rotary position)
    backbone_pos: int  # next backbone slot
    inputs: torch.Tensor  # backbone inputs for the next step [n, hidden]
    thinker_live: bool
    text_due: bool = False
    step: int = 0
    frames_kept: int = 0
    finished: str | None = None  # "eos" | "max_frames" once the reply is over
    text: list[tuple[int, int]] = field(default_factory=list)  # (token id, step that injected it)


@dataclass(frozen=True)
class StepOutput:
    frame: torch.Tensor | None  # [K] int64 on CPU, None when the frame was all zeros (dropped)
    step: int
    new_token: int | None  # a text token chosen at this step, if any


def thinker_prefill(
    model: ChromaModel,
    input_ids: torch.Tensor,
    features: torch.Tensor | None,
    feature_mask: torch.Tensor | None,
    cache: KVCache,
    row: int,
    start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run new thinker tokens [1, T] at slots start..start+T-1 of `row`; returns (last hidden [1, H], logits)."""
    device = model.device
    audio = None
    if features is not None:
        audio = model.thinker.encode_audio(features.to(device), feature_mask.to(device))
    embeds = model.thinker.embed(input_ids.to(device), audio)
    positions = torch.arange(start, start + input_ids.shape[1], device=device)[None]
    rows = torch.tensor([row], device=device)
    return model.thinker_forward(embeds, positions, cache, None if cache.batch_size == 1 else rows)


def prefill_voice(model: ChromaModel, prefix: torch.Tensor, cache: KVCache, row: int) -> None:
    """Backbone KV of a voice prefix [P, H] into `row` at slots 0..P-1 (done once per voice and copied)."""
    device = model.device
    positions = torch.arange(prefix.shape[0], device=device)[None]
    rows = torch.tensor([row], device=device)
    model.backbone.model(prefix.to(device, model.dtype)[None], positions, cache, positions,
                         None if cache.batch_size == 1 else rows)


def start_reply(
    model: ChromaModel,
    row: int,
    prompt_hidden: torch.Tensor,
    prompt_logits: torch.Tensor,
    thinker_pos: int,
    prefix_len: int,
    sampler: Sampler,
    max_frames: int,
) -> ReplyState:
    """A reply whose thinker prompt has been prefilled and whose backbone row holds the voice prefix."""
    token = int(prompt_logits.argmax(-1))  # the thinker is always greedy, as in the reference
    inputs = torch.cat([prompt_hidden.reshape(1, -1), model.embed_text(torch.tensor([token], device=model.device))])
    state = ReplyState(
        row=row, sampler=sampler, max_frames=max_frames, token=token, thinker_pos=thinker_pos,
        backbone_pos=prefix_len, inputs=inputs, thinker_live=token != model.config.im_end_id,
    )
    state.text.append((token, 0))
    return state


def _sample_rows(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    if all(s.params.greedy for s in samplers):
        return logits.argmax(dim=-1)
    return torch.cat([s(logits[i : i + 1]) for i, s in enumerate(samplers)])


def run_step(
    model: ChromaModel,
    states: list[ReplyState],
    thinker_cache: KVCache,
    backbone_cache: KVCache,
    decoder_cache: KVCache,
) -> list[StepOutput]:
    """Advance every reply in `states` by one frame (one batched forward per stage)."""
    cfg = model.config
    device, dtype = model.device, model.dtype
    n = len(states)
    all_rows = n == backbone_cache.batch_size and all(s.row == i for i, s in enumerate(states))
    new_tokens: list[int | None] = [None] * n

    # 1. Thinker, for the rows whose text is due: one token each, batched. Nothing in `states` changes
    # until every stage has run, so a failed step can be retried row by row.
    inputs = [s.inputs for s in states]
    due = [i for i, s in enumerate(states) if s.thinker_live and s.text_due]
    if due:
        ids = torch.tensor([[states[i].token] for i in due], device=device)
        pos = torch.tensor([[states[i].thinker_pos] for i in due], device=device)
        rows = torch.tensor([states[i].row for i in due], device=device)
        whole = len(due) == thinker_cache.batch_size and all(states[i].row == k for k, i in enumerate(due))
        hidden, logits = model.thinker_forward(model.embed_text(ids), pos, thinker_cache, None if whole else rows)
        tokens = logits.argmax(-1).tolist()
        emb = model.embed_text(torch.tensor(tokens, device=device))
        for k, i in enumerate(due):
            inputs[i] = torch.cat([inputs[i], hidden[k : k + 1], emb[k : k + 1]])
            new_tokens[i] = tokens[k]

    # 2. Backbone over each row's new inputs (1 or 3 vectors), padded to a common length. Padding sits
    # after a row's real inputs, so causal attention keeps it out of the real ones; the next step
    # overwrites those slots.
    width = max(x.shape[0] for x in inputs)
    if width == 1 or all(x.shape[0] == width for x in inputs):
        x = torch.stack(inputs)
    else:
        x = torch.zeros(n, width, cfg.backbone.hidden_size, dtype=dtype, device=device)
        for i, row_inputs in enumerate(inputs):
            x[i, : row_inputs.shape[0]] = row_inputs
    base = torch.tensor([s.backbone_pos for s in states], device=device)
    positions = base[:, None] + torch.arange(width, device=device)
    last = torch.tensor([x.shape[0] - 1 for x in inputs], device=device)
    rows = None if all_rows else torch.tensor([s.row for s in states], device=device)
    hidden, logits = model.backbone_forward(x, positions, backbone_cache, rows, last)

    # 3. Codebook 0 per row, then the depth decoder completes every frame.
    samplers = [s.sampler for s in states]
    code0 = _sample_rows(logits, samplers)
    frames = model.depth_decode(hidden, code0, decoder_cache, lambda lg: _sample_rows(lg, samplers))
    next_inputs = model.embed_frames(frames)
    frames_cpu = frames.cpu()

    outputs = []
    for i, s in enumerate(states):
        if new_tokens[i] is not None:
            s.thinker_pos += 1
            s.token = new_tokens[i]
            s.text.append((s.token, s.step))
            s.thinker_live = s.token != cfg.im_end_id
        # Text comes on every other step: right after a step that carried none.
        s.text_due = s.thinker_live and s.text[-1][1] != s.step
        frame = frames_cpu[i]
        kept = int(frame.sum()) != 0
        if kept:
            s.frames_kept += 1
        outputs.append(StepOutput(frame if kept else None, s.step, new_tokens[i]))
        s.backbone_pos += inputs[i].shape[0]
        if bool((frame[:-1] == cfg.codebook_eos_id).all()):
            s.finished = "eos"
        elif s.frames_kept >= s.max_frames:
            s.finished = "max_frames"
        s.inputs = next_inputs[i : i + 1]
        s.step += 1
    return outputs
