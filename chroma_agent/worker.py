"""The LiveKit Agents worker: ``chroma-agent start | dev | console | connect``.

One worker process loads Chroma once and serves many calls from it:

* jobs run as threads of this process (``JobExecutorType.THREAD``), so every call shares the one engine, its
  GPU memory and its batched step loop. LiveKit's default executor starts a process per job, and gives each
  ~10 s to initialize: far less than loading a 4B model, and every process would hold its own copy;
* the engine is loaded before the worker registers (and again, as a no-op, in each job thread's setup), so
  the worker is only offered calls once it can answer them;
* the worker reports its load as busy slots / slots and stops accepting calls when every slot is busy, so
  LiveKit spreads calls across GPU workers;
* each call may pick its voice, instructions and greeting (see `chroma_agent.worker_config.CallSettings`);
  phone callers (SIP participants) are handled like any other: their audio is resampled by the plugin.

Configure it with flags or ``CHROMA_*`` / ``LIVEKIT_*`` environment variables (``chroma-agent --help``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from livekit import rtc
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

# Plugins register themselves on import, which LiveKit allows on the main thread only: import them here,
# not in the job threads.
from livekit.plugins import chroma, silero

from chroma_agent.worker_config import (
    COMMANDS,
    NEEDS_LIVEKIT,
    SOURCES,
    ConfigError,
    WorkerConfig,
    compute_load,
    resolve_call_settings,
)

if TYPE_CHECKING:
    from chroma_agent.engine.engine import Engine

log = logging.getLogger("chroma_agent.worker")


# --- the engine ---------------------------------------------------------------------------------------------


def load_worker_engine(config: WorkerConfig) -> Engine:
    """The process's shared engine for `config`, with its default voice set (loads once, then a no-op)."""
    from chroma_agent.voices import UnknownVoiceError

    if config.model is None:
        raise ConfigError("no model: set CHROMA_MODEL or pass --model")
    engine = chroma.load_engine(config.model, device=config.device, dtype=config.dtype,
                                voices_dir=config.voices_dir, max_sessions=config.max_sessions,
                                max_reply_s=config.max_reply_seconds)
    if engine.default_voice is not None:
        return engine
    if config.voice_audio is not None:
        engine.default_voice = engine.create_voice(config.voice_audio, config.voice_text or "",
                                                   name=config.voice, save=config.voice is not None).result()
        log.info("default voice cloned from %s%s", config.voice_audio,
                 f" and stored as {config.voice!r}" if config.voice else "")
    elif config.voice is not None:
        try:
            engine.default_voice = engine.voices.get(config.voice)
        except UnknownVoiceError:
            raise ConfigError(
                f"CHROMA_VOICE {config.voice!r} is not in {engine.voices.folder} "
                f"(voices there: {', '.join(engine.voices.names()) or 'none'}); "
                "clone one with CHROMA_VOICE_AUDIO + CHROMA_VOICE_TEXT"
            ) from None
    else:
        names = engine.voices.names()
        if len(names) != 1:
            raise ConfigError(
                "no default voice: set CHROMA_VOICE to a stored voice"
                + (f" ({', '.join(names)})" if names else f" (none in {engine.voices.folder})")
                + " or CHROMA_VOICE_AUDIO + CHROMA_VOICE_TEXT to clone one"
            )
        engine.default_voice = engine.voices.get(names[0])
        log.info("default voice: %s (the only stored voice)", names[0])
    return engine


# --- LiveKit callbacks ------------------------------------------------------------------------------------


def prewarm(proc: JobProcess, *, config: WorkerConfig) -> None:
    """Setup of each job thread: the shared engine (already loaded by `main`) and a VAD."""
    proc.userdata["engine"] = load_worker_engine(config)
    proc.userdata["vad"] = silero.VAD.load()


def worker_load(server: AgentServer, *, config: WorkerConfig) -> float:
    """LiveKit's load function: busy engine slots / slots (see `compute_load`)."""
    live = sum(engine.live_sessions for engine in chroma.loaded_engines().values())
    return compute_load(live, len(server.active_jobs), config.max_sessions)


async def entrypoint(ctx: JobContext, *, config: WorkerConfig) -> None:
    """One call: the caller's settings, then an AgentSession with Chroma speaking."""
    engine = ctx.proc.userdata.get("engine") or load_worker_engine(config)
    vad = ctx.proc.userdata.get("vad") or silero.VAD.load()

    room_options = room_io.RoomOptions()
    attributes: dict[str, str] = {}
    room_metadata = None
    if not ctx.is_fake_job():  # console mode has no room and no caller to wait for
        await ctx.connect()
        room_metadata = ctx.room.metadata
        participant = await ctx.wait_for_participant()
        attributes = dict(participant.attributes)
        room_options = room_io.RoomOptions(participant_identity=participant.identity)
        if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_SIP:
            sip = {k: v for k, v in attributes.items() if k.startswith("sip.")}
            log.info("phone call from %s: %s", participant.identity, sip)

    settings = resolve_call_settings(job_metadata=ctx.job.metadata, room_metadata=room_metadata,
                                     attributes=attributes, voice_exists=engine.voices.__contains__)
    model = chroma.RealtimeModel(engine=engine, model=config.model, voice=settings.voice,
                                 temperature=settings.temperature, max_reply_seconds=config.max_reply_seconds)
    session = AgentSession(
        llm=model,
        vad=vad,
        # VAD interruptions: the adaptive detector is a LiveKit Cloud model, this worker stays self-hosted
        turn_handling={"interruption": {"mode": "vad"}},
    )
    voice = settings.voice or (engine.default_voice.name if engine.default_voice else "?")
    log.info("call in room %s: voice %s", ctx.room.name, voice)
    await session.start(agent=Agent(instructions=settings.instructions or config.instructions), room=ctx.room,
                        room_options=room_options)
    greeting = settings.greeting or config.greeting
    if greeting:
        session.generate_reply(instructions=greeting)


