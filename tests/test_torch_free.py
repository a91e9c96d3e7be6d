"""A worker that only talks to a GPU server needs no torch: the LiveKit plugin in remote mode, the realtime
protocol and its client, in a real venv where torch is not installed, holding a conversation with a tiny server.

The venv is made with ``python -m venv --without-pip`` and given exactly what ``pip install
"chroma-agent[livekit]"`` would give it: the dependency closure of the project's dependencies and its
``livekit`` extra, as pyproject.toml lists them, with the versions this test venv has installed (their files
hard-linked, or copied across filesystems; no index, no network), plus this repository on its path. torch is
not in that closure; the test fails if it ever becomes part of it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

from chroma_agent.server.app import create_app
from chroma_agent.server.runner import ServerThread
from chroma_agent.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# what `pip install "chroma-agent[livekit]"` asks for
REMOTE_NEEDS = [Requirement(r).name for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["livekit"]]
KEY = "torch-free-key-0123456789"
GOLDEN_FRAMES = 8


def closure(roots: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` need, by normalised name (markers evaluated, no extras)."""
    env = {**default_environment(), "extra": ""}
    found: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def install_by_link(dist: metadata.Distribution, site: Path) -> None:
    """What ``pip install --no-deps`` would put in `site`, from the files already installed here."""
    for file in dist.files or []:
        if file.parts[0] == "..":  # scripts and data outside site-packages: remote mode needs none
            continue
        source, target = Path(dist.locate_file(file)), site / file
        if not source.is_file() or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory) -> Path:
    needed = closure(REMOTE_NEEDS)
    assert "torch" not in needed, "remote mode's dependencies now pull in torch"
    root = tmp_path_factory.mktemp("torch-free") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for dist in needed.values():
        install_by_link(dist, site)
    # this checkout, as an editable install puts it: chroma_agent and the plugin's namespace package
    (site / "chroma_agent_checkout.pth").write_text(f"{REPO}\n{REPO / 'plugin'}\n")
    return python


def test_remote_mode_imports_and_converses_without_torch(torch_free_python, make_engine, golden_voice,
                                                         golden_dir, case):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    server = ServerThread(create_app(engine, ServerSettings(api_key=KEY)), port=0).start()
    try:
        done = subprocess.run(
            [torch_free_python, str(REPO / "tests" / "remote_without_torch.py"), server.url, KEY,
             str(golden_dir / "user1.wav"), case["system_prompt"], str(GOLDEN_FRAMES)],
            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": ""},
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["start_help"] == 0
    assert result["has_torch"] is False and result["torch_loaded"] is False
    from chroma_agent import __version__

    assert result["version"] == __version__
    # the golden reply, greedy, through the server: the plugin's remote mode works end to end
    assert result["frames"] == GOLDEN_FRAMES and result["samples"] == [1920] and result["connections"] == 1
    assert result["text"] == case["thinker_text"].replace("<|im_end|>", "")[: len(result["text"])]


def test_the_closure_is_computed_from_metadata_not_guessed():
    # guards the fixture: a package remote mode imports is really in the set it installs
    needed = closure(REMOTE_NEEDS)
    assert {"livekit-agents", "livekit", "livekit-plugins-silero", "aiohttp", "numpy", "pydantic", "soxr"} <= set(needed)
    assert metadata.distribution("torch")  # installed here, left out there: the venv is really without it
