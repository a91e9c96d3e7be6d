"""The OpenAI Realtime wire protocol, as chroma-agent speaks it: one definition for the server and the plugin.

What lives here (and nowhere else):

* the audio format (PCM16 little-endian, 24 kHz, mono) and the 80 ms frame it is streamed in;
* event type names, GA (``response.output_audio.delta``) and beta (``response.audio.delta``), and the mapping
  between the two dialects;
* pydantic models that validate the client events we accept (:func:`parse_client_event`), with
  :class:`ProtocolError` carrying the OpenAI error ``type``/``code``/``param`` and the offending ``event_id``;
* builders for the server events we send (:class:`ServerEvents`, one instance per dialect), for the items and
  responses inside them, and for the client events a remote client sends (:class:`ClientEvents`).

Everything here is pure data: no engine, no sockets. Events are plain JSON-ready dicts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "AUDIO_FORMAT",
    "BETA_AUDIO_FORMAT",
    "BETA_HEADER",
    "BETA_HEADER_VALUE",
    "BETA_SUBPROTOCOL",
    "CHANNELS",
    "DEFAULT_TURN_DETECTION",
    "FRAME_BYTES",
    "FRAME_MS",
    "FRAME_SAMPLES",
    "INSECURE_API_KEY_SUBPROTOCOL",
    "OPENAI_VOICES",
    "SAMPLE_RATE",
    "SAMPLE_WIDTH",
    "SUBPROTOCOL",
    "ClientEvent",
    "ClientEventType",
    "ClientEvents",
    "ConversationItemCreate",
    "ConversationItemDelete",
    "ConversationItemRetrieve",
    "ConversationItemTruncate",
    "Dialect",
    "ErrorCode",
    "Modality",
    "InputAudioBufferAppend",
    "InputAudioBufferClear",
    "InputAudioBufferCommit",
    "ProtocolError",
    "ResponseCancel",
    "ResponseCreate",
    "ServerEventType",
    "ServerEvents",
    "SessionConfig",
    "SessionUpdate",
    "audio_ms",
    "b64_to_pcm",
    "beta_name",
    "ga_name",
    "new_id",
    "parse_client_event",
    "pcm_to_b64",
]

# --- audio -------------------------------------------------------------------------------------------------

SAMPLE_RATE = 24_000  # Hz, both directions
CHANNELS = 1
SAMPLE_WIDTH = 2  # bytes: signed 16-bit little-endian
FRAME_MS = 80  # one Mimi frame; every output audio delta carries exactly one
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 1920
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH * CHANNELS  # 3840
AUDIO_FORMAT: dict[str, Any] = {"type": "audio/pcm", "rate": SAMPLE_RATE}  # GA session format object
BETA_AUDIO_FORMAT = "pcm16"  # beta session format string

# --- connection --------------------------------------------------------------------------------------------

SUBPROTOCOL = "realtime"  # browsers offer it; the server echoes it back
INSECURE_API_KEY_SUBPROTOCOL = "openai-insecure-api-key."  # + the key (browsers cannot set headers)
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
BETA_HEADER = "OpenAI-Beta"
BETA_HEADER_VALUE = "realtime=v1"

#: OpenAI's built-in voice names (chat completions' and realtime's, as the `openai` SDK lists them). Clients
#: such as livekit-plugins-openai send one by default; the server maps them to its configured default voice.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin",
     "cedar"}
)

#: Server VAD as OpenAI sessions start with it (OpenAI's documented defaults).
DEFAULT_TURN_DETECTION: Mapping[str, Any] = {
    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
    "create_response": True, "interrupt_response": True,
}

Dialect = Literal["ga", "beta"]
Modality = Literal["audio", "text"]  # what a reply is made of: audio with its transcript, or text only


def audio_ms(n_bytes: int) -> int:
    """Milliseconds of PCM16 24 kHz mono audio in ``n_bytes``."""
    return n_bytes * 1000 // (SAMPLE_RATE * SAMPLE_WIDTH * CHANNELS)


def pcm_to_b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode("ascii")


_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def b64_to_pcm(data: Any, *, param: str = "audio", max_bytes: int | None = None,
               event_id: str | None = None) -> bytes:
    """Strict base64 of PCM16 to bytes; a :class:`ProtocolError` (code ``invalid_audio``) says what is wrong."""
    if not isinstance(data, str):
        raise ProtocolError(ErrorCode.INVALID_TYPE, f"'{param}' must be a base64 string", param=param,
                            event_id=event_id)
    if max_bytes is not None and len(data) * 3 // 4 > max_bytes:
        raise ProtocolError(ErrorCode.AUDIO_TOO_LARGE,
                            f"'{param}' holds more than {max_bytes} bytes of audio", param=param, event_id=event_id)
    if len(data) % 4 or not _B64_RE.match(data):
        raise ProtocolError(ErrorCode.INVALID_AUDIO, f"'{param}' is not valid base64", param=param,
                            event_id=event_id)
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.INVALID_AUDIO, f"'{param}' is not valid base64", param=param,
                            event_id=event_id) from None
    if len(pcm) % (SAMPLE_WIDTH * CHANNELS):
        raise ProtocolError(ErrorCode.INVALID_AUDIO,
                            f"'{param}' must be 16-bit PCM: an even number of bytes, got {len(pcm)}",
                            param=param, event_id=event_id)
    return pcm


def new_id(prefix: str) -> str:
    """An id like OpenAI's: ``item_`` / ``resp_`` / ``event_`` / ``sess_`` + 20 hex digits (<= 32 chars)."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# --- event names -------------------------------------------------------------------------------------------


