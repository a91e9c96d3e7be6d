"""Cloned voices: made once from a reference clip and its transcript, then reused by name.

* :mod:`.profile`: :class:`VoiceProfile` and its file format (the clip's Mimi codes and transcript ids, no audio);
* :mod:`.store`: :class:`VoiceStore`, the voices folder (one file per name);
* :mod:`.clone`: cloning a clip (the engine owns it: `Engine.create_voice`; `create_voice_profile` for scripts);
* :mod:`.names`: voice names and the errors (no torch).

Names are imported lazily: ``from chroma_agent.voices import validate_voice_name`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chroma_agent.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("MAX_NAME_CHARS", "UnknownVoiceError", "VoiceError", "validate_voice_name"),
                    "chroma_agent.voices.names"),
    **dict.fromkeys(("FORMAT", "FORMAT_VERSION", "SUFFIX", "VoiceProfile", "content_id", "fingerprint"),
                    "chroma_agent.voices.profile"),
    **dict.fromkeys(("DEFAULT_DIR", "ENV_DIR", "VoiceStore"), "chroma_agent.voices.store"),
    **dict.fromkeys(("MAX_CLIP_SECONDS", "MAX_TRANSCRIPT_CHARS", "MIN_CLIP_SECONDS", "VoiceClip",
                     "create_voice_profile", "finish_voice_profile", "prepare_voice_clip"),
                    "chroma_agent.voices.clone"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors (`X as X`: a re-export); at run time: lazily, above
    from chroma_agent.voices.clone import (
        MAX_CLIP_SECONDS as MAX_CLIP_SECONDS,
        MAX_TRANSCRIPT_CHARS as MAX_TRANSCRIPT_CHARS,
        MIN_CLIP_SECONDS as MIN_CLIP_SECONDS,
        VoiceClip as VoiceClip,
        create_voice_profile as create_voice_profile,
        finish_voice_profile as finish_voice_profile,
        prepare_voice_clip as prepare_voice_clip,
    )
    from chroma_agent.voices.names import (
        MAX_NAME_CHARS as MAX_NAME_CHARS,
        UnknownVoiceError as UnknownVoiceError,
        VoiceError as VoiceError,
        validate_voice_name as validate_voice_name,
    )
    from chroma_agent.voices.profile import (
        FORMAT as FORMAT,
        FORMAT_VERSION as FORMAT_VERSION,
        SUFFIX as SUFFIX,
        VoiceProfile as VoiceProfile,
        content_id as content_id,
        fingerprint as fingerprint,
    )
    from chroma_agent.voices.store import (
        DEFAULT_DIR as DEFAULT_DIR,
        ENV_DIR as ENV_DIR,
        VoiceStore as VoiceStore,
    )
