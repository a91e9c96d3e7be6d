"""Shared test fixtures: the reference-made tiny checkpoint and its golden outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # in the repository: see its README.md


def _fixture_dir() -> Path:
    override = os.environ.get("CHROMA_TINY_FIXTURE")
    path = Path(override) if override else FIXTURES / "chroma-tiny"
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"the reference tiny checkpoint is missing at {path}: "
            + ("CHROMA_TINY_FIXTURE names a folder without config.json" if override
               else "tests/fixtures/chroma-tiny is part of the repository; restore it with git checkout")
        )
    return path


# Where the browser tests look for Chromium: the same places, in the same order, as
# scripts/install_browser_deps.sh (which installs one with apt only when none of these exists).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_HINT = ("run scripts/install_browser_deps.sh (make test does), install Chromium or Chrome on PATH, "
                "or set CHROMIUM=/path/to/chromium")


def find_chromium() -> Path | None:
    """$CHROMIUM (a path or a command), else the first of BROWSERS on PATH."""
    override = os.environ.get("CHROMIUM")
    names = (override,) if override else BROWSERS
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The Chromium the browser tests drive. A missing one fails them (it is a test requirement, not an
    optional extra), with what to do about it."""
    found = find_chromium()
    if found is None:
        where = f"CHROMIUM={os.environ['CHROMIUM']} is not an executable" if os.environ.get("CHROMIUM") else (
            f"none of {', '.join(BROWSERS)} is on PATH")
        pytest.fail(f"no Chromium for the browser test: {where}; {BROWSER_HINT}")
    return found


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return _fixture_dir()


@pytest.fixture(scope="session")
def golden_dir(tiny_dir: Path) -> Path:
    return tiny_dir / "golden" / "public_single_turn"


@pytest.fixture(scope="session")
def golden_inputs(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "inputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_outputs(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def case(golden_dir: Path) -> dict:
    """The golden case's case.json: messages, voice transcript, expected text."""
    import json

    return json.loads((golden_dir / "case.json").read_text())


@pytest.fixture(scope="session")
def user_pcm16(golden_dir: Path) -> np.ndarray:
    """The golden user turn (user1.wav) as int16 samples at 16 kHz."""
    import soundfile as sf

    audio, rate = sf.read(str(golden_dir / "user1.wav"), dtype="int16")
    assert rate == 16000
    return audio


@pytest.fixture(scope="session")
def params_tsv() -> Path:
    return FIXTURES / "chroma-4b-params.tsv"


@pytest.fixture(scope="session")
def full_config_json() -> Path:
    return FIXTURES / "chroma-4b-config.json"


@pytest.fixture(scope="session")
def tiny_parts(tiny_dir):
    """(ChromaModel, ChromaProcessor) of the reference tiny checkpoint, loaded once per test run."""
    from chroma_agent.model.chroma import ChromaModel
    from chroma_agent.model.processor import ChromaProcessor

    return ChromaModel.from_pretrained(tiny_dir, progress=False), ChromaProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def golden_voice(tiny_parts, golden_dir):
    """The golden case's voice prompt as a VoiceProfile (named "golden")."""
    import json

    from chroma_agent.voices import create_voice_profile

    model, processor = tiny_parts
    text = json.loads((golden_dir / "case.json").read_text())["voice_text"]
    return create_voice_profile(model, processor, golden_dir / "voice.wav", text, name="golden")


@pytest.fixture()
def make_engine(tiny_parts, tmp_path):
    """Factory for engines on the tiny checkpoint (closed at the end of the test)."""
    from chroma_agent.engine.engine import Engine, EngineConfig
    from chroma_agent.engine.sampling import SamplingParams
    from chroma_agent.voices import VoiceStore

    engines = []

    def make(golden_default_voice=None, **config):
        model, processor = tiny_parts
        eng = Engine(model, processor, EngineConfig(**config), voices=VoiceStore(tmp_path / "voices"),
                     default_voice=golden_default_voice, sampling=SamplingParams())
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()


@pytest.fixture()
def start_server(make_engine, golden_voice):
    """start_server(slots=2, engine_config=None, **settings) -> a started ServerThread on a tiny engine whose
    default voice is the golden one (`.engine` reaches it); every server started is stopped after the test."""
    from chroma_agent.server.app import create_app
    from chroma_agent.server.runner import ServerThread
    from chroma_agent.server.settings import ServerSettings

    started = []

    def start(slots: int = 2, engine_config: dict | None = None, **settings):
        engine = make_engine(golden_default_voice=golden_voice, **{"max_sessions": slots, **(engine_config or {})})
        running = ServerThread(create_app(engine, ServerSettings(**settings))).start()
        running.engine = engine
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


class EngineState:
    """A conversation's engine-side state, read on the engine thread (the only thread that may touch it).

    Tests use it to look inside; front ends never need it.
    """

    def __init__(self, engine, session_id: str):
        self.engine = engine
        self.session_id = session_id

    def view(self):
        engine = self.engine
        return engine.post(None, None, lambda *_: engine._sessions[self.session_id].view()).result(timeout=10)

    @property
    def history(self) -> list[dict]:
        """Turns after the instructions: role, text, audio seconds."""
        return [h for h, t in zip(self.view().history, self.view().turns, strict=True) if not t.instructions]

    @property
    def turns(self):
        return self.view().turns

    @property
    def instructions(self) -> str | None:
        return next((t.text for t in self.view().turns if t.instructions), None)

    @property
    def voice(self):
        engine = self.engine
        return engine.post(None, None, lambda *_: engine._sessions[self.session_id].voice).result(timeout=10)

    @property
    def replying(self) -> bool:
        return self.view().replying

    @property
    def response(self):
        """The running reply's `Response` (its counters are plain attributes, safe to read from here)."""
        engine = self.engine

        def current():
            reply = engine._sessions[self.session_id].reply
            return None if reply is None else reply.response

        return engine.post(None, None, lambda *_: current()).result(timeout=10)


def engine_sessions(engine) -> list[EngineState]:
    """Every open conversation of an engine."""
    ids = engine.post(None, None, lambda *_: list(engine._sessions)).result(timeout=10)
    return [EngineState(engine, sid) for sid in ids]
