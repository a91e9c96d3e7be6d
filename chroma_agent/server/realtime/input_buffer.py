"""The input audio buffer: ``input_audio_buffer.append`` / ``commit`` / ``clear``, and server VAD driving them.

Appended audio waits here until a commit (the client's, or server VAD's at the end of a turn) makes it one user
item. Server VAD runs on every append, so it lives with the buffer it trims and commits; the times it reports are
on the session's input audio clock (all audio appended since connect), which the buffer keeps too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from chroma_agent.audio import pcm16_to_float, resample
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import ConversationError
from chroma_agent.realtime_protocol import (
    DEFAULT_TURN_DETECTION,
    SAMPLE_RATE,
    SAMPLE_WIDTH,
    ErrorCode,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ProtocolError,
    audio_ms,
    b64_to_pcm,
    new_id,
)
from chroma_agent.realtime_protocol.rules import MIN_COMMIT_MS
from chroma_agent.server.priority import in_background
from chroma_agent.server.realtime.connection import Connection
from chroma_agent.server.realtime.items import _Item
from chroma_agent.vad import SileroVad, SpeechStarted, TurnDetector, VadEvent

log = logging.getLogger(__name__)

_vad_unavailable_logged = False


def _log_vad_unavailable(exc: Exception) -> None:
    global _vad_unavailable_logged
    if not _vad_unavailable_logged:  # once per process: every session would say the same
        _vad_unavailable_logged = True
        log.warning("server_vad is unavailable (%s: %s): realtime sessions start with turn_detection null",
                    type(exc).__name__, exc)


def server_vad(config: dict[str, Any], origin_ms: int = 0,
               speech_prob: Callable[[np.ndarray], float] | None = None) -> TurnDetector:
    """The shared turn detector as ``server_vad`` runs it: Silero unless ``speech_prob`` stands in for it.

    Blocking the first time (it loads Silero): call it off the event loop. Speech starts on one window at or above
    ``threshold`` (OpenAI's server VAD has no minimum speech length) and ends after ``silence_duration_ms``; a turn
    has no maximum length (the buffer's own limit refuses what does not fit). The detector keeps no audio: the
    buffer is the audio, and keeping ``prefix_padding_ms`` of it before the speech is the buffer's job. Its clock
    starts at ``origin_ms`` on the input audio clock, so its event times are the times the client is told.
    """
    return TurnDetector(speech_prob if speech_prob is not None else SileroVad(),
                        threshold=float(config["threshold"]), min_speech_ms=0,
                        min_silence_ms=float(config["silence_duration_ms"]), max_turn_s=None, keep_audio=False,
                        origin_ms=origin_ms)


def _detect(vad: TurnDetector, pcm: bytes) -> list[VadEvent]:
    """One append through the detector (its own stream resampler takes 24 kHz to 16 kHz). Blocking."""
    return vad.push(pcm16_to_float(pcm), SAMPLE_RATE)


class InputBuffer(Connection):
    """The input audio buffer and server VAD over it."""

    async def _start_server_vad(self) -> None:
        try:
            self.vad = await asyncio.to_thread(server_vad, DEFAULT_TURN_DETECTION, int(self.input_ms_total))
            self.turn_detection = dict(DEFAULT_TURN_DETECTION)
        except Exception as exc:  # VadUnavailable (livekit-plugins-silero / onnxruntime missing), or a broken one
            _log_vad_unavailable(exc)

    async def _append(self, event: InputAudioBufferAppend) -> None:
        room = self.max_buffer_bytes - len(self.buffer)
        try:  # the size check runs on the base64 length, before decoding: +4 covers its padding
            pcm: bytes | None = b64_to_pcm(event.audio, max_bytes=max(room, 0) + 4, event_id=event.event_id)
        except ProtocolError as exc:
            if exc.code != ErrorCode.AUDIO_TOO_LARGE:
                raise
            pcm = None  # reported below with the buffer's real limit, not the room left in it
        if pcm is None or len(pcm) > room:
            limit_s = self.max_buffer_bytes / (SAMPLE_RATE * SAMPLE_WIDTH)
            raise ProtocolError(ErrorCode.AUDIO_TOO_LARGE,
                                f"the input audio buffer holds at most {limit_s:g} s of audio (max_audio_seconds) "
                                f"and has {len(self.buffer) / (SAMPLE_RATE * SAMPLE_WIDTH):.1f} s; commit or clear "
                                "it first", param="audio", event_id=event.event_id)
        self.buffer.extend(pcm)
        self.input_ms_total += len(pcm) * 1000 / (SAMPLE_RATE * SAMPLE_WIDTH)
        if self.vad is not None:
            await self._run_vad(pcm)

    async def _run_vad(self, pcm: bytes) -> None:
        cfg = self.turn_detection
        # ~12 ms of CPU per second of audio (resampling + Silero): off the event loop, which every session shares
        # (onnxruntime releases the GIL). Appends are handled one at a time, so the detector sees them in order.
        for event in await asyncio.to_thread(_detect, self.vad, pcm):
            if isinstance(event, SpeechStarted):
                self.vad_item_id = new_id("item")
                start = max(0, event.at_ms - cfg["prefix_padding_ms"])
                # keep the padding before the speech, drop older silence
                drop = max(0, (start - self.buffer_start_ms) * SAMPLE_RATE // 1000) * SAMPLE_WIDTH
                del self.buffer[:min(drop, len(self.buffer))]
                self.buffer_start_ms = max(self.buffer_start_ms, start)
                interrupted = self.response if cfg["interrupt_response"] else None
                cut = self._barge_in(interrupted) if interrupted is not None else None
                # the reply is cancelled (nothing more of it goes out) before the client hears of the speech
                await self._send(self.events.speech_started(self.vad_item_id, start))
                if cut is not None:
                    await self._send(self.events.item_truncated(interrupted.item_id, 0, cut))
            else:  # TurnEnded
                item_id, self.vad_item_id = self.vad_item_id or new_id("item"), None
                await self._send(self.events.speech_stopped(item_id, event.at_ms))
                if await self._commit_buffer(item_id, None) and cfg["create_response"]:
                    await self._await_cancelled()
                    if self.response is None:
                        try:
                            if self.modality == "audio":
                                self._require_voice(None)
                        except ProtocolError as exc:
                            await self._send_error(exc)
                        else:
                            self._start_response(None, None)
        if not self.vad.speaking:  # between turns keep only the prefix padding
            keep = cfg["prefix_padding_ms"] * SAMPLE_RATE // 1000 * SAMPLE_WIDTH
            if len(self.buffer) > keep:
                del self.buffer[: len(self.buffer) - keep]
            self.buffer_start_ms = int(self.input_ms_total) - audio_ms(len(self.buffer))

    async def _commit(self, event: InputAudioBufferCommit) -> None:
        if audio_ms(len(self.buffer)) < MIN_COMMIT_MS:
            raise ProtocolError(ErrorCode.COMMIT_EMPTY, f"buffer too small: expected at least {MIN_COMMIT_MS}ms of "
                                f"audio, but the buffer holds {audio_ms(len(self.buffer))}ms",
                                event_id=event.event_id)
        item_id, self.vad_item_id = self.vad_item_id or new_id("item"), None
        if self.vad is not None:
            self.vad.reset()
        await self._commit_buffer(item_id, event.event_id)

    async def _commit_buffer(self, item_id: str, event_id: str | None) -> bool:
        pcm = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = int(self.input_ms_total)
        if audio_ms(len(pcm)) < MIN_COMMIT_MS:
            return False
        await self._require_room(event_id)
        rate = self.engine.processor.audio_sample_rate
        clip = await in_background(resample, pcm16_to_float(pcm), SAMPLE_RATE, rate)  # off the event loop
        try:
            turns = await self._add_turns([(self.conv.add_user_audio, (clip, rate))])
        except ContextError as exc:
            raise ProtocolError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, f"the input audio cannot be used: {exc}",
                                event_id=event_id) from None
        except (ValueError, ConversationError) as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, f"the input audio cannot be used: {exc}",
                                event_id=event_id) from None
        previous = self.items[-1].id if self.items else None
        item = _Item(item_id, "user", [self.events.user_audio_content()], turns)
        self.items.append(item)
        await self._send(self.events.input_audio_buffer_committed(item_id, previous))
        body = self._item_body(item)
        await self._send(self.events.item_added(body, previous))
        await self._send(self.events.item_done(body, previous))
        return True

    async def _clear(self, event: InputAudioBufferClear) -> None:
        self.buffer.clear()
        self.buffer_start_ms = int(self.input_ms_total)
        self.vad_item_id = None
        if self.vad is not None:
            self.vad.reset()
        await self._send(self.events.input_audio_buffer_cleared())
