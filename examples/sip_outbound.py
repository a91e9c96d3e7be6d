"""Call a phone number with Chroma on the line: ``python examples/sip_outbound.py +15105550123 --voice anna``.

Two LiveKit API calls place the call:

1. ``CreateDispatch`` sends the ``chroma`` agent (the packaged worker started with ``--agent-name chroma``, or
   ``examples/sip_inbound/agent.py``) into a new room, with the call's voice, instructions and the number as
   its job metadata (the worker's per-call JSON, see ``chroma_agent.worker_config.CallSettings``);
2. ``CreateSIPParticipant`` dials the number through your outbound SIP trunk into the same room and waits
   until the callee answers (or fails: busy, no answer, rejected).

If the call cannot be placed the room is deleted, so the agent does not wait in an empty room.

Environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, SIP_OUTBOUND_TRUNK_ID (an outbound trunk of
your LiveKit project, ``ST_...``); optional CHROMA_AGENT_NAME (default ``chroma``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from livekit import api

AGENT_NAME = "chroma"
DEFAULT_INSTRUCTIONS = (
    "You are calling the person on the phone on behalf of our support team. Introduce yourself, say why you "
    "are calling, keep every answer short and speak naturally."
)
DEFAULT_GREETING = "The person you called has just answered. Greet them and say who you are."
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# The worker's voice-name rule (chroma_agent.voices.validate_voice_name), without importing torch here.
VOICE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(?<!\.)$")
RINGING_TIMEOUT_S = 30
MAX_CALL_DURATION_S = 30 * 60

ENV_HELP = (
    "environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET, SIP_OUTBOUND_TRUNK_ID; optional "
    "CHROMA_AGENT_NAME (default chroma)"
)


class CallError(RuntimeError):
    """The call could not be placed; the message says why (safe to print: no secrets)."""


class SettingsError(CallError):
    """A required environment variable is missing."""


@dataclass(frozen=True)
class PlacedCall:
    room: str
    dispatch_id: str
    participant_identity: str
    sip_call_id: str


def normalize_number(number: str) -> str:
    """``number`` in E.164 form (``+15105550123``); spaces, dashes, dots and brackets are dropped."""
    cleaned = re.sub(r"[\s().-]", "", number or "")
    if cleaned.startswith("00"):
        cleaned = "+" + cleaned[2:]
    if not E164.match(cleaned):
        raise ValueError(f"{number!r} is not a phone number in international form (e.g. +15105550123)")
    return cleaned


def room_for(number: str) -> str:
    """A new room per call: ``call-<digits>-<random>`` (two calls to one number never share a room)."""
    return f"call-{number.lstrip('+')}-{secrets.token_hex(4)}"


def call_metadata(number: str, *, voice: str | None, instructions: str | None,
                  greeting: str | None = DEFAULT_GREETING) -> str:
    """The job metadata: the worker's per-call settings (voice, instructions, greeting) and the number called.

    ``phone_number`` is not a worker setting (the worker ignores unknown keys); agents that want it read it.
    """
    data: dict[str, str] = {"phone_number": number}
    if voice:
        data["voice"] = voice
    if instructions:
        data["instructions"] = instructions
    if greeting:
        data["greeting"] = greeting
    return json.dumps(data)


def build_dispatch_request(room: str, number: str, *, voice: str | None, instructions: str | None = None,
                           agent_name: str = AGENT_NAME) -> api.CreateAgentDispatchRequest:
    """Send the agent named `agent_name` into `room` with this call's settings as its job metadata."""
    return api.CreateAgentDispatchRequest(
        agent_name=agent_name, room=room,
        metadata=call_metadata(number, voice=voice, instructions=instructions or DEFAULT_INSTRUCTIONS),
    )


