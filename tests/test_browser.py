"""The playground end to end in a real browser: headless Chromium with a fake microphone playing a WAV.

Chromium and Playwright's Python package are required, not optional: scripts/install_browser_deps.sh (run by
`make test`) finds or installs them, and a missing one fails this test instead of silently skipping it. The
browser is $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH (conftest.find_chromium).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import uvicorn

from chroma_agent.audio import encode_wav, resample
from chroma_agent.webrtc.playground import TINY_NOTICE, create_app, open_engine

INSTALL_HINT = "run scripts/install_browser_deps.sh (make test does)"
FLAGS = [
    # Passed by hand with headless=False: Playwright's own headless mode adds --mute-audio.
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]
MIC_RATE = 48_000  # what Chromium's fake capture device plays best: 16-bit PCM at 48 kHz
AGENT_RMS = 0.05  # about -26 dBFS: far above Opus's residue of silence, far below the tiny model's noise


def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright Python package is missing: {INSTALL_HINT}")
    return sync_playwright()


@pytest.fixture()
def microphone_wav(golden_dir, tmp_path) -> Path:
    """Speech, a pause that ends the turn, speech again, then silence long enough for a whole reply.

    Chromium loops the file, so a second turn comes even if the browser's echo canceller swallows the speech
    that overlaps the first reply.
    """
    speech, rate = sf.read(str(golden_dir / "user1.wav"), dtype="float32")
    speech = resample(speech[: 2 * rate], rate, MIC_RATE)

    def pause(seconds: float) -> np.ndarray:
        return np.zeros(round(seconds * MIC_RATE), dtype=np.float32)

    path = tmp_path / "microphone.wav"
    path.write_bytes(encode_wav(np.concatenate([pause(0.3), speech, pause(1.5), speech, pause(5.5)]), MIC_RATE))
    return path


@pytest.fixture()
def playground_url(tmp_path):
    """The playground exactly as `chroma-agent playground` serves it (tiny model), uvicorn in a thread."""
    engine, voice = open_engine("tiny", tiny_dir=tmp_path / "tiny")
    app = create_app(engine, voice=voice, notice=TINY_NOTICE)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the playground server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)
    sock.close()
    engine.close()


@pytest.mark.timeout(90)
def test_browser_talks_to_the_agent(playground_url, microphone_wav, tmp_path, chromium):
    console: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(chromium), headless=False, timeout=30_000,
            args=[*FLAGS, f"--use-file-for-fake-audio-capture={microphone_wav}"],
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(playground_url)
            # Before the first click: the noise warning, and (on localhost) no "no microphone here" warning.
            page.wait_for_selector("#notice:not([hidden])", timeout=5000)
            notice_before_click = page.inner_text("#notice")
            insecure_shown = page.is_visible("#insecure")
            remote_hint = page.inner_text("#remote-hint")
            page.click("#start")

            def wait(condition: str, what: str, timeout_s: float) -> None:
                try:
                    page.wait_for_function(condition, timeout=timeout_s * 1000, polling=100)
                except Exception:
                    seen = page.evaluate("() => JSON.stringify(playground, (k, v) => k === 'item' ? undefined : v)")
                    pytest.fail(f"{what} within {timeout_s} s; page state: {seen}; console: {console}")

            wait("() => ['connected', 'completed'].includes(playground.ice)", "ICE did not connect", 15)
            # Two replies whose audio the page heard through WebAudio (AnalyserNode on the remote track).
            wait(f"() => Object.values(playground.turns).filter(t => t.reason && t.peakRms > {AGENT_RMS}).length >= 2",
                 "two replies were not heard", 50)
            turns = page.evaluate("() => Object.values(playground.turns).map(({item, ...t}) => t)")
            shown = page.inner_text("#transcript")
            notice = page.inner_text("#notice")
            errors = page.evaluate("() => playground.errors")
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        finally:
            context.close()

    heard = [t for t in turns if t["reason"] and t["peakRms"] > AGENT_RMS]
    assert len(heard) >= 2 and not errors, (turns, errors)
    assert all(t["ttfaMs"] is not None and t["firstAudioMs"] >= t["ttfaMs"] for t in heard), turns
    assert len(re.findall(r"time to first audio \d+ ms", shown)) >= 2, shown
    texts = [t["text"].strip() for t in heard if t["text"].strip()]
    assert texts and all(text in shown for text in texts), (texts, shown)
    assert "random weights" in notice and "random weights" in notice_before_click
    assert not insecure_shown
    port = playground_url.rstrip("/").rsplit(":", 1)[1]
    assert f"ssh -N -L {port}:localhost:{port}" in remote_hint
