"""Sampling parameters and their one set of limits (no torch: the wire protocol and the plugin check with it).

Every place that accepts a temperature, top-k or top-p (the engine, the realtime protocol's 0..2 temperature,
the chat API, the LiveKit plugin's options) checks it here, so they cannot drift apart.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_TEMPERATURE", "SamplingParams", "check_seed", "check_temperature", "check_top_k", "check_top_p"]

MAX_TEMPERATURE = 2.0  # the OpenAI range; beyond it the distribution is noise for any model


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_temperature(value: Any) -> float:
    if not (_is_number(value) and 0 <= value <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 is greedy), got {value!r}")
    return value


def check_top_k(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {value!r}")
    return value


def check_top_p(value: Any) -> float:
    if not (_is_number(value) and 0 < value <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {value!r}")
    return value


def check_seed(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """`temperature` below 1e-3 means greedy (argmax). `top_k=0` and `top_p=1` switch those filters off.

    `seed=None` draws a fresh seed per reply; any other value makes the reply's audio reproducible.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_top_p(self.top_p)
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        # Dividing logits by a vanishing temperature overflows to inf/NaN; at that point sampling is argmax.
        return self.temperature < 1e-3

    def row_seed(self) -> int:
        """The 62-bit seed a reply's row samples with."""
        return (self.seed if self.seed is not None else secrets.randbits(62)) & ((1 << 62) - 1)
