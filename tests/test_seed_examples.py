"""FlashLabs' API examples (the seed's README: curl, Python `requests`, the `openai` SDK) work unchanged.

They run against `chroma-agent serve --model tiny --voice-audio X --voice-text "..." --assets-dir DIR` started as a
user would start it (a subprocess: real uvicorn on 127.0.0.1), with their requests in FlashLabs' shapes: the same
fields, `model: "chroma"`, audio named by the paths FlashLabs uses (`assets/question_audio.wav`,
`assets/ref_audio.wav`, which resolve inside DIR), `prompt_audio` as a path or as base64, `extra_body` for the SDK,
and a request with no voice prompt at all, which FlashLabs answers with its default prompt and this server with the
default voice cloned at start. Only the port differs (a free one, not 8000).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import soundfile as sf
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
PROMPT_TEXT = "Hello, this is the voice to clone."


def question(with_text: bool = False) -> dict:
    parts = [{"type": "audio", "audio": "assets/question_audio.wav"}]
    if with_text:
        parts.insert(0, {"type": "text", "text": "Please respond to my question."})
    return {"role": "user", "content": parts}


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def server(tmp_path_factory, golden_dir, case):
    """`chroma-agent serve` as the Done-when of issue 9 starts it; yields (base URL, a function giving its log)."""
    root = tmp_path_factory.mktemp("flashlabs")
    (root / "assets").mkdir()
    shutil.copy(golden_dir / "user1.wav", root / "assets" / "question_audio.wav")
    shutil.copy(golden_dir / "voice.wav", root / "assets" / "ref_audio.wav")
    shutil.copy(golden_dir / "voice.wav", root / "default_voice.wav")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root / "home"), "CHROMA_VOICES_DIR": str(root / "voices")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "chroma-agent"), "serve", "--model", "tiny", "--port", str(port),
         "--voice-audio", str(root / "default_voice.wav"), "--voice-text", case["voice_text"],
         "--assets-dir", str(root)],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve did not come up within 120 s"
        time.sleep(0.2)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    yield url, root, log
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    reader.join(10)
    assert proc.returncode == 0, "".join(log)[-3000:]


def voice_of(log: list[str], request_id: str) -> str:
    """The voice the server's log says request `request_id` spoke with."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in list(log):
            if request_id in line and "(voice " in line:
                return line.split("(voice ", 1)[1].split(")", 1)[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line names the voice of {request_id}:\n{''.join(log)[-2000:]}")


def wav_seconds(data_b64: str) -> float:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(data_b64)), dtype="float32")
    assert rate == 24000 and audio.ndim == 1 and np.isfinite(audio).all()
    return len(audio) / rate


def check_reply(result: dict) -> None:
    # The reply names the model that answered: the request's name or the served id.
    assert result["object"] == "chat.completion" and result["model"] in ("chroma", "chroma-4b")
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    # max_tokens 1000 is cut to what the tiny model may say (5 s: random weights never stop by themselves).
    assert 0 < wav_seconds(result["audio"]) <= 5.0


def test_health_and_models_as_flashlabs_checks_them(server):
    url, _, _ = server
    for path, key in (("/health", "status"), ("/v1/models", "data")):
        result = subprocess.run(["curl", "-sS", f"{url}{path}"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert key in json.loads(result.stdout)
    assert json.loads(subprocess.run(["curl", "-sS", f"{url}/health"], capture_output=True, text=True,
                                     timeout=30).stdout)["model_loaded"] is True


def test_curl_example(server):
    url, root, log = server
    body = json.dumps({
        "model": "chroma", "messages": [SYSTEM, question()], "prompt_text": PROMPT_TEXT,
        "prompt_audio": "assets/ref_audio.wav", "max_tokens": 1000, "temperature": 1.0, "return_audio": True,
    }, indent=2)
    result = subprocess.run(["curl", "-sS", "-D", "headers.txt", "-X", "POST", f"{url}/v1/chat/completions",
                             "-H", "Content-Type: application/json", "-d", body], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check_reply(json.loads(result.stdout))
    request_id = next(line.split(":", 1)[1].strip() for line in (root / "headers.txt").read_text().splitlines()
                      if line.lower().startswith("x-request-id:"))
    assert voice_of(log, request_id).startswith("voice-")  # cloned from the request's prompt


def test_python_requests_example(server):
    url, root, log = server
    with open(root / "assets" / "ref_audio.wav", "rb") as f:
        prompt_audio_base64 = base64.b64encode(f.read()).decode("utf-8")
    payload = {
        "model": "chroma", "messages": [SYSTEM, question(with_text=True)], "prompt_text": PROMPT_TEXT,
        "prompt_audio": prompt_audio_base64, "max_tokens": 1000, "temperature": 1.0, "return_audio": True,
    }
    response = requests.post(f"{url}/v1/chat/completions", json=payload,
                             headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    check_reply(response.json())
    assert voice_of(log, response.headers["x-request-id"]).startswith("voice-")


def test_a_request_without_a_voice_prompt_speaks_with_the_default_voice(server):
    url, _, log = server
    payload = {"model": "chroma", "messages": [SYSTEM, question()], "max_tokens": 1000, "temperature": 1.0,
               "return_audio": True}
    response = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    check_reply(response.json())
    assert voice_of(log, response.headers["x-request-id"]) == "default"  # --voice-audio, cloned at start


def test_openai_sdk_example_with_extra_body(server):
    url, _, log = server
    client = OpenAI(api_key="dummy", base_url=f"{url}/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chroma", messages=[SYSTEM, question()],
        extra_body={"prompt_text": PROMPT_TEXT, "prompt_audio": "assets/ref_audio.wav", "return_audio": True},
    )
    response = raw.parse()
    assert voice_of(log, raw.headers["x-request-id"]).startswith("voice-")
    assert response.choices[0].message.role == "assistant"
    assert 0 < wav_seconds(response.model_extra["audio"]) <= 5.0
    assert "Generated audio" not in (response.choices[0].message.content or "")  # the real transcript
