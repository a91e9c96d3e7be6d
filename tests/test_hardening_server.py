"""Hostile and careless clients at the connection level: secrets out of logs, docs behind the key, slow or
oversized headers, connection floods, clean WebSocket refusals. Real uvicorn servers on 127.0.0.1 only; every
flood is bounded in count and time."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import InvalidStatus

from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.security import REDACTED, redact
from chroma_agent.server.settings import ServerSettings

KEY = "live-key-5f2a9c7e31"
WRONG = "wrong-key-8d4b6a0f17"
OTHER_WRONG = "another-wrong-3c9e1f"
HANDSHAKE_ERROR = "ASGI callable returned without completing handshake"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"the server at {url} did not come up within {timeout} s")


def _every_kind_of_request(url: str) -> dict[str, int]:
    """Authenticated and rejected requests of every kind; returns what each got (status or 101)."""
    ws_url = url.replace("http://", "ws://") + "/v1/realtime"
    got: dict[str, int] = {}
    short = {"model": "chroma", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    http_cases = {
        "bearer": ("GET", "/v1/models", {"Authorization": f"Bearer {KEY}"}, None),
        "api-key header": ("GET", "/v1/voices", {"api-key": KEY}, None),
        "chat with bearer": ("POST", "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}, short),
        "schema with key": ("GET", "/openapi.json", {"api-key": KEY}, None),
        "query key (HTTP takes headers only)": ("GET", f"/v1/models?api-key={KEY}", {}, None),
        "query key, percent-encoded name": ("GET", f"/v1/models?api%2Dkey={KEY}&x=1", {}, None),
        "query key, underscore": ("POST", f"/v1/chat/completions?api_key={KEY}", {}, short),
        "wrong bearer": ("GET", "/v1/models", {"Authorization": f"Bearer {WRONG}"}, None),
        "wrong api-key header": ("GET", "/v1/models", {"api-key": WRONG}, None),
        "wrong query key": ("GET", f"/docs?api-key={WRONG}", {}, None),
        "no key": ("GET", "/openapi.json", {}, None),
    }
    for name, (method, path, headers, body) in http_cases.items():
        got[name] = httpx.request(method, url + path, headers=headers, json=body, timeout=30).status_code
    ws_cases = {
        "ws query key": (f"{ws_url}?api-key={KEY}", {}, None),
        "ws bearer": (ws_url, {"Authorization": f"Bearer {KEY}"}, None),
        "ws api-key header": (ws_url, {"api-key": KEY}, None),
        "ws subprotocol key": (ws_url, {}, ["realtime", f"openai-insecure-api-key.{KEY}"]),
        "ws wrong query key": (f"{ws_url}?api-key={WRONG}", {}, None),
        "ws wrong bearer": (ws_url, {"Authorization": f"Bearer {WRONG}"}, None),
        "ws wrong subprotocol key": (ws_url, {}, ["realtime", f"openai-insecure-api-key.{OTHER_WRONG}"]),
    }
    for name, (target, headers, subprotocols) in ws_cases.items():
        try:
            with ws_client.connect(target, additional_headers=headers, subprotocols=subprotocols,
                                   open_timeout=10) as ws:
                json.loads(ws.recv(timeout=10))  # session.created (or an error when no voice): it is open
                got[name] = 101
        except InvalidStatus as exc:
            got[name] = exc.response.status_code
    return got


EXPECTED = {
    "bearer": 200, "api-key header": 200, "chat with bearer": 200, "schema with key": 200,
    "query key (HTTP takes headers only)": 401, "query key, percent-encoded name": 401,
    "query key, underscore": 401, "wrong bearer": 401, "wrong api-key header": 401, "wrong query key": 401,
    "no key": 401, "ws query key": 101, "ws bearer": 101, "ws api-key header": 101, "ws subprotocol key": 101,
    "ws wrong query key": 401, "ws wrong bearer": 401, "ws wrong subprotocol key": 401,
}


def _assert_no_secret(log_text: str) -> None:
    for secret in (KEY, WRONG, OTHER_WRONG):
        lines = [line for line in log_text.splitlines() if secret in line]
        assert not lines, f"{secret} reached the log: {lines[:3]}"


def test_serve_logs_no_key_for_any_request(tiny_dir, golden_voice, tmp_path):
    """`chroma-agent serve` as an operator runs it: uvicorn's access and error logs, ours, all on its output."""
    golden_voice.save(tmp_path / "voices")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chroma_agent.cli", "-v", "serve", "--model", str(tiny_dir), "--port", str(port),
         "--voices-dir", str(tmp_path / "voices"), "--default-voice", "golden", "--max-sessions", "2",
         "--header-timeout-s", "5", "--max-header-kb", "16", "--max-connections", "500"],
        env={**os.environ, "CHROMA_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(url, 90)
        got = _every_kind_of_request(url)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # the flags reached the server
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Filler: " + b"a" * 20_000 + b"\r\n")
            assert b"larger than 16384 bytes" in _read_all(sock, 5)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert got == EXPECTED
    _assert_no_secret(output)
    # The log did record these requests (so the grep above looked at real lines), with the secrets redacted.
    assert f'"GET /v1/models?api-key={REDACTED} HTTP/1.1" 401' in output
    assert f"/v1/models?api%2Dkey={REDACTED}&x=1" in output
    assert f'"WebSocket /v1/realtime?api-key={REDACTED}" [accepted]' in output
    assert f'"WebSocket /v1/realtime?api-key={REDACTED}" 401' in output
    assert output.count('"GET /v1/models HTTP/1.1" 401') == 2
    assert HANDSHAKE_ERROR not in output and "Traceback" not in output


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("httpx", "httpcore")):  # the test's own client, not the server
            return
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _captured(*names: str) -> Iterator[_Capture]:
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        yield capture
    finally:
        for logger in loggers:
            logger.removeHandler(capture)


