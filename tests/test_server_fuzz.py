"""Fuzzing on 127.0.0.1, bounded in examples and time: schemathesis against the server's own OpenAPI schema (no
5xx, responses as documented, nothing leaks), with default and with tight limits, and malformed realtime events
(garbage, wrong types, huge fields, unknown types): each gets a client error and the session goes on."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import httpx
import pytest
import schemathesis
import websockets.sync.client as ws_client
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from chroma_agent.realtime_protocol import ClientEventType
from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 6}
CHAT = "POST /v1/chat/completions"
TIME_BUDGET_S = 60


@pytest.fixture()
def server(make_engine, golden_voice):
    # Replies are capped at 10 frames so that valid generated requests stay cheap.
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2, max_reply_s=0.8)
    with ServerThread(create_app(engine, ServerSettings(session_wait_s=5.0))) as running:
        yield engine, running.url


def fuzz(op, mode: GenerationMode) -> None:
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), served_model=st.booleans())
    def run(case, served_model):
        # Any `model` is served; half the valid chat requests still name the served one, as clients do.
        if op.label == CHAT and mode is GenerationMode.POSITIVE and served_model and isinstance(case.body, dict):
            case.body["model"] = "chroma"
        case.call_and_validate(checks=checks, timeout=30)

    run()


def test_fuzz_the_openapi_schema(server):
    engine, url = server
    _fuzz_every_operation(engine, url)


def test_fuzz_the_openapi_schema_against_tight_limits(make_engine, golden_voice):
    """Generated requests run into every request limit (messages, text, audio, body): 4xx, never 5xx."""
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2, max_reply_s=0.8)
    tight = ServerSettings(max_messages=2, max_turn_chars=24, max_request_chars=40, max_audio_seconds=0.5,
                           max_request_audio_seconds=0.8, max_request_bytes=64 * 1024)
    with ServerThread(create_app(engine, tight)) as running:
        _fuzz_every_operation(engine, running.url, only={CHAT, "POST /v1/voices"})


def _fuzz_every_operation(engine, url: str, only: set[str] | None = None) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {CHAT, "POST /v1/voices", "GET /v1/voices/{name}", "DELETE /v1/voices/{name}", "GET /health",
            "GET /metrics", "GET /v1/models"} <= labels, labels
    started = time.monotonic()
    for op in operations:
        if only is not None and op.label not in only:
            continue
        for mode in EXAMPLES:
            try:
                fuzz(op, mode)
            except Unsatisfiable:
                # No invalid request exists for an operation without input or with only a free-form path string.
                assert mode is GenerationMode.NEGATIVE and op.label != CHAT, op.label
            assert time.monotonic() - started < TIME_BUDGET_S, f"fuzzing ran over {TIME_BUDGET_S} s at {op.label}"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok"
    assert engine.free_slots == engine.config.max_sessions and engine.live_sessions == 0


# --- malformed realtime events -----------------------------------------------------------------------------------

_JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)
_CLIENT_TYPES = [getattr(ClientEventType, name) for name in dir(ClientEventType) if name.isupper()]
_FIELDS = ["event_id", "session", "item", "audio", "item_id", "content_index", "audio_end_ms", "response",
           "response_id", "previous_item_id"]
_SESSION_FIELDS = ["type", "instructions", "voice", "audio", "turn_detection", "modalities", "output_modalities",
                   "temperature", "max_output_tokens", "input_audio_format", "tools"]
_ITEM = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call"]) | _JSON_LEAF,
    "role": st.sampled_from(["user", "assistant", "system", "tool"]) | _JSON_LEAF,
    "id": st.text(max_size=80) | _JSON_LEAF,
    "content": st.lists(st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["input_text", "input_audio", "output_text", "audio", "input_image"]) | _JSON_LEAF,
        "text": _JSON_LEAF, "audio": st.sampled_from(["", "AAAA", "not base64!", "AAA"]) | _JSON_LEAF,
        "transcript": _JSON_LEAF}), max_size=3) | _JSON_LEAF})
_EVENT = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*_CLIENT_TYPES, "session.created", "unknown.event", ""]) | _JSON_LEAF,
    st.fixed_dictionaries({}, optional={
        "event_id": _JSON_LEAF, "session": st.dictionaries(st.sampled_from(_SESSION_FIELDS), _JSON, max_size=4),
        "item": _ITEM | _JSON, "audio": _JSON_LEAF, "item_id": _JSON_LEAF, "content_index": _JSON_LEAF,
        "audio_end_ms": _JSON_LEAF, "response": st.dictionaries(st.text(max_size=12), _JSON, max_size=4),
        "response_id": _JSON_LEAF, "previous_item_id": _JSON_LEAF,
        **{name: _JSON for name in ("extra", "type_")}}))
_PCM = base64.b64encode(bytes(4800)).decode()  # 100 ms of silence
#: Valid events of every kind; the fuzzer breaks one field of one of them at a time, so it reaches the handlers.
_TEMPLATES = [
    {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief.", "max_output_tokens": 2,
                                           "audio": {"input": {"turn_detection": None}, "output": {"voice": "alloy"}}}},
    {"type": "input_audio_buffer.append", "audio": _PCM},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hi"}]}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
                                                  "content": [{"type": "output_text", "text": "Hello"}]}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                  "content": [{"type": "input_audio", "audio": _PCM}]}},
    {"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 100},
    {"type": "conversation.item.delete", "item_id": "item_x"},
    {"type": "conversation.item.retrieve", "item_id": "item_x"},
    {"type": "response.create", "response": {"max_output_tokens": 2, "metadata": {"k": "v"}}},
    {"type": "response.cancel"},
]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _paths(inner, (*prefix, i))


def _break(template: dict, pick: int, replacement, drop: bool) -> dict:
    """The template with the field at one of its paths replaced by `replacement` (or removed)."""
    event = json.loads(json.dumps(template))
    paths = [p for p in _paths(event) if p]
    path = paths[pick % len(paths)]
    parent = event
    for key in path[:-1]:
        parent = parent[key]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return event


_BROKEN = st.builds(_break, st.sampled_from(_TEMPLATES), st.integers(0, 10**6), _JSON, st.booleans())
_MESSAGE = (_BROKEN.map(json.dumps) | st.sampled_from(_TEMPLATES).map(json.dumps) | _EVENT.map(json.dumps)
            | _JSON.map(json.dumps) | st.text(max_size=200) | st.binary(max_size=64))
#: One of each huge field (the server's message limit is 16 MiB; uvicorn's frame limit is above it).
_HUGE = [
    json.dumps({"type": "conversation.item.retrieve", "item_id": "x" * 100_000, "event_id": "e" * 100_000}),
    json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                              "content": [{"type": "input_text", "text": "w " * 200_000}]}}),
    json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(3_000_001)).decode()}),
    json.dumps({"type": "input_audio_buffer.append", "audio": "!" * 2_000_000}),
    json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "i" * 300_000}}),
    json.dumps({"type": "response.create", "response": {"metadata": {f"k{i}": "v" * 600 for i in range(40)}}}),
    json.dumps({"type": "session.update", "session": {"max_output_tokens": 10**30, "temperature": 1e308}}),
    json.dumps({"type": "conversation.item.truncate", "item_id": "x", "content_index": 10**30,
                "audio_end_ms": -(10**30)}),
    "[" * 100_000 + "]" * 100_000,
    '{"type": "session.update", "session": {"temperature": NaN}}',
    json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (17 * 1024 * 1024)}),
]


def _until_sentinel(ws, sentinel: str) -> list[dict]:
    events = []
    deadline = time.monotonic() + 30
    while True:
        event = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if event["type"] == "error" and event["error"]["event_id"] == sentinel:
            return events
        events.append(event)


def test_malformed_realtime_events_get_client_errors_and_the_session_goes_on(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2, max_reply_s=0.8)
    with ServerThread(create_app(engine, ServerSettings())) as running, \
            ws_client.connect(running.url.replace("http://", "ws://") + "/v1/realtime", max_size=None) as ws:
        json.loads(ws.recv(timeout=30))
        sent = [0]
        seen: Counter = Counter()
        started = time.monotonic()

        def check(message: str | bytes) -> None:
            sent[0] += 1
            sentinel = f"sentinel-{sent[0]}"
            ws.send(message)
            time.sleep(0.006)  # well under the 200 messages/s rate limit
            ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "no-such-item",
                                "event_id": sentinel}))
            for event in _until_sentinel(ws, sentinel):
                seen[event["type"] if event["type"] != "error" else "error:" + str(event["error"]["code"])] += 1
                if event["type"] == "error":
                    error = event["error"]
                    assert error["type"] == "invalid_request_error" and error["code"] != "server_error", error
            assert time.monotonic() - started < TIME_BUDGET_S, "realtime fuzzing ran over its budget"

        for message in _HUGE:
            check(message)

        @settings(max_examples=400, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(message=_MESSAGE)
        def run(message):
            check(message)

        run()
        # The same session still holds a conversation.
        ws.send(json.dumps({"type": "response.cancel"}))
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}}))
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2,
                                                                    "output_modalities": ["text"]}}))
        while (event := json.loads(ws.recv(timeout=30)))["type"] != "response.done":
            assert event["type"] != "error" or event["error"]["code"] in (
                "response_cancel_not_active", "conversation_already_has_active_response"), event
        assert sent[0] > 400
        assert len(seen) >= 15, seen  # the examples reached many handlers, not one validation error
    deadline = time.monotonic() + 5
    while engine.free_slots != engine.config.max_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.free_slots == engine.config.max_sessions and engine.live_sessions == 0
