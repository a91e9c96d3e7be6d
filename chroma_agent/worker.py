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
  phone callers (SIP participants) are handled like any other: their audio is resampled by the plugin;
* with ``--server-url`` (``CHROMA_SERVER_URL``) the worker loads no model (nor torch): each call talks to a
  ``chroma-agent serve`` GPU server over ``/v1/realtime`` (the plugin's remote mode), and the worker registers
  only once that server answers ``/health``.

Configure it with flags or ``CHROMA_*`` / ``LIVEKIT_*`` environment variables (``chroma-agent --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
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

from chroma_agent.config import TINY_MAX_REPLY_S, add_flags, describe
from chroma_agent.worker_config import (
    COMMANDS,
    NEEDS_LIVEKIT,
    SOURCES,
    CallSettings,
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
    if config.remote:
        raise ConfigError(f"the worker talks to {config.server_url} and loads no model")
    device, dtype = config.torch_device()
    engine = chroma.load_engine(config.checkpoint(), device=device, dtype=dtype,
                                voices_dir=config.voices_dir, max_sessions=config.max_sessions,
                                max_reply_s=min(config.max_reply_seconds, TINY_MAX_REPLY_S) if config.is_tiny
                                else config.max_reply_seconds)
    if engine.default_voice is None:
        engine.default_voice = config.speaking_voice(engine)
    return engine


def wait_for_server(config: WorkerConfig, *, poll_s: float = 2.0) -> dict[str, Any]:
    """Block until the ``--server-url`` server answers ``/health`` (it may still be loading the model), so the
    worker registers with LiveKit only once calls can be answered. Returns the health report."""
    assert config.server_url is not None
    url = health_url(config.server_url)
    deadline = time.monotonic() + config.load_timeout
    last = "no answer yet"
    logged = False
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                report = json.loads(response.read() or b"{}")
            log.info("Chroma server %s is ready: %s", config.server_url, report)
            return report
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise ConfigError(f"{describe('server_url')} = {config.server_url!r}: {url} did not answer within "
                              f"{config.load_timeout:g} s ({last}); is `chroma-agent serve` running there? "
                              f"(raise {describe('load_timeout')} while it loads the model)")
        if not logged:
            log.info("waiting for the Chroma server at %s (%s)", url, last)
            logged = True
        time.sleep(poll_s)


def health_url(server_url: str) -> str:
    """``/health`` of a server given as http(s)://, ws(s)://, with or without ``/v1`` or ``/v1/realtime``."""
    parts = urllib.parse.urlsplit(server_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    for suffix in ("/realtime", "/v1"):
        path = path.removesuffix(suffix)
    return urllib.parse.urlunsplit((scheme, parts.netloc, f"{path}/health", "", ""))


def remote_voice_exists(config: WorkerConfig, name: str) -> bool:
    """Whether the ``--server-url`` server stores voice `name` (``GET /v1/voices/{name}``); when the server
    cannot say, assume it does and let it decide."""
    assert config.server_url is not None
    url = health_url(config.server_url).removesuffix("/health") + "/v1/voices/" + urllib.parse.quote(name)
    request = urllib.request.Request(url)
    if config.server_api_key:
        request.add_header("Authorization", f"Bearer {config.server_api_key}")
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 404
    except OSError as exc:
        log.warning("could not ask %s whether it stores voice %r: %s", config.server_url, name, exc)
        return True


def realtime_model(config: WorkerConfig, settings: CallSettings, engine: Engine | None) -> chroma.RealtimeModel:
    """Chroma for one call: the worker's engine, or the ``--server-url`` server over /v1/realtime."""
    if config.remote:
        return chroma.RealtimeModel(base_url=config.server_url, api_key=config.server_api_key,
                                    voice=settings.voice or config.voice, temperature=settings.temperature,
                                    max_reply_seconds=config.max_reply_seconds)
    return chroma.RealtimeModel(engine=engine, model=config.model, voice=settings.voice,
                                temperature=settings.temperature, max_reply_seconds=config.max_reply_seconds)


# --- LiveKit callbacks ------------------------------------------------------------------------------------


def prewarm(proc: JobProcess, *, config: WorkerConfig) -> None:
    """Setup of each job thread: the shared engine (already loaded by `main`; none in remote mode) and a VAD."""
    if not config.remote:
        proc.userdata["engine"] = load_worker_engine(config)
    proc.userdata["vad"] = silero.VAD.load()


def worker_load(server: AgentServer, *, config: WorkerConfig) -> float:
    """LiveKit's load function: busy engine slots / slots (see `compute_load`); in remote mode, this worker's
    calls / --max-sessions (the server's slots are shared with its other clients)."""
    live = 0 if config.remote else sum(engine.live_sessions for engine in chroma.loaded_engines().values())
    return compute_load(live, len(server.active_jobs), config.max_sessions)


async def entrypoint(ctx: JobContext, *, config: WorkerConfig) -> None:
    """One call: the caller's settings, then an AgentSession with Chroma speaking."""
    engine = None if config.remote else (ctx.proc.userdata.get("engine") or load_worker_engine(config))
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
                                     attributes=attributes,
                                     voice_exists=None if engine is None else engine.voices.__contains__)
    # The server would refuse an unknown voice and end the call: fall back to the default, as in-process.
    if (engine is None and settings.voice is not None
            and not await asyncio.to_thread(remote_voice_exists, config, settings.voice)):
        log.warning("voice %r is not stored on %s; using the default voice", settings.voice, config.server_url)
        settings = settings.model_copy(update={"voice": None})
    model = realtime_model(config, settings, engine)
    session = AgentSession(
        llm=model,
        vad=vad,
        # VAD interruptions: the adaptive detector is a LiveKit Cloud model, this worker stays self-hosted
        turn_handling={"interruption": {"mode": "vad"}},
    )
    if engine is None:
        voice = settings.voice or config.voice or "the server's default"
    else:
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
        "These commands are parsed by livekit-agents' own CLI: --url, --api-key and --api-secret are its names "
        "(LiveKit's key and secret; the Chroma server's key is --server-api-key), and "
        "`chroma-agent COMMAND --help` lists its other options. The settings shared with the other commands "
        "(--model, --device, --voice, ...) mean the same as in `chroma-agent serve`.",
        epilog="Per-call settings: JSON {\"voice\": ..., \"instructions\": ..., \"greeting\": ..., "
        "\"temperature\": ...} in the dispatch (job) metadata, the room metadata, or the caller's "
        "attributes chroma.voice / chroma.instructions / ...",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    add_flags(parser, WorkerConfig)
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
        if config.remote:
            log.info("the worker talks to the Chroma server at %s over /v1/realtime (no model here)",
                     config.server_url)
            wait_for_server(config)
        else:
            log.info("loading %s for the worker (%s, %s)", config.model, config.device, config.dtype)
            load_worker_engine(config)
    except ConfigError as exc:
        print(f"chroma-agent: error: {exc}", file=sys.stderr)
        return 2
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

