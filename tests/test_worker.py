"""The LiveKit worker: settings, per-call metadata, load reporting, executor choice and the command line.

No LiveKit server runs here: the worker is built and its callbacks are called directly; LiveKit's own CLI is
only asked for its help text (or replaced by a stub that records what it would have been given).
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from livekit.agents import JobExecutorType
from livekit.plugins import chroma

from chroma_agent import worker
from chroma_agent.worker_config import (
    DEFAULT_INSTRUCTIONS,
    CallSettings,
    ConfigError,
    WorkerConfig,
    compute_load,
    resolve_call_settings,
)

LIVEKIT = {"LIVEKIT_URL": "wss://example.livekit.cloud", "LIVEKIT_API_KEY": "APIkey",
           "LIVEKIT_API_SECRET": "very-secret-value"}


@pytest.fixture()
def voice_text(golden_dir) -> str:
    return json.loads((golden_dir / "case.json").read_text())["voice_text"]


@pytest.fixture()
def shared_engines():
    yield
    chroma.close_engines()


# --- settings ---------------------------------------------------------------------------------------------


def test_settings_come_from_the_environment_and_flags_win(tmp_path):
    env = {"CHROMA_MODEL": "FlashLabs/Chroma-4B", "CHROMA_DEVICE": "cuda:1", "CHROMA_DTYPE": "bfloat16",
           "CHROMA_MAX_SESSIONS": "16", "CHROMA_VOICE": "support-anna", "CHROMA_VOICES_DIR": str(tmp_path),
           "CHROMA_AGENT_NAME": "support", "CHROMA_GREETING": " ", **LIVEKIT}
    config = WorkerConfig.from_env(env, max_sessions="4", device=None)
    assert (config.model, config.device, config.dtype) == ("FlashLabs/Chroma-4B", "cuda:1", "bfloat16")
    assert config.max_sessions == 4 and config.voice == "support-anna" and config.voices_dir == tmp_path
    assert config.agent_name == "support" and config.greeting is None  # blank means unset
    assert config.instructions == DEFAULT_INSTRUCTIONS and config.livekit_url == LIVEKIT["LIVEKIT_URL"]
    assert "very-secret-value" not in repr(config)
    config.check_for("start")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHROMA_MAX_SESSIONS": "abc"},
         "CHROMA_MAX_SESSIONS / --max-sessions = 'abc': Input should be a valid integer"),
        ({"CHROMA_MAX_SESSIONS": "0"},
         "CHROMA_MAX_SESSIONS / --max-sessions = '0': Input should be greater than"),
        ({"CHROMA_DEVICE": "gpu"},
         "CHROMA_DEVICE / --device = 'gpu': must be auto, cpu, cuda, cuda:N or mps"),
        ({"CHROMA_DTYPE": "int8"}, "CHROMA_DTYPE / --dtype = 'int8': Input should be 'auto'"),
        ({"LIVEKIT_URL": "localhost:7880"}, "LIVEKIT_URL / --url = 'localhost:7880': must start with wss://"),
        ({"CHROMA_VOICE": "../etc/passwd"}, "CHROMA_VOICE / --voice = '../etc/passwd': voice name"),
        ({"CHROMA_MODEL": "not a model"}, "neither an existing checkpoint folder nor a Hugging Face repo id"),
        ({"CHROMA_VOICE_AUDIO": "/no/such/clip.wav"},
         "CHROMA_VOICE_AUDIO / --voice-audio = '/no/such/clip.wav': file not found"),
        ({"CHROMA_SERVER_URL": "gpu-box:8000"}, "CHROMA_SERVER_URL / --server-url = 'gpu-box:8000': must start"),
        ({"CHROMA_MAX_REPLY_SECONDS": "-1"}, "CHROMA_MAX_REPLY_SECONDS / --max-reply-seconds = '-1'"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_to_fix(env, message):
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env(env)
    assert message in str(info.value)


def test_a_secret_is_never_echoed():
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env({}, livekit_api_secret=["not", "a", "string"])
    assert "LIVEKIT_API_SECRET" in str(info.value) and "not" not in str(info.value).replace("<hidden>", "")


def test_voice_audio_needs_its_transcript(golden_dir):
    with pytest.raises(ConfigError, match="go together: CHROMA_VOICE_TEXT / --voice-text is missing"):
        WorkerConfig.from_env({"CHROMA_VOICE_AUDIO": str(golden_dir / "voice.wav")})


def test_each_command_says_what_it_is_missing(tiny_dir):
    with pytest.raises(ConfigError) as info:
        WorkerConfig.from_env({}).check_for("start")
    text = str(info.value)
    assert "LIVEKIT_URL is not set" in text and "LIVEKIT_API_SECRET is not set" in text
    assert WorkerConfig.from_env({}).model == "FlashLabs/Chroma-4B"  # the default, as in every command
    WorkerConfig.from_env({"CHROMA_MODEL": str(tiny_dir)}).check_for("console")  # no server needed
    with pytest.raises(ConfigError, match="LIVEKIT_API_KEY"):
        config = WorkerConfig.from_env({"CHROMA_MODEL": str(tiny_dir), "LIVEKIT_URL": "ws://localhost:7880"})
        config.check_for("dev")


# --- per-call settings -------------------------------------------------------------------------------------


def test_call_settings_from_job_metadata():
    metadata = {"voice": "support-anna", "instructions": "Be brief.", "greeting": "Say hello.", "order": 42}
    settings = resolve_call_settings(job_metadata=json.dumps(metadata))
    assert settings == CallSettings(voice="support-anna", instructions="Be brief.", greeting="Say hello.")


def test_call_settings_precedence_room_job_participant():
    settings = resolve_call_settings(
        room_metadata=json.dumps({"chroma": {"voice": "room-voice", "instructions": "room",
                                             "temperature": 0.3}}),
        job_metadata=json.dumps({"voice": "job-voice", "instructions": "job"}),
        attributes={"chroma.voice": "caller-voice", "sip.callID": "abc"},
    )
    assert settings == CallSettings(voice="caller-voice", instructions="job", temperature=0.3)
    settings = resolve_call_settings(attributes={"chroma": json.dumps({"temperature": "0.5"}),
                                                 "chroma.greeting": "Hi!"})
    assert settings == CallSettings(temperature=0.5, greeting="Hi!")


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"voice"', "null"])
def test_bad_metadata_is_logged_and_the_defaults_are_used(raw, caplog):
    with caplog.at_level(logging.WARNING, logger="chroma_agent.worker"):
        assert resolve_call_settings(job_metadata=raw) == CallSettings()
    assert "job metadata is" in caplog.text and "using the defaults" in caplog.text


def test_bad_values_fall_back_one_by_one(caplog):
    with caplog.at_level(logging.WARNING, logger="chroma_agent.worker"):
        settings = resolve_call_settings(job_metadata=json.dumps(
            {"voice": "../../x", "temperature": "hot", "instructions": "Keep it short.", "greeting": ""}))
    assert settings == CallSettings(instructions="Keep it short.")
    assert "voice='../../x' is invalid" in caplog.text and "temperature='hot' is invalid" in caplog.text
    assert "greeting='' is invalid" in caplog.text


def test_an_unknown_voice_falls_back_to_the_default(caplog):
    with caplog.at_level(logging.WARNING, logger="chroma_agent.worker"):
        settings = resolve_call_settings(job_metadata='{"voice": "nobody", "instructions": "x"}',
                                         voice_exists=lambda name: name == "support-anna")
    assert settings == CallSettings(instructions="x")
    assert "voice 'nobody' is not a stored voice" in caplog.text
    assert resolve_call_settings(job_metadata='{"voice": "support-anna"}',
                                 voice_exists=lambda name: name == "support-anna").voice == "support-anna"


# --- load reporting and the executor -----------------------------------------------------------------------


def test_load_is_busy_slots_over_slots():
    assert compute_load(0, 0, 8) == 0.0
    assert compute_load(3, 2, 8) == 3 / 8  # live conversations
    assert compute_load(1, 4, 8) == 4 / 8  # accepted jobs whose conversation is not open yet count too
    assert compute_load(7, 7, 8) < 1.0 <= compute_load(8, 8, 8)  # threshold 1.0: full means unavailable
    assert compute_load(12, 12, 8) == 1.0
    with pytest.raises(ValueError):
        compute_load(0, 0, 0)


def test_the_server_runs_jobs_as_threads_sharing_one_engine(tiny_dir):
    config = WorkerConfig.from_env({}, model=str(tiny_dir), agent_name="support", max_sessions=4,
                                   load_timeout=1200)
    server = worker.build_server(config)
    assert server._job_executor_type == JobExecutorType.THREAD
    assert server._initialize_process_timeout == 1200  # a 4B model takes far longer than LiveKit's 10 s
    assert server._load_threshold == 1.0 and server._agent_name == "support"
    assert server.setup_fnc.func is worker.prewarm and server.load_fnc.func is worker.worker_load
    assert server.load_fnc(SimpleNamespace(active_jobs=[object()] * 2)) == 2 / 4


def test_prewarm_loads_the_engine_once_and_reports_real_capacity(tiny_dir, golden_dir, voice_text,
                                                                 shared_engines):
    config = WorkerConfig.from_env({}, model=str(tiny_dir), device="cpu", max_sessions=3,
                                   voice_audio=str(golden_dir / "voice.wav"), voice_text=voice_text)
    first, second = SimpleNamespace(userdata={}), SimpleNamespace(userdata={})
    worker.prewarm(first, config=config)
    worker.prewarm(second, config=config)
    engine = first.userdata["engine"]
    assert second.userdata["engine"] is engine and list(chroma.loaded_engines().values()) == [engine]
    assert engine.config.max_sessions == 3 and engine.default_voice is not None
    assert first.userdata["vad"] is not None
    conv = engine.open_conversation().result()
    assert worker.worker_load(SimpleNamespace(active_jobs=[]), config=config) == 1 / 3
    conv.close().result()
    assert worker.worker_load(SimpleNamespace(active_jobs=[]), config=config) == 0.0


def test_the_default_voice_must_exist(tiny_dir, tmp_path, shared_engines):
    config = WorkerConfig.from_env({}, model=str(tiny_dir), device="cpu", voice="support-anna",
                                   voices_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="CHROMA_VOICE / --voice = 'support-anna': .*stored voices: none"):
        worker.load_worker_engine(config)
    chroma.close_engines()
    with pytest.raises(ConfigError, match="no default voice: set CHROMA_VOICE"):
        worker.load_worker_engine(WorkerConfig.from_env({}, model=str(tiny_dir), device="cpu",
                                                        voices_dir=str(tmp_path)))


# --- the command line --------------------------------------------------------------------------------------


def test_main_help_runs(capsys):
    assert worker.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("start", "dev", "console", "connect", "CHROMA_MODEL", "CHROMA_MAX_SESSIONS", "LIVEKIT_URL"):
        assert word in out


def test_command_help_shows_livekit_options_too(capsys):
    assert worker.main(["start", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--drain-timeout" in out


def test_main_refuses_bad_settings_before_loading_anything(capsys, monkeypatch):
    monkeypatch.delenv("CHROMA_MODEL", raising=False)
    monkeypatch.setattr(worker, "load_worker_engine", lambda config: pytest.fail("must not load"))
    assert worker.main(["start", "--max-sessions", "lots"]) == 2
    assert "CHROMA_MAX_SESSIONS / --max-sessions = 'lots'" in capsys.readouterr().err
    assert worker.main([]) == 2
    assert worker.main(["serve"]) == 2


def test_main_loads_the_model_then_hands_over_to_livekit(tiny_dir, golden_dir, voice_text, monkeypatch,
                                                         shared_engines):
    seen = {}

    def fake_cli(server, args):
        seen.update(server=server, args=list(args))
        return 0

    monkeypatch.setattr(worker, "_run_livekit_cli", fake_cli)
    for var in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(var, raising=False)
    code = worker.main(["dev", "--model", str(tiny_dir), "--device", "cpu", "--voice-audio",
                        str(golden_dir / "voice.wav"), "--voice-text", voice_text, "--log-level", "debug",
                        "--url", "ws://localhost:7880", "--api-key", "devkey", "--api-secret", "secret"])
    assert code == 0
    assert seen["args"][:3] == ["dev", "--log-level", "debug"]
    assert seen["args"][3:] == ["--url", "ws://localhost:7880", "--api-key", "devkey",
                                "--api-secret", "secret"]
    assert seen["server"]._job_executor_type == JobExecutorType.THREAD
    (engine,) = chroma.loaded_engines().values()
    assert engine.default_voice is not None


def test_entrypoint_gives_each_call_its_settings(tiny_dir, golden_dir, voice_text, monkeypatch, caplog,
                                                 shared_engines):
    """The job entrypoint with a stand-in JobContext and AgentSession (no LiveKit server here)."""
    import asyncio

    from livekit import rtc

    config = WorkerConfig.from_env({}, model=str(tiny_dir), device="cpu", greeting="Say hello.",
                                   voice_audio=str(golden_dir / "voice.wav"), voice_text=voice_text)
    proc = SimpleNamespace(userdata={})
    worker.prewarm(proc, config=config)
    started = {}

    class FakeSession:
        def __init__(self, **kwargs):
            started["session"] = kwargs

        async def start(self, *, agent, room, room_options):
            started.update(agent=agent, room=room, room_options=room_options)

        def generate_reply(self, **kwargs):
            started["reply"] = kwargs

    async def connect():
        started["connected"] = True

    caller = SimpleNamespace(identity="sip_+15550100", kind=rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
                             attributes={"sip.phoneNumber": "+15550100", "chroma.voice": "nobody"})

    async def wait_for_participant():
        return caller

    ctx = SimpleNamespace(proc=proc, job=SimpleNamespace(metadata='{"instructions": "You sell shoes."}'),
                          room=SimpleNamespace(name="call-1", metadata='{"chroma": {"temperature": 0.2}}'),
                          is_fake_job=lambda: False, connect=connect,
                          wait_for_participant=wait_for_participant)
    monkeypatch.setattr(worker, "AgentSession", FakeSession)
    with caplog.at_level(logging.INFO, logger="chroma_agent.worker"):
        asyncio.run(worker.entrypoint(ctx, config=config))
    model = started["session"]["llm"]
    assert isinstance(model, chroma.RealtimeModel) and model.engine is proc.userdata["engine"]
    assert model.options.voice is None and model.options.temperature == 0.2  # unknown voice: the default
    assert started["session"]["turn_handling"] == {"interruption": {"mode": "vad"}}
    assert started["session"]["vad"] is proc.userdata["vad"]
    assert started["agent"].instructions == "You sell shoes." and started["connected"]
    assert started["room_options"].participant_identity == "sip_+15550100"
    assert started["reply"] == {"instructions": "Say hello."}
    assert "phone call from sip_+15550100" in caplog.text
    assert "voice 'nobody' is not a stored voice" in caplog.text


# --- remote mode: the model runs in a `chroma-agent serve` ------------------------------------------------------


REMOTE = {"CHROMA_SERVER_URL": "http://gpu-box:8000", "CHROMA_VOICE": "support-anna"}


def test_remote_mode_loads_no_model_and_each_call_talks_to_the_server(monkeypatch):
    config = WorkerConfig.from_env(REMOTE)
    assert config.remote
    monkeypatch.setattr(worker, "load_worker_engine", lambda config: pytest.fail("must not load a model"))
    proc = SimpleNamespace(userdata={})
    worker.prewarm(proc, config=config)
    assert "engine" not in proc.userdata and proc.userdata["vad"] is not None
    model = worker.realtime_model(config, CallSettings(temperature=0.3), None)
    assert model.options.base_url == "http://gpu-box:8000" and model.engine is None
    assert model.options.voice == "support-anna" and model.options.temperature == 0.3  # the worker's default
    assert worker.realtime_model(config, CallSettings(voice="other"), None).options.voice == "other"
    # Load: this worker's calls over its --max-sessions (the server's slots are shared with other clients).
    assert worker.worker_load(SimpleNamespace(active_jobs=[object()]), config=config) == 1 / 4


def test_remote_mode_cannot_clone_a_voice(golden_dir):
    with pytest.raises(ConfigError, match="clone the voice on the server"):
        WorkerConfig.from_env({**REMOTE, "CHROMA_VOICE_AUDIO": str(golden_dir / "voice.wav"),
                               "CHROMA_VOICE_TEXT": "Hello."})


@pytest.mark.parametrize(("url", "health"), [
    ("http://gpu-box:8000", "http://gpu-box:8000/health"),
    ("https://chroma.example.com/v1/", "https://chroma.example.com/health"),
    ("wss://chroma.example.com/v1/realtime", "https://chroma.example.com/health"),
    ("ws://10.0.0.5:8000/prefix/v1", "http://10.0.0.5:8000/prefix/health"),
])
def test_the_server_is_probed_at_its_health_endpoint(url, health):
    assert worker.health_url(url) == health


def test_main_gives_up_on_a_server_that_never_answers(capsys, monkeypatch):
    import socket

    monkeypatch.setattr(worker, "_run_livekit_cli", lambda server, args: pytest.fail("must not register"))
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert worker.main(["console", "--server-url", f"http://127.0.0.1:{port}", "--load-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert f"CHROMA_SERVER_URL / --server-url = 'http://127.0.0.1:{port}'" in err
    assert "did not answer within 1 s" in err and "CHROMA_LOAD_TIMEOUT" in err



def test_remote_calls_ask_the_server_for_their_voice(make_engine, golden_voice, monkeypatch, caplog):
    """A call naming a voice the server lacks speaks with the default one instead of failing (a real server)."""
    import asyncio

    from chroma_agent.server.app import create_app
    from chroma_agent.server.runner import ServerThread

    engine = make_engine(golden_default_voice=golden_voice)
    engine.voices.save(golden_voice)
    with ServerThread(create_app(engine)) as server:
        config = WorkerConfig.from_env({"CHROMA_SERVER_URL": server.url})
        assert worker.remote_voice_exists(config, "golden") and not worker.remote_voice_exists(config, "nobody")
        seen = []

        class FakeSession:
            def __init__(self, **kwargs):
                seen.append(kwargs["llm"])

            async def start(self, **kwargs):
                pass

        monkeypatch.setattr(worker, "AgentSession", FakeSession)
        for voice in ("golden", "nobody"):
            ctx = SimpleNamespace(proc=SimpleNamespace(userdata={"vad": object()}),
                                  job=SimpleNamespace(metadata=json.dumps({"voice": voice})),
                                  room=SimpleNamespace(name="room", metadata=""), is_fake_job=lambda: True)
            with caplog.at_level(logging.WARNING, logger="chroma_agent.worker"):
                asyncio.run(worker.entrypoint(ctx, config=config))
    assert [model.options.voice for model in seen] == ["golden", None]
    assert all(model.options.base_url == server.url for model in seen)
    assert "voice 'nobody' is not stored on" in caplog.text
