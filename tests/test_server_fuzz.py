"""Schemathesis against the server's own OpenAPI schema: no 5xx, responses as documented, nothing leaks."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

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
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {CHAT, "POST /v1/voices", "GET /v1/voices/{name}", "DELETE /v1/voices/{name}", "GET /health",
            "GET /metrics", "GET /v1/models"} <= labels, labels
    started = time.monotonic()
    for op in operations:
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