def test_debug_logging_redacts_headers_and_subprotocols(make_engine, golden_voice):
    # At debug level websockets logs every request header ("< Authorization: Bearer ..."); uvicorn logs
    # the request line. Our own loggers propagate to the root.
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2)
    # Built before the capture starts: uvicorn.Config replaces the handlers of its loggers.
    server = ServerThread(create_app(engine, ServerSettings(api_key=KEY)), log_level="debug")
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        with _captured("uvicorn.error", "uvicorn.access", "") as capture, server:
            got = _every_kind_of_request(server.url)
    finally:
        root.setLevel(old_level)
    assert got == EXPECTED
    text = "\n".join(capture.lines)
    _assert_no_secret(text)
    assert f"Authorization: Bearer {REDACTED}" in text  # websockets' header dump was captured, redacted
    assert f"openai-insecure-api-key.{REDACTED}" in text
    assert HANDSHAKE_ERROR not in text


def test_redact_finds_keys_wherever_they_appear():
    secrets = frozenset({KEY})
    cases = {
        f"GET /v1/realtime?model=x&api-key={WRONG}&voice=y": f"GET /v1/realtime?model=x&api-key={REDACTED}&voice=y",
        f"/x?API_KEY={WRONG}": f"/x?API_KEY={REDACTED}",
        f"/x?api%2dkey={WRONG}": f"/x?api%2dkey={REDACTED}",
        f"/x?authorization=Bearer%20{WRONG}": f"/x?authorization={REDACTED}",
        f"< Authorization: Bearer {WRONG}": f"< Authorization: Bearer {REDACTED}",
        f"api-key: {WRONG}": f"api-key: {REDACTED}",
        f"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.{WRONG}":
            f"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.{REDACTED}",
        f"free text with {KEY} in it": f"free text with {REDACTED} in it",
        "serving chroma-4b (API key required)": "serving chroma-4b (API key required)",
        "/v1/models?model=chroma&stream=true": "/v1/models?model=chroma&stream=true",
    }
    for text, expected in cases.items():
        assert redact(text, secrets) == expected


def test_tracebacks_are_redacted_too():
    from chroma_agent.server.security import install_log_redaction

    install_log_redaction(KEY)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"bad request line GET /v1/realtime?api-key={WRONG} with {KEY}")
        except RuntimeError:
            logger.exception("Exception in ASGI application")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "RuntimeError" in text and REDACTED in text
    _assert_no_secret(text)


