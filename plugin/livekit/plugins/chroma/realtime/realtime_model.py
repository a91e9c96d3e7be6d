"""Chroma as a LiveKit Agents realtime model: ``AgentSession(llm=chroma.RealtimeModel(voice="anna"))``.

Chroma hears audio and answers in a cloned voice, one 80 ms frame at a time. The session's own VAD / turn
detector decides when the user's turn ends (Chroma has no server-side turn detection): AgentSession then
calls `commit_audio` and `generate_reply`, and the reply streams back as 24 kHz audio frames with its
transcript beside it. Interruptions cancel the reply at the next engine step, and `truncate` keeps in
Chroma's context only what the listener heard.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livekit.agents import llm
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given

from ..models import DEFAULT_MODEL, ChromaDevices, ChromaDtypes, ChromaModels
from .backend import Backend, InProcessBackend
from .options import RealtimeOptions, updated_options
from .session import RealtimeSession

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine
    from chroma_agent.voices import VoiceProfile

__all__ = ["RealtimeModel", "RealtimeOptions", "RealtimeSession"]


class RealtimeModel(llm.RealtimeModel):
    """FlashLabs Chroma 1.0, self-hosted speech-to-speech with voice cloning, as a LiveKit realtime model.

    In-process mode runs Chroma in this process. Every `RealtimeModel` asking for the same
    ``(model, device, dtype)`` shares ONE engine (weights, KV caches, batched step loop), loaded on first use
    or by :meth:`prewarm`; each session takes one of its conversation slots.

    Remote mode (``base_url=``) talks to a ``chroma-agent serve`` server over its OpenAI-Realtime-compatible
    ``/v1/realtime`` WebSocket: one WebSocket (one server conversation slot) per session.

    Args:
        model: checkpoint folder or Hugging Face repo id (default ``FlashLabs/Chroma-4B``).
        voice: a stored voice's name (see ``CHROMA_VOICES_DIR``) or a ``VoiceProfile``. Without a voice the
            engine's default voice is used.
        voice_audio, voice_text: clone a voice on the fly from a clip (path, bytes, base64 or array, with
            ``voice_sample_rate`` for arrays) and what it says; cloned once per model, then reused.
        instructions: the system prompt before the Agent's own instructions arrive; an Agent's instructions
            (``update_instructions``) replace it.
        temperature, top_k, top_p: sampling of the audio codes and text (``temperature=0``: greedy).
        max_reply_seconds: the longest reply; max_turn_seconds: the most user audio one turn keeps (the
            latest part is kept).
        device, dtype, voices_dir, max_sessions: how the shared engine is loaded (the first loader wins).
        engine: an existing ``Engine`` to use instead of the shared one.
        base_url: remote mode: the server's URL (``http(s)://host:8000`` or ``ws(s)://...``); then ``voice``
            is a voice stored on the server, only ``temperature`` (0..2) of the sampling can be set, and the
            in-process settings (``device``, ``dtype``, ``voices_dir``, ``max_sessions``, ``engine``) are
            refused.
        api_key: the server's API key (default: ``CHROMA_API_KEY``), sent as ``Authorization: Bearer``.
    """

    def __init__(
        self,
        *,
        model: ChromaModels | str | None = None,
        voice: str | VoiceProfile | None = None,
        voice_audio: Any = None,
        voice_text: str | None = None,
        voice_sample_rate: int | None = None,
        instructions: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        max_reply_seconds: float = 30.0,
        max_turn_seconds: float = 30.0,
        device: ChromaDevices | str | None = None,
        dtype: ChromaDtypes | str | None = None,
        voices_dir: str | Path | None = None,
        max_sessions: int | None = None,
        engine: Engine | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(
            capabilities=llm.RealtimeCapabilities(
                message_truncation=True,
                turn_detection=False,  # AgentSession's VAD / turn detector drives the turns
                user_transcription=False,
                auto_tool_reply_generation=False,
                audio_output=True,
                manual_function_calls=False,  # Chroma has no function calling
                mutable_chat_context=True,
                mutable_instructions=True,
                mutable_tools=False,
                per_response_tool_choice=False,
                supports_say=False,
            )
        )
        if base_url and api_key is None:
            api_key = os.environ.get("CHROMA_API_KEY") or None
        self._opts = RealtimeOptions(
            model=str(model) if model is not None else ("chroma" if engine is not None else DEFAULT_MODEL),
            voice=voice, voice_audio=voice_audio, voice_text=voice_text, voice_sample_rate=voice_sample_rate,
            instructions=instructions, temperature=temperature, top_k=top_k, top_p=top_p,
            max_reply_seconds=max_reply_seconds, max_turn_seconds=max_turn_seconds, device=device,
            dtype=dtype, voices_dir=voices_dir, max_sessions=max_sessions, base_url=base_url, api_key=api_key,
        )
        self._opts.validate()
        self._voice = self._opts.voice_spec()
        self._backend: Backend
        if base_url:
            if engine is not None:
                raise ValueError("give either engine= (in-process) or base_url= (remote), not both")
            from .remote import RemoteBackend

            self._backend = RemoteBackend(base_url, api_key=self._opts.api_key)
        else:
            self._backend = InProcessBackend(
                engine=engine, model=None if model is None else str(model), device=device, dtype=dtype,
                voices_dir=voices_dir, max_sessions=max_sessions,
            )
        self._sessions: weakref.WeakSet[RealtimeSession] = weakref.WeakSet()

    @property
    def model(self) -> str:
        return self._opts.model

    @property
    def provider(self) -> str:
        return "chroma"

    @property
    def options(self) -> RealtimeOptions:
        return replace(self._opts)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def engine(self) -> Engine | None:
        """The in-process engine once loaded (None before, or in remote mode)."""
        return getattr(self._backend, "engine", None)

    def prewarm(self) -> None:
        """Load the model now (blocking), e.g. in a LiveKit worker's setup/prewarm function; in remote mode,
        check that the server answers and takes the API key."""
        self._backend.load()

    def capacity(self) -> tuple[int, int] | None:
        """(live conversations, conversation slots) of the backend, or None before it is loaded."""
        return self._backend.capacity()

    def session(self, *, turn_detection_disabled: bool = False) -> RealtimeSession:
        sess = RealtimeSession(self)
        self._sessions.add(sess)
        return sess

    def update_options(
        self,
        *,
        voice: NotGivenOr[str | VoiceProfile] = NOT_GIVEN,
        temperature: NotGivenOr[float | None] = NOT_GIVEN,
        top_k: NotGivenOr[int | None] = NOT_GIVEN,
        top_p: NotGivenOr[float | None] = NOT_GIVEN,
        max_reply_seconds: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """Change the defaults of new sessions and of every live session of this model."""
        opts = updated_options(self._opts, voice=voice, temperature=temperature, top_k=top_k, top_p=top_p,
                                max_reply_seconds=max_reply_seconds)
        self._opts = opts
        if is_given(voice):
            self._voice = opts.voice_spec()
        for sess in list(self._sessions):
            sess.update_options(voice=voice, temperature=temperature, top_k=top_k, top_p=top_p,
                                max_reply_seconds=max_reply_seconds)

    async def aclose(self) -> None:
        """Nothing to release: sessions free their slots, and the shared engine lives as long as the process
        (`livekit.plugins.chroma.close_engines()` frees it)."""
