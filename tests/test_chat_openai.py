"""Chat completions as OpenAI's audio models take them, driven by the official `openai` SDK on a real server.

Every request here uses only what OpenAI documents for its audio models (`modalities`, `audio: {voice, format}`,
`input_audio` parts, `{"role": "assistant", "audio": {"id"}}` follow-ups, any model name); none of FlashLabs'
extensions. Replies are checked against the golden case (greedy, the golden voice as the server's default).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from pathlib import Path
from typing import Literal, get_args, get_origin

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from openai import OpenAI

from chroma_agent.audio_encode import supported_formats
from chroma_agent.realtime_protocol import OPENAI_VOICES
from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

FRAME = 1920
AUDIO_MODEL = "gpt-4o-audio-preview"  # what OpenAI's examples name; this server answers as chroma-4b


@pytest.fixture()
def serve(make_engine, golden_voice):
    """serve(engine=None, **settings) -> an OpenAI client for a uvicorn server in a thread."""
    servers: list[ServerThread] = []

    def start(engine=None, **settings) -> OpenAI:
        engine = engine or make_engine(golden_default_voice=golden_voice)
        server = ServerThread(create_app(engine, ServerSettings(**settings))).start()
        servers.append(server)
        client = OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0)
        client.engine, client.url = engine, server.url
        return client

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def golden_text(case) -> str:
    return case["thinker_text"].replace("<|im_end|>", "")


@pytest.fixture(scope="module")
def golden_messages(case, golden_dir: Path) -> list[dict]:
    """The golden conversation in OpenAI's shapes: a system prompt and an `input_audio` part."""
    question = base64.b64encode((golden_dir / "user1.wav").read_bytes()).decode()
    return [{"role": "system", "content": case["system_prompt"]},
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": question, "format": "wav"}}]}]


def golden_pcm(golden_outputs, frames: int = 32) -> np.ndarray:
    """The reference's golden waveform (float), as far as `frames` go."""
    return np.clip(golden_outputs["waveform"], -1, 1)[: frames * FRAME]


def assert_golden(pcm: bytes | np.ndarray, golden_outputs, frames: int = 32) -> None:
    """16-bit audio that is the golden waveform (to the reference's float tolerance)."""
    samples = np.frombuffer(pcm, "<i2") if isinstance(pcm, bytes) else pcm
    assert samples.shape == (frames * FRAME,)
    assert np.abs(samples / 32768.0 - golden_pcm(golden_outputs, frames)).max() < 2e-3


def audio_reply(client: OpenAI, messages, *, voice="alloy", fmt="wav", frames=32, **kwargs):
    return client.chat.completions.create(model=AUDIO_MODEL, modalities=["text", "audio"],
                                          audio={"voice": voice, "format": fmt}, messages=messages,
                                          max_completion_tokens=frames, temperature=0, **kwargs)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container FFmpeg reads -> mono float samples and their rate."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return samples, stream.rate


# --- the request OpenAI documents, the reply OpenAI returns ------------------------------------------------


def test_openai_audio_request_gets_openais_reply(serve, golden_messages, golden_text, golden_outputs):
    client = serve()
    response = audio_reply(client, golden_messages)
    assert response.model == "chroma-4b"  # any model name is accepted; the reply names the one that answered
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    message = choice.message
    assert message.content is None  # OpenAI's shape: the transcript lives in message.audio
    assert message.audio.transcript == golden_text
    assert message.audio.id.startswith("audio_")
    assert message.audio.expires_at >= response.created + 3600 - 1
    wav, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="int16")
    assert rate == 24000
    assert_golden(wav, golden_outputs)
    assert "audio" not in (response.model_extra or {})  # FlashLabs' top-level copy only for its own requests
    usage = response.usage
    assert usage.completion_tokens_details.audio_tokens == 32
    assert usage.completion_tokens == 32 + usage.completion_tokens_details.text_tokens


def test_every_stock_voice_is_the_default_voice_and_unknown_voices_are_400(serve, golden_messages,
                                                                          golden_outputs):
    client = serve()
    voice_type = openai.types.chat.chat_completion_audio_param.Voice
    sdk_voices = {v for arg in get_args(voice_type) if get_origin(arg) is Literal for v in get_args(arg)}
    assert sdk_voices <= OPENAI_VOICES and {"fable", "nova", "onyx"} <= OPENAI_VOICES
    first = base64.b64decode(client.chat.completions.create(
        model=AUDIO_MODEL, modalities=["text", "audio"], audio={"format": "pcm16"}, messages=golden_messages,
        max_completion_tokens=2, temperature=0).choices[0].message.audio.data)  # no voice named: the default
    assert_golden(first, golden_outputs, frames=2)
    for voice in sorted(OPENAI_VOICES):
        response = audio_reply(client, golden_messages, voice=voice, fmt="pcm16", frames=2)
        assert base64.b64decode(response.choices[0].message.audio.data) == first, voice
    # the SDK's custom-voice object names a stored voice; the default's name counts as one
    response = audio_reply(client, golden_messages, voice={"id": "golden"}, fmt="pcm16", frames=2)
    assert base64.b64decode(response.choices[0].message.audio.data) == first
    with pytest.raises(openai.BadRequestError) as info:
        audio_reply(client, golden_messages, voice="no-such-voice", frames=2)
    error = info.value.body
    assert error["param"] == "audio.voice" and error["code"] == "voice_not_found"
    assert "no-such-voice" in error["message"]


