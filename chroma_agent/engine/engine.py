"""The engine: loads Chroma once, owns the device, and runs ONE step loop for every live reply.

One thread owns everything: the device, the rows of the static caches, every conversation's context and
every reply. Everyone else talks to it through a command queue (`post`) and gets a `Pending` back; nobody
else takes a lock the loop holds. Between two steps the thread applies the queued commands, runs at most
one piece of prefill (a few audio windows or one chunk of tokens, batched over the replies that need it),
starts the replies whose prompt is in, then launches one decode step over every speaking row and one
thinker step over every text-only row. On a GPU the results of a step are read while the next one runs.

Each conversation holds one row of the thinker and backbone caches. A reply prefills only what its
conversation's row does not hold yet, and copies its voice's precomputed backbone prefix into the row.
Replies may run ahead of their consumer by `lookahead_s`; cancelled replies stop before the next step.

About 730 lines, on purpose: the step loop and the commands applied between its steps share this one thread's
state (rows, replies, caches, waiters), and keeping them together keeps that invariant readable in one place.
The parts with a state of their own live apart: the command queue (`commands`), the per-conversation and
per-reply records (`records`), prompts (`context`), prefill, the step and its runner.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chroma_agent.audio import load_audio
from chroma_agent.engine.commands import CommandQueue, run_command, settle
from chroma_agent.engine.context import Turn
from chroma_agent.engine.conversation import (
    Conversation,
    ConversationError,
    Pending,
    Response,
    TurnRef,
)
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta, Timings, Usage
from chroma_agent.engine.generate import backbone_capacity
from chroma_agent.engine.prefill import PrefillJob, encode_audio, prefill_tokens, prefill_voice
from chroma_agent.engine.records import Detokenizer, EngineSession, Reply
from chroma_agent.engine.runner import StepRunner
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.engine.step import DecodeBatch, Finish
from chroma_agent.frames import FRAME_MS, check_codec
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.kv_cache import KVCache
from chroma_agent.model.loading import resolve_checkpoint
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices.clone import finish_voice_profile, prepare_voice_clip
from chroma_agent.voices.profile import VoiceProfile
from chroma_agent.voices.store import VoiceStore

log = logging.getLogger(__name__)


class EngineBusyError(RuntimeError):
    """Every conversation slot is taken; try again later."""


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 4  # KV-cache rows: conversations served at once
    thinker_context: int = 4096  # thinker tokens a conversation keeps (older turns are dropped beyond)
    backbone_context: int = 2048  # backbone positions per reply: voice prefix + reply
    max_reply_s: float = 60.0
    max_text_tokens: int = 1024  # text-only replies
    lookahead_s: float = 1.5  # how far generation may run ahead of the consumer
    max_user_audio_s: float = 300.0
    voice_cache_size: int = 16  # voices whose backbone prefix (and cloned clips) stay cached
    prefill_chunk_tokens: int = 256  # thinker tokens per prefill piece (a running reply waits one piece)
    prefill_audio_windows: int = 8  # 2 s audio-encoder windows per prefill piece
    step_mode: str | None = None  # "eager", "compile" or "cuda_graph"; None: cuda_graph on CUDA, else eager
    step_buckets: tuple[int, ...] | None = None  # batch buckets of the step; None: powers of two on CUDA
    prep_workers: int = 2  # threads for audio decoding, features and tokenizing

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if self.thinker_context < 64 or self.backbone_context < 64:
            raise ValueError("thinker_context and backbone_context must be >= 64")
        if self.max_reply_s <= 0 or self.lookahead_s <= 0:
            raise ValueError("max_reply_s and lookahead_s must be > 0")
        if self.prefill_chunk_tokens < 1 or self.prefill_audio_windows < 1 or self.prep_workers < 1:
            raise ValueError("prefill_chunk_tokens, prefill_audio_windows and prep_workers must be >= 1")


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
        self.config = cfg = config or EngineConfig()
        self.voices = voices or VoiceStore()
        self.default_voice = default_voice
        self.sampling = sampling or SamplingParams(temperature=0.7, top_k=50)
        check_codec(model.config.sample_rate, model.config.samples_per_frame)
        self.batch = DecodeBatch(model, cfg.max_sessions, cfg.thinker_context, cfg.backbone_context)
        self.runner = StepRunner(self.batch, cfg.step_mode, list(cfg.step_buckets) if cfg.step_buckets else None)
        with torch.inference_mode():
            seconds = self.runner.warm_up()
        if seconds:
            log.info("engine steps ready (%s) in %.1f s", self.runner.mode, seconds)
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.prep_workers, thread_name_prefix="chroma-prep")
        self.stats = {"replies": 0, "errors": 0, "frames": 0, "steps": 0, "prefill_pieces": 0}

        self._commands = CommandQueue(self.pool)
        self._free_rows = list(range(cfg.max_sessions))
        self._waiters: list[tuple[float, Callable, Pending]] = []  # (deadline, make, future), arrival order
        self._sessions: dict[str, EngineSession] = {}
        self._prefilling: list[Reply] = []
        self._ready: list[Reply] = []
        self._running: list[Reply] = []
        self._inflight: list[tuple[Any, str, list[Reply]]] = []
        self._text_next = True  # the next decode step is a text step (see chroma_agent.engine.step)
        self._voice_kv: OrderedDict[str, tuple[KVCache, int]] = OrderedDict()
        self._clones: OrderedDict[tuple[str, str], VoiceProfile] = OrderedDict()
        self._overlap = model.device.type == "cuda"
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="chroma-engine", daemon=True)
        self._thread.start()
        log.info("engine ready: %d sessions, thinker context %d, backbone context %d, device %s, steps %s",
                 cfg.max_sessions, cfg.thinker_context, cfg.backbone_context, model.device, self.runner.mode)

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
        if self._thread.is_alive():
            done = self.post(None, None, lambda *_: self._shutdown())
            try:
                done.result(timeout=10)
            except (concurrent.futures.TimeoutError, RuntimeError):
                log.warning("engine thread did not stop in time")
            self._thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def nudge(self) -> None:
        """Wake the step loop (a consumer caught up, or a cancel): a no-op command."""
        self._commands.wake()

    @property
    def alive(self) -> bool:
        """False once the step thread has stopped (closed, or died): nothing will be generated."""
        return self._thread.is_alive() and not self._stop

    @property
    def free_slots(self) -> int:
        return len(self._free_rows)

    @property
    def live_sessions(self) -> int:
        return len(self._sessions)

    @property
    def queued_replies(self) -> int:
        return len(self._prefilling) + len(self._ready)

    # --- commands ---------------------------------------------------------------------------------------

    def post(self, session_id: str | None, seq: int | None, apply: Callable, prepare: Callable | None = None
             ) -> Pending:
        """Queue `apply(session, prepared)` for the engine thread; `prepare()` runs first in the worker pool.

        Commands of one session run in `seq` order. The result (or the exception) of `apply` resolves the
        returned `Pending`.
        """
        future: Pending = Pending()
        if not self.alive:
            future.set_exception(RuntimeError("the engine is closed"))
        else:
            self._commands.post(session_id, seq, apply, prepare, future)
        return future

    def _apply_commands(self, block: bool) -> None:
        timeout = None
        if block:
            timeout = max(0.0, min(w[0] for w in self._waiters) - time.monotonic()) if self._waiters else 0.5
        for sid, seq, command in self._commands.drain(timeout):
            if sid is None:
                run_command(command, None)
                continue
            session = self._sessions.get(sid)
            if session is None:
                settle(command.future, exc=ConversationError(f"conversation {sid} is closed"))
                continue
            for due in session.commands.add(seq, command):
                if session.closed:
                    settle(due.future, exc=ConversationError(f"conversation {sid} is closed"))
                else:
                    run_command(due, session)

    def _shutdown(self) -> None:
        for session in list(self._sessions.values()):
            self.apply_close(session, None)
        for _, _, future in self._waiters:
            settle(future, exc=RuntimeError("the engine is closed"))
        self._waiters.clear()
        self._stop = True

    # --- voices -----------------------------------------------------------------------------------------

    def create_voice(self, audio, transcript: str, name: str | None = None, *, sample_rate: int | None = None,
                     save: bool = False, allow_paths: bool = True) -> Pending[VoiceProfile]:
        """Clone a voice: decoding in the pool, the Mimi encode as one engine job, repeats from a cache."""
        def prepare():
            clip = prepare_voice_clip(self.model.config, self.processor, audio, transcript, name=name,
                                      sample_rate=sample_rate, allow_paths=allow_paths)
            key = (hashlib.sha256(clip.waveform.numpy().tobytes()).hexdigest(), clip.transcript)
            return clip, key

        def apply(_, prepared):
            clip, key = prepared
            profile = self._clones.get(key)
            if profile is None:
                with torch.inference_mode():
                    codes = self.model.encode_voice_codes(clip.waveform).to("cpu")
                profile = finish_voice_profile(self.model.config, clip, codes)
                self._clones[key] = profile
                while len(self._clones) > self.config.voice_cache_size:
                    self._clones.popitem(last=False)
            else:
                self._clones.move_to_end(key)
                log.info("voice clip already cloned (id %s): reused", profile.id)
            return replace(profile, name=name) if name is not None and name != profile.name else profile

        cloned = self.post(None, None, apply, prepare)
        if not save:
            return cloned
        saved: Pending[VoiceProfile] = Pending()

        def store(job: concurrent.futures.Future) -> None:
            if job.exception() is not None:
                settle(saved, exc=job.exception())
                return
            try:
                self.voices.save(job.result(), overwrite=True)
                settle(saved, result=job.result())
            except Exception as exc:
                settle(saved, exc=exc)

        cloned.add_done_callback(lambda job: self.pool.submit(store, job))
        return saved

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
        if not bool(torch.isfinite(cache.k).all() and torch.isfinite(cache.v).all()):  # once per voice
            raise ValueError(f"voice {voice.name!r} gives non-finite values: clone it again from a clean clip")
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
    ) -> Pending[Conversation]:
        """A new conversation in a free slot. Waits up to `wait_s` for one, first come first served (the
        wait holds no thread); then fails with `EngineBusyError`.

        `voice=None` takes the engine's default voice; without one the conversation has no voice and can only
        give text replies (`respond(output_audio=False)`) until `set_voice`.
        """
        def prepare():
            profile = None if voice is None and self.default_voice is None else self.resolve_voice(voice)
            if profile is not None:
                profile.require_compatible(self.model.config)
            note = self.prepare_turn("system", [instructions]) if instructions else None
            return profile, note

        def apply(_, prepared):
            profile, note = prepared
            future: Pending = Pending()

            def make(row: int) -> Conversation:
                sid = uuid.uuid4().hex[:12]
                session = EngineSession(self, sid, row, profile, sampling or self.sampling)
                if note is not None:
                    session.context.set_instructions(note)
                self._sessions[sid] = session
                name = profile.name if profile is not None else None
                log.info("conversation %s opened (row %d, voice %s)", sid, row, name,
                         extra={"session": sid, "voice": name})
                return Conversation(self, sid, row, profile, instructions or None)

            if self._free_rows:
                return make(self._free_rows.pop(0))
            if wait_s <= 0:
                raise EngineBusyError(f"all {self.config.max_sessions} conversation slots are in use")
            self._waiters.append((time.monotonic() + wait_s, make, future))  # in arrival order
            return future

        outer: Pending[Conversation] = Pending()

        def unwrap(job: concurrent.futures.Future) -> None:
            if job.cancelled():
                return
            if job.exception() is not None:
                settle(outer, exc=job.exception())
                return
            result = job.result()
            if isinstance(result, Pending):  # waiting for a slot: a caller who gives up cancels the wait
                outer.add_done_callback(lambda f: result.cancel() if f.cancelled() else None)
                result.add_done_callback(unwrap)
            elif not settle(outer, result=result):
                result.close()  # the caller gave up just as the slot came: give it back

        self.post(None, None, apply, prepare).add_done_callback(unwrap)
        return outer

    def _grant_waiters(self) -> None:
        """Freed slots go to the waiters at once, in arrival order; expired waits fail."""
        now = time.monotonic()
        waiting, self._waiters = self._waiters, []
        for deadline, make, future in waiting:
            if future.done():  # the caller gave up
                continue
            if self._free_rows:
                row = self._free_rows.pop(0)
                conv = make(row)
                if not settle(future, result=conv):  # gave up at this very moment: give the slot back
                    self.apply_close(self._sessions[conv.id], None)
            elif deadline <= now:
                settle(future, exc=EngineBusyError(f"all {self.config.max_sessions} conversation slots are in "
                                                    "use (waited for one)"))
            else:
                self._waiters.append((deadline, make, future))

    def apply_close(self, session: EngineSession, _: Any) -> None:
        if session.closed:
            return
        if session.reply is not None:
            self._finish(session.reply, "cancelled")
        session.closed = True
        self._sessions.pop(session.id, None)
        for future in session.commands.drop():
            settle(future, exc=ConversationError(f"conversation {session.id} is closed"))
        self._free_rows.append(session.row)
        self._free_rows.sort()
        log.info("conversation %s closed (row %d free)", session.id, session.row, extra={"session": session.id})

    # --- turns (prepared in the pool, applied by the engine thread) -------------------------------------

    def prepare_turn(self, role: str, parts: Sequence[str | tuple[np.ndarray | bytes, int]]) -> Turn:
        """Decode, resample and render one turn (pool thread); the engine thread only appends it."""
        rate = self.processor.audio_sample_rate
        content: list[str | np.ndarray] = []
        text = ""
        for part in parts:
            if isinstance(part, str):
                content.append(part)
                text += part
            else:
                pcm, sample_rate = part
                content.append(load_audio(pcm, rate, sample_rate=sample_rate, allow_paths=False,
                                          max_seconds=self.config.max_user_audio_s))
        if role != "assistant" and len(content) == sum(isinstance(p, str) for p in content) and not text.strip():
            raise ValueError(f"{role} message is empty")
        inputs = self.processor.encode_turn(role, content)
        return Turn(role, inputs.ids, text, inputs.features, inputs.audio_seconds)

    def apply_turn(self, session: EngineSession, turn: Turn) -> TurnRef:
        session.context.append(turn)
        return TurnRef(turn.id, turn.role)

    def apply_instructions(self, session: EngineSession, turn: Turn | None) -> None:
        session.context.set_instructions(turn)

    # --- replies ----------------------------------------------------------------------------------------

    def apply_respond(self, session: EngineSession, response: Response, note: Turn | None, max_frames: int | None,
                      sampling: SamplingParams | None, output_audio: bool, max_tokens: int | None) -> None:
        if session.reply is not None:
            if not session.reply.response.cancel_requested:
                raise ConversationError("a reply is already in progress; cancel it first")
            self._finish(session.reply, "cancelled")  # cancelled, not yet wound down: end it now
        if not session.context.turns and note is None:
            raise ConversationError("the conversation is empty: add a user turn or instructions first")
        if note is not None:
            session.context.append(note)
        if output_audio:
            if session.voice is None:
                raise ConversationError("this conversation has no voice, so it can only reply with text: set a "
                                        "voice (or give the engine a default voice) to hear it speak")
            limit = self.clamp_frames(session.voice, max_frames)
            reserve = (limit + 2) // 2 + 2
        else:
            # a client's output limit counts frames for speech and tokens for text
            asked = max_tokens if max_tokens is not None else max_frames
            limit = max(1, min(int(asked or self.config.max_text_tokens), self.config.max_text_tokens))
            reserve = limit + 1
        prompt = session.context.open_reply(reserve)
        job = PrefillJob(session.row, prompt.ids, prompt.start, prompt.features, self.model.config.audio_token_id,
                         self.model.audio_window_frames)
        reply = Reply(session, response, prompt, job, output_audio, limit, sampling or session.sampling)
        session.reply = reply
        self._prefilling.append(reply)

    def _prefill_piece(self) -> None:
        """One piece of prefill: audio windows of the oldest reply that has audio left, else a token chunk
        of every reply whose audio is encoded (batched)."""
        jobs = [r for r in self._prefilling if not r.finished]
        if not jobs:
            return
        now = time.perf_counter()
        for reply in jobs:
            if reply.prefill_started is None:
                reply.prefill_started = now
        with_audio = [r for r in jobs if not r.job.audio_done]
        try:
            if with_audio:
                budget = self.config.prefill_audio_windows
                pieces, owners = [], []
                for reply in with_audio:
                    taken = reply.job.take_windows(budget - len(pieces))
                    pieces += taken
                    owners += [reply] * len(taken)
                    if len(pieces) >= budget:
                        break
                for reply, vectors in zip(owners, encode_audio(self.model, pieces), strict=True):
                    reply.job.audio.append(vectors)
            else:
                prefill_tokens(self.model, self.batch.thinker_cache, [r.job for r in jobs],
                               self.config.prefill_chunk_tokens)
            self.stats["prefill_pieces"] += 1
        except Exception as exc:
            log.exception("prefill failed")
            for reply in with_audio or jobs:
                self._fail(reply, exc)
            return
        for reply in jobs:
            if reply.job.done:
                self._prefilling.remove(reply)
                reply.prefill_ms = (time.perf_counter() - reply.prefill_started) * 1000
                reply.session.context.prefilled(reply.prompt)
                self._ready.append(reply)

    def _start_ready(self) -> None:
        """Put prefilled replies on their rows. Speaking replies start only on a text step (phase)."""
        for reply in list(self._ready):
            if reply.audio and not self._text_next:
                continue
            self._ready.remove(reply)
            session = reply.session
            try:
                if reply.audio:
                    voice_cache, prefix_len = self._voice_rows(session.voice)
                    self.batch.backbone_cache.copy_rows(voice_cache, 0, reply.row, prefix_len)
                    self.batch.start_audio_row(reply.row, reply.job.hidden, reply.job.token, reply.prompt.context_len,
                                               prefix_len, reply.limit, reply.sampling)
                else:
                    self.batch.start_text_row(reply.row, reply.job.token, reply.prompt.context_len, reply.limit)
                    self.batch.set_text_active(reply.row, True)
            except Exception as exc:
                log.exception("conversation %s: reply could not start", session.id)
                self._fail(reply, exc)
                continue
            reply.detok = Detokenizer(lambda ids: self.processor.decode_text(ids, skip_special_tokens=True))
            reply.running = True
            self._running.append(reply)
            self.stats["replies"] += 1

    def _handle_cancels(self) -> None:
        for reply in [r for r in (*self._prefilling, *self._ready) if r.response.cancel_requested]:
            self._finish(reply, "cancelled")
        for reply in [r for r in self._running if r.response.cancel_requested and not r.finished]:
            self._stop_row(reply)
            if reply.inflight == 0:
                self._finish(reply, "cancelled")

    def _stop_row(self, reply: Reply) -> None:
        if reply.running:
            self.batch.stop_row(reply.row)
            reply.on_device = False

    # --- the step loop ----------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._prefilling or self._ready or self._inflight
                    or any(not r.response.throttled for r in self._running))

    def _loop(self) -> None:
        lookahead = max(2, round(self.config.lookahead_s * 1000 / FRAME_MS))
        with torch.inference_mode():
            while not self._stop:
                try:
                    self._apply_commands(block=not self._has_work())
                    if self._stop:
                        break
                    self._handle_cancels()
                    self._grant_waiters()
                    self._prefill_piece()
                    self._start_ready()
                    launched = self._launch_steps(lookahead)
                    # On a GPU, step k's result is read while step k + 1 runs.
                    previous, self._inflight = self._inflight, launched if self._overlap else []
                    self._read(previous)
                    if not self._overlap:
                        self._read(launched)
                    self._handle_cancels()
                except Exception:  # a bug in the loop must not kill every conversation silently
                    log.exception("engine loop error; failing the replies in flight")
                    for reply in list(self._running):
                        self._fail(reply, RuntimeError("engine step failed"))
                    self._inflight = []
        log.info("engine thread stopped")

    def _launch_steps(self, lookahead: int) -> list[tuple[Any, str, list[Reply]]]:
        launched = []
        speaking = [r for r in self._running if r.audio and not r.finished and not r.response.cancel_requested]
        if self._text_next:  # pacing is decided per pair of steps, so every row keeps its text phase
            for reply in speaking:
                # both frames of the pair must fit in the lookahead window
                want = reply.frames - reply.response.frames_consumed + 2 <= lookahead
                reply.response.throttled = not want
                if want != reply.on_device:
                    self.batch.set_active(reply.row, want)
                    reply.on_device = want
        rows = [r for r in speaking if r.on_device]
        if rows:
            kind = "text" if self._text_next else "audio"
            if not all(r.sampling.greedy for r in rows):
                kind += "+sampled"
            pending = self.runner.launch(self.runner.bucket_for(max(r.row for r in rows) + 1), kind)
            self._text_next = not self._text_next
            self.stats["steps"] += 1
            for reply in rows:
                reply.inflight += 1
            launched.append((pending, kind, rows))
        else:
            self._text_next = True  # nobody is mid-pair: the next speaking reply starts on a text step
        thinking = [r for r in self._running if not r.audio and not r.finished and not r.response.cancel_requested]
        if thinking:
            pending = self.runner.launch(self.runner.bucket_for(max(r.row for r in thinking) + 1), "thinker")
            for reply in thinking:
                reply.inflight += 1
            launched.append((pending, "thinker", thinking))
        return launched

    def _read(self, launched: list[tuple[Any, str, list[Reply]]]) -> None:
        k = self.model.config.num_codebooks
        header = self.batch.header
        for pending, kind, rows in launched:
            result = pending.wait()
            for reply in rows:
                reply.inflight -= 1
                if reply.finished:
                    continue
                row = result[reply.row]
                if not row[k + 1]:
                    continue
                reply.steps_read += 1
                events: list = []
                token, step, finish = int(row[k]), int(row[k + 4]), int(row[k + 3])
                if token >= 0:
                    reply.text.append((token, step))
                    if kind == "thinker" or step > 0:
                        reply.fed += 1
                    events += self._text_events(reply, token)
                if row[k + 2]:
                    index = reply.frames
                    reply.frames += 1
                    reply.response.frames_produced = reply.frames
                    reply.frame_steps.append(step)
                    if reply.first_audio_at is None:
                        reply.first_audio_at = time.perf_counter()
                    pcm = row[header:].view(np.int16).astype(np.float32) / np.float32(32768.0)
                    events.append(AudioChunk(pcm, index, index * FRAME_MS, row[:k].astype(np.int64)))
                    self.stats["frames"] += 1
                if not reply.response.cancel_requested:
                    reply.response.deliver(events)
                if finish == Finish.NONFINITE:
                    self._fail(reply, FloatingPointError("the model produced non-finite values for this reply"),
                               scrub=True)
                elif finish:
                    self._stop_row(reply)
                    self._finish(reply, {Finish.EOS: "completed", Finish.MAX_FRAMES: "max_frames",
                                         Finish.TEXT_END: "completed", Finish.TEXT_LIMIT: "max_tokens"}[finish])
        for reply in [r for r in self._running if r.response.cancel_requested and r.inflight == 0]:
            self._finish(reply, "cancelled")

    def _text_events(self, reply: Reply, token: int) -> list:
        if reply.detok is None or token == self.model.config.im_end_id:
            return []
        delta = reply.detok.push(token)
        return [TextDelta(delta, token, reply.frames)] if delta else []

    # --- ending replies ---------------------------------------------------------------------------------

    def _retire(self, reply: Reply) -> EngineSession:
        reply.finished = True
        reply.response.finished = True
        self._stop_row(reply)
        if not reply.steps_read and reply.job.done_tokens:
            # Prefill wrote these slots but no step looked at them: if they hold a non-finite value (nothing
            # has checked), later masked attention would multiply it by zero and still get NaN. Zero them.
            first = reply.job.start
            self.batch.thinker_cache.k[:, reply.row, first : first + reply.job.done_tokens].zero_()
            self.batch.thinker_cache.v[:, reply.row, first : first + reply.job.done_tokens].zero_()
        for group in (self._prefilling, self._ready, self._running):
            if reply in group:
                group.remove(reply)
        session = reply.session
        if session.reply is reply:
            session.reply = None
        return session

    def _finish(self, reply: Reply, reason: str) -> None:
        if reply.finished:
            return
        session = self._retire(reply)
        session.last_reply = reply
        kept = [t for t, _ in reply.text if t != self.model.config.im_end_id]
        text = self.processor.decode_text(kept, skip_special_tokens=True)
        session.context.close_reply(reply.prompt, kept, reply.fed, text)
        reply.prompt.turn.audio_seconds = reply.frames * FRAME_MS / 1000
        reply.spoken_text = text
        if reply.truncate_ms is not None:
            self.apply_truncation(reply, reply.truncate_ms)
        done = ResponseDone(reason=reason, text=reply.spoken_text, usage=self._usage(reply),
                            timings=self._timings(reply), frame_steps=list(reply.frame_steps),
                            turn=TurnRef(reply.prompt.turn.id, "assistant"))
        log.info("conversation %s: reply %s after %d frames, %d tokens (ttfa %s ms)", session.id, reason,
                 reply.frames, len(kept), None if done.timings.time_to_first_audio_ms is None
                 else round(done.timings.time_to_first_audio_ms), extra={"session": session.id})
        reply.response.deliver([done])

    def _fail(self, reply: Reply, exc: Exception, scrub: bool = False) -> None:
        if reply.finished:
            return
        session = self._retire(reply)
        self.stats["errors"] += 1
        session.context.drop_reply(reply.prompt)
        if scrub:  # nothing non-finite may stay in the row (see chroma_agent.engine.step)
            self.batch.scrub_row(session.row)
            session.context.cached = 0
        kind = "invalid_request_error" if isinstance(exc, ValueError | ConversationError) else "internal_error"
        log.warning("conversation %s: reply failed: %s", session.id, exc, extra={"session": session.id})
        reply.response.deliver([ResponseError(f"{type(exc).__name__}: {exc}", kind)])

    def apply_truncation(self, reply: Reply, heard_ms: float) -> None:
        """Keep in the context only the text injected up to the last frame the listener heard."""
        if not reply.audio:
            return  # a text reply is read, not heard
        heard = min(int(np.ceil(heard_ms / FRAME_MS - 1e-9)), len(reply.frame_steps))
        last_step = reply.frame_steps[heard - 1] if heard > 0 else -1
        end = self.model.config.im_end_id
        said = [t for t, _ in reply.text if t != end]
        spoken = [t for t, step in reply.text if step <= last_step and t != end]
        if spoken == said:
            return  # everything that was said was heard
        reply.spoken_text = self.processor.decode_text(spoken, skip_special_tokens=True)
        reply.session.context.truncate_reply(reply.prompt.turn, spoken, reply.spoken_text)

    # --- reporting --------------------------------------------------------------------------------------

    def _usage(self, reply: Reply) -> Usage:
        return Usage(prompt_tokens=len(reply.prompt.ids), cached_tokens=reply.prompt.start,
                     text_tokens=len([t for t, _ in reply.text if t != self.model.config.im_end_id]),
                     audio_frames=reply.frames, audio_prompt_tokens=reply.prompt.audio_tokens)

    def _timings(self, reply: Reply) -> Timings:
        now = time.perf_counter()
        ttfa = None if reply.first_audio_at is None else (reply.first_audio_at - reply.started_at) * 1000
        return Timings(time_to_first_audio_ms=ttfa, prefill_ms=reply.prefill_ms,
                       total_ms=(now - reply.started_at) * 1000, audio_ms=reply.frames * FRAME_MS)
