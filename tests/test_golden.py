"""Golden parity with the FlashLabs reference on the tiny checkpoint it saved (greedy decoding)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chroma_agent.engine.generate import AudioFrame, ReplyDone, TextToken, generate_reply
from chroma_agent.model.chroma import ChromaModel


@pytest.fixture(scope="module")
def model(tiny_dir) -> ChromaModel:
    return ChromaModel.from_pretrained(tiny_dir, progress=False)


@pytest.fixture(scope="module")
def prompt(golden_inputs):
    return SimpleNamespace(
        input_ids=torch.from_numpy(golden_inputs["thinker_input_ids"]),
        input_features=torch.from_numpy(golden_inputs["thinker_input_features"]),
        feature_attention_mask=torch.from_numpy(golden_inputs["thinker_feature_attention_mask"]),
    )


@pytest.fixture(scope="module")
def voice_codes(model, golden_inputs) -> torch.Tensor:
    return model.encode_voice_codes(torch.from_numpy(golden_inputs["input_values"][0, 0]))


@pytest.fixture(scope="module")
def prefix(model, golden_inputs, voice_codes) -> torch.Tensor:
    return model.voice_prefix(torch.from_numpy(golden_inputs["input_ids"][0]), voice_codes)


@pytest.fixture(scope="module")
def reply(model, prompt, prefix) -> list:
    return list(generate_reply(model, prompt, prefix, max_frames=32))


def test_voice_prompt_codes_match(voice_codes, golden_outputs):
    assert torch.equal(voice_codes, torch.from_numpy(golden_outputs["voice_prompt_codes"]))


def test_frames_and_text_match(reply, golden_outputs):
    done = reply[-1]
    assert isinstance(done, ReplyDone)
    assert done.reason == "max_frames"
    np.testing.assert_array_equal(done.codes().numpy(), golden_outputs["frames"])
    assert done.text_ids == golden_outputs["thinker_text_ids"].tolist()


def test_events_stream_in_reference_order(reply, golden_outputs):
    frames = [e for e in reply if isinstance(e, AudioFrame)]
    texts = [e for e in reply if isinstance(e, TextToken)]
    assert [f.index for f in frames] == list(range(32))
    # One text token per two frames, on frames 0, 2, ..., 18, then audio only (case.json).
    assert [t.step for t in texts] == list(range(0, 20, 2))
    # Each text token is yielded before the frame made at its step.
    order = [(type(e).__name__, e.step) for e in reply if not isinstance(e, ReplyDone)]
    assert order.index(("TextToken", 4)) < order.index(("AudioFrame", 4))
    # backbone_step_lengths: the prompt, then 3 positions on text steps and 1 otherwise.
    lengths = golden_outputs["backbone_step_lengths"].tolist()
    assert lengths[0] == 95
    text_steps = {t.step for t in texts}
    assert lengths[1:] == [3 if s in text_steps else 1 for s in range(1, 32)]


def test_first_step_tensors_match(model, prompt, prefix, golden_outputs):
    with torch.inference_mode():
        audio = model.thinker.encode_audio(prompt.input_features, prompt.feature_attention_mask)
        embeds = model.thinker.embed(prompt.input_ids, audio)
        n = prompt.input_ids.shape[1]
        cache = model.thinker.model.new_cache(1, n, dtype=torch.float32, device="cpu")
        hidden, logits = model.thinker_forward(embeds, torch.arange(n)[None], cache)
        np.testing.assert_allclose(logits[0].numpy(), golden_outputs["first_thinker_logits"], atol=1e-4)
        np.testing.assert_allclose(hidden[0].numpy(), golden_outputs["first_thinker_last_hidden"], atol=1e-4)

        token = logits.argmax(-1)
        x = torch.cat([prefix, hidden, model.embed_text(token)])
        np.testing.assert_allclose(x.numpy(), golden_outputs["first_backbone_input_embeds"], atol=1e-5)
        assert golden_outputs["first_backbone_attention_mask"].all()

        bcache = model.backbone.model.new_cache(1, x.shape[0], dtype=torch.float32, device="cpu")
        bhidden, blogits = model.backbone_forward(x[None], torch.arange(x.shape[0])[None], bcache)
        np.testing.assert_allclose(blogits[0].numpy(), golden_outputs["first_backbone_logits"], atol=1e-4)

        seen: list[torch.Tensor] = []

        def greedy_recording(logits: torch.Tensor, codebook: int) -> torch.Tensor:
            seen.append(logits[0])
            return logits.argmax(-1)

        dcache = model.decoder.model.new_cache(1, 8, dtype=torch.float32, device="cpu")
        model.depth_decode(bhidden, blogits.argmax(-1), dcache, greedy_recording)
        np.testing.assert_allclose(torch.stack(seen).numpy(), golden_outputs["first_decoder_logits"], atol=1e-4)


def test_waveform_matches(model, golden_outputs):
    frames = torch.from_numpy(golden_outputs["frames"]).clamp(0, model.config.codebook_size - 1)
    with torch.inference_mode():
        audio = model.codec_model.decode(frames.T[None]).audio_values[0, 0]
    assert audio.shape[0] == 32 * model.config.samples_per_frame
    np.testing.assert_allclose(audio.numpy(), golden_outputs["waveform"], atol=1e-3)


def test_codebook_eos_rule_stops_generation(model, prompt, prefix, monkeypatch):
    """Force all-zero frames from step 3 on: the reply ends there and the all-zero frame is dropped."""
    calls = {"backbone": 0}
    real_backbone = model.backbone_forward

    def backbone_forward(*args, **kwargs):
        hidden, logits = real_backbone(*args, **kwargs)
        calls["backbone"] += 1
        if calls["backbone"] > 3:
            logits = torch.full_like(logits, -1.0)
            logits[:, 0] = 1.0
        return hidden, logits

    real_heads = model.decoder.codebook_head.logits

    def heads(hidden, codebook):
        logits = real_heads(hidden, codebook)
        if calls["backbone"] > 3:
            logits = torch.full_like(logits, -1.0)
            logits[:, 0] = 1.0
        return logits

    monkeypatch.setattr(model, "backbone_forward", backbone_forward)
    monkeypatch.setattr(model.decoder.codebook_head, "logits", heads)
    done = list(generate_reply(model, prompt, prefix, max_frames=32))[-1]
    assert done.reason == "eos"
    assert len(done.frames) == 3
    assert all(int(f.sum()) != 0 for f in done.frames)