class ClientEventType:
    """Client event names (the same in GA and beta)."""

    SESSION_UPDATE = "session.update"
    INPUT_AUDIO_BUFFER_APPEND = "input_audio_buffer.append"
    INPUT_AUDIO_BUFFER_COMMIT = "input_audio_buffer.commit"
    INPUT_AUDIO_BUFFER_CLEAR = "input_audio_buffer.clear"
    CONVERSATION_ITEM_CREATE = "conversation.item.create"
    CONVERSATION_ITEM_TRUNCATE = "conversation.item.truncate"
    CONVERSATION_ITEM_DELETE = "conversation.item.delete"
    CONVERSATION_ITEM_RETRIEVE = "conversation.item.retrieve"
    RESPONSE_CREATE = "response.create"
    RESPONSE_CANCEL = "response.cancel"


class ServerEventType:
    """Server event names in the GA dialect; :func:`beta_name` gives the beta spelling."""

    ERROR = "error"
    SESSION_CREATED = "session.created"
    SESSION_UPDATED = "session.updated"
    INPUT_AUDIO_BUFFER_COMMITTED = "input_audio_buffer.committed"
    INPUT_AUDIO_BUFFER_CLEARED = "input_audio_buffer.cleared"
    INPUT_AUDIO_BUFFER_SPEECH_STARTED = "input_audio_buffer.speech_started"
    INPUT_AUDIO_BUFFER_SPEECH_STOPPED = "input_audio_buffer.speech_stopped"
    CONVERSATION_ITEM_ADDED = "conversation.item.added"  # beta: conversation.item.created
    CONVERSATION_ITEM_DONE = "conversation.item.done"  # GA only
    CONVERSATION_ITEM_TRUNCATED = "conversation.item.truncated"
    CONVERSATION_ITEM_DELETED = "conversation.item.deleted"
    CONVERSATION_ITEM_RETRIEVED = "conversation.item.retrieved"
    RESPONSE_CREATED = "response.created"
    RESPONSE_OUTPUT_ITEM_ADDED = "response.output_item.added"
    RESPONSE_CONTENT_PART_ADDED = "response.content_part.added"
    RESPONSE_OUTPUT_AUDIO_DELTA = "response.output_audio.delta"  # beta: response.audio.delta
    RESPONSE_OUTPUT_AUDIO_DONE = "response.output_audio.done"
    RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA = "response.output_audio_transcript.delta"
    RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DONE = "response.output_audio_transcript.done"
    RESPONSE_OUTPUT_TEXT_DELTA = "response.output_text.delta"  # text-only replies; beta: response.text.delta
    RESPONSE_OUTPUT_TEXT_DONE = "response.output_text.done"
    RESPONSE_CONTENT_PART_DONE = "response.content_part.done"
    RESPONSE_OUTPUT_ITEM_DONE = "response.output_item.done"
    RESPONSE_DONE = "response.done"


