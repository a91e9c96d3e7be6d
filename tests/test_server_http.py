"""The HTTP API on a real uvicorn server: FlashLabs' three client styles, streaming, voices, auth, bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from openai import OpenAI

from chroma_agent.audio import encode_wav, to_pcm16
from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

FRAME = 1920
API_KEY = "test-key-0123456789"


@pytest.fixture()
def serve(make_engine):
    """serve(engine, **settings) -> base URL of a uvicorn server in a thread; stopped before the engines close."""
    servers: list[ServerThread] = []

    def start(engine, **settings) -> str:
        server = ServerThread(create_app(engine, ServerSettings(**settings))).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def golden_text(case) -> str:
    return case["thinker_text"].replace("<|im_end|>", "")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def golden_request(case, golden_dir, **extra) -> dict:
    """The golden case as a FlashLabs request: system prompt, user1.wav, the voice prompt, greedy, 32 frames."""
    return {
        "model": "chroma",
        "messages": [
            {"role": "system", "content": case["system_prompt"]},
            {"role": "user", "content": [{"type": "audio", "audio": b64(golden_dir / "user1.wav")}]},
        ],
        "prompt_text": case["voice_text"],
        "prompt_audio": b64(golden_dir / "voice.wav"),
        "temperature": 0,
        "max_tokens": 32,
        **extra,
    }


def short_request(**extra) -> dict:
    """A plain text request: the reply is text only unless `extra` asks for audio."""
    return {"model": "chroma", "messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 4, **extra}


def expected_pcm(golden_outputs) -> np.ndarray:
    """The golden waveform as a 16-bit client receives it."""
    return np.frombuffer(to_pcm16(np.clip(golden_outputs["waveform"], -1, 1)), "<i2") / 32768.0


def wav_samples(data_b64: str) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(data_b64)), dtype="float32")
    assert rate == 24000
    return audio


def sse_events(response: httpx.Response) -> list:
    """Parsed `data:` payloads of an SSE response ("[DONE]" kept as a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_for(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the three FlashLabs client styles ---------------------------------------------------------------


def test_requests_style_client_gets_the_golden_reply(make_engine, serve, case, golden_dir, golden_text,
                                                     golden_outputs):
    engine = make_engine()
    url = serve(engine)
    r = httpx.post(f"{url}/v1/chat/completions", json=golden_request(case, golden_dir), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"] == "chroma-4b"  # the served model answers
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == golden_text
    assert body["audio_format"] == "wav" and body["sample_rate"] == 24000
    audio = wav_samples(body["audio"])
    assert audio.shape == (32 * FRAME,)
    assert np.abs(audio - expected_pcm(golden_outputs)).max() < 2e-3
    assert choice["message"]["audio"]["data"] == body["audio"]
    assert choice["message"]["audio"]["transcript"] == golden_text
    usage = body["usage"]
    assert usage["prompt_tokens"] == 114 and usage["completion_tokens_details"]["audio_tokens"] == 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["timings"]["audio_ms"] == 32 * 80
    assert r.headers["x-request-id"].startswith("req_")
    # The cloned prompt voice was for this request only, and the slot is free again.
    assert httpx.get(f"{url}/v1/voices").json()["data"] == []
    assert engine.free_slots == engine.config.max_sessions


def test_openai_sdk_client(make_engine, serve, case, golden_dir, golden_text, golden_outputs):
    url = serve(make_engine())
    client = OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    request = golden_request(case, golden_dir)
    response = client.chat.completions.create(
        model="chroma", messages=request["messages"], temperature=0, max_tokens=32,
        extra_body={"prompt_text": request["prompt_text"], "prompt_audio": request["prompt_audio"],
                    "return_audio": True},
    )
    assert response.choices[0].message.content == golden_text
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.audio.transcript == golden_text
    assert response.usage.completion_tokens == response.usage.total_tokens - response.usage.prompt_tokens
    extra = response.model_extra
    assert extra["audio_format"] == "wav" and extra["sample_rate"] == 24000
    assert response.to_dict()["audio"] == extra["audio"]
    assert np.abs(wav_samples(extra["audio"]) - expected_pcm(golden_outputs)).max() < 2e-3
    assert [m.id for m in client.models.list().data] == ["chroma-4b", "chroma", "FlashLabs/Chroma-4B"]


def test_curl_client(make_engine, serve, golden_voice, case, golden_dir, golden_text, tmp_path):
    curl = shutil.which("curl")
    assert curl, "curl is not installed: the FlashLabs curl example cannot be checked (install curl)"
    url = serve(make_engine(golden_default_voice=golden_voice))
    payload = {
        "model": "FlashLabs/Chroma-4B", "max_tokens": 32, "temperature": 0, "return_audio": True,
        "messages": [
            {"role": "system", "content": case["system_prompt"]},
            {"role": "user", "content": [
                {"type": "audio", "audio": "data:audio/wav;base64," + b64(golden_dir / "user1.wav")}]},
        ],
    }
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    result = subprocess.run(
        [curl, "-sS", "-X", "POST", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json",
         "--data-binary", f"@{tmp_path / 'payload.json'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["choices"][0]["message"]["content"] == golden_text
    assert wav_samples(body["audio"]).shape == (32 * FRAME,)


# --- streaming ---------------------------------------------------------------------------------------


def test_streaming_with_httpx(make_engine, serve, case, golden_dir, golden_text, golden_outputs):
    engine = make_engine()
    url = serve(engine)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=golden_request(case, golden_dir, stream=True),
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    text = "".join(d.get("content", "") for d in deltas)
    assert text == golden_text
    frames = [np.frombuffer(base64.b64decode(d["audio"]["data"]), "<i2") for d in deltas if "data" in d.get("audio", {})]
    assert len(frames) == 32 and all(f.shape == (FRAME,) for f in frames)
    # the last audio delta says until when the reply can be referred to by its id
    last_audio = [d["audio"] for d in deltas if "audio" in d][-1]
    assert set(last_audio) == {"id", "expires_at"} and last_audio["expires_at"] > chunks[0]["created"]
    audio = np.concatenate(frames) / 32768.0
    assert np.abs(audio - expected_pcm(golden_outputs)).max() < 2e-3
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens_details"]["audio_tokens"] == 32
    assert wait_for(lambda: engine.free_slots == engine.config.max_sessions)


def test_streaming_with_the_openai_sdk(make_engine, serve, golden_voice):
    url = serve(make_engine(golden_default_voice=golden_voice))
    client = OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    stream = client.chat.completions.create(model="chroma", stream=True, max_tokens=6, seed=3, temperature=0.8,
                                            messages=[{"role": "user", "content": "Tell me a story."}],
                                            extra_body={"return_audio": True})
    text, frames, finish, usage = "", 0, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.delta.audio is not None and choice.delta.audio.data:  # the SDK types OpenAI's audio delta
                assert len(base64.b64decode(choice.delta.audio.data)) == 2 * FRAME
                frames += 1
            finish = choice.finish_reason or finish
    assert frames == 6 and finish == "length"
    assert usage.completion_tokens_details.audio_tokens == 6
    assert usage.completion_tokens == 6 + usage.completion_tokens_details.text_tokens
    assert isinstance(text, str)


def test_a_client_leaving_a_stream_frees_its_slot_and_full_slots_answer_503(make_engine, serve, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    url = serve(engine, session_wait_s=0.2)
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json=short_request(stream=True, max_tokens=750, return_audio=True)) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection
            for line in lines:
                if '"audio"' in line:
                    break
            assert engine.free_slots == 0
            busy = httpx.post(f"{url}/v1/chat/completions", json=short_request(), timeout=10)
            assert_error(busy, 503, code="engine_busy")
            assert busy.headers["retry-after"] == "1"
        # The stream was closed after one frame of a 60 s reply: the slot must come back within a step.
        assert wait_for(lambda: engine.free_slots == 1, 2.0)
        assert client.post("/v1/chat/completions", json=short_request()).status_code == 200
    # A plain (non-streaming) request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=short_request(max_tokens=750, return_audio=True), timeout=0.5)
    assert wait_for(lambda: engine.free_slots == 1, 2.0)


# --- voices -----------------------------------------------------------------------------------------


def test_voices_crud(make_engine, serve, case, golden_dir, golden_text):
    engine = make_engine()
    url = serve(engine)
    c = httpx.Client(base_url=url, timeout=60)
    clip = (golden_dir / "voice.wav").read_bytes()
    form = {"name": "anna", "transcript": case["voice_text"]}
    r = c.post("/v1/voices", data=form, files={"file": ("voice.wav", clip, "audio/wav")})
    assert r.status_code == 201, r.text
    anna = r.json()
    assert anna["name"] == "anna" and anna["transcript"] == case["voice_text"] and anna["frames"] == 57
    assert abs(anna["duration_s"] - 107705 / 24000) < 1e-3 and anna["created_at"]
    assert_error(c.post("/v1/voices", data=form, files={"file": ("voice.wav", clip)}), 409, "name", "voice_exists")
    r = c.post("/v1/voices", data={**form, "overwrite": "true"}, files={"file": ("voice.wav", clip)})
    assert r.status_code == 201
    r = c.post("/v1/voices", json={"name": "bob", "transcript": case["voice_text"], "audio": b64(golden_dir / "voice.wav")})
    assert r.status_code == 201, r.text
    assert [v["name"] for v in c.get("/v1/voices").json()["data"]] == ["anna", "bob"]
    assert c.get("/v1/voices/bob").json()["frames"] == 57
    # A stored voice made from the golden prompt speaks the golden reply.
    request = golden_request(case, golden_dir, voice="anna")
    del request["prompt_text"], request["prompt_audio"]
    r = c.post("/v1/chat/completions", json=request)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == golden_text
    assert c.delete("/v1/voices/anna").json() == {"name": "anna", "object": "voice.deleted", "deleted": True}
    assert_error(c.get("/v1/voices/anna"), 404, "name", "voice_not_found")
    assert_error(c.delete("/v1/voices/anna"), 404, "name", "voice_not_found")
    assert_error(c.post("/v1/chat/completions", json=request), 400, "voice", "voice_not_found")
    # Bad uploads.
    assert_error(c.post("/v1/voices", data={**form, "name": "bad name!"}, files={"file": ("v.wav", clip)}), 400, "name")
    assert_error(c.get("/v1/voices/..secret"), 400, "name")
    assert_error(c.post("/v1/voices", data=form, files={"file": ("v.wav", b"RIFF" + b"\0" * 100)}), 400, "file")
    silent = encode_wav(np.zeros(48000, np.float32), 24000)
    assert_error(c.post("/v1/voices", data={**form, "name": "quiet"}, files={"file": ("s.wav", silent)}), 400, "file")
    assert_error(c.post("/v1/voices", data={"name": "x"}, files={"file": ("v.wav", clip)}), 400, "transcript")
    assert_error(c.post("/v1/voices", content=b"name=x", headers={"content-type": "text/plain"}), 415)
    assert_error(c.post("/v1/voices", json={"name": "carl", "transcript": "hi", "audio": "bm90IGF1ZGlv" * 8}), 400,
                 "audio")
    assert [v["name"] for v in c.get("/v1/voices").json()["data"]] == ["bob"]


# --- auth, system endpoints ---------------------------------------------------------------------------


def test_api_key(make_engine, serve):
    url = serve(make_engine(), api_key=API_KEY)
    error = assert_error(httpx.get(f"{url}/v1/models"), 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong-key-000000"}), 401)
    assert_error(httpx.get(f"{url}/v1/voices", headers={"Authorization": API_KEY}), 401)  # no Bearer scheme
    # The key is checked before the body is read: a bad body without the key is a 401, not a 400.
    assert_error(httpx.post(f"{url}/v1/chat/completions", content=b"{bad"), 401)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/voices", headers={"api-key": API_KEY}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    client = OpenAI(api_key=API_KEY, base_url=f"{url}/v1", max_retries=0)
    assert client.models.retrieve("chroma").id == "chroma"


def test_health_models_and_metrics(make_engine, serve, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2)
    url = serve(engine)
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "model_loaded": True, "slots_total": 2, "slots_free": 2, "sessions": 0}
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "chroma-4b"
    assert models["data"][0]["object"] == "model"
    for name in ("chroma-4b", "chroma", "FlashLabs/Chroma-4B"):
        assert httpx.get(f"{url}/v1/models/{name}").json()["id"] == name
    assert_error(httpx.get(f"{url}/v1/models/gpt-4o"), 404, "model", "model_not_found")  # not listed
    assert httpx.post(f"{url}/v1/chat/completions", json=short_request(return_audio=True)).status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=short_request(voice="nobody")).status_code == 400
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'chroma_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    assert 'chroma_requests_total{endpoint="/v1/chat/completions",status="400"} 1.0' in text
    assert 'chroma_errors_total{kind="voice_not_found"} 1.0' in text
    assert 'chroma_replies_total{reason="max_frames"} 1.0' in text
    assert "chroma_time_to_first_audio_seconds_count 1.0" in text and "chroma_free_slots 2.0" in text
    engine.close()  # the step thread is gone: the server must say it cannot serve
    dead = httpx.get(f"{url}/health")
    assert dead.status_code == 503 and dead.json()["status"] == "unavailable"


# --- bad input ------------------------------------------------------------------------------------------


def test_bad_requests_get_4xx_errors_naming_the_field(make_engine, serve, golden_voice, golden_dir):
    url = serve(make_engine(golden_default_voice=golden_voice), max_audio_seconds=3.0)
    user1 = b64(golden_dir / "user1.wav")  # 3.5 s: over this server's limit

    def audio_message(audio, kind="audio"):
        part = {"type": kind, kind: audio} if kind == "audio" else {"type": kind, kind: {"data": audio}}
        return {"model": "chroma", "max_tokens": 2,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [part]}]}

    def post(payload=None, **kwargs):
        if payload is not None:
            kwargs["json"] = payload
        return httpx.post(f"{url}/v1/chat/completions", timeout=30, **kwargs)

    part = "messages[1].content[0]"
    cases = [
        # (what, response, status, param, code)
        ("malformed JSON", post(content=b'{"model": "chroma",', headers={"content-type": "application/json"}),
         400, None, None),
        ("not an object", post([1, 2]), 400, None, None),
        ("missing model", post({"messages": [{"role": "user", "content": "hi"}]}), 400, "model", None),
        ("wrong type", post(short_request(max_tokens="many")), 400, "max_tokens", None),
        ("wrong type", post(short_request(temperature=[1])), 400, "temperature", None),
        ("messages not a list", post({"model": "chroma", "messages": "hi"}), 400, "messages", None),
        ("empty messages", post({"model": "chroma", "messages": []}), 400, "messages", None),
        ("unknown role", post({"model": "chroma", "messages": [{"role": "robot", "content": "hi"}]}), 400,
         "messages[0]", None),
        ("no content", post({"model": "chroma", "messages": [{"role": "user"}]}), 400, "messages[0].content",
         None),
        ("blank content", post({"model": "chroma", "messages": [{"role": "user", "content": "  "}]}), 400,
         "messages[0].content", None),
        ("unknown part", post({"model": "chroma", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages[0].content[0]",
         None),
        ("audio part without audio", post({"model": "chroma", "messages": [{"role": "user", "content": [
            {"type": "audio"}]}]}), 400, "messages[0].content[0].audio", None),
        ("audio token in text", post({"model": "chroma", "messages": [{"role": "user", "content": "<|AUDIO|>"}]}),
         400, "messages[0].content", None),
        ("audio in a system message", post({"model": "chroma", "messages": [{"role": "system", "content": [
            {"type": "audio", "audio": user1}]}, {"role": "user", "content": "hi"}]}), 400,
         "messages[0].content[0].type", None),
        ("prompt_text alone", post(short_request(prompt_text="hello")), 400, "prompt_audio", None),
        ("prompt_audio alone", post(short_request(prompt_audio=b64(golden_dir / "voice.wav"))), 400,
         "prompt_text", None),
        ("voice and prompt", post(short_request(voice="x", prompt_text="a", prompt_audio="b")), 400, "voice", None),
        ("unknown voice", post(short_request(voice="nobody")), 400, "voice", "voice_not_found"),
        ("unknown audio.voice", post(short_request(modalities=["text", "audio"], audio={"voice": "nobody"})), 400,
         "audio.voice", "voice_not_found"),
        ("invalid voice name", post(short_request(voice="../../etc/passwd")), 400, "voice", None),
        ("unsupported audio_format", post(short_request(audio_format="ogg")), 400, "audio_format", None),
        ("unsupported audio.format", post(short_request(audio={"format": "m4a"})), 400, "audio.format", None),
        ("n > 1", post(short_request(n=2)), 400, "n", None),
        ("top_p 0", post(short_request(top_p=0)), 400, "top_p", None),
        ("corrupt audio", post(audio_message(base64.b64encode(b"RIFF" + bytes(200)).decode())), 400, part,
         "invalid_audio"),
        ("empty audio", post(audio_message("")), 400, part, "invalid_audio"),
        ("not audio", post(audio_message(base64.b64encode(bytes(range(256)) * 4).decode())), 400, part,
         "invalid_audio"),
        ("audio URL", post(audio_message("https://example.com/a.wav")), 400, part, "invalid_audio"),
        ("too long audio", post(audio_message(user1)), 400, part, "invalid_audio"),
        ("too short audio", post(audio_message(b64_wav(np.zeros(100, np.float32), 16000))), 400, part, None),
        ("path without assets dir", post(audio_message("assets/question_audio.wav")), 400, part, "invalid_audio"),
        ("input_audio path", post(audio_message("user1.wav", "input_audio")), 400, part, "invalid_audio"),
        ("bad prompt audio", post(short_request(prompt_text="hello", prompt_audio="bm9pc2U=" * 20)), 400,
         "prompt_audio", "invalid_audio"),
    ]
    for what, response, status, param, code in cases:
        try:
            assert_error(response, status, param, code)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from None
    assert "mp3" in post(short_request(audio_format="ogg")).json()["error"]["message"]  # the formats are listed
    assert "not valid JSON" in cases[0][1].json()["error"]["message"]
    # Errors carry the request id too; a client's own id is kept.
    assert all(response.headers["x-request-id"].startswith("req_") for _, response, *_ in cases)
    traced = post(short_request(n=3), headers={"X-Request-ID": "client-42"})
    assert traced.status_code == 400 and traced.headers["x-request-id"] == "client-42"


def b64_wav(x: np.ndarray, rate: int) -> str:
    return base64.b64encode(encode_wav(x, rate)).decode()


def test_any_rate_and_channel_count_is_accepted(make_engine, serve, golden_voice):
    url = serve(make_engine(golden_default_voice=golden_voice))
    t = np.arange(8000 * 2) / 8000
    narrowband = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    t = np.arange(48000 * 2) / 48000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    for audio, rate in ((narrowband, 8000), (stereo.astype(np.float32), 48000)):
        payload = {"model": "chroma", "max_tokens": 2, "audio_format": "pcm16", "messages": [
            {"role": "user", "content": [{"type": "input_audio",
                                          "input_audio": {"data": b64_wav(audio, rate), "format": "wav"}}]}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["audio_format"] == "pcm16"
        assert len(base64.b64decode(r.json()["audio"])) == 2 * 2 * FRAME


def test_oversized_bodies_get_413(make_engine, serve, golden_voice):
    limit = 64 * 1024
    url = serve(make_engine(golden_default_voice=golden_voice), max_request_bytes=limit)
    big = short_request(user="x" * (2 * limit))
    # Content-Length announces it.
    assert_error(httpx.post(f"{url}/v1/chat/completions", json=big), 413, code="request_too_large")
    # Chunked upload without a length: counted as it arrives.
    payload = json.dumps(big).encode()
    chunks = (payload[i:i + 8192] for i in range(0, len(payload), 8192))
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert_error(r, 413, code="request_too_large")
    r = httpx.post(f"{url}/v1/voices", data={"name": "a", "transcript": "b"},
                   files={"file": ("big.wav", bytes(2 * limit))})
    assert_error(r, 413, code="request_too_large")
    # Just under the limit is fine.
    assert httpx.post(f"{url}/v1/chat/completions", json=short_request(user="x" * (limit // 2))).status_code == 200


def test_server_side_paths_only_inside_the_assets_folder(make_engine, serve, golden_voice, golden_dir, case,
                                                         tmp_path):
    assets, outside = tmp_path / "assets", tmp_path / "outside"
    assets.mkdir()
    outside.mkdir()
    shutil.copy(golden_dir / "user1.wav", assets / "question.wav")
    shutil.copy(golden_dir / "voice.wav", assets / "ref.wav")
    shutil.copy(golden_dir / "user1.wav", outside / "secret.wav")
    (assets / "link.wav").symlink_to(outside / "secret.wav")
    (assets / "sub").mkdir()
    shutil.copy(golden_dir / "user1.wav", assets / "sub" / "q.wav")
    url = serve(make_engine(golden_default_voice=golden_voice), assets_dir=assets)

    def ask(path, **extra):
        payload = {"model": "chroma", "max_tokens": 2, **extra,
                   "messages": [{"role": "user", "content": [{"type": "audio", "audio": path}]}]}
        return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=30)

    part = "messages[0].content[0]"
    assert ask("question.wav").status_code == 200
    assert ask("sub/q.wav").status_code == 200
    assert ask("question.wav", prompt_text=case["voice_text"], prompt_audio="ref.wav").status_code == 200
    for escape in ("../outside/secret.wav", "sub/../../outside/secret.wav", str(outside / "secret.wav"),
                   str(assets / "question.wav"), "link.wav"):
        assert_error(ask(escape), 400, part, "path_not_allowed")
    assert_error(ask("missing.wav"), 400, part, "audio_not_found")
    assert_error(ask("question.wav", prompt_text="x", prompt_audio="../outside/secret.wav"), 400, "prompt_audio",
                 "path_not_allowed")


# --- chroma-agent serve ---------------------------------------------------------------------------------


def test_serve_refuses_bad_flags_with_exit_2(tiny_dir, tmp_path, capsys):
    from chroma_agent.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = str(taken.getsockname()[1])
        for flags, message in [
            (["--port", "70000"], "--port"),
            (["--max-sessions", "0"], "--max-sessions"),
            (["--max-request-mb", "-1"], "--max-request-mb"),
            (["--assets-dir", str(tmp_path / "missing")], "--assets-dir"),
            (["--api-key", "short"], "--api-key"),
            (["--device", "cuda:7" if not torch_cuda() else "nonsense"], "--device"),
            (["--voices-dir", str(tmp_path), "--voice", "nobody"], "--voice"),
            (["--port", busy], "cannot listen"),
        ]:
            assert main(["serve", "--model", str(tiny_dir), *flags]) == 2, flags
            assert message in capsys.readouterr().err, flags


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_serve_command(tiny_dir, golden_voice, tmp_path):
    golden_voice.save(tmp_path / "voices")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = "serve-test-key-4242"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chroma_agent.cli", "serve", "--model", str(tiny_dir), "--port", str(port),
         "--voices-dir", str(tmp_path / "voices"), "--default-voice", "golden", "--max-sessions", "2"],
        env={**os.environ, "CHROMA_API_KEY": key}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _answers(f"{url}/health"), 60), "the server did not come up"
        assert httpx.get(f"{url}/health").json()["slots_total"] == 2
        assert httpx.post(f"{url}/v1/chat/completions", json=short_request()).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=short_request(return_audio=True),
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens_details"]["audio_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-2000:]
    assert "serving chroma-4b" in output and "voice golden" in output
    assert key not in output


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
