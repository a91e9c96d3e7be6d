"""Voice profiles and the voice store: golden codes, determinism, any input rate, persistence and refusals."""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save as save_safetensors

from chroma_agent.audio import resample
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices import (
    ENV_DIR,
    FORMAT,
    FORMAT_VERSION,
    UnknownVoiceError,
    VoiceError,
    VoiceProfile,
    VoiceStore,
    create_voice_profile,
    fingerprint,
    validate_voice_name,
)

RATE = 24000
# The golden clip's profile id. It keys the engine's prefix cache, so a change here invalidates every cache:
# change it only on purpose.
GOLDEN_ID = "2f2afa8a63a42591"


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> ChromaModel:
    return ChromaModel.from_pretrained(tiny_dir, progress=False)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> ChromaProcessor:
    return ChromaProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def transcript(golden_dir: Path) -> str:
    return json.loads((golden_dir / "case.json").read_text())["voice_text"]


@pytest.fixture(scope="module")
def clip(golden_dir: Path) -> np.ndarray:
    samples, rate = sf.read(golden_dir / "voice.wav", dtype="float32")
    assert rate == RATE and samples.ndim == 1
    return samples


@pytest.fixture(scope="module")
def profile(
    model: ChromaModel, processor: ChromaProcessor, golden_dir: Path, transcript: str
) -> VoiceProfile:
    return create_voice_profile(model, processor, golden_dir / "voice.wav", transcript)


def _renamed(profile: VoiceProfile, name: str, **changes: Any) -> VoiceProfile:
    return replace(profile, name=name, **changes)


# --------------------------------------------------------------------------------------------------------
# cloning


def test_golden_profile_matches_reference(
    profile: VoiceProfile,
    model: ChromaModel,
    transcript: str,
    golden_inputs: dict[str, np.ndarray],
    golden_outputs: dict[str, np.ndarray],
) -> None:
    assert torch.equal(profile.codes, torch.from_numpy(golden_outputs["voice_prompt_codes"]))
    assert torch.equal(profile.text_ids, torch.from_numpy(golden_inputs["input_ids"][0]))
    assert profile.codes.dtype == profile.text_ids.dtype == torch.int64
    assert profile.codes.device.type == "cpu" and not profile.codes.is_inference()
    assert profile.transcript == transcript
    assert profile.duration_s == pytest.approx(107705 / RATE)
    assert (profile.num_codebooks, profile.frames) == (8, 57)
    assert profile.name == f"voice-{profile.id[:8]}"
    assert profile.model_fingerprint == fingerprint(model.config)
    assert profile.is_compatible(model.config)
    assert datetime.fromisoformat(profile.created_at).utcoffset() == timedelta(0)
    # What the profile is for: the backbone prefix is text start + ids + text end + frames + empty frame.
    prefix = model.voice_prefix(profile.text_ids, profile.codes)
    assert prefix.shape[0] == profile.text_ids.numel() + 2 + profile.frames + 1


def test_profile_id_is_pinned(profile: VoiceProfile) -> None:
    assert profile.id == GOLDEN_ID


def test_same_clip_twice_gives_identical_codes_and_id(
    profile: VoiceProfile, model: ChromaModel, processor: ChromaProcessor, golden_dir: Path, transcript: str
) -> None:
    # Same clip through another input form (file bytes instead of a path).
    again = create_voice_profile(model, processor, (golden_dir / "voice.wav").read_bytes(), transcript)
    assert torch.equal(again.codes, profile.codes)
    assert torch.equal(again.text_ids, profile.text_ids)
    assert again.id == profile.id and again.name == profile.name


def test_id_depends_on_content_only(profile: VoiceProfile) -> None:
    renamed = _renamed(profile, "other", created_at="2020-01-01T00:00:00+00:00")
    assert renamed.id == profile.id
    codes = profile.codes.clone()
    codes[0, 0] = (codes[0, 0] + 1) % 2048
    assert _renamed(profile, "changed", codes=codes).id != profile.id
    assert _renamed(profile, "shorter", text_ids=profile.text_ids[:-1]).id != profile.id
    assert len(profile.id) == 16 and int(profile.id, 16) >= 0


def _stereo_48k(clip: np.ndarray) -> tuple[np.ndarray, int]:
    up = resample(clip, RATE, 48000)
    return np.stack([up, 0.5 * up], axis=1), 48000  # [samples, channels], unequal channels


def _mono_8k(clip: np.ndarray) -> tuple[np.ndarray, int]:
    return resample(clip, RATE, 8000), 8000


