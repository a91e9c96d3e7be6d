"""The README, docs/ and the examples' READMEs as a new user reads them: their examples run, their tables are true.

Every shell block in those files carries a marker on the line before it, and the marker says what this test does
with the block:

    <!-- example: run -->               run it; it must exit 0 (bash -e -o pipefail)
    <!-- example: server -->            a command that serves: start it, wait until it answers, stop it
    <!-- example: not run (REASON) -->  what it needs that cannot exist here (a LiveKit server, a GPU, Docker, ...)

Python blocks marked ``run`` are run as scripts too. Blocks run in the order they appear, each file in one
sandbox folder, like a reader working down the page in one terminal with the virtual environment activated (the
README says to activate it, or to prefix the commands with ``.venv/bin/``). The sandbox holds the files the
examples name (ref.wav + ref.txt, anna.wav, question.wav, assets/question_audio.wav, assets/ref_audio.wav: the
golden case's clips) and a `chroma-agent serve` on the tiny model, started the way docs/api.md starts it
(``--assets-dir`` the sandbox, a default voice cloned from ref.wav).

What the examples say and what runs here differ only where this machine must: ``FlashLabs/Chroma-4B`` becomes
``tiny`` (no 4B download; ``CHROMA_MODEL=tiny`` for the commands that name no model), ``--device cuda`` / ``--dtype bfloat16`` become ``auto`` when there is no GPU, the
server address ``localhost:8000`` (or ``gpu-box:8000``) becomes the sandbox server's port, and a serving
command's ``--port`` (or ``CHROMA_PORT``, when it names none) a free port. Every WAV file a block writes must be
a decodable WAV holding audio.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from chroma_agent.config_table import markdown_table

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").rglob("README.md"))]
SHELL = ("bash", "sh", "shell")
MARKER_RE = re.compile(r"^\s*<!-- example: (?P<kind>run|server|not run \((?P<reason>[^)]+)\)) -->\s*$")
FENCE_RE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
TABLE_START, TABLE_END = "<!-- configuration table: start -->", "<!-- configuration table: end -->"


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    kind: str | None  # run, server, not run; None: no marker
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = FENCE_RE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence["indent"], i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:j])
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER_RE.match(lines[k]) if k >= 0 else None
        kind = None if marker is None else ("not run" if marker["reason"] else marker["kind"])
        found.append(Block(path, start + 1, fence["lang"], kind, code + "\n"))
        i = j + 1
    return found


ALL_BLOCKS = [block for path in DOCS for block in blocks(path)]


def test_every_shell_example_says_whether_it_runs_here():
    unmarked = [str(b) for b in ALL_BLOCKS if b.lang in SHELL and b.kind is None]
    assert not unmarked, f"shell blocks without an <!-- example: ... --> marker: {unmarked}"
    assert sum(b.kind in ("run", "server") for b in ALL_BLOCKS) >= 15


def test_the_readme_configuration_table_is_the_parsers():
    """README's table is `python -m chroma_agent.config` output: the flags, variables and defaults the parser
    really has (and the parser's defaults are these classes' fields)."""
    readme = (REPO / "README.md").read_text()
    assert TABLE_START in readme and TABLE_END in readme
    table = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip() + "\n"
    assert table == markdown_table(), "README's configuration table is stale: regenerate it with " \
                                      "`.venv/bin/python -m chroma_agent.config_table`"


@pytest.mark.parametrize(("command", "flag", "env", "default"), [
    ("serve", "--max-sessions", "CHROMA_MAX_SESSIONS", "4"),
    ("serve", "--device", "CHROMA_DEVICE", "auto"),
    ("serve", "--dtype", "CHROMA_DTYPE", "auto"),
    ("playground", "--port", "CHROMA_PORT", "8080"),
    ("start", "--max-sessions", "CHROMA_MAX_SESSIONS", "4"),
    ("start", "--device", "CHROMA_DEVICE", "auto"),
    ("start", "--dtype", "CHROMA_DTYPE", "auto"),
    ("start", "--model", "CHROMA_MODEL", "FlashLabs/Chroma-4B"),
])
def test_help_shows_the_defaults_the_table_shows(command, flag, env, default):
    result = subprocess.run([sys.executable, "-m", "chroma_agent.cli", command, "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 0, result.stderr
    # One option's help: its line and the wrapped lines under it, up to the next option.
    entries = re.split(r"\n(?=  -)", result.stdout)
    entry = " ".join(next(e for e in entries if e.strip().startswith(flag + " ")).split())
    assert f"[{env}" in entry and f"default: {default}" in entry, entry
    row = next(r for r in markdown_table().splitlines() if r.startswith(f"| `{flag}` | `{env}`"))
    assert f"`{default}`" in row, row


# --- running the examples ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture()
def sandbox(tmp_path, golden_dir, case):
    """The reader's folder (one per file): the clips the examples name, the venv and examples/ at hand, and a
    server running."""
    root = tmp_path / "reader"
    root.mkdir()
    voice_text = case["voice_text"]
    for name in ("ref.wav", "anna.wav"):
        shutil.copy(golden_dir / "voice.wav", root / name)
    shutil.copy(golden_dir / "user1.wav", root / "question.wav")
    (root / "ref.txt").write_text(voice_text + "\n")
    (root / "assets").mkdir()
    shutil.copy(golden_dir / "user1.wav", root / "assets" / "question_audio.wav")
    shutil.copy(golden_dir / "voice.wav", root / "assets" / "ref_audio.wav")
    for name in (".venv", "examples"):
        (root / name).symlink_to(REPO / name)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "LIVEKIT_"))}
    # No CHROMA_API_KEY: the server is open, as FlashLabs' is (its examples send no key; ours send an empty one).
    env.update(HOME=str(root / "home"), CHROMA_VOICES_DIR=str(root / "voices"), PYTHONUNBUFFERED="1",
               CHROMA_MODEL="tiny",  # for the commands that name no model (their default is the 4B download)
               LIVEKIT_URL="wss://example.livekit.cloud", LIVEKIT_API_KEY="APIexample",
               LIVEKIT_API_SECRET="example-secret-example-secret-000")
    # The reader's shell: no venv on PATH until they activate it (each block starts with `source activate`).
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    port = free_port()
    server = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "chroma-agent"), "serve", "--model", "tiny", "--port", str(port),
         "--assets-dir", str(root), "--voice-audio", "ref.wav", "--voice-text", voice_text],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/health")
        yield {"root": root, "env": env, "port": port}
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{url} did not answer within {timeout} s:\n{proc.communicate()[0][-3000:]}")


def adapt(code: str, sandbox: dict) -> str:
    code = re.sub(r"http://(localhost|gpu-box):8000", f"http://127.0.0.1:{sandbox['port']}", code)
    code = code.replace("FlashLabs/Chroma-4B", "tiny")
    if not cuda():
        code = code.replace("--device cuda", "--device auto").replace("--dtype bfloat16", "--dtype auto")
    return code


def check_new_wavs(root: Path, since: float, block: Block) -> None:
    for wav in root.rglob("*.wav"):
        if wav.is_file() and not wav.is_symlink() and wav.stat().st_mtime >= since:
            try:
                info = sf.info(str(wav))
            except RuntimeError as exc:
                pytest.fail(f"{block} wrote {wav.name}, which is not a WAV file ({wav.stat().st_size} bytes): {exc}")
            assert info.frames > 0, f"{block} wrote {wav.name} without audio"


def run_block(block: Block, sandbox: dict) -> None:
    t0 = time.monotonic()
    try:
        _run_block(block, sandbox)
    finally:
        print(f"{block}: {block.kind} {time.monotonic() - t0:.1f} s")


def _run_block(block: Block, sandbox: dict) -> None:
    root, env = sandbox["root"], dict(sandbox["env"])
    code = adapt(block.code, sandbox)
    since = time.time() - 1
    if block.lang == "python":
        (root / "example.py").write_text(code)
        argv = [str(root / ".venv" / "bin" / "python"), "example.py"]
    elif block.kind == "server":
        return serve_block(block, code, sandbox)
    else:
        (root / "example.sh").write_text("set -eo pipefail\nsource .venv/bin/activate\n" + code)
        argv = ["bash", "example.sh"]
    result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{code}\n--- stdout\n" \
                                   f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    check_new_wavs(root, since, block)


def serve_block(block: Block, code: str, sandbox: dict) -> None:
    """Start the one command of `block`, wait until it answers over HTTP, stop it with Ctrl-C."""
    root, env = sandbox["root"], dict(sandbox["env"])
    port = free_port()
    command = code.strip()
    if command.startswith("make demo"):  # what make would run, with the PORT= the README documents
        recipe = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "-o", ".venv/.installed-stamp", "demo",
                                 f"PORT={port}"], capture_output=True, text=True, timeout=60, check=True)
        command = recipe.stdout.strip()
        assert f"--port {port}" in command, command
    elif re.search(r"--port \d+", command):
        command = re.sub(r"--port \d+", f"--port {port}", command)
    else:
        env["CHROMA_PORT"] = str(port)
    (root / "example.sh").write_text(f"source .venv/bin/activate\nexec {command}\n")
    proc = subprocess.Popen(["bash", "example.sh"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        path = "/health" if " serve" in command else "/"
        wait_until_serving(proc, f"http://127.0.0.1:{port}{path}")
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGINT), f"{block}: {command}\n{output[-3000:]}"


RUNNABLE = sorted({b.path for b in ALL_BLOCKS if b.kind in ("run", "server")})


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_the_examples_run(path, sandbox):
    for block in blocks(path):
        if block.kind in ("run", "server"):
            run_block(block, sandbox)


def test_api_examples_say_what_they_print(sandbox):
    """The JSON a docs/api.md comment shows after a curl is what the server answers (its keys at least)."""
    shown = re.findall(r"^curl -sS (http://localhost:8000/\S+)[^\n]*\n# (\{.*\})$", (REPO / "docs" / "api.md")
                       .read_text(), re.M)
    assert shown
    for url, comment in shown:
        expected = json.loads(comment.replace('"..."', '""'))
        answer = httpx.get(adapt(url, sandbox), timeout=30).json()
        assert set(expected) <= set(answer), (url, answer)
