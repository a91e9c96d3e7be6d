"""The engine: loads Chroma once, owns the device, and runs ONE step loop for every live reply.

Each conversation holds one row of two static KV caches (thinker and backbone). A dedicated thread
starts replies (prefilling only the new part of a conversation and copying the voice's precomputed
backbone prefix into the row), then advances all running replies together, one frame per step, and
decodes the frames of all replies in one streaming Mimi call. Replies may run ahead of their
consumer by `lookahead_s`; cancelled replies stop before the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from chroma_agent.engine.codec import StreamingMimiDecoder
from chroma_agent.engine.conversation import FRAME_MS, Conversation, ConversationError, Reply, _Detokenizer
from chroma_agent.engine.events import AudioChunk, ResponseError, TextDelta, Timings, Usage
from chroma_agent.engine.generate import backbone_capacity
from chroma_agent.engine.kv_cache import KVCache
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.engine.step import ReplyState, prefill_voice, run_step, start_reply, thinker_prefill
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.loading import resolve_checkpoint
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import VoiceProfile, VoiceStore, create_voice_profile

log = logging.getLogger(__name__)


class EngineBusyError(RuntimeError):
    """Every conversation slot is taken; try again later."""


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 4  # KV-cache rows: conversations served at once
    thinker_context: int = 4096  # thinker tokens a conversation keeps (older turns are dropped beyond)
    backbone_context: int = 2048  # backbone positions per reply: voice prefix + reply
    max_reply_s: float = 60.0
    lookahead_s: float = 1.5  # how far generation may run ahead of the consumer
    max_user_audio_s: float = 300.0
    voice_cache_size: int = 16  # voices whose backbone prefix stays precomputed

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.thinker_context < 64 or self.backbone_context < 64:
            raise ValueError("thinker_context and backbone_context must be >= 64")
        if self.max_reply_s <= 0 or self.lookahead_s <= 0:
            raise ValueError("max_reply_s and lookahead_s must be > 0")


class Engine:
    def __init__(
        self,
        model: ChromaModel,
        processor: ChromaProcessor,
        config: EngineConfig | None = None,
        *,
        voices: VoiceStore | None = None,
        default_voice: VoiceProfile | None = None,
        sampling: SamplingParams | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.config = config or EngineConfig()
        self.voices = voices or VoiceStore()
        self.default_voice = default_voice
        self.sampling = sampling or SamplingParams(temperature=0.7, top_k=50)
        cfg, device, dtype = self.config, model.device, model.dtype
        self.thinker_cache = model.thinker.model.new_cache(cfg.max_sessions, cfg.thinker_context, dtype=dtype,
                                                           device=device)
        self.backbone_cache = model.backbone.model.new_cache(cfg.max_sessions, cfg.backbone_context, dtype=dtype,
                                                             device=device)
        self._decoder_caches: dict[int, KVCache] = {}
        # One streaming Mimi decoder for all rows: each step decodes the frames of every reply in one call.
        self.codec = StreamingMimiDecoder(model.codec_model, batch_size=cfg.max_sessions)
        self._voice_kv: OrderedDict[str, tuple[KVCache, int]] = OrderedDict()
        self.turn_end_ids = self._turn_end_ids()

        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._free_rows = list(range(cfg.max_sessions))
        self._slot_freed = threading.Condition(self.lock)
        self.conversations: dict[str, Conversation] = {}
        self._pending: list[Reply] = []
        self._running: list[Reply] = []
        self._detok: dict[int, _Detokenizer] = {}
        self.stats = {"replies": 0, "errors": 0, "frames": 0, "steps": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="chroma-engine", daemon=True)
        self._thread.start()
        log.info("engine ready: %d sessions, thinker context %d, backbone context %d, device %s",
                 cfg.max_sessions, cfg.thinker_context, cfg.backbone_context, device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        config: EngineConfig | None = None,
        voices_dir: str | Path | None = None,
        **kwargs,
    ) -> Engine:
        folder = resolve_checkpoint(name_or_path)
        model = ChromaModel.from_pretrained(folder, device=device, dtype=dtype)
        processor = ChromaProcessor.from_pretrained(folder)
        return cls(model, processor, config, voices=VoiceStore(voices_dir), **kwargs)

    # --- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        with self.lock:
            for conv in list(self.conversations.values()):
                self._release_locked(conv)
            self._stop = True
        self.wake()
        self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        """False once the step thread has stopped (closed, or died): nothing will be generated."""
        return self._thread.is_alive() and not self._stop

    @property
    def free_slots(self) -> int:
        return len(self._free_rows)

    @property
    def live_sessions(self) -> int:
        return len(self.conversations)

    @property
    def queued_replies(self) -> int:
        return len(self._pending)

    # --- voices -----------------------------------------------------------------------------------------

    def create_voice(self, audio, transcript: str, name: str | None = None, *, sample_rate: int | None = None,
                     save: bool = False, allow_paths: bool = True) -> VoiceProfile:
        with self.lock:  # the codec runs on the engine's device
            profile = create_voice_profile(self.model, self.processor, audio, transcript, name=name,
                                           sample_rate=sample_rate, allow_paths=allow_paths)
        if save:
            self.voices.save(profile, overwrite=True)
        return profile

    def resolve_voice(self, voice: VoiceProfile | str | None) -> VoiceProfile:
        if isinstance(voice, VoiceProfile):
            return voice
        if voice is None:
            if self.default_voice is None:
                raise ValueError("no voice given and the engine has no default voice")
            return self.default_voice
        return self.voices.get(voice)

    def _voice_rows(self, voice: VoiceProfile) -> tuple[KVCache, int]:
        """The voice's backbone prefix KV, computed once per voice and reused by every reply."""
        if voice.id in self._voice_kv:
            self._voice_kv.move_to_end(voice.id)
            return self._voice_kv[voice.id]
        model = self.model
        prefix = model.voice_prefix(voice.text_ids, voice.codes)
        cache = model.backbone.model.new_cache(1, prefix.shape[0], dtype=model.dtype, device=model.device)
        prefill_voice(model, prefix, cache, 0)
        self._voice_kv[voice.id] = (cache, prefix.shape[0])
        while len(self._voice_kv) > self.config.voice_cache_size:
            self._voice_kv.popitem(last=False)
        return cache, prefix.shape[0]

    def clamp_frames(self, voice: VoiceProfile, max_frames: int | None) -> int:
        """A reply's frame limit: the request's, the engine's, and what the backbone row can hold."""
        limit = int(self.config.max_reply_s * 1000 / FRAME_MS)
        frames = limit if max_frames is None else max(1, min(int(max_frames), limit))
        prefix_len = voice.text_ids.numel() + 2 + voice.codes.shape[1] + 1
        while frames > 1 and backbone_capacity(prefix_len, frames) > self.config.backbone_context:
            frames -= 1
        if backbone_capacity(prefix_len, frames) > self.config.backbone_context:
            raise ValueError(f"voice {voice.name!r} is too long for backbone_context {self.config.backbone_context}")
        return frames

    # --- conversations ----------------------------------------------------------------------------------

    def open_conversation(
        self,
        voice: VoiceProfile | str | None = None,
        instructions: str | None = None,
        *,
        sampling: SamplingParams | None = None,
        wait_s: float = 0.0,
    ) -> Conversation:
        """A new conversation in a free slot; waits up to `wait_s` for one, then raises EngineBusyError."""
        profile = self.resolve_voice(voice)
        profile.require_compatible(self.model.config)
        deadline = time.monotonic() + wait_s
        with self._slot_freed:
            while not self._free_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineBusyError(f"all {self.config.max_sessions} conversation slots are in use")
                self._slot_freed.wait(remaining)
            row = self._free_rows.pop(0)
            try:
                conv = Conversation(self, row, profile, instructions, sampling or self.sampling)
            except Exception:
                self._free_rows.append(row)  # e.g. instructions the template cannot take: the slot goes back
                self._free_rows.sort()
                raise
            self.conversations[conv.id] = conv
        log.info("conversation %s opened (row %d, voice %s)", conv.id, row, profile.name)
        return conv

    def release(self, conv: Conversation) -> None:
        with self.lock:
            self._release_locked(conv)
        self.wake()

    def _release_locked(self, conv: Conversation) -> None:
        if conv.closed:
            return
        if conv.reply is not None:
            self._finish(conv.reply, "cancelled")
        conv.closed = True
        self.conversations.pop(conv.id, None)
        self._free_rows.append(conv.row)
        self._free_rows.sort()
        self._slot_freed.notify_all()
        log.info("conversation %s closed (row %d free)", conv.id, conv.row)

    def submit(self, reply: Reply) -> None:
        self._pending.append(reply)
        self.wake()

    # --- the step loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        lookahead = max(1, round(self.config.lookahead_s * 1000 / FRAME_MS))
        busy = False
        while True:
            if not busy:
                self._wake.wait(timeout=0.05)
            self._wake.clear()
            with self.lock, torch.inference_mode():
                if self._stop:
                    return
                for reply in self._pending:
                    self._start(reply)
                self._pending.clear()
                for reply in [r for r in self._running if r.cancelled]:
                    self._finish(reply, "cancelled")
                runnable = [r for r in self._running if r.frames_produced - r.frames_consumed < lookahead]
                if runnable:
                    self._step(runnable)
                busy = bool(runnable)
            if busy:
                time.sleep(0)  # let API callers take the lock between steps

    def _start(self, reply: Reply) -> None:
        conv = reply.conversation
        if reply.cancelled or conv.closed:
            self._finish(reply, "cancelled")
            return
        t0 = time.perf_counter()
        try:
            ids = torch.tensor([reply.prefill_ids], dtype=torch.long)
            hidden, logits = thinker_prefill(self.model, ids, reply.prefill_features, reply.prefill_mask,
                                             self.thinker_cache, conv.row, reply.context_start)
            conv.cached = reply.context_len
            voice_cache, prefix_len = self._voice_rows(conv.voice)
            self.backbone_cache.copy_rows(voice_cache, 0, conv.row, prefix_len)
            reply.state = start_reply(self.model, conv.row, hidden, logits, reply.context_len, prefix_len,
                                      reply.sampler, reply.max_frames)
        except Exception as exc:  # a bad turn ends this reply only
            log.exception("conversation %s: prefill failed", conv.id)
            self._fail(reply, exc)
            return
        reply.prefill_ms = (time.perf_counter() - t0) * 1000
        self.codec.reset([conv.row])
        self._detok[id(reply)] = _Detokenizer(lambda ids: self.processor.decode_text(ids, skip_special_tokens=True))
        self._push_text(reply, reply.state.token, 0)
        self._running.append(reply)
        self.stats["replies"] += 1

    def _decoder_cache(self, n: int) -> KVCache:
        if n not in self._decoder_caches:
            m = self.model
            self._decoder_caches[n] = m.decoder.model.new_cache(n, m.config.num_codebooks, dtype=m.dtype,
                                                                device=m.device)
        return self._decoder_caches[n]

    def _step(self, replies: list[Reply]) -> None:
        states: list[ReplyState] = [r.state for r in replies]
        try:
            outputs = run_step(self.model, states, self.thinker_cache, self.backbone_cache,
                               self._decoder_cache(len(states)))
        except Exception:
            log.exception("batched step failed; retrying each reply alone")
            outputs = []
            for reply in list(replies):
                try:
                    outputs.append(run_step(self.model, [reply.state], self.thinker_cache, self.backbone_cache,
                                            self._decoder_cache(1))[0])
                except Exception as exc:
                    self._fail(reply, exc)
                    replies = [r for r in replies if r is not reply]
        self.stats["steps"] += 1
        top = self.model.config.codebook_size - 1
        voiced = [(reply, out) for reply, out in zip(replies, outputs, strict=True) if out.frame is not None]
        pcm = None
        if voiced:
            codes = torch.stack([out.frame for _, out in voiced]).clamp(0, top).to(self.model.device)[..., None]
            pcm = self.codec.decode(codes, rows=[r.conversation.row for r, _ in voiced]).float().cpu().numpy()
        audio = {id(reply): pcm[i] for i, (reply, _) in enumerate(voiced)}
        for reply, out in zip(replies, outputs, strict=True):
            if out.new_token is not None:
                self._push_text(reply, out.new_token, reply.frames_produced)
            if out.frame is not None:
                index = reply.frames_produced
                reply.frames_produced += 1
                reply.frame_steps.append(out.step)
                if reply.first_audio_at is None:
                    reply.first_audio_at = time.perf_counter()
                reply.emit(AudioChunk(audio[id(reply)], index, index * FRAME_MS, out.frame.numpy()))
                self.stats["frames"] += 1
            if reply.state.finished:
                self._finish(reply, "completed" if reply.state.finished == "eos" else reply.state.finished)

    def _push_text(self, reply: Reply, token: int, frame_index: int) -> None:
        detok = self._detok.get(id(reply))
        if detok is None or token == self.model.config.im_end_id:
            return
        delta = detok.push(token)
        if delta:
            reply.emit(TextDelta(delta, token, frame_index))

    def _retire(self, reply: Reply) -> Conversation:
        """Take a reply out of the loop; returns its conversation."""
        reply.finished = True
        if reply in self._running:
            self._running.remove(reply)
        if reply in self._pending:
            self._pending.remove(reply)
        self._detok.pop(id(reply), None)
        conv = reply.conversation
        if conv.reply is reply:
            conv.reply = None
        return conv

    def _finish(self, reply: Reply, reason: str) -> None:
        if reply.finished:
            return
        conv = self._retire(reply)
        conv.last_reply = reply
        done = conv.on_finished(reply, reason)
        log.info("conversation %s: reply %s after %d frames (ttfa %s ms)", conv.id, reason, reply.frames_produced,
                 None if done.timings.time_to_first_audio_ms is None else round(done.timings.time_to_first_audio_ms))
        reply.emit(done)

    def _fail(self, reply: Reply, exc: Exception) -> None:
        conv = self._retire(reply)
        self.stats["errors"] += 1
        conv.drop_turn(reply.turn)
        kind = "invalid_request_error" if isinstance(exc, ValueError | ConversationError) else "internal_error"
        reply.emit(ResponseError(f"{type(exc).__name__}: {exc}", kind))

    # --- reporting --------------------------------------------------------------------------------------

    def usage(self, reply: Reply) -> Usage:
        return Usage(
            prompt_tokens=len(reply.prefill_ids),
            cached_tokens=reply.context_start,
            text_tokens=len(reply.text_ids),
            audio_frames=reply.frames_produced,
        )

    def timings(self, reply: Reply) -> Timings:
        now = time.perf_counter()
        ttfa = None if reply.first_audio_at is None else (reply.first_audio_at - reply.started_at) * 1000
        return Timings(
            time_to_first_audio_ms=ttfa,
            prefill_ms=reply.prefill_ms,
            total_ms=(now - reply.started_at) * 1000,
            audio_ms=reply.frames_produced * FRAME_MS,
        )

    def _turn_end_ids(self) -> list[int]:
        """The ids the chat template puts after an assistant message (e.g. "<|im_end|>" + newline)."""
        marker = "\u2063"
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
        tail = self.processor.render(probe, add_generation_prompt=False).split(marker, 1)[1]
        return self.processor.tokenizer(tail, add_special_tokens=False)["input_ids"]
