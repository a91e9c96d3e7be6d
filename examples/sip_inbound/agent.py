"""A phone agent: Chroma answers the calls ``dispatch_rule.json`` routes to it. Run ``python agent.py dev``.

* greets the caller by the number they call from (the SIP participant's ``sip.phoneNumber`` attribute);
* takes its voice, instructions and greeting from the room metadata the dispatch rule sets (the worker's
  per-call JSON, see ``chroma_agent.worker_config.CallSettings``), or from ``sip_outbound.py``'s job metadata;
* keypad (DTMF): ``0`` transfers the caller to a human at ``SIP_TRANSFER_TO``, ``#`` hangs up, other digits
  are told to the model as "the caller pressed N" (for spoken menus);
* hangs up by removing the phone participant and deleting the room (the agent's job ends with the room).

Environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET; CHROMA_MODEL (default FlashLabs/Chroma-4B);
optional CHROMA_AGENT_NAME (default ``chroma``: must match the dispatch rule), SIP_TRANSFER_TO
(``+15105550100``, ``tel:...`` or ``sip:...``), and the packaged worker's CHROMA_* settings (CHROMA_VOICE: the
default voice, CHROMA_VOICES_DIR, CHROMA_DEVICE, CHROMA_INSTRUCTIONS, ...; see ``chroma-agent --help``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from livekit import api, rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobExecutorType,
    JobProcess,
    cli,
    room_io,
)

# Plugins register on import, which LiveKit allows on the main thread only.
from livekit.plugins import chroma, silero

from chroma_agent.worker import load_worker_engine
from chroma_agent.worker_config import ConfigError, WorkerConfig, resolve_call_settings

log = logging.getLogger("chroma.sip_inbound")

AGENT_NAME = os.environ.get("CHROMA_AGENT_NAME") or "chroma"
MODEL = os.environ.get("CHROMA_MODEL") or "FlashLabs/Chroma-4B"
TRANSFER_ENV = "SIP_TRANSFER_TO"
DEFAULT_GREETING = "Greet the caller briefly and ask how you can help."
OUTBOUND_GREETING = "The person you called has answered. Greet them and say who you are."
ANNOUNCE_TIMEOUT_S = 15.0  # longest wait for a spoken "transferring you" / "goodbye" before acting anyway

# A caller ID is whatever the caller's carrier put in the From header: accept digits only, so nothing the
# caller controls reaches the model's instructions as text.
_NUMBER = re.compile(r"^\+?\d{3,15}$")

DtmfAction = Literal["transfer", "hangup", "keypad"]


# --- pure helpers (tested without LiveKit) ------------------------------------------------------------------


def parse_dtmf_action(digit: str) -> DtmfAction | None:
    """What a keypad digit does: ``0`` transfer, ``#`` hang up, ``1``-``9`` and ``*`` keypad, else None."""
    digit = (digit or "").strip()
    if digit == "0":
        return "transfer"
    if digit == "#":
        return "hangup"
    if len(digit) == 1 and (digit in "123456789*"):
        return "keypad"
    return None


def caller_number(attributes: Mapping[str, str]) -> str | None:
    """The caller's number from the SIP participant's attributes; None if withheld or not a number."""
    raw = (attributes.get("sip.phoneNumber") or "").strip()
    compact = re.sub(r"[\s().-]", "", raw)
    return compact if _NUMBER.match(compact) else None


def spoken_number(number: str) -> str:
    """``+15105550123`` -> ``+1 5 1 0 5 5 5 0 1 2 3``: digit by digit, as a person reads a number aloud."""
    return ("+" if number.startswith("+") else "") + " ".join(number.lstrip("+"))


def caller_greeting(attributes: Mapping[str, str], greeting: str | None = None) -> str:
    """Instructions for the agent's first reply: `greeting` (or the default) plus who is calling, if known.

    The number is only used when it is a plain phone number (see :func:`caller_number`); the model is asked to
    mention its last four digits, which callers recognise and which does not read out their whole number.
    """
    base = (greeting or DEFAULT_GREETING).strip()
    number = caller_number(attributes)
    if number is None:
        return f"{base} The caller's number is not known."
    dialed = caller_number({"sip.phoneNumber": attributes.get("sip.trunkPhoneNumber", "")})
    about_dialed = f" They dialed {spoken_number(dialed)}." if dialed else ""
    return (f"{base} The caller is calling from {spoken_number(number)}.{about_dialed} Greet them by their "
            f"number: say you see they are calling from the number ending in {spoken_number(number[-4:])}.")


