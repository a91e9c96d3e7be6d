"""From a chat request to a conversation: everything about a request that can be refused is checked here,
before a slot is taken, so a bad request gets a 4xx and never a half-sent stream.

`plan_request` (run in a worker thread) turns the messages into turns within the request budget, picks or
clones the voice and sets the sampling; `open_planned` takes a slot and adds the turns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from chroma_agent.audio_encode import supported_formats
from chroma_agent.engine.context import ContextError
from chroma_agent.engine.conversation import Conversation
from chroma_agent.engine.engine import Engine, EngineBusyError
from chroma_agent.engine.sampling import SamplingParams
from chroma_agent.server.audio_replies import AudioReplyStore
from chroma_agent.server.errors import APIError
from chroma_agent.server.request_audio import load_request_audio
from chroma_agent.server.schemas import (
    AudioPart,
    ChatCompletionRequest,
    TextPart,
    VoiceRef,
)
from chroma_agent.server.settings import ServerSettings
from chroma_agent.server.voice_choice import (
    DEFAULT_VOICE_SETTING,
    VoiceNotFound,
    resolve_voice,
)
from chroma_agent.voices import MAX_CLIP_SECONDS, VoiceError, VoiceProfile

#: OpenAI's code for a conversation that does not fit the model's context.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass
class PlannedTurn:
    role: str  # system, user or assistant
    where: str  # the request field it came from, for error messages
    text: str | None = None
    parts: list[str | np.ndarray] | None = None  # a user message: text and audio (at the processor's rate)


@dataclass
class ChatPlan:
    voice: VoiceProfile | None  # None for a text reply that names no voice
    instructions: str | None
    turns: list[PlannedTurn]
    sampling: SamplingParams
    max_frames: int
    return_audio: bool
    audio_format: str  # one of audio_encode.OUTPUT_FORMATS
    flashlabs: bool  # FlashLabs' reply style: transcript in message.content, audio also at the top level


#: FlashLabs' request fields; a request with any of them gets FlashLabs' reply style.
_FLASHLABS_FIELDS = ("return_audio", "prompt_audio", "prompt_text", "voice", "audio_format")


def _given(body: ChatCompletionRequest, name: str) -> bool:
    return name in body.model_fields_set and getattr(body, name) is not None


def _wants_audio(body: ChatCompletionRequest) -> bool:
    """Audio only when asked for: `return_audio` decides, else `modalities`, else FlashLabs' audio fields."""
    if _given(body, "return_audio"):
        return bool(body.return_audio)
    if body.modalities is not None:
        return "audio" in body.modalities
    return any(_given(body, name) for name in ("prompt_audio", "prompt_text", "voice", "audio_format"))


def _audio_format(body: ChatCompletionRequest) -> tuple[str, str]:
    """(format, the field that named it); FlashLabs' audio_format wins over OpenAI's audio.format."""
    if body.audio_format is not None:
        fmt, param = body.audio_format, "audio_format"
    elif body.audio is not None and body.audio.format is not None:
        fmt, param = body.audio.format, "audio.format"
    else:
        fmt, param = "wav", "audio_format"
    return ("pcm16" if fmt == "pcm" else fmt), param


def _voice_name(body: ChatCompletionRequest) -> tuple[str | None, str]:
    """The voice the request names and the field it came from (`voice` or `audio.voice`)."""
    name, param = body.voice, "voice"
    if body.audio is not None and body.audio.voice is not None:
        given = body.audio.voice.id if isinstance(body.audio.voice, VoiceRef) else body.audio.voice
        if name is not None and name != given:
            raise APIError(400, "voice and audio.voice name different voices", param="voice")
        name, param = given, "audio.voice"
    elif name is None and body.audio is not None:
        param = "audio.voice"
    return name, param