def test_stock_names_never_reach_a_stored_voice_of_that_name(serve, make_engine, golden_voice, golden_messages,
                                                            golden_outputs, case, golden_dir):
    engine = make_engine(golden_default_voice=golden_voice)
    client = serve(engine)
    # someone stores a different voice under a stock name: stock names still mean the configured default
    other = engine.create_voice(golden_dir / "user1.wav", "What should I wear for the weather today?", name="alloy").result()
    engine.voices.save(other)
    response = audio_reply(client, golden_messages, voice="alloy", fmt="pcm16", frames=2)
    assert_golden(base64.b64decode(response.choices[0].message.audio.data), golden_outputs, frames=2)


def test_text_only_unless_audio_is_asked_for(serve, golden_messages, golden_text):
    client = serve()
    for extra in ({}, {"modalities": ["text"]}):
        response = client.chat.completions.create(model="gpt-4o", messages=golden_messages, temperature=0,
                                                  max_completion_tokens=32, **extra)
        message = response.choices[0].message
        assert message.audio is None and message.content == golden_text, extra
        assert response.usage.completion_tokens_details.audio_tokens == 0
        assert response.usage.completion_tokens == response.usage.completion_tokens_details.text_tokens
    stream = client.chat.completions.create(model="gpt-4o", messages=golden_messages, temperature=0,
                                            max_completion_tokens=32, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(d.audio is None for d in deltas)
    assert "".join(d.content or "" for d in deltas) == golden_text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens_details.audio_tokens == 0


def test_streaming_audio_in_openais_shape(serve, golden_messages, golden_text, golden_outputs):
    client = serve()
    stream = audio_reply(client, golden_messages, fmt="pcm16", stream=True)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and all(c.model == "chroma-4b" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert all(not d.content for d in deltas)  # the transcript comes in delta.audio.transcript
    audio = [d.audio for d in deltas if d.audio is not None]
    assert len({a.id for a in audio}) == 1
    assert "".join(a.transcript or "" for a in audio) == golden_text
    data = [base64.b64decode(a.data) for a in audio if a.data]
    assert len(data) == 32 and all(len(d) == 2 * FRAME for d in data)  # one 80 ms PCM16 frame per delta
    assert_golden(b"".join(data), golden_outputs)
    assert audio[-1].expires_at is not None and audio[-1].data is None and audio[-1].transcript is None
    finish = chunks[-1]
    assert finish.choices[0].finish_reason == "length" and finish.usage.completion_tokens_details.audio_tokens == 32


@pytest.mark.parametrize("fmt", ["wav", "pcm16", "mp3", "flac", "opus", "aac"])
def test_output_formats_whole_and_streamed(serve, golden_messages, golden_outputs, fmt):
    if fmt not in supported_formats():  # aac needs FFmpeg's encoder; the server then refuses it with a 400
        client = serve()
        with pytest.raises(openai.BadRequestError) as info:
            audio_reply(client, golden_messages, fmt=fmt, frames=8)
        assert info.value.body["param"] == "audio.format"
        return
    client = serve()
    frames = 16
    pcm16 = audio_reply(client, golden_messages, fmt="pcm16", frames=frames).choices[0].message.audio.data
    expected = np.frombuffer(base64.b64decode(pcm16), "<i2")
    assert_golden(expected, golden_outputs, frames)
    whole = base64.b64decode(audio_reply(client, golden_messages, fmt=fmt, frames=frames).choices[0].message.audio.data)
    pieces = [d.audio.data for c in audio_reply(client, golden_messages, fmt=fmt, frames=frames, stream=True)
              for d in [c.choices[0].delta] if c.choices and d.audio is not None and d.audio.data]
    streamed = b"".join(base64.b64decode(p) for p in pieces)
    if fmt == "pcm16":
        assert whole == streamed == expected.tobytes()
        return
    if fmt == "wav":  # streamed as raw PCM16 frames: a WAV header needs the length
        assert streamed == expected.tobytes()
        samples, rate = sf.read(io.BytesIO(whole), dtype="int16")
        assert rate == 24000 and np.array_equal(samples, expected)
        return
    if fmt == "flac":  # one piece at the end: its header must hold the length
        assert len(pieces) == 1 and streamed == whole
    else:  # the encoded file goes out while it is made
        assert len(pieces) > 1
    for data in (whole, streamed):
        samples, rate = decode(data)
        seconds = len(samples) / rate
        assert abs(seconds - frames * 0.08) < 0.12, (fmt, seconds)  # encoder delay and padding only
        if fmt == "flac":  # lossless: exactly the PCM16 reply
            flac, flac_rate = sf.read(io.BytesIO(data), dtype="int16")
            assert flac_rate == 24000 and np.array_equal(flac, expected)


# --- follow-ups by audio id --------------------------------------------------------------------------------


def test_follow_up_by_audio_id_is_that_replys_transcript(serve, golden_messages, golden_text):
    client = serve()
    first = audio_reply(client, golden_messages, frames=32)
    audio_id = first.choices[0].message.audio.id
    question = {"role": "user", "content": "And tomorrow?"}

    def follow_up(assistant: dict):
        return client.chat.completions.create(model=AUDIO_MODEL, messages=[*golden_messages, assistant, question],
                                              temperature=0, max_completion_tokens=12)

    by_id = follow_up({"role": "assistant", "audio": {"id": audio_id}})
    by_text = follow_up({"role": "assistant", "content": golden_text})
    empty = follow_up({"role": "assistant", "content": ""})
    # the reference reads exactly as the transcript would: same context, same greedy reply
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens > empty.usage.prompt_tokens
    assert by_id.choices[0].message.content == by_text.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        follow_up({"role": "assistant", "audio": {"id": "audio_unknown"}})
    assert info.value.body["param"] == "messages[2].audio.id"


def test_follow_up_after_expires_at_is_400(serve, golden_messages):
    client = serve(audio_reply_ttl_s=1)
    first = audio_reply(client, golden_messages, frames=1)
    expires_at = first.choices[0].message.audio.expires_at
    assert first.created <= expires_at <= first.created + 1
    while time.time() < expires_at:
        time.sleep(0.05)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=AUDIO_MODEL, max_completion_tokens=1, messages=[
            *golden_messages, {"role": "assistant", "audio": {"id": first.choices[0].message.audio.id}},
            {"role": "user", "content": "Go on."}])
    assert info.value.body["param"] == "messages[2].audio.id" and "expires_at" in info.value.body["message"]


def test_a_full_reply_store_says_so_in_expires_at(serve, golden_messages):
    client = serve(audio_reply_store_size=1)
    kept = audio_reply(client, golden_messages, frames=1)
    not_kept = audio_reply(client, golden_messages, frames=1)
    assert kept.choices[0].message.audio.expires_at > kept.created
    assert not_kept.choices[0].message.audio.expires_at == not_kept.created  # not kept: expired at once
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=AUDIO_MODEL, max_completion_tokens=1, messages=[
            *golden_messages, {"role": "assistant", "audio": {"id": not_kept.choices[0].message.audio.id}},
            {"role": "user", "content": "Go on."}])


