"""The decode step: one fixed-shape function that advances every engine row by one frame, on the device.

gpt-fast style: all per-row state lives in preallocated device tensors (`DecodeBatch`), and a step is a
pure function of those tensors and the weights. It makes no host sync (no `.item()`, no tensors built from
Python lists, no Python branch on a tensor value) and every shape is fixed by the batch bucket, so the
same function runs eagerly, under `torch.compile(fullgraph=True)` and inside a CUDA graph. Python reads
one small int32 result per step (codes, token, flags and the frame's PCM16), copied to the host in one go.

How the reference's decisions map onto tensors:

* Rows that do not run this step (free, paused, finished, text-only) are masked: their inputs are zeroed,
  their KV writes go to a reserved scratch slot (the last slot of each row, which no live query reaches),
  and `torch.where` keeps their state. Masked attention still multiplies every slot by its zero weight and
  0 x NaN is NaN, so nothing non-finite may ever sit in a cache slot: zeroed inputs keep scratch writes
  finite, and a row that produces a non-finite value is finished on the spot (`Finish.NONFINITE`) and its
  caches are scrubbed by the engine before the row is used again.
* The thinker runs inside the step, phase-aligned rather than masked every step: the reference calls it on
  every other frame (reply steps 2, 4, ...), and the engine starts every reply on an even global step and
  pauses rows only for whole pairs of steps, so all rows whose text is due are due on the same steps. Even
  steps run `text=True` (thinker + backbone width 3), odd steps `text=False` (backbone width 1, no
  thinker). Masking it on every step would read the thinker's weights, the biggest part of the model,
  twice as often for the same output.
* The backbone's inputs are a fixed width-3 buffer per row ([frame embedding], [thinker hidden, token
  embedding] on step 0, or all three on a text step) with the real count in `n_inputs`; padding sits after
  the real inputs, so causal attention keeps it out, and the next step overwrites those slots.
* End of audio (codebooks 0..6 all EOS), dropped frames (all codes 0), the frame limit and the end of text
  are decided here; the engine learns them from the result.
"""

from __future__ import annotations

from enum import IntEnum

import torch

from chroma_agent.engine.codec import StreamingMimiDecoder
from chroma_agent.engine.sampling import SamplingParams, SamplingRows, race_noise, sample
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.kv_cache import KVCache


class Finish(IntEnum):
    NONE = 0
    EOS = 1  # a frame whose codebooks 0..K-2 are all the EOS code
    MAX_FRAMES = 2  # the frame limit, or the row's caches are full
    NONFINITE = 3  # the model produced NaN/inf for this row: the reply fails alone
    TEXT_END = 4  # text-only reply: the thinker's end of turn
    TEXT_LIMIT = 5  # text-only reply: the token limit


