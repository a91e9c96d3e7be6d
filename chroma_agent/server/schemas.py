"""The HTTP API's request and response bodies: FlashLabs' chat completions, OpenAI's shapes, voices, health.

These models are the schema: FastAPI validates requests with them and publishes them at `/openapi.json`.
Requests ignore fields they do not know, because OpenAI clients send many (`stream_options`, `user`,
`store`, ...) that mean nothing here; responses carry OpenAI's fields plus FlashLabs' top-level `audio`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag, field_validator

from chroma_agent.engine.params import MAX_TEMPERATURE

#: What `audio_format` / `audio.format` may name: OpenAI's output formats ("pcm" is FlashLabs' word for pcm16).
AudioFormat = Literal["wav", "pcm16", "pcm", "mp3", "flac", "opus", "aac"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# --- chat completions: request -------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class AudioPart(_Request):
    """FlashLabs' audio part."""

    type: Literal["audio"]
    audio: str = Field(
        description="base64 of an audio file, a data URL (data:audio/wav;base64,...), or a path inside the "
        "server's assets folder when it has one"
    )


class InputAudio(_Request):
    data: str = Field(description="base64 of an audio file (WAV, FLAC, OGG)")
    format: str | None = Field(None, description="the file's format; informative, the bytes decide")


class InputAudioPart(_Request):
    """OpenAI's audio part."""

    type: Literal["input_audio"]
    input_audio: InputAudio


# Unions are told apart by a field (`type`, `role`) rather than by trying each member, so that an error names
# the field the client got wrong. Tag names carry a "-": the error formatter drops such segments of a location.
def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"{kind}-part" if kind in ("text", "audio", "input_audio") else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("text-part")] | Annotated[AudioPart, Tag("audio-part")]
    | Annotated[InputAudioPart, Tag("input_audio-part")],
    Discriminator(_part_tag, custom_error_type="invalid_part_type",
                  custom_error_message="type must be 'text', 'audio' or 'input_audio'"),
]


class SystemMessageParam(_Request):
    role: Literal["system", "developer"] = Field(description='"developer" is OpenAI\'s newer name for "system"')
    content: str | list[TextPart]


class UserMessageParam(_Request):
    role: Literal["user"]
    content: str | list[ContentPart] = Field(description="text, or parts; audio is accepted only here")


class AudioRef(_Request):
    id: str = Field(min_length=1, max_length=128, description="message.audio.id of an earlier reply")


class AssistantMessageParam(_Request):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = Field(None, description="an earlier reply's transcript")
    audio: AudioRef | None = Field(None, description="an earlier reply with audio, by its id: its transcript is "
                                   "used (while the reply's expires_at has not passed)")


_ROLE_TAGS = {"system": "system-message", "developer": "system-message", "user": "user-message",
              "assistant": "assistant-message"}


def _role_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return _ROLE_TAGS.get(role) if isinstance(role, str) else None


ChatMessage = Annotated[
    Annotated[SystemMessageParam, Tag("system-message")] | Annotated[UserMessageParam, Tag("user-message")]
    | Annotated[AssistantMessageParam, Tag("assistant-message")],
    Discriminator(_role_tag, custom_error_type="invalid_role",
                  custom_error_message="role must be 'system', 'developer', 'user' or 'assistant'"),
]


class VoiceRef(_Request):
    id: str = Field(description="a stored voice's name")


