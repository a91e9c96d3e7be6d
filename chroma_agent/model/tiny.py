"""Build a tiny random Chroma checkpoint in the FlashLabs/Chroma-4B folder layout.

For demos and tests that must not depend on downloaded weights: same files, same tensor names, same
token-id layout (special tokens after the BPE vocabulary, like 151643.. in the real one), tiny sizes.
It speaks noise: the weights are random.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MimiConfig, PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.saving import save_checkpoint

log = logging.getLogger(__name__)

BPE_VOCAB = 488
# Qwen2.5-Omni's added tokens, in its order; Chroma appends text_start / text_end.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<|text_start|>", "<|text_end|>",
]
TOKEN_ID = {tok: BPE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}

# The Qwen2.5-Omni conversation format (system default, audio placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "hello there this is the reference voice speaking clearly so model can learn how i sound what should "
    "wear for a walk in park afternoon weather today sunny warm cold rain jacket shoes hat water bring "
    "you are chroma helpful assistant please tell me about your day thank very much good morning evening "
    "night call support order account help with problem number phone time where when why who which "
    "yes no maybe sure great nice okay right left first second third one two three four five six seven"
).split()


def _corpus(n_sentences: int = 400) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    sentences = []
    for _ in range(n_sentences):
        idx = torch.randint(len(_WORDS), (int(torch.randint(4, 14, (1,), generator=gen)),), generator=gen)
        words = [_WORDS[i] for i in idx.tolist()]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB:
        raise RuntimeError(f"tiny BPE came out with {tok.get_vocab_size()} ids, expected {BPE_VOCAB}")
    tok.add_special_tokens(SPECIAL_TOKENS)  # in Qwen's order, right after the BPE ids
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids(SPECIAL_TOKENS)
    if ids != [TOKEN_ID[t] for t in SPECIAL_TOKENS]:
        raise RuntimeError("tiny tokenizer special tokens landed on unexpected ids")
    return fast


def _rope(theta: float, **extra: Any) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta, **extra}


def tiny_config_dict() -> dict[str, Any]:
    text = {
        "vocab_size": BPE_VOCAB + len(SPECIAL_TOKENS), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "rope_parameters": _rope(1e6, mrope_section=[2, 3, 3]),
        "tie_word_embeddings": False, "hidden_act": "silu",
    }
    audio = {
        "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "num_mel_bins": 128, "n_window": 100, "output_dim": 32, "max_source_positions": 1500,
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
              "fullatt_block_indexes": [0]}
    thinker = Qwen2_5OmniThinkerConfig(
        text_config=text, audio_config=audio, vision_config=vision,
        audio_token_index=TOKEN_ID["<|AUDIO|>"], image_token_index=TOKEN_ID["<|IMAGE|>"],
        video_token_index=TOKEN_ID["<|VIDEO|>"], audio_start_token_id=TOKEN_ID["<|audio_bos|>"],
        audio_end_token_id=TOKEN_ID["<|audio_eos|>"], vision_start_token_id=TOKEN_ID["<|vision_bos|>"],
        vision_end_token_id=TOKEN_ID["<|vision_eos|>"], vision_token_id=TOKEN_ID["<|vision_pad|>"],
        bos_token_id=TOKEN_ID["<|im_start|>"], eos_token_id=TOKEN_ID["<|im_end|>"],
        pad_token_id=TOKEN_ID["<|endoftext|>"], position_id_per_seconds=25, seconds_per_chunk=2,
        tie_word_embeddings=False,
    ).to_dict()
    stack = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": _rope(500000.0), "vocab_size": 2051, "audio_num_codebooks": 8,
    }
    codec = MimiConfig(
        hidden_size=32, num_filters=4, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, codebook_dim=8, vector_quantization_hidden_dimension=8,
        upsample_groups=32, sliding_window=16, num_quantizers=8, frame_rate=12.5,
    ).to_dict()
    return {
        "model_type": "chroma",
        "architectures": ["ChromaForConditionalGeneration"],
        "thinker_config": thinker,
        "backbone_config": {**stack, "model_type": "chroma_backbone", "max_position_embeddings": 2048},
        "decoder_config": {**stack, "model_type": "chroma_decoder", "max_position_embeddings": 33,
                           "audio_embedding_dim": 32},
        "codec_config": codec,
        "audio_num_codebooks": 8,
        "codebook_pad_token_id": 2050,
        "codebook_eos_token_id": 0,
        "audio_frame_freq": 1920,
        "text_start_token_id": TOKEN_ID["<|text_start|>"],
        "text_end_token_id": TOKEN_ID["<|text_end|>"],
        "im_end_token_id": TOKEN_ID["<|im_end|>"],
    }


@torch.no_grad()
def _randomise(model: ChromaModel, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name or "ln_" in name:
            continue
        if p.dim() >= 2:
            # Larger than the usual 0.02 so attention is not uniform and replies depend on their inputs.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    # Mimi's init leaves every codebook at zero (every code decodes alike): give the codes distinct vectors.
    for name, buf in model.codec_model.named_buffers():
        if name.endswith("embed_sum"):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        elif name.endswith("cluster_usage") or name.endswith("initialized"):
            buf.fill_(1.0)


def build_tiny_checkpoint(folder: str | Path, *, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = ChromaConfig(tiny_config_dict())
    torch.manual_seed(seed)
    model = ChromaModel(config, with_vision=False)
    _randomise(model, seed)
    save_checkpoint(model, folder)
    build_tokenizer().save_pretrained(folder)
    WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
        padding_value=0.0, return_attention_mask=True, dither=0.0,
    ).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True}) + "\n")
    log.info("wrote a tiny random Chroma checkpoint to %s", folder)
    return folder


def synthetic_speech(seconds: float, rate: int, pitch: float, seed: int) -> np.ndarray:
    """A voiced-sounding test signal: harmonics with vibrato and syllable-like bursts (the tiny demo's voice
    and question: no recording needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 3.5 * t)) ** 2
    x = 0.2 * voice * syllables + 0.003 * rng.standard_normal(t.shape)
    return x.astype(np.float32)