#: GA name -> beta name, for the server events whose names differ.
BETA_NAMES: Mapping[str, str] = {
    ServerEventType.CONVERSATION_ITEM_ADDED: "conversation.item.created",
    ServerEventType.RESPONSE_OUTPUT_AUDIO_DELTA: "response.audio.delta",
    ServerEventType.RESPONSE_OUTPUT_AUDIO_DONE: "response.audio.done",
    ServerEventType.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA: "response.audio_transcript.delta",
    ServerEventType.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DONE: "response.audio_transcript.done",
    ServerEventType.RESPONSE_OUTPUT_TEXT_DELTA: "response.text.delta",
    ServerEventType.RESPONSE_OUTPUT_TEXT_DONE: "response.text.done",
}
GA_NAMES: Mapping[str, str] = {beta: ga for ga, beta in BETA_NAMES.items()}
#: Server events that exist only in GA (a beta server does not send them).
GA_ONLY = frozenset({ServerEventType.CONVERSATION_ITEM_DONE})


def beta_name(event_type: str) -> str:
    return BETA_NAMES.get(event_type, event_type)


def ga_name(event_type: str) -> str:
    """A server event's GA name, whichever dialect it was sent in (what a client should dispatch on).

    ``conversation.item.created`` (beta) maps to ``conversation.item.added``.
    """
    return GA_NAMES.get(event_type, event_type)


# --- errors ------------------------------------------------------------------------------------------------


