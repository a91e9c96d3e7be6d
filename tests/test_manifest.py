"""The full-size Chroma-4B, built on the meta device from its config, has exactly the checkpoint's tensors."""

from __future__ import annotations

import torch

from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.loading import checkpoint_state_dict


def _read_manifest(path) -> dict[str, tuple[int, ...]]:
    rows: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("name\t"):
            continue
        name, shape, numel = line.split("\t")
        dims = tuple(int(d) for d in shape.split("x")) if shape else ()
        assert int(numel) == (torch.Size(dims).numel() if dims else 1)
        rows[name] = dims
    return rows


def test_full_model_matches_every_manifest_line(params_tsv, full_config_json):
    manifest = _read_manifest(params_tsv)
    assert len(manifest) == 1907
    with torch.device("meta"):
        model = ChromaModel(ChromaConfig.from_json_file(full_config_json), with_vision=True)
    ours = {name: tuple(t.shape) for name, t in checkpoint_state_dict(model).items()}
    assert sorted(set(manifest) - set(ours)) == []
    assert sorted(set(ours) - set(manifest)) == []
    mismatched = {n: (ours[n], manifest[n]) for n in manifest if ours[n] != manifest[n]}
    assert mismatched == {}
    # Tied audio tables are one tensor; the thinker's lm_head is its own.
    assert model.backbone.audio_embedding.embed_audio_tokens.weight is model.decoder.audio_embedding.embed_audio_tokens.weight
    assert model.thinker.lm_head.weight is not model.thinker.model.embed_tokens.weight


def test_without_vision_tower_only_vision_tensors_are_absent(params_tsv, full_config_json):
    manifest = _read_manifest(params_tsv)
    with torch.device("meta"):
        model = ChromaModel(ChromaConfig.from_json_file(full_config_json))
    ours = set(checkpoint_state_dict(model))
    assert set(manifest) - ours == {n for n in manifest if n.startswith("thinker.visual.")}
    unique = sum(p.numel() for p in model.parameters())
    assert unique == 5_252_995_905
