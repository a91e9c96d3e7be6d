"""Thinker prefill in pieces, so a long user turn or a new session never stalls the replies already running.

A turn's audio goes through the audio encoder a few 2 s windows at a time (Qwen2.5-Omni's encoder attends
within 2 s windows only, so encoding a clip window by window gives the same vectors as encoding it whole),
then its tokens go through the thinker in chunks of at most `chunk_tokens`. The engine runs one piece
between two decode steps, so the rows that are speaking wait at most one piece. Pieces of several replies
that are ready at the same time run as one batched forward.

Everything the host knows (ids, where the audio placeholders sit) goes to the device as whole tensors; the
only device values that come back are kept on the device (the last hidden state and the first token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.kv_cache import KVCache
from chroma_agent.model.processor import num_audio_tokens


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data to the device without making the host wait for work already queued there."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class PrefillJob:
    """One reply's thinker input still to be written into its row (ids from slot `start` on)."""

    row: int
    ids: list[int]
    start: int
    clips: list[torch.Tensor]  # Whisper features [mels, frames] (valid frames only), in placeholder order
    audio_token_id: int
    window_frames: int  # mel frames per audio-encoder window
    done_tokens: int = 0
    audio: list[torch.Tensor] = field(default_factory=list)  # encoded vectors, one tensor per piece, in order
    _pieces: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [H] last hidden state, once every token is in
    token: torch.Tensor | None = None  # [] the thinker's first reply token (greedy), once every token is in

    def __post_init__(self) -> None:
        for clip in self.clips:
            self._pieces.extend(clip.split(self.window_frames, dim=-1))

    @property
    def audio_done(self) -> bool:
        return not self._pieces

    @property
    def done(self) -> bool:
        return self.audio_done and self.done_tokens == len(self.ids)

    def take_windows(self, budget: int) -> list[torch.Tensor]:
        """Up to `budget` windows of audio still to encode (at least one if any is left)."""
        taken = self._pieces[: max(1, budget)]
        del self._pieces[: len(taken)]
        return taken


def encode_audio(model: ChromaModel, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Audio-encoder vectors for each window-aligned piece [mels, frames] -> [num_audio_tokens(frames), H]."""
    device = model.device
    longest = max(p.shape[-1] for p in pieces)
    features = torch.zeros(len(pieces), pieces[0].shape[0], longest)
    mask = torch.zeros(len(pieces), longest, dtype=torch.long)
    for i, piece in enumerate(pieces):
        features[i, :, : piece.shape[-1]] = piece
        mask[i, : piece.shape[-1]] = 1
    vectors = model.thinker.encode_audio(to_device(features, torch.float32, device),
                                         to_device(mask, torch.long, device))
    return list(vectors.split([num_audio_tokens(p.shape[-1]) for p in pieces]))


def prefill_tokens(model: ChromaModel, cache: KVCache, jobs: list[PrefillJob], chunk_tokens: int) -> None:
    """Write the next chunk of each job's ids into its row of `cache` (one batched forward).

    Rows with fewer ids than the longest pad with id 0 written to the scratch slot; a job whose last id went
    in gets its `hidden` and `token`.
    """
    device = model.device
    scratch = cache.capacity - 1
    width = min(chunk_tokens, max(len(j.ids) - j.done_tokens for j in jobs))
    ids = torch.zeros(len(jobs), width, dtype=torch.long)
    slots = torch.full((len(jobs), width), scratch, dtype=torch.long)
    positions = torch.zeros(len(jobs), width, dtype=torch.long)
    lasts, audio_at, audio = [], [], []
    for i, job in enumerate(jobs):
        piece = job.ids[job.done_tokens : job.done_tokens + width]
        n = len(piece)
        ids[i, :n] = torch.tensor(piece)
        slots[i, :n] = positions[i, :n] = torch.arange(job.start + job.done_tokens, job.start + job.done_tokens + n)
        lasts.append(max(n - 1, 0))
        placeholders = [k for k, t in enumerate(piece) if t == job.audio_token_id]
        if placeholders:
            audio_at.extend(i * width + k for k in placeholders)
            audio.append(_take_audio(job, len(placeholders)))
        job.done_tokens += n
    embeds = model.embed_text(to_device(ids, torch.long, device))
    if audio:
        flat = embeds.view(-1, embeds.shape[-1])
        flat.index_copy_(0, to_device(audio_at, torch.long, device), torch.cat(audio).to(embeds.dtype))
    rows = [j.row for j in jobs]
    whole = rows == list(range(cache.batch_size))
    last, logits = model.thinker_forward(embeds, to_device(positions, torch.long, device), cache,
                                         to_device(slots, torch.long, device),
                                         None if whole else to_device(rows, torch.long, device),
                                         to_device(lasts, torch.long, device))
    tokens = logits.argmax(dim=-1)
    for i, job in enumerate(jobs):
        if job.done:
            job.hidden, job.token = last[i], tokens[i]


def _take_audio(job: PrefillJob, count: int) -> torch.Tensor:
    """The next `count` encoded audio vectors of a job, in placeholder order."""
    taken, need = [], count
    while need:
        head = job.audio[0]
        if head.shape[0] <= need:
            taken.append(job.audio.pop(0))
            need -= head.shape[0]
        else:
            taken.append(head[:need])
            job.audio[0] = head[need:]
            need = 0
    return torch.cat(taken)


def prefill_voice(model: ChromaModel, prefix: torch.Tensor, cache: KVCache, row: int) -> None:
    """Backbone KV of a voice prefix [P, H] into `row` at slots 0..P-1 (done once per voice and copied)."""
    device = model.device
    positions = torch.arange(prefix.shape[0], device=device)[None]
    rows = None if cache.batch_size == 1 else torch.tensor([row], device=device)
    model.backbone.model(prefix.to(device, model.dtype)[None], positions, cache, positions, rows)
