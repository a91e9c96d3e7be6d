"""Client events: the pydantic models that validate what a client sends (:func:`parse_client_event`), and
builders for the client events a remote client sends (:class:`ClientEvents`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from chroma_agent.engine.params import check_temperature
from chroma_agent.realtime_protocol.wire import (
    AUDIO_FORMAT,
    ClientEventType,
    ErrorCode,
    ProtocolError,
    decode_json,
    given,
    new_id,
    pcm_to_b64,
)

# --- client events: validation -----------------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown fields are ignored: clients send many options we do not model (tracing, include, prompt, ...).
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Model):
    type: str | None = None
    rate: int | None = None


class TurnDetection(_Model):
    type: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=10_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None
    eagerness: str | None = None


class VoiceRef(_Model):
    id: str


class AudioInputConfig(_Model):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None


class AudioOutputConfig(_Model):
    format: AudioFormat | None = None
    voice: str | VoiceRef | None = None
    speed: float | None = None


class AudioConfig(_Model):
    input: AudioInputConfig | None = None
    output: AudioOutputConfig | None = None


#: The engine's own temperature rule (SamplingParams), not a copy of its limits.
Temperature = Annotated[float, AfterValidator(check_temperature)]

MaxTokens = Union[int, Literal["inf"]]  # noqa: UP007 - pydantic needs a runtime union on 3.10


def _positive_tokens(cls, v):
    if isinstance(v, int) and v < 1:
        raise ValueError("must be >= 1 or 'inf'")
    return v


class SessionConfig(_Model):
    """``session`` of ``session.update``: GA fields (nested ``audio``) and beta fields (flat), both accepted."""

    type: str | None = None
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[str] | None = None  # GA
    modalities: list[str] | None = None  # beta
    audio: AudioConfig | None = None  # GA
    voice: str | VoiceRef | None = None  # beta
    input_audio_format: str | None = None  # beta
    output_audio_format: str | None = None  # beta
    turn_detection: TurnDetection | None = None  # beta
    input_audio_transcription: dict[str, Any] | None = None  # beta
    temperature: Temperature | None = None
    max_output_tokens: MaxTokens | None = None  # GA
    max_response_output_tokens: MaxTokens | None = None  # beta
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    _positive = field_validator("max_output_tokens", "max_response_output_tokens")(_positive_tokens)


class ContentPart(_Model):
    type: str
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class Item(_Model):
    id: str | None = Field(default=None, min_length=1, max_length=64)
    type: str = "message"
    role: str | None = None
    content: list[ContentPart] | None = None
    status: str | None = None


class ResponseAudioOutput(_Model):
    format: AudioFormat | None = None
    voice: str | VoiceRef | None = None


class ResponseAudio(_Model):
    output: ResponseAudioOutput | None = None


class ResponseParams(_Model):
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    output_modalities: list[str] | None = None  # GA
    modalities: list[str] | None = None  # beta
    max_output_tokens: MaxTokens | None = None  # GA (beta: max_response_output_tokens)
    max_response_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    conversation: str | None = None
    input: list[dict[str, Any]] | None = None
    voice: str | VoiceRef | None = None  # beta
    audio: ResponseAudio | None = None  # GA
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 keys")
            if any(len(k) > 64 or len(val) > 512 for k, val in v.items()):
                raise ValueError("keys are at most 64 characters and values at most 512")
        return v

    _positive = field_validator("max_output_tokens", "max_response_output_tokens")(_positive_tokens)


class _Event(_Model):
    type: str
    event_id: str | None = Field(default=None, max_length=512)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionConfig


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64 PCM16; decoded by the receiver (it knows the size limit)


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: Item
    previous_item_id: str | None = None


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ConversationItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class ConversationItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = Union[  # noqa: UP007 - a runtime union for pydantic on 3.10
    SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear, ConversationItemCreate,
    ConversationItemTruncate, ConversationItemDelete, ConversationItemRetrieve, ResponseCreate, ResponseCancel,
]

CLIENT_EVENT_MODELS: Mapping[str, type[_Event]] = {
    m.model_fields["type"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear,
              ConversationItemCreate, ConversationItemTruncate, ConversationItemDelete, ConversationItemRetrieve,
              ResponseCreate, ResponseCancel)
}

#: Client events of the OpenAI protocol that this server knows but does not implement.
UNSUPPORTED_CLIENT_EVENTS = frozenset({
    "output_audio_buffer.clear", "transcription_session.update", "session.close",
})


def _validation_error(exc: ValidationError, event_id: str | None) -> ProtocolError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "missing":
        return ProtocolError(ErrorCode.MISSING_PARAMETER, f"missing required parameter '{param}'", param=param,
                             event_id=event_id)
    code = ErrorCode.INVALID_TYPE if kind.endswith("_type") or kind in ("model_type", "dict_type", "list_type") \
        else ErrorCode.INVALID_VALUE
    return ProtocolError(code, f"invalid '{param}': {err.get('msg', 'invalid value')}", param=param,
                         event_id=event_id)


def parse_client_event(raw: str | bytes | Mapping[str, Any]) -> ClientEvent:
    """One client message (JSON text or an already-decoded object) to its validated event model.

    Raises :class:`ProtocolError` with ``invalid_json``, ``invalid_event``, ``unknown_event_type``,
    ``unsupported_feature``, ``missing_required_parameter``, ``invalid_type`` or ``invalid_value``; the error
    carries the message's ``event_id`` when it had a readable one.
    """
    data = decode_json(raw, "message")
    if not isinstance(data, Mapping):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "a client event must be a JSON object")
    event_id = data.get("event_id")
    if not isinstance(event_id, str):
        event_id = None
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        code = ErrorCode.MISSING_PARAMETER if kind is None else ErrorCode.INVALID_TYPE
        raise ProtocolError(code, "a client event needs a string 'type'", param="type", event_id=event_id)
    model = CLIENT_EVENT_MODELS.get(kind)
    if model is None:
        if kind in UNSUPPORTED_CLIENT_EVENTS:
            raise ProtocolError(ErrorCode.UNSUPPORTED, f"event type '{kind}' is not supported by this server",
                                param="type", event_id=event_id)
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event type '{kind[:100]}'", param="type",
                            event_id=event_id)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, event_id) from None


# --- client events: builders (for a remote client, e.g. the LiveKit plugin's remote mode) -----------------


class ClientEvents:
    """Builds the client events this server accepts, GA shapes; every method returns a JSON-ready dict."""

    @staticmethod
    def _event(kind: str, event_id: str | None, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": event_id or new_id("event"), **fields}

    @classmethod
    def session_update(cls, *, instructions: str | None = None, voice: str | None = None,
                       turn_detection: dict[str, Any] | None | Literal["unset"] = "unset",
                       max_output_tokens: int | str | None = None, temperature: float | None = None,
                       output_modalities: list[str] | None = None, event_id: str | None = None) -> dict[str, Any]:
        session: dict[str, Any] = {"type": "realtime", "output_modalities": list(output_modalities or ["audio"])}
        audio_in: dict[str, Any] = {"format": dict(AUDIO_FORMAT)}
        audio_out: dict[str, Any] = {"format": dict(AUDIO_FORMAT)}
        if turn_detection != "unset":
            audio_in["turn_detection"] = turn_detection
        if voice is not None:
            audio_out["voice"] = voice
        session["audio"] = {"input": audio_in, "output": audio_out}
        session |= given(instructions=instructions, max_output_tokens=max_output_tokens, temperature=temperature)
        return cls._event(ClientEventType.SESSION_UPDATE, event_id, session=session)

    @classmethod
    def input_audio_buffer_append(cls, pcm: bytes, event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.INPUT_AUDIO_BUFFER_APPEND, event_id, audio=pcm_to_b64(pcm))

    @classmethod
    def input_audio_buffer_commit(cls, event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.INPUT_AUDIO_BUFFER_COMMIT, event_id)

    @classmethod
    def input_audio_buffer_clear(cls, event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.INPUT_AUDIO_BUFFER_CLEAR, event_id)

    @classmethod
    def conversation_item_create(cls, role: str, *, text: str | None = None, pcm: bytes | None = None,
                                 item_id: str | None = None, previous_item_id: str | None = None,
                                 event_id: str | None = None) -> dict[str, Any]:
        """A message item: user text/audio, system text or assistant text."""
        if (text is None) == (pcm is None):
            raise ValueError("give exactly one of text and pcm")
        if pcm is not None:
            if role != "user":
                raise ValueError("only user items can carry audio")
            content = [{"type": "input_audio", "audio": pcm_to_b64(pcm)}]
        elif role == "assistant":
            content = [{"type": "output_text", "text": text}]
        else:
            content = [{"type": "input_text", "text": text}]
        item: dict[str, Any] = {"type": "message", "role": role, "content": content}
        if item_id is not None:
            item["id"] = item_id
        fields: dict[str, Any] = {"item": item}
        if previous_item_id is not None:
            fields["previous_item_id"] = previous_item_id
        return cls._event(ClientEventType.CONVERSATION_ITEM_CREATE, event_id, **fields)

    @classmethod
    def conversation_item_truncate(cls, item_id: str, audio_end_ms: int, content_index: int = 0,
                                   event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.CONVERSATION_ITEM_TRUNCATE, event_id, item_id=item_id,
                          content_index=content_index, audio_end_ms=int(audio_end_ms))

    @classmethod
    def conversation_item_delete(cls, item_id: str, event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.CONVERSATION_ITEM_DELETE, event_id, item_id=item_id)

    @classmethod
    def conversation_item_retrieve(cls, item_id: str, event_id: str | None = None) -> dict[str, Any]:
        return cls._event(ClientEventType.CONVERSATION_ITEM_RETRIEVE, event_id, item_id=item_id)

    @classmethod
    def response_create(cls, *, instructions: str | None = None, metadata: dict[str, str] | None = None,
                        max_output_tokens: int | str | None = None, output_modalities: list[str] | None = None,
                        event_id: str | None = None) -> dict[str, Any]:
        response = given(output_modalities=None if output_modalities is None else list(output_modalities),
                         instructions=instructions, metadata=metadata, max_output_tokens=max_output_tokens)
        return cls._event(ClientEventType.RESPONSE_CREATE, event_id, response=response)

    @classmethod
    def response_cancel(cls, response_id: str | None = None, event_id: str | None = None) -> dict[str, Any]:
        fields = {"response_id": response_id} if response_id else {}
        return cls._event(ClientEventType.RESPONSE_CANCEL, event_id, **fields)