def _voice(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
           speaks: bool) -> VoiceProfile | None:
    """The request's voice: cloned from prompt_text + prompt_audio, a stored one, or the configured default.

    A reply that does not speak needs no voice (None).
    """
    name, param = _voice_name(body)
    if (body.prompt_text is None) != (body.prompt_audio is None):
        missing = "prompt_audio" if body.prompt_audio is None else "prompt_text"
        raise APIError(400, f"{missing} is missing: prompt_text and prompt_audio go together (give both or "
                       "neither)", param=missing)
    if body.prompt_audio is not None:
        if name is not None:
            raise APIError(400, "give either a stored voice or prompt_text + prompt_audio, not both", param="voice")
        if not speaks:  # cloning is the expensive part, and a text-only reply does not use the voice
            return None
        rate = engine.processor.voice_sample_rate
        clip = load_request_audio(body.prompt_audio, rate, "prompt_audio", settings, max_seconds=MAX_CLIP_SECONDS)
        try:
            # Not stored: a per-request clone. Its backbone prefix is still cached by content in the engine.
            profile = engine.create_voice(clip, body.prompt_text, sample_rate=rate, allow_paths=False).result()
        except VoiceError as exc:
            param = "prompt_audio" if str(exc).startswith("voice clip") else "prompt_text"
            raise APIError(400, f"{param}: {exc}", param=param) from None
    else:
        try:
            found = resolve_voice(engine, name)
        except VoiceNotFound:
            raise APIError(400, f"{param}: voice {name!r} not found (GET /v1/voices lists the stored voices; "
                           "OpenAI's voice names speak with the server's default voice)", param=param,
                           code="voice_not_found") from None
        except VoiceError as exc:
            raise APIError(400, f"{param}: {exc}", param=param) from None
        if found is None:
            if not speaks:
                return None
            named = f"{name!r} stands for the server's default voice, but " if name is not None else ""
            raise APIError(400, f"{param}: {named}this server has no default voice ({DEFAULT_VOICE_SETTING} is not "
                           "set): name a stored voice, or clone one with prompt_text + prompt_audio", param=param,
                           code="voice_required")
        profile = found
    try:
        profile.require_compatible(engine.model.config)
    except VoiceError as exc:
        raise APIError(400, f"{param}: {exc}", param=param) from None
    return profile


class _Budget:
    """What the rest of a request may still bring: messages, text and audio, per turn and in all (the settings
    `max_messages`, `max_turn_chars`, `max_request_chars`, `max_audio_seconds`, `max_request_audio_seconds`).

    Text is counted before anything is tokenized; audio as each part is decoded (a part is decoded up to the
    per-part limit), so a refused request costs at most one part beyond the limits.
    """

    def __init__(self, settings: ServerSettings, rate: int):
        self.settings, self.rate = settings, rate
        self.chars = 0
        self.audio = 0  # samples at `rate`
        self.turn_chars = 0
        self.turn_audio = 0

    def next_turn(self) -> None:
        self.turn_chars = self.turn_audio = 0

    def text(self, where: str, text: str) -> None:
        s = self.settings
        self.turn_chars += len(text)
        self.chars += len(text)
        if self.turn_chars > s.max_turn_chars:
            raise APIError(400, f"{where}: the message holds more than {s.max_turn_chars} characters of text "
                           "(max_turn_chars)", param=where, code="text_too_long")
        if self.chars > s.max_request_chars:
            raise APIError(400, f"{where}: the request holds more than {s.max_request_chars} characters of text "
                           "(max_request_chars)", param=where, code="text_too_long")

    def audio_part(self, where: str, samples: int) -> None:
        s = self.settings
        self.turn_audio += samples
        self.audio += samples
        if self.turn_audio > s.max_audio_seconds * self.rate:
            raise APIError(400, f"{where}: the message's audio is {self.turn_audio / self.rate:.1f} s long in all; "
                           f"at most {s.max_audio_seconds:g} s per message (max_audio_seconds)", param=where,
                           code="invalid_audio")
        if self.audio > s.max_request_audio_seconds * self.rate:
            raise APIError(400, f"{where}: the request's audio is {self.audio / self.rate:.1f} s long in all; at most "
                           f"{s.max_request_audio_seconds:g} s per request (max_request_audio_seconds)", param=where,
                           code="invalid_audio")