def transfer_target(value: str | None) -> str | None:
    """``SIP_TRANSFER_TO`` as a SIP transfer URI: ``+1510...`` -> ``tel:+1510...``; ``tel:``/``sip:`` kept."""
    value = (value or "").strip()
    if not value:
        return None
    if value.startswith(("tel:", "sip:", "sips:")):
        return value
    compact = re.sub(r"[\s().-]", "", value)
    if not _NUMBER.match(compact):
        raise ValueError(f"{TRANSFER_ENV}={value!r} is neither a phone number nor a tel:/sip: URI")
    return f"tel:{compact}"


def call_is_active(attributes: Mapping[str, str]) -> bool:
    """True once the phone call is answered (``sip.callStatus`` is ``active``; absent: not a phone)."""
    return attributes.get("sip.callStatus", "active") == "active"


# --- call control over the LiveKit API ----------------------------------------------------------------------


async def transfer_call(lkapi: api.LiveKitAPI, room: str, identity: str,
                        to: str) -> api.TransferSIPParticipantResponse:
    """Hand the phone call to `to` (a ``tel:`` or ``sip:`` URI); the caller hears a dial tone meanwhile."""
    return await lkapi.sip.transfer_sip_participant(api.TransferSIPParticipantRequest(
        room_name=room, participant_identity=identity, transfer_to=to, play_dialtone=True))


async def hang_up(lkapi: api.LiveKitAPI, room: str, identity: str | None, *,
                  delete_room: bool = True) -> None:
    """End the call: remove the phone participant (hangs up its line), then delete the room (ends the agent).

    A participant or room already gone is not an error.
    """
    if identity:
        try:
            await lkapi.room.remove_participant(api.RoomParticipantIdentity(room=room, identity=identity))
        except api.ServerError as exc:
            if exc.code != api.ServerErrorCode.NOT_FOUND:
                raise
    if delete_room:
        try:
            await lkapi.room.delete_room(api.DeleteRoomRequest(room=room))
        except api.ServerError as exc:
            if exc.code != api.ServerErrorCode.NOT_FOUND:
                raise


class Speaker(Protocol):
    """What call control needs of an AgentSession: say something (and wait for it), or stop talking."""

    def generate_reply(self, *, user_input: Any = ..., instructions: Any = ...) -> Any: ...

    def interrupt(self) -> Any: ...


