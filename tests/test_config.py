"""One configuration for every command: the same flag means the same everywhere; flag > environment > default."""

from __future__ import annotations

import argparse
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from chroma_agent import config
from chroma_agent.cli import build_parser, main
from chroma_agent.config import (
    SOURCES,
    DemoSettings,
    GenerateSettings,
    ModelSettings,
    PlaygroundSettings,
    ServeSettings,
    SettingsError,
    ensure_tiny_checkpoint,
)
from chroma_agent.worker import build_parser as worker_parser
from chroma_agent.worker_config import WorkerConfig


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings
            if action.help != argparse.SUPPRESS}


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: sub.choices[name] for name in ("generate", "demo", "serve", "playground")}
    parsers["start"] = worker_parser()
    return parsers


def test_a_flag_means_the_same_in_every_command_that_takes_it():
    seen: dict[str, tuple[str, str]] = {}
    livekit_names = {SOURCES[name].flag for name in ("livekit_url", "livekit_api_key", "livekit_api_secret")}
    for command, parser in command_parsers().items():
        for flag, action in _options(parser).items():
            if flag in ("-h", "--help"):
                continue
            meaning = (action.help or "").split(" [", 1)[0]
            if flag in seen and seen[flag][1] != meaning:
                # The only exception: a name livekit-agents' CLI fixes, and the help says so.
                assert command == "start" and flag in livekit_names, (flag, seen[flag], (command, meaning))
                assert "LiveKit's CLI name" in action.help, action.help
            seen.setdefault(flag, (command, meaning))
    parsers = command_parsers()
    for name in ("model", "device", "dtype", "voice", "voice_audio", "voice_text", "voices_dir"):
        takers = [command for command, parser in parsers.items() if SOURCES[name].flag in _options(parser)]
        everyone = ["generate", "demo", "serve", "playground", "start"]
        assert takers == (everyone if name in ("model", "device", "dtype") else everyone[:1] + everyone[2:]), name


def test_every_command_takes_the_settings_the_issue_lists():
    for command in ("serve", "playground", "start"):
        flags = _options(command_parsers()[command])
        for flag in ("--model", "--device", "--dtype", "--voice", "--voice-audio", "--voice-text", "--voices-dir",
                     "--max-sessions"):
            assert flag in flags, (command, flag)


def test_flags_win_over_the_environment_which_wins_over_defaults(tmp_path, tiny_dir):
    args = build_parser().parse_args(["serve", "--port", "9001"])
    env = {"CHROMA_PORT": "9002", "CHROMA_MAX_SESSIONS": "7", "CHROMA_MODEL_PATH": str(tiny_dir)}
    settings = ServeSettings.from_args(args, env=env)
    assert (settings.port, settings.max_sessions, settings.host) == (9001, 7, "127.0.0.1")
    assert settings.model == str(tiny_dir)  # FlashLabs' CHROMA_MODEL_PATH is accepted...
    settings = ServeSettings.from_args(args, env={**env, "CHROMA_MODEL": "tiny"})
    assert settings.model == "tiny"  # ...and CHROMA_MODEL comes first
    defaults = ServeSettings.from_sources({})
    assert (defaults.model, defaults.device, defaults.dtype, defaults.max_sessions) == (
        "FlashLabs/Chroma-4B", "auto", "auto", 4)
    assert PlaygroundSettings.from_sources({}).model == DemoSettings.from_sources({}).model == "tiny"
    assert WorkerConfig.from_env({}).max_sessions == defaults.max_sessions  # one default, not one per command


