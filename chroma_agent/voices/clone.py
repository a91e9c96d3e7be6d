"""Cloning a voice from a clip and its transcript: the checks and preparation (any thread), then the profile
from the clip's Mimi codes. A running engine owns cloning (`Engine.create_voice`: preparation in its worker
pool, the encode as one engine job); :func:`create_voice_profile` does the same in one call for a script that
has a model and no engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from chroma_agent.audio import AudioSource
from chroma_agent.model.chroma import ChromaModel
from chroma_agent.model.config import ChromaConfig
from chroma_agent.model.processor import ChromaProcessor
from chroma_agent.voices.names import VoiceError, validate_voice_name
from chroma_agent.voices.profile import VoiceProfile, content_id, fingerprint

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CLIP_SECONDS",
    "MAX_TRANSCRIPT_CHARS",
    "MIN_CLIP_SECONDS",
    "VoiceClip",
    "create_voice_profile",
    "finish_voice_profile",
    "prepare_voice_clip",
]

#: Shorter clips give the backbone too little of the voice to imitate.
MIN_CLIP_SECONDS = 1.0
#: Longer clips only lengthen every request's prefix; the reference uses short prompts.
MAX_CLIP_SECONDS = 30.0
#: Far more than 30 s of speech can hold; a longer "transcript" is a mistake and would bloat the prefix.
MAX_TRANSCRIPT_CHARS = 2000
#: A clip whose RMS or peak is below these is silence (or near-silent noise): nothing to clone.
SILENCE_RMS = 1e-4
SILENCE_PEAK = 1e-3


@dataclass(frozen=True)
class VoiceClip:
    """A voice clip checked and resampled to the codec rate, with its transcript's ids: ready to encode."""

    name: str | None
    transcript: str
    text_ids: torch.Tensor  # int64 [T]
    waveform: torch.Tensor  # float32 [samples] at the codec rate
    duration_s: float


def prepare_voice_clip(
    config: ChromaConfig,
    processor: ChromaProcessor,
    audio: AudioSource,
    transcript: str,
    *,
    name: str | None = None,
    sample_rate: int | None = None,
    allow_paths: bool = True,
) -> VoiceClip:
    """Everything of cloning but the Mimi encode: checks, decoding, resampling, tokenizing (any thread)."""
    if name is not None:
        validate_voice_name(name)
    if not isinstance(transcript, str) or not transcript.strip():
        raise VoiceError("transcript is empty: give the exact words spoken in the clip")
    transcript = transcript.strip()
    if len(transcript) > MAX_TRANSCRIPT_CHARS:
        raise VoiceError(
            f"transcript is {len(transcript)} characters; at most {MAX_TRANSCRIPT_CHARS} for a "
            f"{MAX_CLIP_SECONDS:g} s clip"
        )
    rate = int(config.sample_rate)
    if processor.voice_sample_rate != rate:
        raise VoiceError(
            f"processor resamples voices to {processor.voice_sample_rate} Hz but the codec runs at {rate} Hz: "
            "model and processor come from different checkpoints"
        )
    try:
        prompt = processor.encode_voice_prompt(
            transcript, audio, sample_rate=sample_rate, allow_paths=allow_paths, max_seconds=MAX_CLIP_SECONDS
        )
    except ValueError as exc:  # AudioError included
        # load_audio checks the length before resampling, so an hour-long upload is refused cheaply.
        raise VoiceError(f"voice clip: {exc}") from exc

    wave = prompt.waveform.reshape(-1)
    duration = wave.numel() / rate
    if duration < MIN_CLIP_SECONDS:
        raise VoiceError(f"voice clip is {duration:.2f} s long; at least {MIN_CLIP_SECONDS:g} s is needed")
    if duration > MAX_CLIP_SECONDS + 1.0 / rate:  # resampling may round the length up by one sample
        raise VoiceError(f"voice clip is {duration:.1f} s long; at most {MAX_CLIP_SECONDS:g} s is accepted")
    if not bool(torch.isfinite(wave).all()):
        raise VoiceError("voice clip has non-finite samples (NaN or infinity)")
    rms = float(wave.double().pow(2).mean().sqrt())
    peak = float(wave.abs().max())
    if rms < SILENCE_RMS or peak < SILENCE_PEAK:
        raise VoiceError(f"voice clip is silent (RMS {rms:.1e}, peak {peak:.1e}): nothing to clone")
    return VoiceClip(name, transcript, prompt.text_ids.reshape(-1), wave, duration)


def finish_voice_profile(config: ChromaConfig, clip: VoiceClip, codes: torch.Tensor) -> VoiceProfile:
    """The profile of a prepared clip, given its Mimi codes [K, frames]."""
    if codes.ndim != 2 or codes.shape[0] != config.num_codebooks or codes.shape[1] == 0:
        raise VoiceError(f"the codec returned codes of shape {tuple(codes.shape)}; expected [K, frames]")
    voice_name = clip.name if clip.name is not None else f"voice-{content_id(clip.text_ids, codes)[:8]}"
    profile = VoiceProfile(
        name=voice_name,
        transcript=clip.transcript,
        text_ids=clip.text_ids,
        codes=codes,
        duration_s=clip.duration_s,
        model_fingerprint=fingerprint(config),
    )
    logger.info(
        "voice %r: cloned %.2f s clip into %d frames x %d codebooks (id %s)",
        profile.name,
        clip.duration_s,
        profile.frames,
        profile.num_codebooks,
        profile.id,
        extra={"voice": profile.name},
    )
    return profile


def create_voice_profile(
    model: ChromaModel,
    processor: ChromaProcessor,
    audio: AudioSource,
    transcript: str,
    *,
    name: str | None = None,
    sample_rate: int | None = None,
    allow_paths: bool = True,
) -> VoiceProfile:
    """Clone a voice once: the clip's codes and the transcript's ids, ready to be stored and reused.

    ``audio`` is anything :func:`chroma_agent.audio.load_audio` accepts, at any rate, mono or multi-channel.
    The transcript must be what the clip says: the backbone learns the voice from the pairing. (A running
    engine clones with `Engine.create_voice`, which does the same off its step loop.)
    """
    clip = prepare_voice_clip(model.config, processor, audio, transcript, name=name, sample_rate=sample_rate,
                              allow_paths=allow_paths)
    return finish_voice_profile(model.config, clip, model.encode_voice_codes(clip.waveform).to("cpu"))