@pytest.mark.parametrize("make", [_stereo_48k, _mono_8k], ids=["48k-stereo", "8k-mono"])
def test_other_rates_and_channels_are_converted(
    make,
    clip: np.ndarray,
    profile: VoiceProfile,
    model: ChromaModel,
    processor: ChromaProcessor,
    transcript: str,
) -> None:
    audio, rate = make(clip)
    other = create_voice_profile(model, processor, audio, transcript, name="converted", sample_rate=rate)
    assert other.frames == profile.frames and other.num_codebooks == profile.num_codebooks
    assert other.duration_s == pytest.approx(profile.duration_s, abs=1e-3)
    assert torch.equal(other.text_ids, profile.text_ids)
    assert int(other.codes.max()) < model.config.codebook_size


@pytest.mark.parametrize(
    ("seconds", "kind", "message"),
    [
        (0.5, "clip", "at least 1 s"),
        (31.0, "clip", "at most 30 s"),
        (2.0, "zeros", "silent"),
        (2.0, "whisper", "silent"),
    ],
)
def test_unusable_clips_are_refused(
    seconds: float,
    kind: str,
    message: str,
    clip: np.ndarray,
    model: ChromaModel,
    processor: ChromaProcessor,
    transcript: str,
) -> None:
    n = int(seconds * RATE)
    if kind == "clip":
        audio = np.resize(clip, n).astype(np.float32)  # repeats the clip as needed
    elif kind == "zeros":
        audio = np.zeros(n, dtype=np.float32)
    else:  # noise far below speech: peak well under 1e-3
        audio = (np.random.default_rng(0).standard_normal(n) * 1e-5).astype(np.float32)
    with pytest.raises(VoiceError, match=message):
        create_voice_profile(model, processor, audio, transcript, sample_rate=RATE)


@pytest.mark.parametrize("text", ["", "   \n", None])
def test_empty_transcript_is_refused(
    text: Any, model: ChromaModel, processor: ChromaProcessor, golden_dir: Path
) -> None:
    with pytest.raises(VoiceError, match="transcript is empty"):
        create_voice_profile(model, processor, golden_dir / "voice.wav", text)


def test_bad_audio_and_paths_are_voice_errors(
    model: ChromaModel, processor: ChromaProcessor, golden_dir: Path, transcript: str
) -> None:
    with pytest.raises(VoiceError, match="missing"):
        create_voice_profile(model, processor, None, transcript)
    with pytest.raises(VoiceError, match="not a decodable audio file"):
        create_voice_profile(model, processor, b"junk" * 20, transcript)
    with pytest.raises(VoiceError, match="paths are not allowed"):
        create_voice_profile(model, processor, str(golden_dir / "voice.wav"), transcript, allow_paths=False)


def test_transcript_is_stripped(
    profile: VoiceProfile, model: ChromaModel, processor: ChromaProcessor, clip: np.ndarray, transcript: str
) -> None:
    padded = create_voice_profile(model, processor, clip, f"  {transcript}\n", sample_rate=RATE)
    assert padded.transcript == transcript
    assert torch.equal(padded.text_ids, profile.text_ids)


# --------------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("../x", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("/etc/passwd", "path separator"),
        (".hidden", "start with a letter or digit"),
        ("..", "start with a letter or digit"),
        ("-flag", "start with a letter or digit"),
        ("x..y", "contains '..'"),
        ("name.", "must not end with '.'"),
        ("", "empty"),
        ("a" * 65, "65 characters long"),
        ("café", "non-ASCII"),
        ("\u0430bc", "non-ASCII"),  # Cyrillic a
        ("a\x00b", "NUL"),
        ("a b", "contains ' '"),
        ("a:b", "contains ':'"),
    ],
)
def test_bad_names_are_refused(name: str, rule: str, profile: VoiceProfile, tmp_path: Path) -> None:
    with pytest.raises(VoiceError, match=rule):
        validate_voice_name(name)
    with pytest.raises(VoiceError, match=rule):
        VoiceStore(tmp_path).path_for(name)
    with pytest.raises(VoiceError, match=rule):
        _renamed(profile, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "A-1_b.c", "9" * 64, "my.voice-v2"])
def test_good_names_are_kept(name: str, tmp_path: Path) -> None:
    assert validate_voice_name(name) == name
    assert VoiceStore(tmp_path).path_for(name) == tmp_path / f"{name}.safetensors"


def test_bad_name_is_refused_before_encoding(
    model: ChromaModel, processor: ChromaProcessor, transcript: str
) -> None:
    # An empty clip would fail later: the name error must come first.
    with pytest.raises(VoiceError, match="path separator"):
        create_voice_profile(
            model, processor, np.zeros(0, np.float32), transcript, name="../x", sample_rate=RATE
        )


