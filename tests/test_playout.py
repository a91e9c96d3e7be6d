"""chroma_agent.playout: what a listener can have heard of a reply, the rule barge-ins and truncations cut by."""

from __future__ import annotations

import math

import pytest

from chroma_agent.frames import FRAME_MS
from chroma_agent.playout import Playout


def test_heard_is_what_went_out_and_no_more_than_real_time_allows():
    playout = Playout(started=100.0)
    assert playout.heard_ms(now=200.0) == 0.0 and playout.time_to_first_ms is None  # nothing sent yet
    assert [playout.frame_out(now=100.5) for _ in range(10)] == list(range(10))  # a burst of 10 frames
    assert playout.time_to_first_ms == 500.0 and playout.sent_ms == 10 * FRAME_MS
    assert playout.heard_ms(now=100.5 + 0.2) == pytest.approx(200.0)  # 0.2 s of playback: 200 ms heard, not 800
    assert playout.heard_ms(now=105.0) == 10 * FRAME_MS  # later: everything sent, and no more


def test_a_truncation_point_is_clamped_to_what_was_sent():
    playout = Playout()
    for _ in range(3):
        playout.frame_out()
    assert playout.clamp(10_000) == 3 * FRAME_MS
    assert playout.clamp(-5) == 0.0 and playout.clamp(math.nan) == 0.0 and playout.clamp(math.inf) == 0.0
    assert playout.clamp(100.0) == 100.0