class ErrorCode:
    """``error.code`` values the server sends (OpenAI's own codes where one exists)."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"  # not a JSON object, or no string "type"
    UNKNOWN_EVENT = "unknown_event_type"
    MISSING_PARAMETER = "missing_required_parameter"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    UNSUPPORTED = "unsupported_feature"
    UNSUPPORTED_AUDIO_FORMAT = "unsupported_audio_format"
    UNKNOWN_VOICE = "unknown_voice"
    INVALID_AUDIO = "invalid_audio"
    AUDIO_TOO_LARGE = "input_audio_buffer_too_large"
    BINARY_NOT_SUPPORTED = "binary_messages_not_supported"
    MESSAGE_TOO_LARGE = "message_too_large"
    RATE_LIMITED = "rate_limit_exceeded"
    COMMIT_EMPTY = "input_audio_buffer_commit_empty"
    ITEM_NOT_FOUND = "item_not_found"  # an unknown previous_item_id
    ITEM_RETRIEVE_INVALID_ID = "item_retrieve_invalid_item_id"
    ITEM_TRUNCATE_INVALID_ID = "item_truncate_invalid_item_id"
    ITEM_DELETE_INVALID_ID = "item_delete_invalid_item_id"
    VOICE_REQUIRED = "voice_required"  # an audio reply, no voice chosen, and no default voice configured
    DUPLICATE_ITEM_ID = "item_create_duplicate_item_id"
    ACTIVE_RESPONSE = "conversation_already_has_active_response"
    CANCEL_NOT_ACTIVE = "response_cancel_not_active"
    SERVER_BUSY = "server_busy"
    SESSION_EXPIRED = "session_expired"  # OpenAI's, when a session hits its maximum duration (we: or idles)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's: a turn that cannot fit the model's context
    TOO_MANY_ITEMS = "too_many_items"  # the conversation holds the server's max_items
    TEXT_TOO_LONG = "text_too_long"  # a text longer than the server's max_turn_chars
    SERVER_ERROR = "server_error"
    INVALID_API_KEY = "invalid_api_key"


class ProtocolError(Exception):
    """A client event we refuse; becomes one ``error`` server event (the connection stays open)."""

    def __init__(self, code: str, message: str, *, param: str | None = None, event_id: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id, self.type = code, message, param, event_id, type

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, param={self.param!r})"


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
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
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
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
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
    if isinstance(raw, str | bytes):
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(ErrorCode.INVALID_JSON, f"message is not valid JSON: {exc}") from None
    else:
        data = raw
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


# --- server events: builders -------------------------------------------------------------------------------


class ServerEvents:
    """Builds server events in one dialect (``"ga"`` or ``"beta"``); every method returns a JSON-ready dict.

    Methods return ``None`` for events the dialect does not have (``conversation.item.done`` in beta).
    """

    def __init__(self, dialect: Dialect = "ga"):
        if dialect not in ("ga", "beta"):
            raise ValueError(f"dialect must be 'ga' or 'beta', got {dialect!r}")
        self.dialect: Dialect = dialect

    def _event(self, ga_type: str, **fields: Any) -> dict[str, Any] | None:
        if self.dialect == "beta":
            if ga_type in GA_ONLY:
                return None
            ga_type = beta_name(ga_type)
        return {"type": ga_type, "event_id": new_id("event"), **fields}

    # items and responses -------------------------------------------------------------------------------

    def user_audio_content(self, transcript: str | None = None) -> dict[str, Any]:
        return {"type": "input_audio", "transcript": transcript}

    def user_text_content(self, text: str) -> dict[str, Any]:
        return {"type": "input_text", "text": text}

    def system_text_content(self, text: str) -> dict[str, Any]:
        return {"type": "input_text", "text": text}

    def assistant_text_content(self, text: str) -> dict[str, Any]:
        return {"type": "output_text" if self.dialect == "ga" else "text", "text": text}

    def assistant_audio_content(self, transcript: str | None) -> dict[str, Any]:
        """An assistant audio part as items carry it: its transcript (the audio itself is never echoed)."""
        return {"type": "output_audio" if self.dialect == "ga" else "audio", "transcript": transcript}

    def message_item(self, item_id: str, role: str, content: list[dict[str, Any]],
                     status: str = "completed") -> dict[str, Any]:
        return {"id": item_id, "object": "realtime.item", "type": "message", "status": status, "role": role,
                "content": content}

    def usage(self, *, input_text: int, input_audio: int, cached: int, output_text: int,
              output_audio: int) -> dict[str, Any]:
        """Token counts: input = thinker context tokens (cached included); output = text tokens + audio frames."""
        inp = input_text + input_audio
        out = output_text + output_audio
        return {
            "total_tokens": inp + out,
            "input_tokens": inp,
            "output_tokens": out,
            "input_token_details": {"text_tokens": input_text, "audio_tokens": input_audio, "cached_tokens": cached,
                                    "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0}},
            "output_token_details": {"text_tokens": output_text, "audio_tokens": output_audio},
        }

    def modalities(self, modality: Modality) -> list[str]:
        """A reply's modalities as the dialect spells them (GA: one of audio/text; beta: text is always on)."""
        if self.dialect == "ga":
            return [modality]
        return ["text"] if modality == "text" else ["audio", "text"]

    def response(self, response_id: str, *, status: str = "in_progress", output: list[dict[str, Any]] | None = None,
                 metadata: dict[str, str] | None = None, usage: dict[str, Any] | None = None,
                 status_details: dict[str, Any] | None = None, voice: str | None = None,
                 max_output_tokens: int | str = "inf", modality: Modality = "audio") -> dict[str, Any]:
        body: dict[str, Any] = {
            "object": "realtime.response", "id": response_id, "status": status, "status_details": status_details,
            "output": output or [], "conversation_id": "conv_default", "metadata": metadata, "usage": usage,
        }
        if self.dialect == "ga":
            body["output_modalities"] = self.modalities(modality)
            body["max_output_tokens"] = max_output_tokens
            body["audio"] = {"output": {"format": dict(AUDIO_FORMAT), "voice": voice}}
        else:
            body["modalities"] = self.modalities(modality)
            body["max_output_tokens"] = max_output_tokens
            body["output_audio_format"] = BETA_AUDIO_FORMAT
            body["voice"] = voice
        return body

    def session(self, *, session_id: str, model: str, instructions: str, voice: str | None,
                turn_detection: dict[str, Any] | None, max_output_tokens: int | str,
                temperature: float | None, modality: Modality = "audio") -> dict[str, Any]:
        """The effective session, as ``session.created`` / ``session.updated`` report it."""
        if self.dialect == "ga":
            body: dict[str, Any] = {
                "type": "realtime", "object": "realtime.session", "id": session_id, "model": model,
                "output_modalities": self.modalities(modality), "instructions": instructions,
                "audio": {
                    "input": {"format": dict(AUDIO_FORMAT), "transcription": None, "noise_reduction": None,
                              "turn_detection": turn_detection},
                    "output": {"format": dict(AUDIO_FORMAT), "voice": voice, "speed": 1.0},
                },
                "tools": [], "tool_choice": "auto", "max_output_tokens": max_output_tokens,
            }
        else:
            body = {
                "object": "realtime.session", "id": session_id, "model": model,
                "modalities": self.modalities(modality),
                "instructions": instructions, "voice": voice, "input_audio_format": BETA_AUDIO_FORMAT,
                "output_audio_format": BETA_AUDIO_FORMAT, "input_audio_transcription": None,
                "turn_detection": turn_detection, "tools": [], "tool_choice": "auto",
                "max_response_output_tokens": max_output_tokens,
            }
        if temperature is not None:
            body["temperature"] = temperature
        return body

    # events ------------------------------------------------------------------------------------------------

    def error(self, message: str, *, code: str | None, type: str = "invalid_request_error",
              param: str | None = None, event_id: str | None = None) -> dict[str, Any]:
        return self._event(ServerEventType.ERROR, error={"type": type, "code": code, "message": message,
                                                         "param": param, "event_id": event_id})

    def from_protocol_error(self, exc: ProtocolError) -> dict[str, Any]:
        return self.error(exc.message, code=exc.code, type=exc.type, param=exc.param, event_id=exc.event_id)

    def session_created(self, session: dict[str, Any]) -> dict[str, Any]:
        return self._event(ServerEventType.SESSION_CREATED, session=session)

    def session_updated(self, session: dict[str, Any]) -> dict[str, Any]:
        return self._event(ServerEventType.SESSION_UPDATED, session=session)

    def input_audio_buffer_committed(self, item_id: str, previous_item_id: str | None) -> dict[str, Any]:
        return self._event(ServerEventType.INPUT_AUDIO_BUFFER_COMMITTED, item_id=item_id,
                           previous_item_id=previous_item_id)

    def input_audio_buffer_cleared(self) -> dict[str, Any]:
        return self._event(ServerEventType.INPUT_AUDIO_BUFFER_CLEARED)

    def speech_started(self, item_id: str, audio_start_ms: int) -> dict[str, Any]:
        return self._event(ServerEventType.INPUT_AUDIO_BUFFER_SPEECH_STARTED, item_id=item_id,
                           audio_start_ms=audio_start_ms)

    def speech_stopped(self, item_id: str, audio_end_ms: int) -> dict[str, Any]:
        return self._event(ServerEventType.INPUT_AUDIO_BUFFER_SPEECH_STOPPED, item_id=item_id,
                           audio_end_ms=audio_end_ms)

    def item_added(self, item: dict[str, Any], previous_item_id: str | None) -> dict[str, Any]:
        """GA ``conversation.item.added`` / beta ``conversation.item.created``."""
        return self._event(ServerEventType.CONVERSATION_ITEM_ADDED, previous_item_id=previous_item_id, item=item)

    def item_done(self, item: dict[str, Any], previous_item_id: str | None) -> dict[str, Any] | None:
        return self._event(ServerEventType.CONVERSATION_ITEM_DONE, previous_item_id=previous_item_id, item=item)

    def item_truncated(self, item_id: str, content_index: int, audio_end_ms: int) -> dict[str, Any]:
        return self._event(ServerEventType.CONVERSATION_ITEM_TRUNCATED, item_id=item_id,
                           content_index=content_index, audio_end_ms=audio_end_ms)

    def item_deleted(self, item_id: str) -> dict[str, Any]:
        return self._event(ServerEventType.CONVERSATION_ITEM_DELETED, item_id=item_id)

    def item_retrieved(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._event(ServerEventType.CONVERSATION_ITEM_RETRIEVED, item=item)

    def response_created(self, response: dict[str, Any]) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_CREATED, response=response)

    def output_item_added(self, response_id: str, item: dict[str, Any], output_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_ITEM_ADDED, response_id=response_id,
                           output_index=output_index, item=item)

    @staticmethod
    def _part(modality: Modality, text: str) -> dict[str, Any]:
        # ``part.type`` is "audio" or "text" in both dialects (unlike item content types)
        return {"type": "audio", "transcript": text} if modality == "audio" else {"type": "text", "text": text}

    def content_part_added(self, response_id: str, item_id: str, transcript: str = "", output_index: int = 0,
                           content_index: int = 0, modality: Modality = "audio") -> dict[str, Any]:
        """The reply's audio (or, for a text-only reply, text) part opens."""
        return self._event(ServerEventType.RESPONSE_CONTENT_PART_ADDED, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index,
                           part=self._part(modality, transcript))

    def audio_delta(self, response_id: str, item_id: str, pcm: bytes, output_index: int = 0,
                    content_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_AUDIO_DELTA, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index, delta=pcm_to_b64(pcm))

    def transcript_delta(self, response_id: str, item_id: str, text: str, output_index: int = 0,
                         content_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA, response_id=response_id,
                           item_id=item_id, output_index=output_index, content_index=content_index, delta=text)

    def audio_done(self, response_id: str, item_id: str, output_index: int = 0,
                   content_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_AUDIO_DONE, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index)

    def transcript_done(self, response_id: str, item_id: str, transcript: str, output_index: int = 0,
                        content_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DONE, response_id=response_id,
                           item_id=item_id, output_index=output_index, content_index=content_index,
                           transcript=transcript)

    def text_delta(self, response_id: str, item_id: str, text: str, output_index: int = 0,
                   content_index: int = 0) -> dict[str, Any]:
        """Text of a text-only reply (GA ``response.output_text.delta``, beta ``response.text.delta``)."""
        return self._event(ServerEventType.RESPONSE_OUTPUT_TEXT_DELTA, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index, delta=text)

    def text_done(self, response_id: str, item_id: str, text: str, output_index: int = 0,
                  content_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_TEXT_DONE, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index, text=text)

    def content_part_done(self, response_id: str, item_id: str, transcript: str, output_index: int = 0,
                          content_index: int = 0, modality: Modality = "audio") -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_CONTENT_PART_DONE, response_id=response_id, item_id=item_id,
                           output_index=output_index, content_index=content_index,
                           part=self._part(modality, transcript))

    def output_item_done(self, response_id: str, item: dict[str, Any], output_index: int = 0) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_OUTPUT_ITEM_DONE, response_id=response_id,
                           output_index=output_index, item=item)

    def response_done(self, response: dict[str, Any]) -> dict[str, Any]:
        return self._event(ServerEventType.RESPONSE_DONE, response=response)


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
        if instructions is not None:
            session["instructions"] = instructions
        if max_output_tokens is not None:
            session["max_output_tokens"] = max_output_tokens
        if temperature is not None:
            session["temperature"] = temperature
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
        response: dict[str, Any] = {}
        if output_modalities is not None:
            response["output_modalities"] = list(output_modalities)
        if instructions is not None:
            response["instructions"] = instructions
        if metadata is not None:
            response["metadata"] = metadata
        if max_output_tokens is not None:
            response["max_output_tokens"] = max_output_tokens
        return cls._event(ClientEventType.RESPONSE_CREATE, event_id, response=response)

    @classmethod
    def response_cancel(cls, response_id: str | None = None, event_id: str | None = None) -> dict[str, Any]:
        fields = {"response_id": response_id} if response_id else {}
        return cls._event(ClientEventType.RESPONSE_CANCEL, event_id, **fields)
