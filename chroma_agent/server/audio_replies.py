"""Replies with audio, remembered by their audio id so that a later request can refer to them as OpenAI clients
do: the transcript only, bounded in number, until `expires_at`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from fastapi import Request

from chroma_agent.server.settings import ServerSettings

log = logging.getLogger(__name__)


class AudioReplyStore:
    """Transcripts of recent replies with audio, by audio id, until their `expires_at` (bounded, in memory).

    Every entry lives `ttl_s`, so insertion order is expiry order and expired entries leave from the front.
    When the store is full of live entries a new reply is not kept, and says so: its `expires_at` is its
    creation time (no entry ever disappears before the `expires_at` it was given).
    """

    def __init__(self, ttl_s: float, capacity: int):
        self.ttl_s, self.capacity = ttl_s, capacity
        self._entries: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._lock = threading.Lock()  # requests are prepared in worker threads
        self._full_logged = False

    def _purge(self, now: float) -> None:
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] > now:
                break
            self._entries.popitem(last=False)

    def add(self, audio_id: str, transcript: str, created: int) -> int:
        """Remember a reply; returns its `expires_at` (Unix seconds)."""
        expires_at = int(created + self.ttl_s)
        now = time.time()
        with self._lock:
            self._purge(now)
            if expires_at <= now:
                return created
            if len(self._entries) >= self.capacity:
                if not self._full_logged:
                    log.warning("audio reply store full (%d live transcripts, audio_reply_store_size): new replies "
                                "cannot be referred to until older ones expire", len(self._entries))
                    self._full_logged = True
                return created
            self._full_logged = False
            self._entries[audio_id] = (expires_at, transcript)
        return expires_at

    def get(self, audio_id: str) -> str | None:
        """The transcript, while the reply's `expires_at` has not passed; None otherwise."""
        now = time.time()
        with self._lock:
            self._purge(now)
            entry = self._entries.get(audio_id)
        return entry[1] if entry is not None and now < entry[0] else None

    def __len__(self) -> int:
        return len(self._entries)


def reply_store(request: Request) -> AudioReplyStore:
    """The app's store (made on first use, on the event loop, so there is exactly one)."""
    state = request.app.state
    store = getattr(state, "audio_replies", None)
    if store is None:
        settings: ServerSettings = state.settings
        store = state.audio_replies = AudioReplyStore(settings.audio_reply_ttl_s, settings.audio_reply_store_size)
    return store
