"""Checkpoint loading: the tiny builder round trip, sharded and re-laid-out checkpoints, dtypes, hub
repo ids (monkeypatched, never the network) and every error a bad checkpoint folder should give."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file

from chroma_agent.engine.generate import ReplyDone, generate_reply
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig, ConfigError
from chroma_agent.model.loading import (
    DOWNLOAD_PATTERNS,
    INDEX_FILE,
    SINGLE_FILE,
    TIED_AUDIO_TABLES,
    CheckpointError,
    _mimi_is_nested,
    checkpoint_state_dict,
    resolve_checkpoint,
)
from chroma_agent.model.tiny import build_tiny_checkpoint, tiny_config_dict

GOLDEN_FRAMES = 8
LM_TABLE = "thinker.lm_head.weight"
# A Mimi tensor that newer transformers nest (codec_model.decoder.decoder_seanet.layers.*).
CODEC_KEY = "codec_model.decoder.layers.0.conv.weight"


# --- helpers ----------------------------------------------------------------------------------------


def _load(folder: Path | str, **kwargs) -> ChromaModel:
    return ChromaModel.from_pretrained(folder, progress=False, **kwargs)


def _write_checkpoint(folder: Path, config: dict | Path, tensors: dict[str, torch.Tensor] | None) -> Path:
    """A checkpoint folder holding `config` (a dict, or a config.json to copy) and `tensors` (if any)."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Path):
        shutil.copyfile(config, folder / "config.json")  # copyfile: the fixture's files are read-only
    else:
        (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SINGLE_FILE))
    return folder


