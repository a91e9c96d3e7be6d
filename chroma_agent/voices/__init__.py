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

if TYPE_CHECKING:  # what type checkers and editors see; at run time the names resolve lazily (above)
    from chroma_agent.voices.clone import (  # noqa: F401
        MAX_CLIP_SECONDS,
        MAX_TRANSCRIPT_CHARS,
        MIN_CLIP_SECONDS,
        VoiceClip,
        create_voice_profile,
        finish_voice_profile,
        prepare_voice_clip,
    )
    from chroma_agent.voices.names import MAX_NAME_CHARS, UnknownVoiceError, VoiceError, validate_voice_name  # noqa: F401
    from chroma_agent.voices.profile import (  # noqa: F401
        FORMAT,
        FORMAT_VERSION,
        SUFFIX,
        VoiceProfile,
        content_id,
        fingerprint,
    )
    from chroma_agent.voices.store import DEFAULT_DIR, ENV_DIR, VoiceStore  # noqa: F401