def _turns(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
           store: AudioReplyStore) -> tuple[str | None, list[PlannedTurn]]:
    """The instructions (a leading system message) and the other messages as conversation turns.

    A user message is one turn holding its text and audio parts in order (the chat template renders them in
    one user block, as the reference does); consecutive text parts are joined, as the template joins them.
    An assistant message that refers to an earlier reply by its audio id is that reply's transcript. One pass
    over the messages and their parts: the work is linear in the request, and bounded by the limits.
    """
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"messages: {len(body.messages)} messages; at most {settings.max_messages} per request "
                       "(max_messages)", param="messages", code="too_many_messages")
    rate = engine.processor.audio_sample_rate
    audio_token = engine.processor.audio_token
    budget = _Budget(settings, rate)
    instructions: str | None = None
    turns: list[PlannedTurn] = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        budget.next_turn()
        role = "system" if message.role == "developer" else message.role
        content = "" if message.content is None else message.content
        ref = getattr(message, "audio", None)
        if ref is not None:
            transcript = store.get(ref.id)
            if transcript is None:
                raise APIError(400, f"{where}.audio.id: no reply with audio id {ref.id!r} can be referred to (unknown "
                               "to this server, or its expires_at has passed); send its transcript as content "
                               "instead", param=f"{where}.audio.id", code="audio_expired")
            budget.text(f"{where}.audio", transcript)
            turns.append(PlannedTurn(role, f"{where}.audio", text=transcript))
            continue
        parts = [(f"{where}.content", TextPart(type="text", text=content))] if isinstance(content, str) else [
            (f"{where}.content[{j}]", part) for j, part in enumerate(content)
        ]
        pieces: list[list[str] | np.ndarray] = []  # runs of text parts (joined at the end) and audio clips
        for part_where, part in parts:
            if isinstance(part, TextPart):
                budget.text(part_where, part.text)
                if audio_token in part.text:
                    raise APIError(400, f"{part_where}: text must not contain {audio_token}", param=part_where)
                if pieces and isinstance(pieces[-1], list):
                    pieces[-1].append(part.text)
                else:
                    pieces.append([part.text])
            else:
                if isinstance(part, AudioPart):
                    clip = load_request_audio(part.audio, rate, part_where, settings)
                else:  # OpenAI's input_audio is base64 by definition: never a path
                    clip = load_request_audio(part.input_audio.data, rate, part_where, settings, allow_paths=False)
                if len(clip) < engine.processor.min_audio_samples:
                    raise APIError(400, f"{part_where}: audio is too short ({len(clip)} samples at {rate} Hz; at "
                                   f"least {engine.processor.min_audio_samples})", param=part_where)
                budget.audio_part(part_where, len(clip))
                pieces.append(clip)
        joined: list[str | np.ndarray] = ["".join(p) if isinstance(p, list) else p for p in pieces]
        text = "".join(p for p in joined if isinstance(p, str))
        has_audio = any(not isinstance(p, str) for p in joined)
        if not has_audio and not text.strip() and role != "assistant":
            raise APIError(400, f"{where}.content is empty", param=f"{where}.content")
        if i == 0 and role == "system":
            instructions = text
        elif role == "user":
            turns.append(PlannedTurn(role, f"{where}.content", parts=[p for p in joined if not isinstance(p, str) or p]))
        else:
            turns.append(PlannedTurn(role, f"{where}.content", text=text))
    return instructions, turns


def plan_request(engine: Engine, settings: ServerSettings, body: ChatCompletionRequest,
             store: AudioReplyStore) -> ChatPlan:
    """Everything about a request that can be refused, checked before a slot is taken (runs in a thread)."""
    speaks = _wants_audio(body)
    audio_format, format_param = _audio_format(body)
    if speaks and audio_format not in supported_formats():
        raise APIError(400, f"{format_param}: {audio_format!r} cannot be encoded on this server (its FFmpeg has "
                       f"no encoder for it); use one of {', '.join(supported_formats())}", param=format_param)
    instructions, turns = _turns(engine, settings, body, store)
    voice = _voice(engine, settings, body, speaks)  # after the messages: cloning is the expensive part
    overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p),
                                   ("top_k", body.top_k), ("seed", body.seed)) if v is not None}
    try:
        sampling = replace(engine.sampling, **overrides)
        limit = body.max_tokens or body.max_completion_tokens or settings.default_max_frames
        # speech: frames the voice's backbone row can hold; text: tokens (the engine caps them)
        max_frames = engine.clamp_frames(voice, limit) if voice is not None else int(limit)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return ChatPlan(
        voice=voice, instructions=instructions, turns=turns, sampling=sampling, max_frames=max_frames,
        return_audio=speaks, audio_format=audio_format,
        flashlabs=any(_given(body, name) for name in _FLASHLABS_FIELDS),
    )


async def open_planned(engine: Engine, plan: ChatPlan, wait_s: float) -> Conversation:
    """A conversation holding the request's turns (waiting for a slot holds no thread)."""
    try:
        conv = await engine.open_conversation(plan.voice, plan.instructions, sampling=plan.sampling, wait_s=wait_s)
    except EngineBusyError as exc:
        raise APIError(503, f"{exc}; try again shortly", type="server_error", code="engine_busy",
                       headers={"Retry-After": "1"}) from None
    added: list[tuple[PlannedTurn, Any]] = []
    try:
        rate = engine.processor.audio_sample_rate
        # Queued all at once: the engine's pool renders them in parallel, the engine applies them in order.
        for turn in plan.turns:
            if turn.role == "user":
                added.append((turn, conv.add_user_message([p if isinstance(p, str) else (p, rate)
                                                           for p in turn.parts])))
            elif turn.role == "system":
                added.append((turn, conv.add_system_text(turn.text)))
            else:
                added.append((turn, conv.add_assistant_text(turn.text)))
        for turn, pending in added:
            try:
                await pending
            except ContextError as exc:  # this turn alone cannot fit the thinker context
                raise APIError(400, f"{turn.where}: {exc}", param=turn.where, code=CONTEXT_LENGTH_EXCEEDED) from None
            except ValueError as exc:  # AudioError and VoiceError included
                raise APIError(400, f"{turn.where}: {exc}", param=turn.where) from None
    except BaseException:
        conv.close()
        raise
    return conv