# --------------------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip(profile: VoiceProfile, tmp_path: Path) -> None:
    path = profile.save(tmp_path)
    assert path == tmp_path / f"{profile.name}.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, no temp leftovers
    loaded = VoiceProfile.load(path)
    assert loaded == profile
    for field in ("name", "transcript", "duration_s", "created_at", "model_fingerprint", "id"):
        assert getattr(loaded, field) == getattr(profile, field), field
    assert torch.equal(loaded.codes, profile.codes) and torch.equal(loaded.text_ids, profile.text_ids)
    assert loaded.codes.dtype == loaded.text_ids.dtype == torch.int64

    info = loaded.to_json()
    assert info == {
        "name": profile.name,
        "transcript": profile.transcript,
        "duration_s": profile.duration_s,
        "frames": 57,
        "created_at": profile.created_at,
    }
    assert json.loads(json.dumps(info)) == info


def test_save_without_overwrite_never_clobbers(profile: VoiceProfile, tmp_path: Path) -> None:
    # No store lock here: the file system itself must refuse (what protects two server processes).
    _renamed(profile, "taken").save(tmp_path, overwrite=False)
    with pytest.raises(VoiceError, match="'taken' already exists"):
        _renamed(profile, "taken", transcript="Second writer.").save(tmp_path, overwrite=False)
    assert VoiceProfile.load(tmp_path / "taken.safetensors").transcript == profile.transcript
    assert [p.name for p in tmp_path.iterdir()] == ["taken.safetensors"]


def test_profile_tensors_are_private_copies(profile: VoiceProfile) -> None:
    codes = profile.codes.clone()
    copy_ = _renamed(profile, "copy", codes=codes)
    codes[0, 0] += 1
    assert torch.equal(copy_.codes, profile.codes)