def build_sip_participant_request(room: str, number: str, *, trunk_id: str,
                                  caller_id: str | None = None) -> api.CreateSIPParticipantRequest:
    """Dial `number` through outbound trunk `trunk_id` into `room`; the request returns once answered."""
    if not trunk_id.strip():
        raise ValueError("no outbound trunk: set SIP_OUTBOUND_TRUNK_ID (an ST_... id of your project)")
    request = api.CreateSIPParticipantRequest(
        sip_trunk_id=trunk_id.strip(),
        sip_call_to=number,
        room_name=room,
        participant_identity=f"sip_{number}",
        participant_name="Phone callee",
        wait_until_answered=True,
        play_dialtone=False,
    )
    if caller_id:
        request.sip_number = caller_id  # the number shown to the callee; must belong to the trunk
    request.ringing_timeout.seconds = RINGING_TIMEOUT_S
    request.max_call_duration.seconds = MAX_CALL_DURATION_S
    return request


async def place_call(lkapi: api.LiveKitAPI, number: str, *, trunk_id: str, voice: str | None = None,
                     instructions: str | None = None, agent_name: str = AGENT_NAME,
                     caller_id: str | None = None, room: str | None = None) -> PlacedCall:
    """Dispatch the agent, then dial; on a failed dial the room is deleted and :class:`CallError` raised."""
    number = normalize_number(number)
    room = room or room_for(number)
    dispatch = await lkapi.agent_dispatch.create_dispatch(
        build_dispatch_request(room, number, voice=voice, instructions=instructions, agent_name=agent_name))
    request = build_sip_participant_request(room, number, trunk_id=trunk_id, caller_id=caller_id)
    try:
        participant = await lkapi.sip.create_sip_participant(request)
    except api.SipCallError as exc:
        await _delete_room_quietly(lkapi, room)
        status = exc.message
        if exc.sip_status_code:
            status = f"{exc.sip_status_code} {exc.sip_status or ''}".strip()
        raise CallError(f"the call to {number} failed: {status}") from exc
    except api.ServerError as exc:
        await _delete_room_quietly(lkapi, room)
        raise CallError(f"LiveKit refused the call to {number}: {exc.code}: {exc.message}") from exc
    return PlacedCall(room=room, dispatch_id=dispatch.id, sip_call_id=participant.sip_call_id,
                      participant_identity=participant.participant_identity)


async def _delete_room_quietly(lkapi: api.LiveKitAPI, room: str) -> None:
    with contextlib.suppress(api.ServerError):  # the room may never have been created
        await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sip_outbound.py", description="Call a phone number with the Chroma agent on the line.",
        epilog=ENV_HELP)
    parser.add_argument("number", help="phone number to call, international form (+15105550123)")
    parser.add_argument("--voice", help="stored voice the agent speaks with (default: the worker's default)")
    parser.add_argument("--instructions", help="system prompt for this call")
    parser.add_argument("--caller-id", help="number shown to the callee (one of the trunk's numbers)")
    parser.add_argument("--room", help="room name (default: call-<number>-<random>)")
    return parser


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> PlacedCall:
    missing = [v for v in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "SIP_OUTBOUND_TRUNK_ID")
               if not env.get(v, "").strip()]
    if missing:
        raise SettingsError(f"{', '.join(missing)} not set ({ENV_HELP})")
    async with api.LiveKitAPI(env["LIVEKIT_URL"], env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) as lkapi:
        return await place_call(lkapi, args.number, trunk_id=env["SIP_OUTBOUND_TRUNK_ID"], voice=args.voice,
                                instructions=args.instructions,
                                agent_name=env.get("CHROMA_AGENT_NAME") or AGENT_NAME,
                                caller_id=args.caller_id, room=args.room)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Exit code 0: answered; 1: the call failed; 2: bad arguments or settings."""
    args = build_parser().parse_args(argv)
    try:
        normalize_number(args.number)
        if args.voice and not VOICE_NAME.match(args.voice):
            raise ValueError(f"--voice {args.voice!r} is not a voice name (A-Z, a-z, 0-9, '_', '.', '-')")
    except ValueError as exc:
        print(f"sip_outbound.py: error: {exc}", file=sys.stderr)
        return 2
    try:
        call = asyncio.run(run(args, os.environ if env is None else env))
    except SettingsError as exc:
        print(f"sip_outbound.py: error: {exc}", file=sys.stderr)
        return 2
    except CallError as exc:
        print(f"sip_outbound.py: {exc}", file=sys.stderr)
        return 1
    print(f"answered: room {call.room}, participant {call.participant_identity}, "
          f"SIP call {call.sip_call_id}, dispatch {call.dispatch_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
