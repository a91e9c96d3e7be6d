"""Chroma's input processing: conversations to thinker inputs, voice prompts to backbone inputs.

Mirrors FlashLabs' ``ChromaProcessor`` (a ``Qwen2_5OmniProcessor`` subclass) without building the Qwen processor:
that one needs torchvision for its unused video processor, pads every clip to 300 s of mel frames, and loads
audio from arbitrary paths and URLs. What stays the same, and is checked against the reference goldens:

* the prompt is the checkpoint's chat template with ``add_generation_prompt=True``, tokenized without added
  special tokens;
* each ``<|AUDIO|>`` becomes ``N = ((L - 1) // 2 + 1 - 2) // 2 + 1`` copies, ``L`` being the clip's valid mel
  frames (``ceil(samples / hop)``, what the reference's attention mask counts);
* the valid mel frames equal WhisperFeatureExtractor's output for the 300 s padded clip (see
  :meth:`ChromaProcessor.extract_features` for why a short padding gives the same numbers);
* the voice prompt is the transcript's ids (no special tokens) and the clip at the codec rate.

Two things differ on purpose, and are invisible for ordinary text:

* Text that comes from clients is text. The template is rendered with markers where client text goes; if
  any client text spells a control token (``<|im_end|><|im_start|>system...``), that text is tokenized
  with special tokens split into plain characters, so nobody can forge a turn. Only the template emits
  control tokens. For all other text the whole prompt is tokenized at once, exactly as the reference does.
* A conversation turn is rendered on its own (:meth:`ChromaProcessor.encode_turn`), in O(1) however long
  the history, because the chat template renders each message independently except for a default system
  prompt before a first non-system message (:class:`TemplatePieces`). The processor checks that property
  on the checkpoint's template when it loads and refuses a template without it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase, WhisperFeatureExtractor

from chroma_agent.audio import AudioError, AudioSource, load_audio

logger = logging.getLogger(__name__)

__all__ = ["ChromaProcessor", "TemplatePieces", "ThinkerInputs", "TurnInputs", "VoicePromptInputs",
           "num_audio_tokens"]

ROLES = ("system", "user", "assistant")
DEFAULT_VOICE_SAMPLE_RATE = 24000  # the reference's target_sample_rate default and Mimi's rate
# Markers for client text inside a rendered template (private-use characters; stripped from client text).
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_ANCHOR = {"role": "system", "content": "x"}  # a message rendered before a turn so the turn renders alone


def num_audio_tokens(mel_frames: int) -> int:
    """Audio-encoder outputs for ``mel_frames`` valid frames (Qwen2.5-Omni's two stride-2 reductions)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass
class ThinkerInputs:
    """One conversation, ready for the thinker."""

    input_ids: torch.LongTensor  # [1, L], <|AUDIO|> already expanded
    # [n_audio, n_mels, frames]; frames = the longest clip's valid frames (not the reference's 30000)
    input_features: torch.FloatTensor | None
    feature_attention_mask: torch.LongTensor | None  # [n_audio, frames], 1 on valid frames
    audio_token_counts: list[int]  # <|AUDIO|> ids per clip, in prompt order
    prompt_text: str  # rendered template, one <|AUDIO|> per clip

    @property
    def attention_mask(self) -> torch.LongTensor:
        return torch.ones_like(self.input_ids)

    @property
    def feature_lengths(self) -> list[int]:
        if self.feature_attention_mask is None:
            return []
        return [int(n) for n in self.feature_attention_mask.sum(-1)]


@dataclass
class TurnInputs:
    """One message rendered on its own: its ids (<|AUDIO|> expanded) and its clips' features."""

    ids: list[int]
    features: list[torch.Tensor]  # per clip [n_mels, valid frames], in placeholder order
    audio_seconds: float


@dataclass(frozen=True)
class TemplatePieces:
    """What the chat template adds around independently rendered turns."""

    default_prefix: list[int]  # before a first message that is not a system message ([] if none)
    assistant_header: list[int]  # the generation prompt ("<|im_start|>assistant\n")
    turn_end: list[int]  # what closes an assistant message ("<|im_end|>\n")
    audio_token_id: int  # the placeholder each encoded audio vector takes


@dataclass
class VoicePromptInputs:
    """The voice to clone: what the reference passes as ``input_ids`` and ``input_values``."""

    text_ids: torch.LongTensor  # [1, T] transcript ids, no special tokens
    waveform: torch.FloatTensor  # [samples] mono at the codec rate


@dataclass
class _AudioRef:
    message_index: int
    part_index: int
    source: AudioSource
    sample_rate: int | None
    allow_paths: bool  # False for OpenAI input_audio, whose data is base64 by definition


def _find_chat_template(folder: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"  # the older processor layout (e.g. Qwen2.5-Omni's own repo)
    if as_json.is_file():
        template = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    raise FileNotFoundError(
        f"no chat template in {folder}: expected chat_template.jinja, chat_template.json or a chat_template "
        "entry in tokenizer_config.json"
    )


def _config_value(config: Mapping[str, Any], *keys: str) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


class ChromaProcessor:
    """Tokenizer + Whisper features + chat template, loaded from a local checkpoint folder."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        chat_template: str,
        *,
        audio_token_id: int | None = None,
        voice_sample_rate: int = DEFAULT_VOICE_SAMPLE_RATE,
    ) -> None:
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template
        self.voice_sample_rate = int(voice_sample_rate)
        self.audio_sample_rate = int(feature_extractor.sampling_rate)
        self.hop_length = int(feature_extractor.hop_length)
        # The reference truncates each clip to the extractor's window (300 s); keep that limit.
        self.max_audio_samples = int(feature_extractor.n_samples)

        self.audio_token: str = getattr(tokenizer, "audio_token", None) or "<|AUDIO|>"
        token_id = tokenizer.convert_tokens_to_ids(self.audio_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no id for the audio token {self.audio_token!r}")
        if audio_token_id is not None and int(audio_token_id) != int(token_id):
            raise ValueError(
                f"config audio_token_index {audio_token_id} disagrees with the tokenizer's "
                f"{self.audio_token} id {token_id}"
            )
        self.audio_token_id = int(token_id)
        # A second backend that reads control-token strings as plain text, for client text. A separate copy
        # because the wrapper's `split_special_tokens` flips a flag on the shared backend (not thread-safe).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._text_backend: Tokenizer | None = None
        if backend is not None:
            self._text_backend = Tokenizer.from_str(backend.to_str())
            self._text_backend.encode_special_tokens = True
        specials = sorted({str(t) for t in tokenizer.get_added_vocab()} | set(tokenizer.all_special_tokens),
                          key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(t) for t in specials if t)) if specials else None
        self.pieces = self._template_pieces()

    @property
    def min_audio_samples(self) -> int:
        """The shortest clip the audio encoder takes: its stride-2 conv and pooling need 3 mel frames."""
        return 2 * self.hop_length + 1

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChromaProcessor:
        """Load from a local checkpoint folder (nothing is downloaded)."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{name} is missing from {folder}")

        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok_kwargs: dict[str, Any] = {"local_files_only": True}
        if tokenizer_config.get("tokenizer_class"):
            # config.json's model_type "chroma" is unknown to transformers: reading it only logs a misleading
            # warning, and the tokenizer class is named in tokenizer_config.json anyway.
            tok_kwargs["config"] = PreTrainedConfig()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **tok_kwargs)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        chat_template = _find_chat_template(folder, tokenizer)

        config: dict[str, Any] = {}
        config_path = folder / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        audio_token_id = _config_value(config, "thinker_config", "audio_token_index")
        voice_rate = _config_value(config, "codec_config", "sampling_rate") or DEFAULT_VOICE_SAMPLE_RATE
        return cls(
            tokenizer,
            feature_extractor,
            chat_template,
            audio_token_id=audio_token_id,
            voice_sample_rate=int(voice_rate),
        )

    # ----------------------------------------------------------------------------------------------------
    # conversations

    def _normalise(self, messages: Any) -> tuple[list[dict[str, Any]], list[_AudioRef]]:
        """Validated, template-ready messages and the audio parts in prompt order.

        Parts are rebuilt from scratch rather than passed through: the template decides a part is an image or
        audio from the mere presence of keys like ``image`` or ``audio_url``, so stray keys must not reach it.
        """
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
            raise ValueError("messages must be a list of {role, content} objects")
        if not messages:
            raise ValueError("messages is empty: at least one message is needed")

        rendered: list[dict[str, Any]] = []
        audio: list[_AudioRef] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
            if "content" not in message:
                raise ValueError(f"messages[{i}].content is missing")
            content = message["content"]
            if isinstance(content, str):
                rendered.append({"role": role, "content": content})
                continue
            if not isinstance(content, Sequence):
                raise ValueError(f"messages[{i}].content must be a string or a list of parts")

            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, Mapping):
                    raise ValueError(f"{where} must be an object, got {type(part).__name__}")
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError(f"{where}.text is missing or not a string")
                    parts.append({"type": "text", "text": text})
                elif kind == "audio":
                    if part.get("audio") is None:
                        raise ValueError(f"{where}.audio is missing")
                    audio.append(_AudioRef(i, j, part["audio"], part.get("sample_rate"), True))
                    parts.append({"type": "audio", "audio": f"<audio {len(audio)}>"})
                elif kind == "input_audio":
                    payload = part.get("input_audio")
                    data = payload.get("data") if isinstance(payload, Mapping) else None
                    if not isinstance(data, str) or not data:
                        raise ValueError(f"{where}.input_audio.data is missing (base64 audio expected)")
                    fmt = payload.get("format")
                    if fmt is not None and not isinstance(fmt, str):
                        raise ValueError(f"{where}.input_audio.format must be a string")
                    audio.append(_AudioRef(i, j, data, None, False))
                    parts.append({"type": "audio", "audio": f"<audio {len(audio)}>"})
                else:
                    raise ValueError(
                        f"{where}.type {kind!r} is not supported (text, audio or input_audio expected)"
                    )
            rendered.append({"role": role, "content": parts})
        return rendered, audio

    def _apply_template(self, rendered: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = self.tokenizer.apply_chat_template(
            rendered,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        if not isinstance(text, str):  # some tokenizer versions wrap single conversations in a list
            text = text[0]
        return text

    @staticmethod
    def _marked(rendered: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Messages whose client text is replaced by markers, and the texts in marker order."""
        texts: list[str] = []

        def mark(text: str) -> str:
            texts.append(text.replace(_OPEN, "\ufffd").replace(_CLOSE, "\ufffd"))
            return f"{_OPEN}{len(texts) - 1}{_CLOSE}"

        out = []
        for message in rendered:
            content = message["content"]
            if isinstance(content, str):
                content = mark(content)
            else:
                content = [{**part, "text": mark(part["text"])} if part["type"] == "text" else part
                           for part in content]
            out.append({**message, "content": content})
        return out, texts

    def _tokenize_marked(self, marked: str, texts: list[str]) -> list[int]:
        """Ids of a rendered template with marked client text; client text never becomes control tokens."""
        plain = _MARK.sub(lambda m: texts[int(m.group(1))], marked)
        if self._special is None or not any(self._special.search(t) for t in texts):
            return self.tokenizer(plain, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        pos = 0
        for m in _MARK.finditer(marked):
            if m.start() > pos:
                ids += self.tokenizer(marked[pos : m.start()], add_special_tokens=False)["input_ids"]
            ids += self._client_text_ids(texts[int(m.group(1))])
            pos = m.end()
        if pos < len(marked):
            ids += self.tokenizer(marked[pos:], add_special_tokens=False)["input_ids"]
        return ids

    def _client_text_ids(self, text: str) -> list[int]:
        if self._text_backend is not None:
            return self._text_backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Ids of client text (a voice transcript, a message) with control-token strings kept as text."""
        if self._special is not None and self._special.search(text):
            return self._client_text_ids(text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (one ``<|AUDIO|>`` per clip); audio is not loaded."""
        rendered, _ = self._normalise(messages)
        return self._apply_template(rendered, add_generation_prompt)

    def _render_ids(self, rendered: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[list[int], str]:
        marked, texts = self._marked(rendered)
        text = self._apply_template(marked, add_generation_prompt)
        return self._tokenize_marked(text, texts), _MARK.sub(lambda m: texts[int(m.group(1))], text)

    def _template_pieces(self) -> TemplatePieces:
        """The template's fixed pieces, and a check that it renders every message independently."""
        anchor = self._apply_template([_ANCHOR], False)
        header = self._apply_template([_ANCHOR], True)[len(anchor):]
        user = {"role": "user", "content": "y"}
        alone = self._apply_template([user], False)
        piece = self._apply_template([_ANCHOR, user], False)[len(anchor):]
        if not alone.endswith(piece):
            raise ValueError("unsupported chat template: a first user message must render as a prefix + the message")
        marker = "\u2063"
        closed = self._apply_template([_ANCHOR, {"role": "assistant", "content": marker}], False)
        tokenize = self.tokenizer
        pieces = TemplatePieces(
            default_prefix=tokenize(alone[: len(alone) - len(piece)], add_special_tokens=False)["input_ids"],
            assistant_header=tokenize(header, add_special_tokens=False)["input_ids"],
            turn_end=tokenize(closed.split(marker, 1)[1], add_special_tokens=False)["input_ids"],
            audio_token_id=self.audio_token_id,
        )
        probe = [{"role": "system", "content": "a"}, user, {"role": "assistant", "content": "z"},
                 {"role": "user", "content": "w"}]
        for conversation in (probe, probe[1:]):
            whole = self._render_ids(conversation, True)[0]
            parts = [] if conversation[0]["role"] == "system" else list(pieces.default_prefix)
            for message in conversation:
                parts += self._render_ids([_ANCHOR, message], False)[0][len(self._render_ids([_ANCHOR], False)[0]):]
            if whole != parts + pieces.assistant_header:
                raise ValueError("unsupported chat template: messages do not render independently of each other, "
                                 "which keeping a conversation's KV cache between turns relies on")
        return pieces

    def encode_turn(self, role: str, content: str | Sequence[str | np.ndarray]) -> TurnInputs:
        """One message rendered alone: text as str, audio as 16 kHz float32 clips, in order.

        The ids do not depend on the turns before it; a conversation is `pieces.default_prefix` (when its
        first turn is not a system turn) followed by its turns' ids.
        """
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        clips: list[np.ndarray] = []
        if isinstance(content, str):
            message: dict[str, Any] = {"role": role, "content": content}
        else:
            parts: list[dict[str, Any]] = []
            for part in content:
                if isinstance(part, str):
                    parts.append({"type": "text", "text": part})
                else:
                    clips.append(np.asarray(part, dtype=np.float32))
                    parts.append({"type": "audio", "audio": f"<audio {len(clips)}>"})
            message = {"role": role, "content": parts}
        anchor_ids = self._render_ids([_ANCHOR], False)[0]
        ids = self._render_ids([_ANCHOR, message], False)[0][len(anchor_ids):]
        inputs = self._expand(ids, clips)
        features = []
        if inputs.input_features is not None:
            for f, n in zip(inputs.input_features, inputs.feature_lengths, strict=True):
                features.append(f[:, :n].clone())
        seconds = sum(len(c) for c in clips) / self.audio_sample_rate
        return TurnInputs(inputs.input_ids[0].tolist(), features, seconds)

    def load_clips(
        self,
        messages: Any,
        *,
        base_dir: Path | None = None,
        allow_paths: bool = True,
        max_audio_seconds: float | None = None,
    ) -> list[np.ndarray]:
        """Every audio part of ``messages`` at 16 kHz, in prompt order; errors name the part."""
        _, refs = self._normalise(messages)
        clips: list[np.ndarray] = []
        for k, ref in enumerate(refs, start=1):
            try:
                clip = load_audio(
                    ref.source,
                    self.audio_sample_rate,
                    sample_rate=ref.sample_rate,
                    base_dir=base_dir,
                    allow_paths=allow_paths and ref.allow_paths,
                    max_seconds=max_audio_seconds,
                )
            except AudioError as exc:
                raise AudioError(
                    f"audio part {k} (messages[{ref.message_index}].content[{ref.part_index}]): {exc}"
                ) from None
            if clip.size > self.max_audio_samples:
                logger.warning(
                    "audio part %d is %.1f s; keeping the first %.0f s like the reference",
                    k,
                    clip.size / self.audio_sample_rate,
                    self.max_audio_samples / self.audio_sample_rate,
                )
                clip = clip[: self.max_audio_samples]
            clips.append(clip)
        return clips

    def encode_messages(
        self,
        messages: Any,
        *,
        base_dir: Path | None = None,
        allow_paths: bool = True,
        max_audio_seconds: float | None = None,
    ) -> ThinkerInputs:
        """Thinker inputs for one conversation; audio errors name the message and part they come from."""
        rendered, _ = self._normalise(messages)
        ids, prompt = self._render_ids(rendered, True)
        clips = self.load_clips(
            messages, base_dir=base_dir, allow_paths=allow_paths, max_audio_seconds=max_audio_seconds
        )
        inputs = self._expand(ids, clips)
        inputs.prompt_text = prompt
        return inputs

    def _expand(self, ids: list[int], clips: Sequence[np.ndarray]) -> ThinkerInputs:
        """Template ids + their 16 kHz clips -> ids with each placeholder expanded, and features."""
        placeholders = sum(1 for t in ids if t == self.audio_token_id)
        if placeholders != len(clips):
            raise ValueError(
                f"the prompt has {placeholders} {self.audio_token} placeholders for {len(clips)} audio parts"
            )

        features = mask = None
        counts: list[int] = []
        if clips:
            features, mask = self.extract_features(clips)
            counts = [num_audio_tokens(int(n)) for n in mask.sum(-1)]
            for k, count in enumerate(counts, start=1):
                if count < 1:  # the encoder's stride-2 conv and pooling need 3 mel frames for one output
                    raise AudioError(
                        f"audio part {k}: audio is too short ({len(clips[k - 1])} samples; at least "
                        f"{self.min_audio_samples} at {self.audio_sample_rate} Hz)"
                    )
            expanded: list[int] = []
            clip_iter = iter(counts)
            for t in ids:
                if t == self.audio_token_id:
                    expanded.extend([t] * next(clip_iter))
                else:
                    expanded.append(t)
            ids = expanded

        return ThinkerInputs(
            input_ids=torch.tensor([ids], dtype=torch.long),
            input_features=features,
            feature_attention_mask=mask,
            audio_token_counts=counts,
            prompt_text="",
        )

    def extract_features(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper log-mel features of 16 kHz clips, cut to the longest clip's valid frames.

        The reference pads every clip with zeros to 300 s before the STFT. Frame ``i`` only sees samples
        ``[i*hop - n_fft/2, i*hop + n_fft/2)``, so padding with zeros to a few frames past the longest clip gives
        every frame that touches audio exactly as the reference computes it; the frames we no longer compute are
        all-zero windows whose log-mel is the clamp floor, which never raises the per-clip maximum used for the
        ``max - 8`` normalisation. Hence the same valid frames at a fraction of the cost.
        """
        hop = self.hop_length
        longest = max(len(c) for c in clips)
        # The last frame touching audio ends before sample n + n_fft; it must end inside our zero padding (not
        # in the STFT's reflect padding), which holds with n_fft + hop samples past the last full hop.
        margin = math.ceil(self.feature_extractor.n_fft / hop) + 1
        padded_len = min(hop * (math.ceil(longest / hop) + margin), self.max_audio_samples)
        out = self.feature_extractor(
            [np.asarray(c, dtype=np.float32) for c in clips],
            sampling_rate=self.audio_sample_rate,
            padding="max_length",
            max_length=padded_len,
            truncation=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        mask = np.asarray(out["attention_mask"], dtype=np.int64)
        frames = int(mask.sum(-1).max())
        features = torch.from_numpy(
            np.ascontiguousarray(out["input_features"][:, :, :frames], dtype=np.float32)
        )
        return features, torch.from_numpy(np.ascontiguousarray(mask[:, :frames]))

    # ----------------------------------------------------------------------------------------------------
    # voice prompt and text

    def encode_voice_prompt(
        self,
        text: str | None,
        audio: AudioSource | None,
        *,
        sample_rate: int | None = None,
        base_dir: Path | None = None,
        allow_paths: bool = True,
        max_seconds: float | None = None,
    ) -> VoicePromptInputs:
        """Transcript ids and the clip at the codec rate; the transcript must be what the clip says."""
        if audio is None or (isinstance(audio, str | bytes) and not audio):
            raise ValueError("voice prompt audio is missing: prompt text and audio go together")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("voice prompt text is empty: prompt text and audio go together")
        ids = self.text_ids(text)
        try:
            wave = load_audio(
                audio,
                self.voice_sample_rate,
                sample_rate=sample_rate,
                base_dir=base_dir,
                allow_paths=allow_paths,
                max_seconds=max_seconds,
            )
        except AudioError as exc:
            raise AudioError(f"voice prompt audio: {exc}") from None
        return VoicePromptInputs(
            text_ids=torch.tensor([ids], dtype=torch.long),
            waveform=torch.from_numpy(wave),
        )

    def decode_text(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
        """Token ids (list, array or tensor of any shape) to text; special tokens are kept unless asked."""
        if isinstance(ids, torch.Tensor | np.ndarray):
            flat = ids.reshape(-1).tolist()
        else:
            flat = [int(t) for t in ids]
        return self.tokenizer.decode(flat, skip_special_tokens=skip_special_tokens)
