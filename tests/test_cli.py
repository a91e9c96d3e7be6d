"""`chroma-agent generate` / `make-tiny` end to end, and its handling of bad input (exit code 2)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from chroma_agent.cli import main


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chroma_agent.cli", *argv], capture_output=True, text=True, timeout=300
    )


@pytest.fixture()
def golden_case(tmp_path, golden_dir) -> Path:
    """The golden conversation as the CLI takes it: conv.json beside its audio, relative paths."""
    case = json.loads((golden_dir / "case.json").read_text())
    shutil.copy(golden_dir / "user1.wav", tmp_path / "user1.wav")
    (tmp_path / "conv.json").write_text(json.dumps(case["messages"]))
    return tmp_path


def test_generate_reproduces_the_golden_reply(tiny_dir, golden_dir, golden_case, golden_outputs):
    case = json.loads((golden_dir / "case.json").read_text())
    out = golden_case / "reply.wav"
    result = _run(
        "generate", "--model", str(tiny_dir), "--messages", str(golden_case / "conv.json"),
        "--voice-audio", str(golden_dir / "voice.wav"), "--voice-text", case["voice_text"],
        "--greedy", "--max-frames", "32", "--out", str(out),
        "--codes-out", str(golden_case / "codes.npy"), "--text-out", str(golden_case / "reply.txt"),
    )
    assert result.returncode == 0, result.stderr
    codes = np.load(golden_case / "codes.npy")
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, golden_outputs["frames"])
    audio, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and audio.shape == golden_outputs["waveform"].shape
    # The WAV is 16-bit, so compare at PCM resolution (the golden waveform peaks near 76: clipped).
    expected = np.clip(golden_outputs["waveform"], -1, 1)
    assert np.abs(audio - expected).max() < 2e-3
    assert (golden_case / "reply.txt").read_text().strip() == case["thinker_text"].replace("<|im_end|>", "")
    assert "time to first frame" in result.stdout and "real-time factor" in result.stdout


def test_seeded_sampling_is_reproducible(tiny_dir, golden_dir, golden_case):
    outputs = []
    for name in ("a", "b", "c"):
        seed = "7" if name != "c" else "8"
        result = _run(
            "generate", "--model", str(tiny_dir), "--messages", str(golden_case / "conv.json"),
            "--voice-audio", str(golden_dir / "voice.wav"), "--voice-text", "Hello there.",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", seed, "--max-frames", "12",
            "--out", str(golden_case / f"{name}.wav"), "--codes-out", str(golden_case / f"{name}.npy"),
        )
        assert result.returncode == 0, result.stderr
        outputs.append(np.load(golden_case / f"{name}.npy"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_make_tiny_then_generate(tmp_path, golden_dir, golden_case):
    assert main(["make-tiny", str(tmp_path / "tiny")]) == 0
    result = _run(
        "generate", "--model", str(tmp_path / "tiny"), "--messages", str(golden_case / "conv.json"),
        "--voice-audio", str(golden_dir / "voice.wav"), "--voice-text", "Hello there.",
        "--max-frames", "6", "--seed", "1", "--out", str(tmp_path / "r.wav"), "--codes-out", str(tmp_path / "c.npy"),
    )
    assert result.returncode == 0, result.stderr
    codes = np.load(tmp_path / "c.npy")
    assert codes.shape[1] == 8 and 1 <= codes.shape[0] <= 6
    audio, rate = sf.read(str(tmp_path / "r.wav"))
    assert rate == 24000 and len(audio) == codes.shape[0] * 1920


def _wav_bytes(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_model", "checkpoint folder not found"),
        ("corrupt_user_wav", "not a decodable audio file"),
        ("empty_user_wav", "empty"),
        ("bad_json", "not valid JSON"),
        ("missing_voice", "not found"),
        ("empty_voice_text", "--voice-text is missing"),
        ("missing_tokenizer", "tokenizer"),
        ("missing_weights", "model.safetensors"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tiny_dir, golden_dir, golden_case, setup, message):
    model = str(tiny_dir)
    conv = golden_case / "conv.json"
    voice = str(golden_dir / "voice.wav")
    voice_text = "Hello there."
    if setup == "missing_model":
        model = str(tmp_path / "nowhere")
    elif setup == "corrupt_user_wav":
        (golden_case / "user1.wav").write_bytes(b"RIFF this is not audio at all")
    elif setup == "empty_user_wav":
        (golden_case / "user1.wav").write_bytes(_wav_bytes(np.zeros(0, dtype=np.float32), 16000))
    elif setup == "bad_json":
        conv.write_text("[{not json")
    elif setup == "missing_voice":
        voice = str(tmp_path / "nope.wav")
    elif setup == "empty_voice_text":
        voice_text = "   "
    elif setup in ("missing_tokenizer", "missing_weights"):
        copy = tmp_path / "ckpt"
        shutil.copytree(tiny_dir, copy, ignore=shutil.ignore_patterns("golden"))
        (copy / ("tokenizer.json" if setup == "missing_tokenizer" else "model.safetensors")).unlink()
        if setup == "missing_tokenizer":
            (copy / "vocab.json").unlink()
            (copy / "merges.txt").unlink()
        model = str(copy)
    result = _run(
        "generate", "--model", model, "--messages", str(conv), "--voice-audio", voice, "--voice-text", voice_text,
        "--max-frames", "2", "--out", str(tmp_path / "r.wav"),
    )
    assert result.returncode == 2, result.stderr
    assert "chroma-agent: error:" in result.stderr
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