def _shard(folder: Path, config: Path, tensors: dict[str, torch.Tensor], n: int) -> list[str]:
    """Write `tensors` as `n` shards plus a model.safetensors.index.json; returns the shard names."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, folder / "config.json")
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    shards = []
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::n]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        shards.append(shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return shards


def _greedy_reply(model: ChromaModel, golden_inputs: dict[str, np.ndarray], max_frames: int) -> ReplyDone:
    """The golden conversation (as in tests/test_golden.py), greedy, for `max_frames` frames."""
    prompt = SimpleNamespace(
        input_ids=torch.from_numpy(golden_inputs["thinker_input_ids"]),
        input_features=torch.from_numpy(golden_inputs["thinker_input_features"]),
        feature_attention_mask=torch.from_numpy(golden_inputs["thinker_feature_attention_mask"]),
    )
    codes = model.encode_voice_codes(torch.from_numpy(golden_inputs["input_values"][0, 0]))
    prefix = model.voice_prefix(torch.from_numpy(golden_inputs["input_ids"][0]), codes)
    done = list(generate_reply(model, prompt, prefix, max_frames=max_frames))[-1]
    assert isinstance(done, ReplyDone)
    return done


def _assert_golden_frames(model: ChromaModel, golden_inputs, golden_outputs) -> None:
    done = _greedy_reply(model, golden_inputs, GOLDEN_FRAMES)
    assert done.reason == "max_frames"
    np.testing.assert_array_equal(done.codes().numpy(), golden_outputs["frames"][:GOLDEN_FRAMES])


def _assert_same_weights(model: ChromaModel, reference: ChromaModel) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def fixture_tensors(tiny_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_dir / SINGLE_FILE))


@pytest.fixture(scope="module")
def reference_model(tiny_dir) -> ChromaModel:
    return _load(tiny_dir)


@pytest.fixture()
def hub_calls(monkeypatch) -> list[tuple[tuple, dict]]:
    """Record snapshot_download calls instead of reaching the network (which fails the test)."""
    calls: list[tuple[tuple, dict]] = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("snapshot_download called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


# --- the tiny builder round trip --------------------------------------------------------------------


def test_tiny_builder_round_trip(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "tiny", seed=0)
    saved = load_file(str(folder / SINGLE_FILE))
    model = _load(folder)
    loaded = checkpoint_state_dict(model)

    # The tied audio table is stored once, under the decoder's name; the model exposes it under both.
    backbone_table, decoder_table = TIED_AUDIO_TABLES
    assert decoder_table in saved and backbone_table not in saved
    assert set(loaded) == set(saved) | {backbone_table}
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded[backbone_table], saved[decoder_table])
    backbone_weight = model.backbone.audio_embedding.embed_audio_tokens.weight
    assert backbone_weight is model.decoder.audio_embedding.embed_audio_tokens.weight

    # The Mimi names are the flat FlashLabs ones whatever layout this transformers uses.
    assert CODEC_KEY in saved
    assert not any(".decoder_seanet." in k or ".encoder_seanet." in k for k in saved)
    # The processor files come with it.
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name


def test_tiny_builder_is_deterministic_per_seed(tmp_path):
    first = (build_tiny_checkpoint(tmp_path / "a", seed=0) / SINGLE_FILE).read_bytes()
    again = (build_tiny_checkpoint(tmp_path / "b", seed=0) / SINGLE_FILE).read_bytes()
    other = (build_tiny_checkpoint(tmp_path / "c", seed=1) / SINGLE_FILE).read_bytes()
    assert first == again
    assert first != other
    a, c = load_file(str(tmp_path / "a" / SINGLE_FILE)), load_file(str(tmp_path / "c" / SINGLE_FILE))
    assert a.keys() == c.keys()
    assert not torch.equal(a[LM_TABLE], c[LM_TABLE])


def test_tiny_config_round_trips(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "tiny", seed=0)
    built = ChromaConfig(tiny_config_dict())
    saved = ChromaConfig.from_pretrained(folder)
    typed = [
        "text", "backbone", "decoder", "decoder_audio_embedding_dim", "tie_text_embeddings", "num_codebooks",
        "codebook_pad_id", "codebook_eos_id", "text_start_id", "text_end_id", "im_end_id", "samples_per_frame",
        "audio_token_id", "sample_rate", "audio_vocab_size", "codebook_size",
    ]
    for field in typed:
        assert getattr(saved, field) == getattr(built, field), field
    # The raw dict survives too (through JSON), so a re-saved checkpoint keeps every field.
    assert saved.to_dict() == json.loads(json.dumps(tiny_config_dict()))
    assert saved.thinker_config.to_dict() == built.thinker_config.to_dict()
    assert saved.codec_config.to_dict() == built.codec_config.to_dict()


# --- layouts: sharded, newer thinker names, nested Mimi names ----------------------------------------


def test_sharded_checkpoint_loads_and_replies_like_golden(
    tmp_path, tiny_dir, fixture_tensors, reference_model, golden_inputs, golden_outputs
):
    folder = tmp_path / "sharded"
    shards = _shard(folder, tiny_dir / "config.json", fixture_tensors, 3)
    assert not (folder / SINGLE_FILE).exists()
    assert all(len(load_file(str(folder / s))) > 0 for s in shards)
    model = _load(folder)
    _assert_same_weights(model, reference_model)
    _assert_golden_frames(model, golden_inputs, golden_outputs)


def test_sharded_index_naming_a_missing_shard(tmp_path, tiny_dir, fixture_tensors):
    folder = tmp_path / "sharded"
    shards = _shard(folder, tiny_dir / "config.json", fixture_tensors, 3)
    (folder / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]) as err:
        _load(folder)
    assert shards[0] not in str(err.value) and shards[2] not in str(err.value)


def test_sharded_index_that_is_not_an_index(tmp_path, tiny_dir, fixture_tensors):
    folder = tmp_path / "sharded"
    _shard(folder, tiny_dir / "config.json", fixture_tensors, 3)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}}))  # no weight_map
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        _load(folder)


def _newer_thinker_name(name: str) -> str:
    for flat, nested in (
        ("thinker.model.", "thinker.model.language_model."),
        ("thinker.audio_tower.", "thinker.model.audio_tower."),
        ("thinker.visual.", "thinker.model.visual."),
    ):
        if name.startswith(flat):
            return nested + name[len(flat):]
    return name


def test_newer_thinker_layout_loads(
    tmp_path, tiny_dir, fixture_tensors, reference_model, golden_inputs, golden_outputs
):
    renamed = {_newer_thinker_name(k): v for k, v in fixture_tensors.items()}
    assert any(k.startswith("thinker.model.language_model.") for k in renamed)
    assert any(k.startswith("thinker.model.audio_tower.") for k in renamed)
    assert any(k.startswith("thinker.model.visual.") for k in renamed)
    assert not any(k.startswith(("thinker.audio_tower.", "thinker.visual.")) for k in renamed)
    folder = _write_checkpoint(tmp_path / "newer", tiny_dir / "config.json", renamed)
    model = _load(folder)
    _assert_same_weights(model, reference_model)
    _assert_golden_frames(model, golden_inputs, golden_outputs)
    # The nested vision tensors are skipped like the flat ones, and load with vision.
    visual = _load(folder, with_vision=True).thinker.visual.state_dict()
    assert torch.equal(visual["blocks.0.attn.k.weight"], fixture_tensors["thinker.visual.blocks.0.attn.k.weight"])


def test_nested_mimi_names_load(tmp_path, tiny_dir, fixture_tensors, reference_model):
    # The suite runs against the transformers pinned in constraints.txt, which nests Mimi's halves.
    assert _mimi_is_nested(reference_model), "expected transformers' nested Mimi layout (see constraints.txt)"
    # Saved by a newer transformers: the model's own (nested) codec names.
    nested = {k: v for k, v in reference_model.state_dict().items() if k.startswith("codec_model.")}
    assert "codec_model.decoder.decoder_seanet.layers.0.conv.weight" in nested
    tensors = {k: v for k, v in fixture_tensors.items() if not k.startswith("codec_model.")} | nested
    model = _load(_write_checkpoint(tmp_path / "nested", tiny_dir / "config.json", tensors))
    _assert_same_weights(model, reference_model)


# --- dtype and device -------------------------------------------------------------------------------


def test_bfloat16_lm_with_float32_codec(tiny_dir, golden_inputs):
    model = _load(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        expected = torch.float32 if name.startswith("codec_model.") else torch.bfloat16
        assert p.dtype == expected, name
    assert model.thinker.lm_head.weight.dtype == torch.bfloat16
    assert model.codec_model.dtype == torch.float32
    done = _greedy_reply(model, golden_inputs, 4)
    assert done.reason in ("max_frames", "eos")
    codes = done.codes()
    assert 1 <= codes.shape[0] <= 4
    assert codes.shape[1] == model.config.num_codebooks
    assert int(codes.min()) >= 0 and int(codes.max()) < model.config.audio_vocab_size


def test_bfloat16_weights_are_the_rounded_float32_ones(tiny_dir, reference_model):
    model = _load(tiny_dir, dtype=torch.bfloat16)
    got, want = model.thinker.lm_head.weight, reference_model.thinker.lm_head.weight
    assert torch.equal(got, want.to(torch.bfloat16))
    codec = model.codec_model.state_dict()
    for name, tensor in reference_model.codec_model.state_dict().items():
        assert torch.equal(codec[name], tensor), name


def test_unknown_dtype(tiny_dir):
    with pytest.raises(ValueError, match="float8") as err:
        _load(tiny_dir, dtype="float8")
    for allowed in ("float32", "bfloat16", "float16"):
        assert allowed in str(err.value)


def test_cuda_without_cuda(tiny_dir, monkeypatch):
    # This is the CPU-only behaviour; pinned so the test means the same on a machine with a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        _load(tiny_dir, device="cuda")


# --- a bad checkpoint folder ------------------------------------------------------------------------


def test_missing_tensor_is_named(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    del tensors[LM_TABLE]
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\)") as err:
        _load(folder)
    assert LM_TABLE in str(err.value)
    assert "unexpected" not in str(err.value)


def test_missing_codec_tensor_is_named_as_in_the_checkpoint(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    del tensors[CODEC_KEY]
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\)") as err:
        _load(folder)
    assert CODEC_KEY in str(err.value)


def test_missing_tied_audio_table_is_named(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    del tensors[TIED_AUDIO_TABLES[1]]  # the only copy of the shared table
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    with pytest.raises(CheckpointError, match="missing tensors") as err:
        _load(folder)
    assert TIED_AUDIO_TABLES[0] in str(err.value) and TIED_AUDIO_TABLES[1] in str(err.value)


def test_unexpected_tensor_is_named(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    tensors["backbone.extra_head.weight"] = torch.zeros(2, 3)
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\)") as err:
        _load(folder)
    assert "backbone.extra_head.weight" in str(err.value)
    assert "missing" not in str(err.value)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    expected = tuple(tensors[LM_TABLE].shape)
    tensors[LM_TABLE] = torch.zeros(expected[0] - 1, expected[1])
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    with pytest.raises(CheckpointError, match=LM_TABLE) as err:
        _load(folder)
    assert str((expected[0] - 1, expected[1])) in str(err.value)
    assert str(expected) in str(err.value)


def test_truncated_weights_file(tmp_path, tiny_dir):
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", None)
    data = (tiny_dir / SINGLE_FILE).read_bytes()
    (folder / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _load(folder)


def test_corrupt_weights_header(tmp_path, tiny_dir):
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", None)
    (folder / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        _load(folder)


def test_no_weights_file(tmp_path, tiny_dir):
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", None)
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        _load(folder)


def test_config_missing(tmp_path, tiny_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copyfile(tiny_dir / SINGLE_FILE, folder / SINGLE_FILE)
    with pytest.raises(ConfigError, match="config file not found"):
        _load(folder)


def test_config_not_json(tmp_path, tiny_dir):
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", None)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _load(folder)


def test_config_of_another_model_type(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["model_type"] = "llama"
    folder = _write_checkpoint(tmp_path / "ckpt", config, None)
    with pytest.raises(ConfigError, match="llama"):
        _load(folder)


def test_config_missing_a_field_names_it(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    del config["backbone_config"]["hidden_size"]
    folder = _write_checkpoint(tmp_path / "ckpt", config, None)
    with pytest.raises(ConfigError, match=r"backbone_config\.hidden_size"):
        _load(folder)


# --- where the checkpoint comes from ----------------------------------------------------------------


def test_path_that_is_a_file(tiny_dir, hub_calls):
    with pytest.raises(CheckpointError, match="is a file"):
        _load(tiny_dir / "config.json")
    assert hub_calls == []


@pytest.mark.parametrize("name", ["./nope", "nope", "nope/a/b", "~/nope-chroma-ckpt"])
def test_folder_not_found_does_not_ask_the_hub(name, tmp_path, monkeypatch, hub_calls):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        _load(name)
    assert hub_calls == []


def test_repo_id_downloads_from_the_hub(tmp_path, tiny_dir, reference_model, monkeypatch):
    calls = []
    snapshot = tmp_path / "snapshot"
    _write_checkpoint(snapshot, tiny_dir / "config.json", None)
    shutil.copyfile(tiny_dir / SINGLE_FILE, snapshot / SINGLE_FILE)

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)  # no local FlashLabs/Chroma-4B folder to shadow the repo id
    model = _load("FlashLabs/Chroma-4B", revision="main")
    assert calls == [("FlashLabs/Chroma-4B", {"revision": "main", "allow_patterns": DOWNLOAD_PATTERNS})]
    assert "*.safetensors" in DOWNLOAD_PATTERNS and "*.json" in DOWNLOAD_PATTERNS
    _assert_same_weights(model, reference_model)

    calls.clear()
    assert resolve_checkpoint("FlashLabs/Chroma-4B") == snapshot
    assert calls == [("FlashLabs/Chroma-4B", {"revision": None, "allow_patterns": DOWNLOAD_PATTERNS})]


@pytest.mark.parametrize(
    "error",
    [
        RepositoryNotFoundError("404 Client Error: Repository Not Found", response=SimpleNamespace(
            headers={}, request=None)),
        LocalEntryNotFoundError("offline mode is enabled and nothing is cached"),
    ],
    ids=["not-found", "offline"],
)
def test_hub_error_becomes_checkpoint_error(error, tmp_path, monkeypatch):
    def fake(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="FlashLabs/Chroma-4B") as err:
        _load("FlashLabs/Chroma-4B")
    assert err.value.__cause__ is error
    assert str(error) in str(err.value)


# --- the vision tower -------------------------------------------------------------------------------


def test_vision_tensors_skipped_without_vision(tiny_dir, fixture_tensors, caplog):
    visual = [k for k in fixture_tensors if k.startswith("thinker.visual.")]
    assert visual, "the fixture is expected to carry the vision tower"
    with caplog.at_level(logging.INFO, logger="chroma_agent.model.loading"):
        model = _load(tiny_dir)
    assert not hasattr(model.thinker, "visual")
    assert not any(k.startswith("thinker.visual.") for k in model.state_dict())
    assert f"skipped {len(visual)} vision-tower tensors" in caplog.text


def test_vision_tensors_loaded_with_vision(tiny_dir, fixture_tensors):
    model = _load(tiny_dir, with_vision=True)
    assert model.with_vision
    visual = model.thinker.visual.state_dict()
    expected = {k[len("thinker.visual."):]: v for k, v in fixture_tensors.items() if k.startswith("thinker.visual.")}
    assert visual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(visual[name], tensor), name


def test_vision_tensor_misshapen_with_vision(tmp_path, tiny_dir, fixture_tensors):
    tensors = dict(fixture_tensors)
    name = "thinker.visual.blocks.0.attn.k.weight"
    tensors[name] = torch.zeros(3, 3)
    folder = _write_checkpoint(tmp_path / "ckpt", tiny_dir / "config.json", tensors)
    _load(folder)  # without vision the tensor is not looked at
    with pytest.raises(CheckpointError, match=name):
        _load(folder, with_vision=True)
