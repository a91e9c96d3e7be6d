"""The one batched sampler: greedy rows are argmax, seeded rows reproducible and independent of their batch,
the draw follows the filtered softmax, and no setting leaves nothing to pick."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chroma_agent.engine.sampling import SamplingParams, SamplingRows, race_noise, sample


def rows_for(params: list[SamplingParams]) -> SamplingRows:
    rows = SamplingRows(len(params), "cpu")
    for i, p in enumerate(params):
        rows.set_row(i, p)
    return rows


def draw(logits: torch.Tensor, params: list[SamplingParams], step: int, codebook: int = 0) -> torch.Tensor:
    rows = rows_for(params)
    steps = torch.full((len(params),), step, dtype=torch.long)
    noise = race_noise(rows.seed, steps, 8, logits.shape[-1])[:, codebook]
    return sample(logits, rows, noise)


def test_greedy_rows_are_exactly_argmax():
    logits = torch.randn(6, 2051, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 3 + [SamplingParams(temperature=0.9, top_k=40, seed=i) for i in range(3)]
    picked = draw(logits, params, step=5)
    assert torch.equal(picked[:3], logits[:3].argmax(-1))
    assert SamplingParams(temperature=1e-4).greedy


def test_seeded_rows_are_reproducible_and_independent_of_their_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2051, generator=gen)
    mine = SamplingParams(temperature=1.0, top_k=0, top_p=0.95, seed=1234)
    alone = [int(draw(logits, [mine], step)[0]) for step in range(50)]
    again = [int(draw(logits, [mine], step)[0]) for step in range(50)]
    others = [SamplingParams(temperature=0.3, top_k=5, seed=9), SamplingParams(), SamplingParams(temperature=1.5)]
    crowded = []
    for step in range(50):
        batch = torch.cat([torch.randn(3, 2051, generator=gen), logits])
        crowded.append(int(draw(batch, [*others, mine], step)[3]))
    assert alone == again == crowded
    assert len(set(alone)) > 10  # it really samples
    other_seed = [int(draw(logits, [SamplingParams(temperature=1.0, top_p=0.95, seed=99)], s)[0]) for s in range(50)]
    assert other_seed != alone


def test_draws_follow_the_filtered_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(4000, -1).contiguous()
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(4000)]
    counts = np.bincount(draw(logits, params, step=0).numpy(), minlength=5) / 4000
    np.testing.assert_allclose(counts, probs.numpy(), atol=0.03)
    # top-k 2: only the two best, renormalised (2/3, 1/3)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(4000)]
    counts = np.bincount(draw(logits, params, step=0).numpy(), minlength=5) / 4000
    np.testing.assert_allclose(counts, [2 / 3, 1 / 3, 0, 0, 0], atol=0.03)
    # top-p 0.7: the smallest prefix reaching 0.7 mass is {0.5, 0.25}
    params = [SamplingParams(temperature=1.0, top_p=0.7, seed=s) for s in range(4000)]
    counts = np.bincount(draw(logits, params, step=0).numpy(), minlength=5) / 4000
    assert counts[2:].sum() == 0 and abs(counts[0] - 2 / 3) < 0.03


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=1e-300),  # rounds to 0 in float32: the top token must stay
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1e-3, top_p=1e-9),
])
def test_extreme_settings_keep_the_top_token(params):
    logits = torch.randn(4, 2051, generator=torch.Generator().manual_seed(3))
    picked = draw(logits, [params] * 4, step=0)
    assert torch.equal(picked, logits.argmax(-1))


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": 2.5}, {"temperature": float("nan")}, {"top_k": -1},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("inf")}, {"seed": 1.5}, {"top_k": True},
])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
