"""The seam between a LiveKit realtime session and whatever runs Chroma.

`RealtimeSession` talks only to the two small protocols below, :class:`Backend` (opens conversations) and
:class:`BackendConversation` (one conversation: add turns, stream a reply, cancel, truncate, close). Their
events are the engine's own (`AudioChunk`, `TextDelta`, `ResponseDone`, `ResponseError`), so a reply looks
the same wherever it was made.

:class:`InProcessBackend` implements them over an :class:`~chroma_agent.engine.engine.Engine` in this
process; :class:`~.remote.RemoteBackend` implements them over a ``chroma-agent serve`` server's
``/v1/realtime`` WebSocket. The session does not change.

In-process engines are shared: :func:`load_engine` keeps one engine per ``(model, device, dtype)`` for the
whole process, so every session (and every job of a LiveKit worker using the thread executor) uses the same
weights and the same batched step loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from chroma_agent.engine.events import ResponseEvent
from chroma_agent.frames import INPUT_RATE, frames_for_seconds

from ..log import logger
from ..models import DEFAULT_MODEL

if TYPE_CHECKING:
    from chroma_agent.engine.conversation import Conversation
    from chroma_agent.engine.engine import Engine
    from chroma_agent.voices import VoiceProfile

Role = Literal["user", "assistant", "system"]


@dataclass(frozen=True)
class SamplingOverrides:
    """Sampling settings a session asks for; ``None`` keeps the backend's default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


@dataclass(frozen=True, eq=False)
class VoiceSpec:
    """The voice a session speaks with: a stored profile's name, a profile, or a clip to clone once."""

    name: str | None = None
    profile: VoiceProfile | None = None
    audio: Any = None  # anything chroma_agent.audio.load_audio accepts: path, bytes, base64, array
    text: str | None = None  # what `audio` says
    sample_rate: int | None = None  # needed when `audio` is an array

    @property
    def label(self) -> str:
        if self.profile is not None:
            return self.profile.name
        if self.name is not None:
            return self.name
        return "cloned voice" if self.audio is not None else "default voice"


class BackendConversation(Protocol):
    """One conversation: its context lives in the backend (an engine's KV-cache row, or a remote session).

    Every method is called from the session's event loop, one at a time, except `cancel` and `truncate`,
    which may come while a reply streams. `truncate` applies to the backend's latest reply at the time of
    the call and must take effect before any later call does.
    """

    @property
    def id(self) -> str: ...

    @property
    def instructions(self) -> str | None: ...

    async def add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None: ...

    async def add_text(self, role: Role, text: str) -> None: ...

    async def set_instructions(self, text: str | None) -> None: ...

    async def set_voice(self, voice: VoiceSpec) -> None: ...

    def respond(
        self, *, instructions: str | None, max_seconds: float | None, sampling: SamplingOverrides
    ) -> AsyncIterator[ResponseEvent]: ...

    def cancel(self) -> None: ...

    def truncate(self, heard_ms: float, on_kept: Callable[[str], None] | None = None) -> None:
        """Keep only what the listener heard of the latest reply. A reply still running reports its kept
        words in its `ResponseDone.text`; for one already over, `on_kept` gets them once known (from any
        thread), if the backend learns them."""
        ...

    async def close(self) -> None: ...


