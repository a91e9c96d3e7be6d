"""Shared test fixtures: the reference-made tiny checkpoint and its golden outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _fixture_dir() -> Path:
    override = os.environ.get("CHROMA_TINY_FIXTURE")
    path = Path(override) if override else REPO.parent / "shared" / "fixtures" / "chroma-tiny"
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"the reference tiny checkpoint is missing at {path}; "
            "set CHROMA_TINY_FIXTURE to the chroma-tiny folder"
        )
    return path


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
def params_tsv(tiny_dir: Path) -> Path:
    return tiny_dir.parent / "chroma-4b-params.tsv"


@pytest.fixture(scope="session")
def full_config_json(tiny_dir: Path) -> Path:
    return tiny_dir.parent / "chroma-4b-config.json"
