"""Server events: builders for what the server sends, in either dialect (:class:`ServerEvents`), and the typed
models a client parses them into (:func:`parse_server_event`). The tests hold every builder's output to its
model, in both dialects, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chroma_agent.realtime_protocol.wire import (
    AUDIO_FORMAT,
    BETA_AUDIO_FORMAT,
    GA_ONLY,
    Dialect,
    ErrorCode,
    Modality,
    ProtocolError,
    ServerEventType,
    beta_name,
    decode_json,
    ga_name,
    new_id,
    pcm_to_b64,
)

# --- server events: builders -------------------------------------------------------------------------------


def response_status(*, reason: str | None, failure: str | None = None, cancelled: bool = False,
                    cancel_reason: str = "client_cancelled") -> tuple[str, dict[str, Any] | None]:
    """How a reply ended (the engine's `ResponseDone.reason`, None when there was none) as a response's
    ``status`` and ``status_details``; :meth:`ResponseBody.engine_reason` is the inverse."""
    if failure is not None:
        return "failed", {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                      "message": failure}}
    if reason is None or reason == "cancelled" or cancelled:
        return "cancelled", {"type": "cancelled", "reason": cancel_reason}
    if reason == "completed":
        return "completed", None
    return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}  # max_frames / max_tokens


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

    def usage_of(self, usage: Any, *, output_audio: int | None = None) -> dict[str, Any]:
        """A reply's usage (the engine's `Usage`) as the protocol reports it (``output_audio``: the frames the
        client was sent, when fewer than were made); :meth:`UsageBody.counts` is the inverse."""
        return self.usage(input_text=max(usage.input_tokens - usage.audio_prompt_tokens, 0),
                          input_audio=usage.audio_prompt_tokens, cached=usage.cached_tokens,
                          output_text=usage.text_tokens,
                          output_audio=usage.audio_frames if output_audio is None else output_audio)

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


# --- server events: typed models (what a client parses) ------------------------------------------------------


class _Body(BaseModel):
    # A server may send fields we do not model (OpenAI adds some now and then): kept, never an error.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Body):
    type: str = "server_error"
    code: str | None = None
    message: str = "unknown error"
    param: str | None = None
    event_id: str | None = None

    def to_protocol_error(self) -> ProtocolError:
        return ProtocolError(self.code or ErrorCode.SERVER_ERROR, self.message, param=self.param,
                             event_id=self.event_id, type=self.type)


class ContentBody(_Body):
    type: str
    text: str | None = None
    transcript: str | None = None


class ItemBody(_Body):
    id: str | None = None
    type: str = "message"
    role: str | None = None
    status: str | None = None
    content: list[ContentBody] = Field(default_factory=list)

    def transcript(self) -> str | None:
        """The words of the item's first part that has any (an audio part's transcript, or a text part)."""
        for part in self.content:
            for text in (part.transcript, part.text):
                if isinstance(text, str):
                    return text
        return None


class InputTokenDetails(_Body):
    text_tokens: int = 0
    audio_tokens: int = 0
    cached_tokens: int = 0


class OutputTokenDetails(_Body):
    text_tokens: int = 0
    audio_tokens: int = 0


class UsageBody(_Body):
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: InputTokenDetails = Field(default_factory=InputTokenDetails)
    output_token_details: OutputTokenDetails = Field(default_factory=OutputTokenDetails)

    def counts(self) -> dict[str, int]:
        """The engine's `Usage` fields (the inverse of :meth:`ServerEvents.usage_of`)."""
        cached = self.input_token_details.cached_tokens
        return {"prompt_tokens": max(self.input_tokens - cached, 0), "cached_tokens": cached,
                "text_tokens": self.output_token_details.text_tokens,
                "audio_frames": self.output_token_details.audio_tokens,
                "audio_prompt_tokens": self.input_token_details.audio_tokens}


class StatusDetails(_Body):
    type: str | None = None
    reason: str | None = None
    error: ErrorDetail | None = None


class ResponseBody(_Body):
    id: str
    status: str = "in_progress"
    status_details: StatusDetails | None = None
    output: list[ItemBody] = Field(default_factory=list)
    usage: UsageBody | None = None
    metadata: dict[str, str] | None = None

    def engine_reason(self) -> str:
        """The engine's `ResponseDone.reason` for a response that did not fail (the inverse of
        :func:`response_status`)."""
        return {"incomplete": "max_frames", "cancelled": "cancelled"}.get(self.status, "completed")

    def failure(self) -> ErrorDetail | None:
        """What went wrong, for a failed response."""
        if self.status != "failed":
            return None
        detail = self.status_details.error if self.status_details is not None else None
        return detail or ErrorDetail(message="the reply failed on the server")

    def transcript(self) -> str:
        for item in self.output:
            text = item.transcript()
            if text is not None:
                return text
        return ""


class SessionBody(_Body):
    id: str | None = None
    model: str | None = None
    instructions: str | None = None


