"""/v1/voices: clone a voice once (multipart upload or JSON), list, read and delete stored voices."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from chroma_agent.audio import AudioError, load_audio
from chroma_agent.engine.engine import Engine
from chroma_agent.server.errors import APIError
from chroma_agent.server.priority import in_background
from chroma_agent.server.request_audio import load_request_audio
from chroma_agent.server.schemas import (
    ErrorResponse,
    Voice,
    VoiceCreate,
    VoiceDeleted,
    VoiceList,
    VoiceUpload,
)
from chroma_agent.server.system import ERROR_RESPONSES, ProtectedRoute
from chroma_agent.voices import (
    MAX_CLIP_SECONDS,
    UnknownVoiceError,
    VoiceError,
    VoiceProfile,
    validate_voice_name,
)

log = logging.getLogger(__name__)

router = APIRouter(route_class=ProtectedRoute, prefix="/v1/voices", tags=["voices"])

_NOT_FOUND = {404: {"model": ErrorResponse, "description": "no voice of that name"}}
_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": VoiceUpload.model_json_schema()},
            "application/json": {"schema": VoiceCreate.model_json_schema()},
        },
    }
}


def _voice(profile: VoiceProfile) -> Voice:
    return Voice(**profile.to_json())


def _valid_name(name: str) -> str:
    try:
        return validate_voice_name(name)
    except VoiceError as exc:
        raise APIError(400, f"name: {exc}", param="name", code="invalid_voice_name") from None


def _not_found(name: str) -> APIError:
    return APIError(404, f"name: voice {name!r} not found", type="not_found_error", param="name", code="voice_not_found")


def _exists(name: str) -> APIError:
    return APIError(409, f"name: voice {name!r} already exists; send overwrite=true to replace it", param="name",
                    code="voice_exists")


async def _read_create_request(request: Request) -> tuple[VoiceCreate | VoiceUpload, str]:
    """The request as one of the two models, and the field that holds its audio."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == "multipart/form-data":
            async with request.form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                if isinstance(upload, UploadFile):
                    fields["file"] = await upload.read()
                return VoiceUpload.model_validate(fields), "file"
        if content_type == "application/json" or content_type.endswith("+json"):
            return VoiceCreate.model_validate_json(await request.body()), "audio"
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    raise APIError(415, "send the voice as multipart/form-data (name, transcript, file) or as JSON "
                   "(name, transcript, audio as base64)", code="unsupported_media_type")


def _clone(engine: Engine, request: Request, body: VoiceCreate | VoiceUpload, audio_field: str) -> VoiceProfile:
    settings = request.app.state.settings
    rate = engine.processor.voice_sample_rate
    if isinstance(body, VoiceUpload):
        try:
            clip = load_audio(body.file, rate, max_seconds=min(MAX_CLIP_SECONDS, settings.max_audio_seconds),
                              max_samples=settings.max_audio_samples)
        except AudioError as exc:
            raise APIError(400, f"file: {exc}", param="file", code="invalid_audio") from None
    else:
        clip = load_request_audio(body.audio, rate, "audio", settings, max_seconds=MAX_CLIP_SECONDS)
    try:
        return engine.create_voice(clip, body.transcript, body.name, sample_rate=rate, allow_paths=False).result()
    except VoiceError as exc:
        param = audio_field if str(exc).startswith("voice clip") else "transcript"
        raise APIError(400, f"{param}: {exc}", param=param) from None


@router.get("", response_model=VoiceList, responses=ERROR_RESPONSES)
async def list_voices(request: Request) -> VoiceList:
    profiles = await run_in_threadpool(request.app.state.engine.voices.list)
    return VoiceList(data=[_voice(p) for p in profiles])


@router.post("", status_code=201, response_model=Voice, openapi_extra=_CREATE_BODY,
             responses={**ERROR_RESPONSES,
                        409: {"model": ErrorResponse, "description": "a voice of that name exists"},
                        415: {"model": ErrorResponse, "description": "neither JSON nor multipart"}})
async def create_voice(request: Request) -> Voice:
    """Clone a voice from a 1-30 s clip and its transcript, and store it under `name`."""
    engine: Engine = request.app.state.engine
    body, audio_field = await _read_create_request(request)
    name = _valid_name(body.name)
    if not body.overwrite and name in engine.voices:
        raise _exists(name)  # before cloning: the codec's work would be thrown away
    profile = await in_background(_clone, engine, request, body, audio_field)
    try:
        await run_in_threadpool(engine.voices.save, profile, overwrite=body.overwrite)
    except VoiceError as exc:
        if name in engine.voices:  # taken by a concurrent request since the check above
            raise _exists(name) from None
        raise APIError(500, f"the voice could not be stored: {exc}", type="server_error") from None
    log.info("request %s: voice %r stored (%.1f s clip)", request.state.request_id, name, profile.duration_s)
    return _voice(profile)


@router.get("/{name}", response_model=Voice, responses={**ERROR_RESPONSES, **_NOT_FOUND})
async def get_voice(request: Request, name: str) -> Voice:
    name = _valid_name(name)
    try:
        profile = await run_in_threadpool(request.app.state.engine.voices.get, name)
    except UnknownVoiceError:
        raise _not_found(name) from None
    except VoiceError as exc:
        raise APIError(500, f"voice {name!r} cannot be read: {exc}", type="server_error") from None
    return _voice(profile)


@router.delete("/{name}", response_model=VoiceDeleted, responses={**ERROR_RESPONSES, **_NOT_FOUND})
async def delete_voice(request: Request, name: str) -> VoiceDeleted:
    name = _valid_name(name)
    try:
        await run_in_threadpool(request.app.state.engine.voices.delete, name)
    except UnknownVoiceError:
        raise _not_found(name) from None
    log.info("request %s: voice %r deleted", request.state.request_id, name)
    return VoiceDeleted(name=name)
