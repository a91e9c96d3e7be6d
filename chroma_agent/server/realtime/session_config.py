"""``session.update``: what a session is configured to do (voice, modalities, instructions, sampling, turn detection).

An update is validated whole before any of it applies (a refused update changes nothing), so the validation of
formats and modalities lives here with it; :mod:`.responses` reuses the same checks for ``response.create``'s
per-reply overrides.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging

from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.realtime_protocol import (
    ErrorCode,
    ProtocolError,
    SessionUpdate,
)
from chroma_agent.realtime_protocol.rules import (
    check_beta_format,
    check_format,
    output_modality,
    turn_detection_config,
    voice_name,
)
from chroma_agent.server.realtime.connection import Connection
from chroma_agent.server.realtime.input_buffer import server_vad
from chroma_agent.server.voice_choice import (
    DEFAULT_VOICE_SETTING,
    VoiceNotFound,
    is_stock_voice,
    known_voices,
    resolve_voice,
)
from chroma_agent.voices import VoiceError, VoiceProfile

log = logging.getLogger(__name__)






class SessionConfig(Connection):
    """``session.update`` and what the other parts ask of the session's configuration (its voice, sampling)."""

    def _sampling(self, temperature: float | None) -> SamplingParams:
        base = self.engine.sampling
        t = temperature if temperature is not None else self.temperature
        return base if t is None else dataclasses.replace(base, temperature=t)

    async def _resolve_voice(self, name: str, param: str, event_id: str | None) -> VoiceProfile | None:
        """A stored voice, the configured default (its name or an OpenAI stock name), or None: a stock name
        while no default is configured (the update's other fields still apply; audio replies are refused)."""
        if self.voice is not None and name == self.voice.name and not is_stock_voice(name):
            return self.voice
        try:
            return await asyncio.to_thread(resolve_voice, self.engine, name)
        except VoiceNotFound:
            known = await asyncio.to_thread(known_voices, self.engine)
            raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"unknown voice {name!r}; available voices: {known} (OpenAI's "
                                "voice names speak with the server's default voice)", param=param,
                                event_id=event_id) from None
        except VoiceError as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_VOICE, f"voice {name!r} cannot be used: {exc}", param=param,
                                event_id=event_id) from None

    def _voice_param(self) -> str:
        return "session.audio.output.voice" if self.dialect == "ga" else "session.voice"

    def _require_voice(self, event_id: str | None) -> None:
        """An audio reply needs a voice; refuse it (naming the setting) when the session has none."""
        if self.voice is None:
            raise ProtocolError(ErrorCode.VOICE_REQUIRED, f"this server has no default voice ({DEFAULT_VOICE_SETTING} "
                                f"is not set) and the session has none: set {self._voice_param()} to a stored voice, "
                                "or ask for a text reply (output_modalities ['text'])", param=self._voice_param(),
                                event_id=event_id)


    async def _session_update(self, event: SessionUpdate) -> None:
        s, eid = event.session, event.event_id
        fields = s.model_fields_set
        # 1. validate everything, apply nothing
        if isinstance(s.instructions, str):
            self._require_text(len(s.instructions), "session.instructions", eid)
        modality = self.modality
        for name in ("output_modalities", "modalities"):
            modality = output_modality(getattr(s, name), f"session.{name}", eid) or modality
        check_beta_format(s.input_audio_format, "session.input_audio_format", eid)
        check_beta_format(s.output_audio_format, "session.output_audio_format", eid)
        wanted_voice = voice_name(s.voice)
        voice_param = "session.voice"
        td_given, td, td_param = False, None, "session.turn_detection"
        if "turn_detection" in fields:
            td_given, td = True, s.turn_detection
        audio = s.audio
        if audio is not None:
            if audio.input is not None:
                check_format(audio.input.format, "session.audio.input.format", eid)
                if "turn_detection" in audio.input.model_fields_set:
                    td_given, td, td_param = True, audio.input.turn_detection, "session.audio.input.turn_detection"
            if audio.output is not None:
                check_format(audio.output.format, "session.audio.output.format", eid)
                if audio.output.voice is not None:
                    wanted_voice, voice_param = voice_name(audio.output.voice), "session.audio.output.voice"
        new_td = turn_detection_config(td, td_param, eid) if td_given else self.turn_detection
        voice = await self._resolve_voice(wanted_voice, voice_param, eid) if wanted_voice else self.voice
        if voice is None and wanted_voice:
            log.info("realtime session %s: voice %r stands for the default voice, and none is configured",
                     self.session_id, wanted_voice)
        max_tokens = self.max_output_tokens
        for name in ("max_output_tokens", "max_response_output_tokens"):
            if name in fields:
                value = getattr(s, name)
                max_tokens = self.settings.default_max_frames if value is None else value
        vad = self.vad
        if new_td != self.turn_detection:
            vad = None
            if new_td is not None:
                try:
                    vad = await asyncio.to_thread(server_vad, new_td, int(self.input_ms_total))
                except Exception as exc:  # silero/onnxruntime missing or broken
                    log.warning("realtime session %s: server_vad unavailable: %s", self.session_id, exc)
                    raise ProtocolError(ErrorCode.UNSUPPORTED, f"server_vad is not available on this server "
                                        f"({type(exc).__name__}: {exc}); use turn_detection null and commit the "
                                        "input audio buffer yourself", param=td_param, event_id=eid) from None
        # 2. apply
        if voice is not self.voice:
            self.voice = voice
            await self.conv.set_voice(self._engine_voice())
        self.modality = modality
        if "instructions" in fields and (s.instructions or None) != self.instructions:
            self.instructions = s.instructions or None
            await self._edit_context(functools.partial(self.conv.set_instructions, self.instructions))
        if "temperature" in fields:
            self.temperature = s.temperature
        self.max_output_tokens = max_tokens
        if new_td != self.turn_detection:
            self.turn_detection, self.vad, self.vad_item_id = new_td, vad, None
        await self._send(self.events.session_updated(self._session_payload()))