def build_server(config: WorkerConfig) -> AgentServer:
    """The AgentServer for `config` (jobs as threads sharing one engine; load = busy slots / slots)."""
    server = AgentServer(
        # Threads, not processes: all jobs share the engine loaded in this process. The default process
        # executor would load a copy per job and gives initialization ~10 s, far less than a 4B model needs.
        job_executor_type=JobExecutorType.THREAD,
        initialize_process_timeout=config.load_timeout,
        num_idle_processes=min(2, config.max_sessions),  # idle job threads ready to take a call
        load_threshold=1.0,  # unavailable exactly when every engine slot is busy (see compute_load)
        setup_fnc=functools.partial(prewarm, config=config),
        load_fnc=functools.partial(worker_load, config=config),
        ws_url=config.livekit_url,
        api_key=config.livekit_api_key,
        api_secret=config.livekit_api_secret,
    )
    server.rtc_session(functools.partial(entrypoint, config=config), agent_name=config.agent_name)
    return server


# --- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chroma-agent",
        usage="chroma-agent {start,dev,console,connect} [chroma options] [LiveKit options]",
        description="Run Chroma as a LiveKit Agents worker. Commands: start (production), dev (development), "
        "console (talk to it in this terminal, no LiveKit server), connect --room NAME (join one room). "
        "`chroma-agent COMMAND --help` lists LiveKit's options of a command.",
        epilog="Per-call settings: JSON {\"voice\": ..., \"instructions\": ..., \"greeting\": ..., "
        "\"temperature\": ...} in the dispatch (job) metadata, the room metadata, or the caller's "
        "attributes chroma.voice / chroma.instructions / ...",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    help_of = {
        "model": "checkpoint folder or Hugging Face repo id (FlashLabs/Chroma-4B)",
        "device": "auto (default), cpu, cuda, cuda:N, mps",
        "dtype": "auto (default: bfloat16 on CUDA), float32, bfloat16, float16",
        "voice": "default voice: a stored voice (or the name to store --voice-audio under)",
        "voice_audio": "clone the default voice from this clip at start",
        "voice_text": "what --voice-audio says",
        "voices_dir": "folder of stored voices (default ~/.cache/chroma-agent/voices)",
        "max_sessions": "calls at once on this worker (engine slots, default 8)",
        "agent_name": "name for explicit dispatch (default: automatic dispatch)",
        "instructions": "default system prompt",
        "greeting": "instructions for a first reply when a call starts (default: wait for the caller)",
        "max_reply_seconds": "longest reply (default 30)",
        "load_timeout": "seconds the model may take to load (default 900)",
        "livekit_url": "LiveKit server URL",
        "livekit_api_key": "LiveKit API key",
        "livekit_api_secret": "LiveKit API secret",
    }
    for name, (var, flag) in SOURCES.items():
        parser.add_argument(flag, dest=name, metavar=var, default=None, help=f"{help_of[name]} [{var}]")
    return parser


def _run_livekit_cli(server: AgentServer, args: Sequence[str]) -> int:
    """LiveKit's own CLI (start/dev/console/connect) on `server`, with `args` as its command line."""
    saved = sys.argv
    sys.argv = ["chroma-agent", *args]
    try:
        cli.run_app(server)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``chroma-agent COMMAND [options]``; returns the exit code (2: bad settings)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        ns, rest = parser.parse_known_args(argv[1:] if command else argv)
    except SystemExit as exc:  # a chroma flag without its value
        return exc.code if isinstance(exc.code, int) else 2
    if command is None:
        parser.print_help()
        if ns.help:
            return 0
        print(f"\nchroma-agent: error: expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if ns.help:  # ours, then LiveKit's options of the command
        parser.print_help()
        print()
        return _run_livekit_cli(_help_server(), [command, "--help"])

    settings = {name: getattr(ns, name) for name in SOURCES}
    try:
        config = WorkerConfig.from_env(**settings)
        config.check_for(command)
    except ConfigError as exc:
        print(f"chroma-agent: error: {exc}", file=sys.stderr)
        return 2

    passthrough = list(rest)
    if command in NEEDS_LIVEKIT:  # LiveKit's CLI takes these too (it would otherwise read the environment)
        for name, flag in (("livekit_url", "--url"), ("livekit_api_key", "--api-key"),
                           ("livekit_api_secret", "--api-secret")):
            if settings[name] is not None:
                passthrough += [flag, settings[name]]

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO)
    try:
        log.info("loading %s for the worker (%s, %s)", config.model, config.device, config.dtype)
        load_worker_engine(config)
    except Exception as exc:  # a missing checkpoint, a bad voice file, no GPU, ...
        print(f"chroma-agent: error: could not load the model: {exc}", file=sys.stderr)
        return 2
    finally:
        root.removeHandler(handler)  # LiveKit's CLI installs its own logging
        root.setLevel(previous_level)
    return _run_livekit_cli(build_server(config), [command, *passthrough])


def _help_server() -> AgentServer:
    server = AgentServer()

    async def _unused(ctx: Any) -> None:  # pragma: no cover - only LiveKit's help text is shown
        return None

    server.rtc_session(_unused)
    return server


if __name__ == "__main__":
    sys.exit(main())