def test_blank_variables_are_unset_and_bad_ones_name_the_variable(tmp_path):
    settings = ServeSettings.from_sources({"CHROMA_API_KEY": "", "CHROMA_VOICE": "  ", "CHROMA_ASSETS_DIR": ""})
    assert settings.api_key is None and settings.voice is None and settings.assets_dir is None
    for env, message in [
        ({"CHROMA_PORT": "eighty"}, "CHROMA_PORT / --port = 'eighty'"),
        ({"CHROMA_API_KEY": "short"}, "CHROMA_API_KEY / --api-key = <hidden>: must be at least 8 characters"),
        ({"CHROMA_ASSETS_DIR": str(tmp_path / "none")}, "CHROMA_ASSETS_DIR / --assets-dir"),
        ({"CHROMA_DTYPE": "int4"}, "CHROMA_DTYPE / --dtype = 'int4'"),
        ({"CHROMA_MODEL": "/no/such/folder"}, "checkpoint folder not found: /no/such/folder"),
        ({"CHROMA_VOICE_TEXT": "Hello."}, "CHROMA_VOICE_AUDIO / --voice-audio is missing"),
    ]:
        with pytest.raises(SettingsError) as info:
            ServeSettings.from_sources(env)
        assert message in str(info.value), (env, str(info.value))
        assert "short" not in str(info.value)  # a key is never echoed


def test_auto_picks_cuda_and_bfloat16_only_when_there_is_a_gpu():
    if torch.cuda.is_available():
        assert ModelSettings.from_sources({}).torch_device() == ("cuda", "bfloat16")
    else:
        assert ModelSettings.from_sources({}).torch_device() == ("cpu", "float32")
        with pytest.raises(SettingsError, match="CHROMA_DEVICE / --device = 'cuda:1': CUDA is not available"):
            ModelSettings.from_sources({}, device="cuda:1").torch_device()
    assert ModelSettings.from_sources({}, device="cpu", dtype="bfloat16").torch_device() == ("cpu", "bfloat16")


def test_the_tiny_checkpoint_is_built_once_even_by_racing_processes(tmp_path, monkeypatch):
    calls = []
    real_build = __import__("chroma_agent.model.tiny", fromlist=["build_tiny_checkpoint"]).build_tiny_checkpoint

    def counted(folder, **kwargs):
        calls.append(folder)
        return real_build(folder, **kwargs)

    monkeypatch.setattr("chroma_agent.model.tiny.build_tiny_checkpoint", counted)
    folder = tmp_path / "cache" / "tiny"
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_checkpoint(folder))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [folder] * 3 and (folder / "config.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["tiny"]  # the losers' copies are gone
    built = len(calls)
    assert ensure_tiny_checkpoint(folder) == folder and len(calls) == built  # reused, not rebuilt
    monkeypatch.setattr(config, "TINY_DIR", folder)  # where `--model tiny` looks (~/.cache/chroma-agent/tiny)
    assert ModelSettings.from_sources({}, model="tiny").checkpoint() == str(folder)
    assert len(calls) == built


def test_generate_clones_a_voice_stores_it_by_name_and_reuses_it(tmp_path, tiny_dir, golden_dir, case, capsys):
    (tmp_path / "conv.json").write_text(json.dumps(case["messages"]))
    shutil.copy(golden_dir / "user1.wav", tmp_path / "user1.wav")
    common = ["generate", "--model", str(tiny_dir), "--messages", str(tmp_path / "conv.json"), "--greedy",
              "--max-frames", "4", "--voices-dir", str(tmp_path / "voices")]
    assert main([*common, "--voice", "golden", "--voice-audio", str(golden_dir / "voice.wav"), "--voice-text",
                 case["voice_text"], "--out", str(tmp_path / "a.wav"), "--codes-out", str(tmp_path / "a.npy")]) == 0
    assert (tmp_path / "voices" / "golden.safetensors").is_file()
    assert main([*common, "--voice", "golden", "--out", str(tmp_path / "b.wav"),
                 "--codes-out", str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert main([*common, "--voice", "nobody", "--out", str(tmp_path / "c.wav")]) == 2
    assert "CHROMA_VOICE / --voice = 'nobody'" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "d.wav")]) == 2
    assert "generate needs a voice" in capsys.readouterr().err


def test_generate_settings_are_the_shared_ones():
    assert set(GenerateSettings.model_fields) == {"model", "device", "dtype", "step_mode", "voice", "voice_audio",
                                                  "voice_text", "voices_dir"}
