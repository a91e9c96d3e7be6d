"""README's Python example, run as written on the tiny checkpoint: it imports the public API only, and it works.

The only changes made to it here: the tiny checkpoint instead of Chroma-4B, the CPU instead of CUDA, 1 s replies
(random weights never end a reply by themselves), and stand-ins for the two names it leaves to the reader
(``pcm_int16``, the user's audio, and ``play``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import numpy as np

from chroma_agent import VoiceStore
from chroma_agent.audio import resample

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_imports_the_public_api_only():
    imports = [n for n in ast.walk(ast.parse(python_example())) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in imports] == ["chroma_agent"]


def test_the_example_runs(tiny_dir, golden_voice, user_pcm16, tmp_path, monkeypatch, capsys):
    VoiceStore(tmp_path).save(dataclasses.replace(golden_voice, name="support-anna"))
    monkeypatch.setenv("CHROMA_VOICES_DIR", str(tmp_path))
    code = python_example()
    for old, new in [('"FlashLabs/Chroma-4B"', repr(str(tiny_dir))), ('device="cuda", dtype="bfloat16"',
                      'device="cpu", dtype="float32"'), ("max_sessions=16)", "max_sessions=16, max_reply_s=1.0)")]:
        assert old in code
        code = code.replace(old, new)
    played: list[bytes] = []
    pcm = resample(user_pcm16.astype(np.float32) / 32768, 16000, 48000)
    exec(compile(code, "README.md", "exec"), {"pcm_int16": (pcm * 32767).astype(np.int16), "play": played.append})
    assert len(played) == 12 and all(len(chunk) == 1920 * 2 for chunk in played)  # 1 s: 12 whole 80 ms frames
    assert "(max_frames; first audio after" in capsys.readouterr().out