class OutputAudio(_Request):
    """OpenAI's `audio` request parameter; `voice` is a stored voice, or an OpenAI name (the default voice)."""

    voice: str | VoiceRef | None = None
    format: AudioFormat | None = None

    @field_validator("format", mode="before")
    @classmethod
    def lowercase_format(cls, value: Any) -> Any:
        return _lower(value)


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"dependentRequired": {"prompt_text": ["prompt_audio"], "prompt_audio": ["prompt_text"]}},
    )

    model: str = Field(description="any name: the served model answers (replies report its id)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False  # strict: "yes" or 1 is a mistake to report, not to guess
    stream_options: dict[str, Any] | None = Field(None, description="accepted; usage is always in the last chunk")
    max_tokens: StrictInt | None = Field(None, ge=1, le=100_000, description="reply length limit in 80 ms audio frames")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=100_000, description="OpenAI's name for max_tokens")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, description="0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0 switches top-k off")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="makes sampled replies reproducible")
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(
        None, description='OpenAI\'s output modalities: audio is returned when they include "audio"'
    )
    audio: OutputAudio | None = None
    voice: str | None = Field(None, description="a stored voice (GET /v1/voices); default: the server's voice")
    prompt_text: str | None = Field(None, description="transcript of prompt_audio; both or neither")
    prompt_audio: str | None = Field(None, description="a clip of the voice to clone for this request only")
    return_audio: bool | None = Field(
        None, description="FlashLabs: whether audio is returned. Default: when modalities include audio, or "
        "voice / prompt_audio / prompt_text is given; otherwise the reply is text only")
    audio_format: AudioFormat | None = Field(None, description="FlashLabs' name for audio.format (default wav)")

    @field_validator("audio_format", mode="before")
    @classmethod
    def lowercase_format(cls, value: Any) -> Any:
        return _lower(value)


# --- chat completions: response ------------------------------------------------------------------------


def _none(value: Any) -> bool:
    return value is None


class ReplyAudio(BaseModel):
    """OpenAI's `message.audio`."""

    id: str = Field(description="refer to this reply in later requests as {role: assistant, audio: {id}}")
    data: str = Field(description="base64 of the reply audio in the requested format")
    transcript: str
    expires_at: int = Field(description="Unix time after which `id` can no longer be referred to")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the reply's text; null when audio was asked for OpenAI's way "
                                "(modalities), the transcript is then in audio.transcript")
    refusal: None = None
    audio: ReplyAudio | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="tokens reused from the KV cache (not recomputed)")


class CompletionTokensDetails(BaseModel):
    text_tokens: int
    audio_tokens: int = Field(description="audio frames (80 ms each)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="text tokens + audio frames")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ReplyTimings(BaseModel):
    time_to_first_audio_ms: float | None
    prefill_ms: float
    total_ms: float
    audio_ms: float


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    audio: str | None = Field(None, exclude_if=_none, description="FlashLabs: base64 of the reply audio (only for "
                              "requests with FlashLabs' fields)")
    audio_format: AudioFormat | None = Field(None, exclude_if=_none)
    sample_rate: int | None = Field(None, exclude_if=_none)
    timings: ReplyTimings


class DeltaAudio(BaseModel):
    id: str
    data: str | None = Field(None, description="base64 of the next piece of the reply audio (pcm16 and wav: one "
                             "80 ms frame of 16-bit little-endian mono PCM at 24 kHz)")
    transcript: str | None = Field(None, description="transcript text (requests that ask for audio with "
                                   "modalities)")
    expires_at: int | None = Field(None, description="in the last audio delta")


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    sample_rate: int | None = None


# --- errors, models, health ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model_loaded: bool
    slots_total: int
    slots_free: int
    sessions: int


# --- voices --------------------------------------------------------------------------------------------


class Voice(BaseModel):
    name: str
    transcript: str
    duration_s: float
    frames: int = Field(description="Mimi frames of the clip (12.5 per second)")
    created_at: str


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Voice]


class VoiceCreate(_Request):
    """POST /v1/voices as JSON."""

    name: str
    transcript: str = Field(description="the exact words spoken in the clip")
    audio: str = Field(description="base64 of the clip (1-30 s), a data URL, or a path inside the assets folder")
    overwrite: bool = False


class VoiceUpload(_Request):
    """POST /v1/voices as multipart/form-data."""

    name: str
    transcript: str
    file: bytes = Field(description="the clip: a WAV, FLAC or OGG file of 1-30 s")
    overwrite: bool = False


class VoiceDeleted(BaseModel):
    name: str
    object: Literal["voice.deleted"] = "voice.deleted"
    deleted: Literal[True] = True