# --- models, and a server without a default voice ----------------------------------------------------------


def test_models_lists_the_served_model_and_its_aliases(serve, golden_messages):
    client = serve(model_aliases=("gpt-4o-audio-preview", "chroma"))
    assert [m.id for m in client.models.list().data] == ["chroma-4b", "gpt-4o-audio-preview", "chroma"]
    assert client.models.retrieve("gpt-4o-audio-preview").id == "gpt-4o-audio-preview"
    response = client.chat.completions.create(model="any-model-name", messages=golden_messages,
                                              max_completion_tokens=2)
    assert response.model == "chroma-4b"


def test_without_a_default_voice_speech_needs_a_named_voice(serve, make_engine, golden_voice, golden_messages,
                                                           golden_outputs, golden_text):
    engine = make_engine()  # no --default-voice
    engine.voices.save(golden_voice)
    engine.voices.save(dataclasses.replace(golden_voice, name="0-attacker", transcript="x"))
    client = serve(engine)
    with pytest.raises(openai.BadRequestError) as info:
        audio_reply(client, golden_messages, voice="alloy", frames=2)
    error = info.value.body
    assert error["code"] == "voice_required" and error["param"] == "audio.voice"
    assert "--voice-audio" in error["message"]  # the setting that gives the server a default voice
    # text needs no voice; a stored voice named in the request speaks
    text = client.chat.completions.create(model=AUDIO_MODEL, messages=golden_messages, temperature=0,
                                          max_completion_tokens=32)
    assert text.choices[0].message.content == golden_text
    named = audio_reply(client, golden_messages, voice="golden", fmt="pcm16", frames=2)
    assert_golden(base64.b64decode(named.choices[0].message.audio.data), golden_outputs, frames=2)
    r = httpx.post(f"{client.url}/v1/chat/completions", timeout=30, json={
        "model": "chroma", "messages": [{"role": "user", "content": "hi"}], "return_audio": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "voice_required"
    assert r.json()["error"]["param"] == "voice"
