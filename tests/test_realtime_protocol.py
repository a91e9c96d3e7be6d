"""chroma_agent.realtime_protocol on its own: every server event the server builds parses into its typed model (in
both dialects), and the usage and status mappings invert each other."""

from __future__ import annotations

import json

import pytest

from chroma_agent.engine.events import Usage
from chroma_agent.realtime_protocol import (
    SERVER_EVENT_MODELS,
    ErrorCode,
    ProtocolError,
    ResponseBody,
    ServerEvent,
    ServerEvents,
    ServerEventType,
    parse_client_event,
    parse_server_event,
    response_status,
)


def every_server_event(ev: ServerEvents) -> list[dict]:
    """One of each event the server sends, built the way the server builds them."""
    item = ev.message_item("item_1", "assistant", [ev.assistant_audio_content("hello")])
    response = ev.response("resp_1", output=[item], usage=ev.usage_of(Usage(10, 5, 3, 7, audio_prompt_tokens=4)))
    session = ev.session(session_id="sess_1", model="chroma", instructions="be brief", voice="anna",
                         turn_detection=None, max_output_tokens="inf", temperature=0.5)
    built = [
        ev.error("bad", code=ErrorCode.INVALID_VALUE, param="session.voice", event_id="event_9"),
        ev.session_created(session), ev.session_updated(session),
        ev.input_audio_buffer_committed("item_0", None), ev.input_audio_buffer_cleared(),
        ev.speech_started("item_0", 120), ev.speech_stopped("item_0", 900),
        ev.item_added(item, "item_0"), ev.item_done(item, "item_0"), ev.item_truncated("item_1", 0, 400),
        ev.item_deleted("item_1"), ev.item_retrieved(item), ev.response_created(response),
        ev.output_item_added("resp_1", item), ev.content_part_added("resp_1", "item_1"),
        ev.audio_delta("resp_1", "item_1", b"\x01\x00" * 4), ev.transcript_delta("resp_1", "item_1", "he"),
        ev.audio_done("resp_1", "item_1"), ev.transcript_done("resp_1", "item_1", "hello"),
        ev.text_delta("resp_1", "item_1", "he"), ev.text_done("resp_1", "item_1", "hello"),
        ev.content_part_done("resp_1", "item_1", "hello"), ev.output_item_done("resp_1", item),
        ev.response_done(response),
    ]
    return [e for e in built if e is not None]  # beta has no conversation.item.done


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_every_server_event_parses_into_its_typed_model(dialect):
    seen = set()
    for event in every_server_event(ServerEvents(dialect)):
        parsed = parse_server_event(json.dumps(event))
        assert parsed.type in SERVER_EVENT_MODELS, event["type"]
        assert type(parsed) is SERVER_EVENT_MODELS[parsed.type]
        seen.add(parsed.type)
        # nothing the server sent is lost by the model
        assert parsed.model_dump(exclude={"type"}, exclude_unset=True) | {"type": event["type"]} == event
    names = {v for k, v in vars(ServerEventType).items() if k.isupper()}
    assert seen == names - ({ServerEventType.CONVERSATION_ITEM_DONE} if dialect == "beta" else set())
    assert set(SERVER_EVENT_MODELS) == names


def test_typed_bodies_answer_what_a_client_asks():
    ev = ServerEvents("ga")
    item = ev.message_item("item_1", "assistant", [ev.assistant_audio_content("the kept words")])
    usage = Usage(prompt_tokens=10, cached_tokens=5, text_tokens=3, audio_frames=7, audio_prompt_tokens=4)
    for reason in ("completed", "max_frames", "cancelled"):
        status, details = response_status(reason=reason)
        body = ResponseBody.model_validate(ev.response("resp_1", status=status, status_details=details,
                                                       output=[item], usage=ev.usage_of(usage)))
        assert body.engine_reason() == reason and body.failure() is None
        assert body.transcript() == "the kept words"
        assert Usage(**body.usage.counts()) == usage  # the server's usage and the client's are one mapping
    status, details = response_status(reason=None, failure="out of memory")
    failure = ResponseBody.model_validate(ev.response("resp_2", status=status, status_details=details)).failure()
    assert failure.message == "out of memory" and failure.code == "engine_error"
    assert response_status(reason="completed", cancelled=True, cancel_reason="turn_detected") == (
        "cancelled", {"type": "cancelled", "reason": "turn_detected"})


def test_unknown_and_broken_server_events():
    assert type(parse_server_event({"type": "rate_limits.updated", "rate_limits": []})) is ServerEvent
    for raw in ("not json", json.dumps([1]), json.dumps({"type": "response.done", "response": {}})):
        with pytest.raises(ProtocolError) as caught:
            parse_server_event(raw)
        assert caught.value.code in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_EVENT)


@pytest.mark.parametrize("temperature", [-0.1, 2.01, float("nan")])
def test_the_protocol_temperature_is_the_engines_rule(temperature):
    event = {"type": "session.update", "session": {"temperature": temperature}}
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(event)
    assert caught.value.code == ErrorCode.INVALID_VALUE and caught.value.param == "session.temperature"
    assert "[0, 2]" in caught.value.message


def test_session_rules():
    from chroma_agent.realtime_protocol import (
        DEFAULT_TURN_DETECTION,
        AudioFormat,
        TurnDetection,
        dialect_of,
        max_frames,
        output_modality,
        peek_event_id,
        turn_detection_config,
    )

    assert dialect_of("realtime=v1", []) == "beta" and dialect_of(None, ["openai-beta.realtime-v1"]) == "beta"
    assert dialect_of("other=1", ["realtime"]) == "ga"
    assert output_modality(["audio", "text"], "m", None) == "audio" and output_modality(["text"], "m", None) == "text"
    assert output_modality(None, "m", None) is None
    with pytest.raises(ProtocolError) as caught:
        output_modality(["video"], "session.output_modalities", "e1")
    assert caught.value.param == "session.output_modalities" and caught.value.event_id == "e1"
    assert max_frames(None, 375) == 375 and max_frames("inf", 375) is None and max_frames(12, 375) == 12
    assert turn_detection_config(TurnDetection(type="none"), "td", None) is None
    completed = turn_detection_config(TurnDetection(type="server_vad", silence_duration_ms=400), "td", None)
    assert completed == {**DEFAULT_TURN_DETECTION, "silence_duration_ms": 400}
    with pytest.raises(ProtocolError):
        turn_detection_config(TurnDetection(type="magic_vad"), "td", None)
    from chroma_agent.realtime_protocol import check_format

    check_format(AudioFormat(type="audio/pcm", rate=24000), "f", None)
    with pytest.raises(ProtocolError) as caught:
        check_format(AudioFormat(type="audio/pcm", rate=16000), "session.audio.input.format", None)
    assert caught.value.code == ErrorCode.UNSUPPORTED_AUDIO_FORMAT
    assert peek_event_id('{"event_id": "abc", "type": "x"}') == "abc"
    assert peek_event_id('{"type": "x", "event_id": "abc", "audio": "') == "abc"  # cut off: found by scanning
    assert peek_event_id("[]") is None