class ServerEvent(_Body):
    """Any server event; the subclasses below are the ones with a known body. ``type`` is the GA name."""

    type: str
    event_id: str | None = None


class ErrorEvent(ServerEvent):
    error: ErrorDetail


class SessionEvent(ServerEvent):
    """``session.created`` and ``session.updated``."""

    session: SessionBody


class InputAudioBufferCommittedEvent(ServerEvent):
    item_id: str
    previous_item_id: str | None = None


class SpeechStartedEvent(ServerEvent):
    item_id: str
    audio_start_ms: int


class SpeechStoppedEvent(ServerEvent):
    item_id: str
    audio_end_ms: int


class ItemEvent(ServerEvent):
    """``conversation.item.added`` (beta ``.created``), ``.done`` and ``.retrieved``."""

    item: ItemBody
    previous_item_id: str | None = None


class ItemTruncatedEvent(ServerEvent):
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class ItemDeletedEvent(ServerEvent):
    item_id: str


class ResponseStatusEvent(ServerEvent):
    """``response.created`` and ``response.done``."""

    response: ResponseBody


class OutputItemEvent(ServerEvent):
    """``response.output_item.added`` and ``.done``."""

    response_id: str
    output_index: int = 0
    item: ItemBody


class _ContentEvent(ServerEvent):
    """An event about one content part of a reply's output item (the fields OpenAI gives all of them)."""

    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ContentPartEvent(_ContentEvent):
    """``response.content_part.added`` and ``.done``."""

    part: ContentBody


class DeltaEvent(_ContentEvent):
    """A reply's audio (base64 PCM16), transcript or text delta."""

    delta: str


class PartDoneEvent(_ContentEvent):
    """The end of a reply's audio (no body), transcript (``transcript``) or text (``text``)."""

    transcript: str | None = None
    text: str | None = None


_S = ServerEventType
#: The model of each server event, by GA name.
SERVER_EVENT_MODELS: Mapping[str, type[ServerEvent]] = {
    _S.ERROR: ErrorEvent,
    _S.SESSION_CREATED: SessionEvent,
    _S.SESSION_UPDATED: SessionEvent,
    _S.INPUT_AUDIO_BUFFER_COMMITTED: InputAudioBufferCommittedEvent,
    _S.INPUT_AUDIO_BUFFER_CLEARED: ServerEvent,
    _S.INPUT_AUDIO_BUFFER_SPEECH_STARTED: SpeechStartedEvent,
    _S.INPUT_AUDIO_BUFFER_SPEECH_STOPPED: SpeechStoppedEvent,
    _S.CONVERSATION_ITEM_ADDED: ItemEvent,
    _S.CONVERSATION_ITEM_DONE: ItemEvent,
    _S.CONVERSATION_ITEM_TRUNCATED: ItemTruncatedEvent,
    _S.CONVERSATION_ITEM_DELETED: ItemDeletedEvent,
    _S.CONVERSATION_ITEM_RETRIEVED: ItemEvent,
    _S.RESPONSE_CREATED: ResponseStatusEvent,
    _S.RESPONSE_OUTPUT_ITEM_ADDED: OutputItemEvent,
    _S.RESPONSE_CONTENT_PART_ADDED: ContentPartEvent,
    _S.RESPONSE_OUTPUT_AUDIO_DELTA: DeltaEvent,
    _S.RESPONSE_OUTPUT_AUDIO_DONE: PartDoneEvent,
    _S.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DELTA: DeltaEvent,
    _S.RESPONSE_OUTPUT_AUDIO_TRANSCRIPT_DONE: PartDoneEvent,
    _S.RESPONSE_OUTPUT_TEXT_DELTA: DeltaEvent,
    _S.RESPONSE_OUTPUT_TEXT_DONE: PartDoneEvent,
    _S.RESPONSE_CONTENT_PART_DONE: ContentPartEvent,
    _S.RESPONSE_OUTPUT_ITEM_DONE: OutputItemEvent,
    _S.RESPONSE_DONE: ResponseStatusEvent,
}


def parse_server_event(raw: str | bytes | Mapping[str, Any]) -> ServerEvent:
    """One server message (JSON text or a decoded object), in either dialect, to its typed model with ``type``
    set to the GA name; an event type not listed in :data:`SERVER_EVENT_MODELS` comes back as a plain
    :class:`ServerEvent`. Raises :class:`ProtocolError` (``invalid_json`` / ``invalid_event``) for a message
    that is not a server event or whose body does not have the fields its type requires."""
    data = decode_json(raw, "server message")
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "a server event must be a JSON object with a string 'type'")
    kind = ga_name(data["type"])
    model = SERVER_EVENT_MODELS.get(kind, ServerEvent)
    try:
        return model.model_validate({**data, "type": kind})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"server event {kind!r}: '{where}': {err.get('msg')}",
                            param=where) from None