def test_load_refuses_bad_files(profile: VoiceProfile, tmp_path: Path) -> None:
    with pytest.raises(VoiceError, match="not found"):
        VoiceProfile.load(tmp_path / "nope.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(VoiceError, match="corrupt"):
        VoiceProfile.load(garbage)

    good = profile._metadata()
    tensors = {"text_ids": profile.text_ids, "codes": profile.codes}

    def write(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(save_safetensors(tensors, metadata=metadata))
        return path

    no_codes = write("no-codes", {"text_ids": profile.text_ids}, good)
    with pytest.raises(VoiceError, match="missing codes"):
        VoiceProfile.load(no_codes)
    no_transcript = write("no-transcript", tensors, {k: v for k, v in good.items() if k != "transcript"})
    with pytest.raises(VoiceError, match="missing transcript"):
        VoiceProfile.load(no_transcript)
    foreign = write("foreign", tensors, {**good, "format": "something-else"})
    with pytest.raises(VoiceError, match="not a chroma-agent voice"):
        VoiceProfile.load(foreign)
    future = write("future", tensors, {**good, "format_version": "99"})
    with pytest.raises(VoiceError, match="format version '99'"):
        VoiceProfile.load(future)
    # The name inside the file is validated like any other name, never used as a path.
    evil = write("evil", tensors, {**good, "name": "../../etc/evil"})
    with pytest.raises(VoiceError, match="path separator"):
        VoiceProfile.load(evil)
    floats = write("floats", {**tensors, "codes": profile.codes.float()}, good)
    with pytest.raises(VoiceError, match="codes must be int64"):
        VoiceProfile.load(floats)
    bad_duration = write("bad-duration", tensors, {**good, "duration_s": "nan"})
    with pytest.raises(VoiceError, match="duration_s"):
        VoiceProfile.load(bad_duration)
    # Control: the same writer with the untouched metadata gives a loadable, equal profile.
    assert good["format"] == FORMAT and good["format_version"] == FORMAT_VERSION
    assert VoiceProfile.load(write(profile.name, tensors, good)) == profile


# --------------------------------------------------------------------------------------------------------
# store


def test_store_save_list_get_overwrite_delete(profile: VoiceProfile, tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    store = VoiceStore(folder)
    assert store.list() == [] and not folder.exists()  # nothing is created by reading

    store.save(_renamed(profile, "bob"))
    store.save(_renamed(profile, "alice"))
    assert folder.is_dir() and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in store.list()] == ["alice", "bob"]
    assert "alice" in store and "carol" not in store and "../x" not in store
    assert store.get("bob") == _renamed(profile, "bob")

    with pytest.raises(VoiceError, match="'bob' already exists"):
        store.save(_renamed(profile, "bob", transcript="Something else."))
    assert store.get("bob").transcript == profile.transcript
    store.save(_renamed(profile, "bob", transcript="Something else."), overwrite=True)
    assert store.get("bob").transcript == "Something else."

    store.delete("bob")
    assert [p.name for p in store.list()] == ["alice"]
    with pytest.raises(UnknownVoiceError, match="unknown voice 'bob'"):
        store.get("bob")
    with pytest.raises(UnknownVoiceError, match="unknown voice 'bob'"):
        store.delete("bob")
    assert sorted(p.name for p in folder.iterdir()) == ["alice.safetensors"]


def test_unknown_voice_error_is_a_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError) as info:
        VoiceStore(tmp_path).get("ghost")
    assert isinstance(info.value, VoiceError) and isinstance(info.value, ValueError)
    assert str(info.value) == "unknown voice 'ghost'" and info.value.voice == "ghost"


def test_store_refuses_symlinks(profile: VoiceProfile, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target = _renamed(profile, "target").save(outside)
    folder = tmp_path / "voices"
    store = VoiceStore(folder)
    store.save(_renamed(profile, "real"))
    (folder / "linked.safetensors").symlink_to(target)

    with pytest.raises(VoiceError, match="symlink"):
        store.get("linked")
    with pytest.raises(VoiceError, match="symlink"):
        store.delete("linked")
    with pytest.raises(VoiceError, match="symlink"):
        store.save(_renamed(profile, "linked", transcript="Overwritten."), overwrite=True)
    assert [p.name for p in store.list()] == ["real"]
    assert VoiceProfile.load(target).transcript == profile.transcript  # the target was not touched


def test_list_skips_corrupt_files_with_a_warning(
    profile: VoiceProfile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = VoiceStore(tmp_path)
    store.save(_renamed(profile, "good"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 5)
    (tmp_path / "notes.txt").write_text("not a voice")
    with caplog.at_level(logging.WARNING, logger="chroma_agent.voices"):
        names = [p.name for p in store.list()]
    assert names == ["good"]
    assert any("'broken'" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    with pytest.raises(VoiceError, match="corrupt") as info:
        store.get("broken")
    assert not isinstance(info.value, UnknownVoiceError)


def test_store_is_keyed_by_file_name(profile: VoiceProfile, tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    path = store.save(_renamed(profile, "before"))
    os.replace(path, tmp_path / "after.safetensors")
    assert [p.name for p in store.list()] == ["after"]
    assert store.get("after").id == profile.id


def test_store_folder_from_env(
    monkeypatch: pytest.MonkeyPatch, profile: VoiceProfile, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "from-env"))
    store = VoiceStore()
    assert store.folder == tmp_path / "from-env"
    store.save(_renamed(profile, "env"))
    assert (tmp_path / "from-env" / "env.safetensors").is_file()
    assert VoiceStore(tmp_path / "explicit").folder == tmp_path / "explicit"  # an explicit folder wins

    monkeypatch.delenv(ENV_DIR)
    assert VoiceStore().folder == Path("~/.cache/chroma-agent/voices").expanduser()


def test_concurrent_saves(profile: VoiceProfile, tmp_path: Path) -> None:
    store = VoiceStore(tmp_path)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            store.save(_renamed(profile, "shared", transcript=f"Writer {i}."))
            results.append(f"ok {i}")
        except VoiceError:
            results.append("exists")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("ok")]
    assert len(results) == 8 and len(winners) == 1
    assert store.get("shared").transcript == f"Writer {winners[0].split()[1]}."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.safetensors"]


# --------------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_tracks_codec_and_tokenizer(model: ChromaModel, profile: VoiceProfile) -> None:
    raw = model.config.to_dict()
    base = fingerprint(model.config)
    assert fingerprint(ChromaConfig(copy.deepcopy(raw))) == base

    runtime_only = copy.deepcopy(raw)
    runtime_only["codec_config"]["dtype"] = "bfloat16"
    assert fingerprint(ChromaConfig(runtime_only)) == base

    other_codec = copy.deepcopy(raw)
    other_codec["codec_config"]["num_filters"] = 8
    other_vocab = copy.deepcopy(raw)
    other_vocab["thinker_config"]["text_config"]["vocab_size"] += 1
    for changed in (other_codec, other_vocab):
        config = ChromaConfig(changed)
        assert fingerprint(config) != base
        assert not profile.is_compatible(config)
        with pytest.raises(VoiceError, match="clone it again"):
            profile.require_compatible(config)
    profile.require_compatible(model.config)