class DecodeBatch:
    """Device state of `rows` engine rows: caches, per-row reply state, sampling parameters, codec state.

    Capacities are the usable slots per row; one more slot per row is allocated as the scratch slot.
    Host-side setters take Python scalars and device tensors only, so they never wait for the device.
    """

    def __init__(self, model: ChromaModel, rows: int, thinker_capacity: int, backbone_capacity: int):
        cfg = model.config
        device, dtype = model.device, model.dtype
        self.model = model
        self.rows = rows
        self.device = device
        self.thinker_cache = model.thinker.model.new_cache(rows, thinker_capacity + 1, dtype=dtype, device=device)
        self.backbone_cache = model.backbone.model.new_cache(rows, backbone_capacity + 1, dtype=dtype,
                                                             device=device)
        self.decoder_cache = model.decoder.model.new_cache(rows, cfg.num_codebooks, dtype=dtype, device=device)
        self.codec = StreamingMimiDecoder(model.codec_model, batch_size=rows)
        if self.codec.samples_per_frame % 2:
            raise ValueError("the step packs PCM16 pairs into int32: samples per frame must be even")

        def zeros(*shape, kind=torch.long):
            return torch.zeros(*shape, dtype=kind, device=device)

        hidden = cfg.backbone.hidden_size
        self.token = zeros(rows)  # the thinker's latest token, fed to it on the row's next text step
        self.thinker_pos = zeros(rows)
        self.backbone_pos = zeros(rows)
        self.inputs = zeros(rows, 3, hidden, kind=dtype)  # next backbone inputs, padded to width 3
        self.n_inputs = torch.ones(rows, dtype=torch.long, device=device)
        self.step = zeros(rows)  # the reply's step (text-only replies: tokens fed)
        self.frames_kept = zeros(rows)
        self.limit = zeros(rows)  # frame limit (text-only replies: token limit)
        self.thinker_live = zeros(rows, kind=torch.bool)
        self.active = zeros(rows, kind=torch.bool)  # runs in decode steps (host-controlled)
        self.text_active = zeros(rows, kind=torch.bool)  # runs in thinker-only steps (host-controlled)
        self.finished = zeros(rows)  # a Finish code, set by the device
        self.sampling = SamplingRows(rows, device)
        self.header = cfg.num_codebooks + 5
        self.result = torch.zeros(rows, self.header + self.codec.samples_per_frame // 2, dtype=torch.int32,
                                  device=device)
        self._views: dict[int, BatchView] = {}

    def view(self, n: int) -> BatchView:
        """Rows 0..n-1 as a batch of its own (a bucket); views share storage, so addresses never change."""
        if n not in self._views:
            self._views[n] = BatchView(self, n)
        return self._views[n]

    # --- host-side control (between steps) -------------------------------------------------------------

    def start_audio_row(self, row: int, hidden: torch.Tensor, token: torch.Tensor, thinker_pos: int,
                        backbone_pos: int, max_frames: int, sampling: SamplingParams) -> None:
        """A reply whose thinker prompt is prefilled (last hidden [H], first token []) and whose backbone row
        holds the voice prefix up to `backbone_pos`. Its step 0 feeds [hidden, E(token)] to the backbone."""
        model = self.model
        self.token[row] = token
        self.thinker_pos[row] = thinker_pos
        self.backbone_pos[row] = backbone_pos
        self.inputs[row].zero_()
        self.inputs[row, 0] = hidden.to(self.inputs.dtype)
        self.inputs[row, 1] = model.embed_text(token.reshape(1))[0]
        self.n_inputs[row] = 2
        self._start_common(row, token, max_frames)
        self.sampling.set_row(row, sampling)
        self.codec.reset([row])

    def start_text_row(self, row: int, token: torch.Tensor, thinker_pos: int, max_tokens: int) -> None:
        """A text-only reply: the thinker alone runs, one token per thinker step."""
        self.token[row] = token
        self.thinker_pos[row] = thinker_pos
        self._start_common(row, token, max_tokens)

    def _start_common(self, row: int, token: torch.Tensor, limit: int) -> None:
        self.thinker_live[row] = token != self.model.config.im_end_id
        self.step[row] = 0
        self.frames_kept[row] = 0
        self.limit[row] = limit
        self.finished[row] = 0

    def set_active(self, row: int, active: bool) -> None:
        self.active[row] = active

    def set_text_active(self, row: int, active: bool) -> None:
        self.text_active[row] = active

    def stop_row(self, row: int) -> None:
        self.active[row] = False
        self.text_active[row] = False

    def scrub_row(self, row: int) -> None:
        """After a non-finite reply: nothing of it may stay in the row (see the module docstring)."""
        self.stop_row(row)
        self.thinker_cache.clear_row(row)
        self.backbone_cache.clear_row(row)
        self.decoder_cache.clear_row(row)
        self.inputs[row].zero_()
        self.codec.reset([row])


class BatchView:
    """The first `n` rows of a `DecodeBatch`, as the tensors a step function reads and writes."""

    def __init__(self, batch: DecodeBatch, n: int):
        self.n = n
        self.model = batch.model
        self.header = batch.header
        self.thinker_cache: KVCache = batch.thinker_cache.head(n)
        self.backbone_cache: KVCache = batch.backbone_cache.head(n)
        self.decoder_cache: KVCache = batch.decoder_cache.head(n)
        self.codec = batch.codec.head(n)
        self.sampling = batch.sampling.head(n)
        for name in ("token", "thinker_pos", "backbone_pos", "inputs", "n_inputs", "step", "frames_kept", "limit",
                     "thinker_live", "active", "text_active", "finished", "result"):
            setattr(self, name, getattr(batch, name)[:n])


def _keep(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> None:
    """old <- new on the rows of `mask`, in place (static buffers keep their addresses)."""
    old.copy_(torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old))