class Backend(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def input_sample_rate(self) -> int:
        """The rate `add_user_audio` is best given (the session resamples what it is pushed to it, once)."""
        ...

    def load(self) -> None:
        """Make the backend ready now (blocking): load weights, connect. Idempotent."""
        ...

    async def open(
        self, *, voice: VoiceSpec, instructions: str | None, sampling: SamplingOverrides
    ) -> BackendConversation: ...

    def capacity(self) -> tuple[int, int] | None:
        """(live conversations, conversation slots), or None when not known yet."""
        ...


# --- the process-wide engine registry ------------------------------------------------------------------

_engines: dict[tuple[str, str, str], Engine] = {}
_engines_lock = threading.Lock()


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    if device is None or device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``None``/``"auto"`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype is None or dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def load_engine(
    model: str | Path = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    voices_dir: str | Path | None = None,
    max_sessions: int | None = None,
    max_reply_s: float | None = None,
) -> Engine:
    """The process's engine for ``(model, device, dtype)``, loaded on first use and shared afterwards.

    Blocking (a 4B checkpoint takes a while): call it from a prewarm function or a thread. Engine settings
    (``max_sessions``, ``voices_dir``, ``max_reply_s``) only apply to the call that loads it; later callers
    asking for different ones get the loaded engine and a warning.
    """
    from chroma_agent.engine.engine import Engine, EngineConfig

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    key = (str(model), device, dtype)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            settings: dict[str, Any] = {}
            if max_sessions is not None:
                settings["max_sessions"] = int(max_sessions)
            if max_reply_s is not None:
                settings["max_reply_s"] = float(max_reply_s)
            logger.info("loading Chroma engine %s on %s (%s)", model, device, dtype)
            engine = Engine.from_pretrained(model, device=device, dtype=dtype,
                                            config=EngineConfig(**settings), voices_dir=voices_dir)
            _engines[key] = engine
            return engine
    if max_sessions is not None and engine.config.max_sessions != max_sessions:
        logger.warning("engine %s is already loaded with %d sessions; ignoring max_sessions=%d",
                       model, engine.config.max_sessions, max_sessions)
    if voices_dir is not None and Path(voices_dir).expanduser() != engine.voices.folder:
        logger.warning("engine %s is already loaded with voices from %s; ignoring voices_dir=%s",
                       model, engine.voices.folder, voices_dir)
    return engine


def loaded_engines() -> dict[tuple[str, str, str], Engine]:
    """The engines loaded in this process, by (model, device, dtype)."""
    with _engines_lock:
        return dict(_engines)


def close_engines() -> None:
    """Close every shared engine (frees their slots and stops their step loops)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()


# --- the in-process backend ------------------------------------------------------------------------------


class InProcessBackend:
    """Chroma running in this process: a given `Engine`, or the shared one for (model, device, dtype)."""

    input_sample_rate = INPUT_RATE  # what the thinker's audio encoder hears

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        voices_dir: str | Path | None = None,
        max_sessions: int | None = None,
    ):
        self._engine = engine
        self._model = model
        self._device = device
        self._dtype = dtype
        self._voices_dir = voices_dir
        self._max_sessions = max_sessions
        self._clone_lock = threading.Lock()
        self._cloned: dict[int, VoiceProfile] = {}

    @property
    def model_name(self) -> str:
        if self._model is not None:
            return str(self._model)
        return "chroma" if self._engine is not None else DEFAULT_MODEL

    @property
    def engine(self) -> Engine | None:
        """The engine, once loaded (None before)."""
        return self._engine

    def load(self) -> None:
        self._load_engine()

    def _load_engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self._model or DEFAULT_MODEL, device=self._device, dtype=self._dtype,
                                       voices_dir=self._voices_dir, max_sessions=self._max_sessions)
        return self._engine

    def capacity(self) -> tuple[int, int] | None:
        engine = self._engine
        if engine is None:
            return None
        return engine.live_sessions, engine.config.max_sessions

    def resolve_voice(self, voice: VoiceSpec) -> VoiceProfile:
        """The profile for `voice` (blocking: may read a voice file, or clone a clip the first time)."""
        engine = self._load_engine()
        if voice.profile is not None:
            return voice.profile
        if voice.audio is not None:
            with self._clone_lock:
                profile = self._cloned.get(id(voice))
                if profile is None:
                    profile = engine.create_voice(voice.audio, voice.text or "", name=voice.name,
                                                  sample_rate=voice.sample_rate).result()
                    self._cloned[id(voice)] = profile
                return profile
        return engine.resolve_voice(voice.name)

    def sampling_params(self, overrides: SamplingOverrides):
        from chroma_agent.engine.sampling import SamplingParams

        base = self._load_engine().sampling
        return SamplingParams(
            temperature=base.temperature if overrides.temperature is None else overrides.temperature,
            top_k=base.top_k if overrides.top_k is None else overrides.top_k,
            top_p=base.top_p if overrides.top_p is None else overrides.top_p,
            seed=base.seed,
        )

    async def open(
        self, *, voice: VoiceSpec, instructions: str | None, sampling: SamplingOverrides
    ) -> InProcessConversation:
        def _open() -> Conversation:
            engine = self._load_engine()  # a lazy load can take minutes: a worker thread, not the loop
            profile = self.resolve_voice(voice)
            return engine.open_conversation(profile, instructions, sampling=self.sampling_params(sampling)).result()

        task = asyncio.ensure_future(asyncio.to_thread(_open))
        try:
            conv = await asyncio.shield(task)
        except asyncio.CancelledError:
            # the thread still opens it (a lazy model load can take minutes): free the slot when it does
            task.add_done_callback(_close_orphan)
            raise
        return InProcessConversation(self, conv)


def _close_orphan(task: asyncio.Future[Conversation]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class InProcessConversation:
    """A `BackendConversation` over an engine `Conversation` (its commands never block the loop)."""

    def __init__(self, backend: InProcessBackend, conversation: Conversation):
        self._backend = backend
        self._conv = conversation

    @property
    def id(self) -> str:
        return self._conv.id

    @property
    def instructions(self) -> str | None:
        return self._conv.instructions

    @property
    def conversation(self) -> Conversation:
        """The engine conversation underneath (for inspection and tests)."""
        return self._conv

    async def add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        await self._conv.add_user_audio(pcm, sample_rate)

    async def add_text(self, role: Role, text: str) -> None:
        add = {"user": self._conv.add_user_text, "assistant": self._conv.add_assistant_text,
               "system": self._conv.add_system_text}[role]
        await add(text)

    async def set_instructions(self, text: str | None) -> None:
        await self._conv.set_instructions(text)

    async def set_voice(self, voice: VoiceSpec) -> None:
        profile = await asyncio.to_thread(self._backend.resolve_voice, voice)  # may read a file or clone
        await self._conv.set_voice(profile)

    async def respond(
        self, *, instructions: str | None, max_seconds: float | None, sampling: SamplingOverrides
    ) -> AsyncIterator[ResponseEvent]:
        max_frames = None if max_seconds is None else frames_for_seconds(max_seconds)
        stream = self._conv.respond(instructions, max_frames=max_frames,
                                    sampling=self._backend.sampling_params(sampling))
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # leaving early cancels the reply in the engine

    def cancel(self) -> None:
        self._conv.cancel()

    def truncate(self, heard_ms: float, on_kept: Callable[[str], None] | None = None) -> None:
        from chroma_agent.engine.conversation import ConversationError

        try:
            pending = self._conv.truncate(max(0.0, float(heard_ms)))
        except ConversationError as exc:  # the conversation is closed
            logger.debug("truncate ignored: %s", exc)
            return

        def kept(job) -> None:
            if job.exception() is not None:  # no reply yet
                logger.debug("truncate ignored: %s", job.exception())
            elif job.result() is not None and on_kept is not None:  # None: the running reply reports it
                on_kept(job.result())

        pending.add_done_callback(kept)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._conv.close()