@dataclass
class CallControl:
    """Keypad handling for one call; `handle_dtmf` is the ``sip_dtmf_received`` handler (see `attach`)."""

    lkapi: api.LiveKitAPI
    room: str
    caller_identity: str
    transfer_to: str | None = None
    session: Speaker | None = None
    ended: bool = False  # after a transfer or hang-up, further digits are ignored
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)

    def attach(self, room: rtc.Room) -> None:
        """Listen to ``sip_dtmf_received`` on `room` (event handlers are sync: each digit becomes a task)."""

        def on_dtmf(event: rtc.SipDTMF) -> None:
            task = asyncio.create_task(self.handle_dtmf(event))
            self._tasks.add(task)
            task.add_done_callback(self._done)

        room.on("sip_dtmf_received", on_dtmf)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("keypad action failed", exc_info=task.exception())

    async def handle_dtmf(self, event: Any) -> str | None:
        """Act on one digit; returns what was done (``transferred``, ``hung_up``, ...) or None if ignored."""
        sender = getattr(event.participant, "identity", None) if event.participant is not None else None
        if sender is not None and sender != self.caller_identity:
            log.info("digit %r from %s, not the caller: ignored", event.digit, sender)
            return None
        action = parse_dtmf_action(event.digit)
        if action is None:
            return None
        async with self._lock:  # one action at a time: "0" then "#" must not race
            if self.ended:
                return None
            log.info("caller pressed %r: %s", event.digit, action)
            if action == "keypad":
                if self.session is not None:
                    self.session.generate_reply(
                        user_input=f"(The caller pressed {event.digit} on the keypad.)")
                return "keypad"
            if action == "hangup":
                await self._say("The caller asked to end the call. Say a short goodbye.")
                self.ended = True
                await hang_up(self.lkapi, self.room, self.caller_identity)
                return "hung_up"
            return await self._transfer()

    async def _transfer(self) -> str:
        if not self.transfer_to:
            await self._say("The caller asked for a human, but no one can take the call now. Apologise and "
                            "offer to keep helping.")
            return "transfer_unavailable"
        await self._say("Tell the caller you are transferring them to a colleague now. One short sentence.")
        try:
            result = await transfer_call(self.lkapi, self.room, self.caller_identity, self.transfer_to)
            if result.status == api.STS_TRANSFER_FAILED:  # answered without an error, but not transferred
                raise api.SipCallError("failed", api.SIPTransferReason.Name(result.reason), status=200)
        except api.ServerError as exc:  # SipCallError included: busy, no answer, rejected
            log.warning("transfer to %s failed: %s", self.transfer_to, exc)
            await self._say("The transfer did not go through. Apologise and offer to keep helping.")
            return "transfer_failed"
        self.ended = True  # the caller left the room for the human; the room closes when they are gone
        return "transferred"

    async def _say(self, instructions: str) -> None:
        if self.session is None:
            return
        with contextlib.suppress(RuntimeError):  # nothing to interrupt
            self.session.interrupt()
        try:
            handle = self.session.generate_reply(instructions=instructions)
            await asyncio.wait_for(handle.wait_for_playout(), ANNOUNCE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("announcement did not finish in %.0f s; going on", ANNOUNCE_TIMEOUT_S)
        except RuntimeError as exc:  # the session has closed (the caller hung up): act without a word
            log.info("no announcement: %s", exc)


# --- the agent ----------------------------------------------------------------------------------------------


def _job_number(job_metadata: str | None) -> str | None:
    """The number ``sip_outbound.py`` called (``phone_number`` in the job metadata), if any."""
    try:
        data = json.loads(job_metadata or "{}")
    except json.JSONDecodeError:
        return None
    return data.get("phone_number") if isinstance(data, dict) else None


def worker_config() -> WorkerConfig:
    """The packaged worker's settings from the environment (CHROMA_VOICE, CHROMA_VOICES_DIR, ...)."""
    return WorkerConfig.from_env(model=MODEL, agent_name=AGENT_NAME)


def prewarm(proc: JobProcess) -> None:
    config = worker_config()
    proc.userdata["config"] = config
    # The shared engine with its default voice, loaded once per process, as the packaged worker does.
    proc.userdata["engine"] = load_worker_engine(config)
    proc.userdata["vad"] = silero.VAD.load()


async def _wait_until_answered(room: rtc.Room, participant: rtc.RemoteParticipant) -> None:
    if call_is_active(participant.attributes):
        return
    answered = asyncio.Event()

    def on_change(_changed: dict[str, str], who: rtc.Participant) -> None:
        if who.identity == participant.identity and call_is_active(who.attributes):
            answered.set()

    room.on("participant_attributes_changed", on_change)
    try:
        await answered.wait()
    finally:
        room.off("participant_attributes_changed", on_change)


async def entrypoint(ctx: JobContext) -> None:
    config: WorkerConfig = ctx.proc.userdata["config"]
    engine = ctx.proc.userdata["engine"]
    await ctx.connect()
    caller = await ctx.wait_for_participant(kind=rtc.ParticipantKind.PARTICIPANT_KIND_SIP)
    await _wait_until_answered(ctx.room, caller)  # outbound calls: the participant exists while it rings
    settings = resolve_call_settings(job_metadata=ctx.job.metadata, room_metadata=ctx.room.metadata,
                                     attributes=caller.attributes, voice_exists=engine.voices.__contains__)
    session = AgentSession(
        llm=chroma.RealtimeModel(engine=engine, model=config.model, voice=settings.voice,
                                 temperature=settings.temperature,
                                 max_reply_seconds=config.max_reply_seconds),
        vad=ctx.proc.userdata["vad"],
        turn_handling={"interruption": {"mode": "vad"}},
    )
    control = CallControl(ctx.api, ctx.room.name, caller.identity,
                          transfer_to=transfer_target(os.environ.get(TRANSFER_ENV)), session=session)
    control.attach(ctx.room)
    await session.start(agent=Agent(instructions=settings.instructions or config.instructions),
                        room=ctx.room, room_options=room_io.RoomOptions(participant_identity=caller.identity))
    if _job_number(ctx.job.metadata):  # we placed this call: the callee answered, say who we are
        session.generate_reply(instructions=settings.greeting or OUTBOUND_GREETING)
    else:
        session.generate_reply(instructions=caller_greeting(caller.attributes, settings.greeting))


def build_server() -> AgentServer:
    # Jobs as threads of one process share the engine loaded once in prewarm; give it time to load.
    server = AgentServer(setup_fnc=prewarm, job_executor_type=JobExecutorType.THREAD,
                         initialize_process_timeout=900)
    server.rtc_session(entrypoint, agent_name=AGENT_NAME)  # explicit dispatch: the rule names this agent
    return server


def check_settings() -> str | None:
    """A message naming what to fix in the environment, or None (checked before anything is loaded)."""
    try:
        worker_config()
        transfer_target(os.environ.get(TRANSFER_ENV))  # a malformed SIP_TRANSFER_TO fails now, not mid-call
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


if __name__ == "__main__":
    if (problem := check_settings()) is not None:
        print(f"agent.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    cli.run_app(build_server())