def _pcm16(pcm: torch.Tensor) -> torch.Tensor:
    """float audio [B, S] -> int16 PCM packed in pairs as int32 [B, S/2] (the scaling of `audio.to_pcm16`)."""
    pcm16 = (pcm.float() * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
    return pcm16.view(torch.int32)


def _thinker_token_step(model: ChromaModel, b: BatchView, due: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed each due row's token to the thinker at its position: (last hidden [B, H], next token [B])."""
    scratch = b.thinker_cache.capacity - 1
    tokens = torch.where(due, b.token, 0)
    slots = torch.where(due, b.thinker_pos, scratch)[:, None]
    positions = torch.where(due, b.thinker_pos, 0)[:, None]
    embeds = torch.where(due[:, None, None], model.embed_text(tokens[:, None]), 0)
    hidden, logits = model.thinker_forward(embeds, positions, b.thinker_cache, slots)
    return hidden, logits.argmax(dim=-1)  # the thinker is greedy, as in the reference


def decode_step(model: ChromaModel, b: BatchView, text: bool, sampled: bool) -> None:
    """Advance every active row by one frame; writes `b.result` (see `DecodeBatch` for the layout).

    `sampled=False` is the variant for batches whose rows are all greedy: argmax, no sampling work at all.
    """
    cfg = model.config
    n = b.n
    thinker_scratch = b.thinker_cache.capacity - 1
    backbone_scratch = b.backbone_cache.capacity - 1
    width = 3 if text else 1
    active = b.active & (b.finished == 0)
    # A row whose caches cannot take this step ends as if at its frame limit (never an out-of-range write).
    full = b.backbone_pos + width > backbone_scratch
    inputs, n_inputs = b.inputs, b.n_inputs
    reported = torch.where(active & (b.step == 0), b.token, -1)  # step 0 carries the prefill's token
    if text:
        due = active & b.thinker_live & (b.step > 0)
        full = full | (due & (b.thinker_pos >= thinker_scratch))
        due = due & ~full
        hidden_t, chosen = _thinker_token_step(model, b, due)
        with_text = torch.stack([inputs[:, 0], hidden_t.to(inputs.dtype), model.embed_text(chosen)], dim=1)
        inputs = torch.where(due[:, None, None], with_text, inputs)
        n_inputs = torch.where(due, 3, n_inputs)
        reported = torch.where(due, chosen, reported)
    run = active & ~full
    x = torch.where(run[:, None, None], inputs[:, :width], 0)
    positions = b.backbone_pos[:, None] + torch.arange(width, device=x.device)
    slots = torch.where(run[:, None], positions, backbone_scratch)
    positions = torch.where(run[:, None], positions, 0)
    hidden, logits = model.backbone_forward(x, positions, b.backbone_cache, slots,
                                            last=(n_inputs - 1) if text else None)

    if sampled:
        noise = race_noise(b.sampling.seed, b.step, cfg.num_codebooks, logits.shape[-1])

        def pick(lg: torch.Tensor, codebook: int) -> torch.Tensor:
            return sample(lg, b.sampling, noise[:, codebook])
    else:
        def pick(lg: torch.Tensor, codebook: int) -> torch.Tensor:
            return lg.argmax(dim=-1)

    frames = model.depth_decode(hidden, pick(logits, 0), b.decoder_cache, pick)  # [B, K]
    kept = frames.sum(dim=-1) != 0
    eos = (frames[:, :-1] == cfg.codebook_eos_id).all(dim=-1)
    frames_kept = b.frames_kept + (run & kept).long()
    nonfinite = ~torch.isfinite(hidden).all(dim=-1)
    finish = torch.where(frames_kept >= b.limit, int(Finish.MAX_FRAMES), int(Finish.NONE))
    finish = torch.where(eos, int(Finish.EOS), finish)
    finish = torch.where(nonfinite, int(Finish.NONFINITE), finish)
    finish = torch.where(run, finish, torch.where(active & full, int(Finish.MAX_FRAMES), 0))

    # The next step's inputs: this frame's summed embedding.
    next_inputs = torch.cat([model.embed_frames(frames)[:, None], inputs.new_zeros(n, 2, inputs.shape[-1])], dim=1)
    _keep(run, next_inputs, b.inputs)
    _keep(run, torch.ones_like(n_inputs), b.n_inputs)
    _keep(run, b.backbone_pos + (n_inputs if text else 1), b.backbone_pos)
    if text:
        _keep(due, chosen, b.token)
        _keep(due, b.thinker_pos + 1, b.thinker_pos)
        _keep(due, chosen != cfg.im_end_id, b.thinker_live)
    step_index = b.step.clone()
    _keep(run, b.step + 1, b.step)
    b.frames_kept.copy_(frames_kept)
    _keep(active, finish, b.finished)

    voiced = run & kept
    top = cfg.codebook_size - 1
    pcm = b.codec.step(frames.clamp(0, top)[:, :, None], voiced)
    flags = torch.stack([reported, active.long(), voiced.long(), finish, step_index], dim=1)
    b.result.copy_(torch.cat([frames.int(), flags.int(), _pcm16(pcm)], dim=1))


def thinker_step(model: ChromaModel, b: BatchView) -> None:
    """Text-only replies: feed one token per row to the thinker and pick the next; writes `b.result`."""
    cfg = model.config
    scratch = b.thinker_cache.capacity - 1
    live = b.text_active & (b.finished == 0)
    due = live & b.thinker_live & (b.thinker_pos < scratch)
    hidden, chosen = _thinker_token_step(model, b, due)
    fed = b.step + due.long()
    finish = torch.where(fed >= b.limit, int(Finish.TEXT_LIMIT), int(Finish.NONE))
    finish = torch.where(chosen == cfg.im_end_id, int(Finish.TEXT_END), finish)
    finish = torch.where(~torch.isfinite(hidden).all(dim=-1), int(Finish.NONFINITE), finish)
    # a row whose first token already ended the turn, or whose cache is full, stops without running
    finish = torch.where(due, finish, torch.where(b.thinker_live, int(Finish.TEXT_LIMIT), int(Finish.TEXT_END)))
    reported = torch.where(due, b.token, -1)
    _keep(due, chosen, b.token)
    _keep(due, b.thinker_pos + 1, b.thinker_pos)
    _keep(due, chosen != cfg.im_end_id, b.thinker_live)
    step_index = b.step.clone()
    b.step.copy_(fed)
    _keep(live, finish, b.finished)
    header = torch.zeros(b.n, cfg.num_codebooks, dtype=torch.long, device=chosen.device)
    flags = torch.stack([reported, live.long(), torch.zeros_like(reported), torch.where(live, finish, 0),
                         step_index], dim=1)
    b.result[:, : b.header].copy_(torch.cat([header, flags], dim=1).int())