def test_docs_follow_the_api_key_rule_and_can_be_turned_off(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    with ServerThread(create_app(engine, ServerSettings(api_key=KEY))) as keyed:
        for path in ("/docs", "/redoc", "/openapi.json"):
            refused = httpx.get(keyed.url + path)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        schema = httpx.get(keyed.url + "/openapi.json", headers={"api-key": KEY}).json()
        assert "/v1/chat/completions" in schema["paths"] and "/docs" not in schema["paths"]
        assert httpx.get(keyed.url + "/health").status_code == 200  # still open, as documented
    with ServerThread(create_app(engine, ServerSettings())) as open_server:  # no key: open, like the API
        assert httpx.get(open_server.url + "/openapi.json").status_code == 200
        assert "swagger" in httpx.get(open_server.url + "/docs").text.lower()
    with ServerThread(create_app(engine, ServerSettings(api_key=KEY, docs=False))) as no_docs:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(no_docs.url + path, headers={"api-key": KEY}).status_code == 404


# --- connections -------------------------------------------------------------------------------------------


def _flood_size(wanted: int) -> int:
    # Each connection costs two descriptors in this process (client and server end); keep far from the limit.
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(50, min(wanted, (soft - 256) // 2))


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_connections_that_never_finish_their_headers_are_closed(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    timeout_s = 1.5
    count = _flood_size(1000)
    settings = ServerSettings(header_timeout_s=timeout_s, max_connections=count + 100)
    with ServerThread(create_app(engine, settings)) as server:
        socks = []
        try:
            for k in range(count):
                sock = socket.create_connection((server.host, server.port), timeout=5)
                # Half the flood sends nothing, half a request line and one header, never the blank line.
                if k % 2:
                    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                socks.append(sock)
            opened = time.monotonic()
            # While they hang, the server answers everyone else at once.
            t0 = time.perf_counter()
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 1.0
            # A keep-alive connection that starts its next request and stalls is timed out as well.
            keep = socket.create_connection((server.host, server.port), timeout=5)
            keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert keep.recv(65536).startswith(b"HTTP/1.1 200")
            keep.sendall(b"GET /health HTTP/1.1\r\n")
            socks.append(keep)
            answers = [_read_all(sock, timeout_s + 10) for sock in socks]
            elapsed = time.monotonic() - opened
        finally:
            for sock in socks:
                sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout") for a in answers), {a[:40] for a in answers}
    assert b"header_timeout_s" in answers[0]
    assert elapsed < timeout_s + 8, elapsed  # all closed by the deadline, not left open


def test_oversized_headers_get_431(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    with ServerThread(create_app(engine, ServerSettings(max_header_bytes=8 * 1024))) as server:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(OSError):  # the server may close while we still write
                for _ in range(100):
                    sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
            answer = _read_all(sock, 5)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert b"max_header_bytes" in answer
        # Headers under the limit, and a body far larger than it, are fine.
        assert httpx.get(f"{server.url}/health", headers={"X-Big": "b" * 4000}).status_code == 200
        r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{" + b" " * 200_000 + b"}",
                       headers={"content-type": "application/json"})
        assert r.status_code == 400


def test_connections_beyond_max_connections_get_503_at_once(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    with ServerThread(create_app(engine, ServerSettings(max_connections=20, header_timeout_s=2.0))) as server:
        idle = [socket.create_connection((server.host, server.port), timeout=5) for _ in range(20)]
        try:
            time.sleep(0.2)  # let the server accept them all
            t0 = time.perf_counter()
            r = httpx.get(f"{server.url}/health", timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
            assert "max_connections" in r.json()["error"]["message"]
            assert time.perf_counter() - t0 < 1.0
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_serve_refuses_bad_hardening_flags_with_exit_2(tiny_dir, capsys):
    from chroma_agent.cli import main

    # The messages name the flag and its variable (chroma_agent.config), as every bad setting's does.
    for flags, message in ((["--header-timeout-s", "0"], "CHROMA_HEADER_TIMEOUT_S / --header-timeout-s"),
                           (["--max-header-kb", "0"], "CHROMA_MAX_HEADER_KB / --max-header-kb"),
                           (["--max-connections", "-1"], "CHROMA_MAX_CONNECTIONS / --max-connections"),
                           (["--max-audio-samples", "0"], "CHROMA_MAX_AUDIO_SAMPLES / --max-audio-samples")):
        assert main(["serve", "--model", str(tiny_dir), *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_connection_settings_are_validated():
    for bad in ({"header_timeout_s": 0}, {"max_header_bytes": 10}, {"max_connections": 0}):
        with pytest.raises(ValueError):
            ServerSettings(**bad)


def test_refused_websockets_log_no_error(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    # Captured from after the server is built: uvicorn.Config replaces the handlers of its loggers.
    server = ServerThread(create_app(engine, ServerSettings(api_key=KEY)), log_level="info")
    with _captured("uvicorn.error") as capture, server:
        ws_url = server.url.replace("http://", "ws://") + "/v1/realtime"
        for _ in range(5):
            with pytest.raises(InvalidStatus) as info:
                ws_client.connect(f"{ws_url}?api-key={WRONG}", open_timeout=5)
            assert info.value.response.status_code == 401
            assert json.loads(info.value.response.body)["error"]["code"] == "invalid_api_key"
    errors = [line for line in capture.lines if line.startswith("ERROR")]
    assert not errors, errors
    assert sum('" 401' in line for line in capture.lines) == 5  # the refusals were logged, at info

