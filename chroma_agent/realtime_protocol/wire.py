"""The wire basics of the OpenAI Realtime protocol as chroma-agent speaks it: audio format, ids, event names in
both dialects, error codes.

Pure data and plain functions: no pydantic models here (see :mod:`.client_events` and :mod:`.server_events`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from chroma_agent import frames

# --- audio -------------------------------------------------------------------------------------------------

SAMPLE_RATE = 24_000  # Hz, both directions
CHANNELS = 1
SAMPLE_WIDTH = 2  # bytes: signed 16-bit little-endian
# Every output audio delta carries exactly one Mimi frame: 80 ms, 1920 samples (the wire's rate is Mimi's).
FRAME_MS = frames.FRAME_MS
FRAME_SAMPLES = frames.FRAME_SAMPLES
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


def decode_json(raw: str | bytes | Mapping[str, Any], what: str) -> Any:
    """A message as JSON text or an already-decoded object -> the object (`what` names it in the error)."""
    if not isinstance(raw, str | bytes):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"{what} is not valid JSON: {exc}") from None


def given(**fields: Any) -> dict[str, Any]:
    """The fields that are not None (an event body leaves out what the caller did not set)."""
    return {k: v for k, v in fields.items() if v is not None}


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
