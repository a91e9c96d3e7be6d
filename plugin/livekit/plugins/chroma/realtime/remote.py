"""Remote mode: the plugin as a client of a ``chroma-agent serve`` server, over its ``/v1/realtime``
WebSocket.

:class:`RemoteBackend` and :class:`RemoteConversation` implement the `Backend` / `BackendConversation`
protocols of :mod:`.backend`, so `RealtimeSession` does not know where Chroma runs. The protocol client is
:mod:`chroma_agent.realtime_client` (one WebSocket = one server conversation, replies as the engine's own
events); this module adds what a LiveKit session needs on top of it: LiveKit's error types, and a new
connection after a lost one.

A lost connection ends the running reply with a `ResponseError`; the next call opens a new connection and a
new server conversation. The server-side context is lost with the old one: the text turns this conversation
added (and the words of its finished replies) are kept in a replay log and replayed, user audio turns are not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np
from livekit.agents import APIConnectionError, APIStatusError, APITimeoutError, llm

from chroma_agent.audio import resample, to_pcm16
from chroma_agent.engine.events import ResponseDone, ResponseEvent
from chroma_agent.frames import frames_for_seconds
from chroma_agent.realtime_client import (
    ClientConnection,
    ClientReply,
    ConnectionLost,
    RealtimeClient,
    RealtimeClientError,
    RequestRefused,
    ServerBusy,
    ServerRefused,
    ServerTimeout,
    ServerUnreachable,
    nothing_said,
    realtime_url,
)
from chroma_agent.realtime_protocol import SAMPLE_RATE, ItemBody

from ..log import logger
from .backend import Role, SamplingOverrides, VoiceSpec

__all__ = ["RemoteBackend", "RemoteConversation", "ServerBusyError", "realtime_url"]

MAX_REPLAY_TURNS = 64  # text turns kept to replay on a new connection


class ServerBusyError(APIStatusError):
    """Every conversation slot of the server is taken (close code 1013): recoverable, try again later."""

    def __init__(self, message: str):
        super().__init__(message, status_code=503, retryable=True)


def livekit_error(exc: RealtimeClientError) -> Exception:
    """The client's error as the LiveKit error type AgentSession knows how to handle (retry or give up)."""
    if isinstance(exc, ServerBusy):
        return ServerBusyError(str(exc))
    if isinstance(exc, ServerRefused):
        return APIStatusError(str(exc), status_code=exc.status)
    if isinstance(exc, ServerTimeout):
        return APITimeoutError(str(exc))
    if isinstance(exc, ConnectionLost | ServerUnreachable):
        return APIConnectionError(str(exc))
    if isinstance(exc, RequestRefused):
        return llm.RealtimeError(str(exc), code=exc.code)
    return llm.RealtimeError(str(exc))


@contextlib.contextmanager
def _livekit_errors() -> Iterator[None]:
    try:
        yield
    except RealtimeClientError as exc:
        raise livekit_error(exc) from exc


class RemoteBackend:
    """A ``chroma-agent serve`` server; every conversation is one WebSocket to its ``/v1/realtime``."""

    input_sample_rate = SAMPLE_RATE  # the session buffers user audio at the wire's rate: one resampling

    def __init__(self, base_url: str, *, api_key: str | None = None, **timeouts: float):
        self.client = RealtimeClient(base_url, api_key=api_key, **timeouts)
        self._model: str | None = None

    def __repr__(self) -> str:
        return f"RemoteBackend({self.display_url!r})"

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def display_url(self) -> str:
        return self.client.display_url

    @property
    def model_name(self) -> str:
        return self._model or "chroma"

    def load(self) -> None:
        """Check now (blocking) that the server answers and takes the API key (``GET /v1/models``)."""
        with _livekit_errors():
            self._model = self.client.check() or self._model

    def capacity(self) -> tuple[int, int] | None:
        return None  # the server's slots are shared with its other clients: see its /health

    async def open(self, *, voice: VoiceSpec, instructions: str | None,
                   sampling: SamplingOverrides) -> RemoteConversation:
        if voice.profile is not None or voice.audio is not None:
            raise ValueError("remote mode speaks with voices stored on the server: give voice=<name>")
        conv = RemoteConversation(self, voice=voice.name, instructions=instructions,
                                  temperature=sampling.temperature)
        try:
            await conv.connect()
        except BaseException:
            await conv.close()
            raise
        return conv

    async def connect(self) -> ClientConnection:
        """A new WebSocket, past the server's ``session.created`` (a new server-side conversation)."""
        with _livekit_errors():
            conn = await self.client.connect()
        self._model = conn.model or self._model
        return conn


class RemoteConversation:
    """A `BackendConversation` on a Chroma server: one WebSocket at a time, reopened after a loss."""

    def __init__(self, backend: RemoteBackend, *, voice: str | None, instructions: str | None,
                 temperature: float | None):
        self._backend = backend
        self._voice = voice
        self._instructions = instructions
        self._temperature = temperature
        self._conn: ClientConnection | None = None
        self._connect_lock = asyncio.Lock()
        self._replay: deque[list[str]] = deque(maxlen=MAX_REPLAY_TURNS)  # [role, text] of the text turns
        self._latest: ClientReply | None = None
        self._latest_entry: list[str] | None = None  # the latest reply's line in the replay log
        self._latest_kept: str | None = None  # its words after a truncation the server applied after it ended
        self._closed = False
        self._id = ""
        self.connections = 0  # how many WebSockets this conversation has opened

    @property
    def id(self) -> str:
        """The server's session id of the current (or last) connection."""
        return self._id

    @property
    def instructions(self) -> str | None:
        return self._instructions

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive

    # --- the connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._connection()

    async def _connection(self) -> ClientConnection:
        if self._closed:
            raise llm.RealtimeError("the Chroma conversation is closed")
        if self._conn is not None and self._conn.alive:
            return self._conn
        async with self._connect_lock:
            if self._conn is not None and self._conn.alive:
                return self._conn
            old, self._conn = self._conn, None
            if old is not None:
                await old.close()
                logger.info("reconnecting to the Chroma server at %s: the server-side context is lost; "
                            "replaying %d text turns", self._backend.display_url, len(self._replay))
            conn = await self._backend.connect()
            try:
                with _livekit_errors():
                    await self._set_up(conn)
            except BaseException:
                await conn.close()
                raise
            if self._closed:
                await conn.close()
                raise llm.RealtimeError("the Chroma conversation is closed")
            self._conn, self._id = conn, conn.session_id
            self.connections += 1
            return conn

    async def _set_up(self, conn: ClientConnection) -> None:
        conn.on_retrieved = self._on_retrieved
        await conn.update_session(instructions=self._instructions, voice=self._voice, turn_detection=None,
                                  temperature=self._temperature)
        turns = [(entry[0], entry[1]) for entry in self._replay if entry[1].strip()]
        for (role, _), error in zip(turns, await conn.add_texts(turns), strict=True):
            if error is not None:
                logger.warning("a %s turn could not be replayed: %s", role, error)

    def _on_retrieved(self, item: ItemBody) -> None:
        """A truncated reply's kept words (asked for after the reply ended) replace its replay text."""
        reply = self._latest
        if reply is not None and item.id == reply.item_id:
            self._latest_kept = item.transcript() or ""
            if self._latest_entry is not None:
                self._latest_entry[1] = self._latest_kept

    # --- context -------------------------------------------------------------------------------------

    async def add_user_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        conn = await self._connection()
        data = to_pcm16(resample(np.asarray(pcm, dtype=np.float32), int(sample_rate), SAMPLE_RATE))
        with _livekit_errors():
            await conn.add_audio(data)

    async def add_text(self, role: Role, text: str) -> None:
        conn = await self._connection()
        with _livekit_errors():
            await conn.add_text(role, text)
        self._replay.append([role, text])

    async def set_instructions(self, text: str | None) -> None:
        self._instructions = text
        if self.connected:
            with _livekit_errors():
                await self._conn.update_session(instructions=text or "")

    async def set_voice(self, voice: VoiceSpec) -> None:
        if voice.profile is not None or voice.audio is not None:
            raise ValueError("remote mode speaks with voices stored on the server: give voice=<name>")
        if voice.name is None:
            logger.warning("remote mode: the voice stays %s (a server's default voice cannot be asked for by "
                           "omission)", self._voice or "the server's default")
            return
        if self.connected:
            with _livekit_errors():
                await self._conn.update_session(voice=voice.name)
        self._voice = voice.name

    # --- replies -------------------------------------------------------------------------------------

    def respond(self, *, instructions: str | None, max_seconds: float | None,
                sampling: SamplingOverrides) -> AsyncIterator[ResponseEvent]:
        max_frames = None if max_seconds is None else frames_for_seconds(max_seconds)
        reply = ClientReply(instructions=instructions, max_frames=max_frames)
        # cancel() and truncate() apply to it from now on
        self._latest, self._latest_entry, self._latest_kept = reply, None, None
        return self._stream(reply, sampling.temperature)

    async def _stream(self, reply: ClientReply, temperature: float | None) -> AsyncIterator[ResponseEvent]:
        if reply.cancel_requested:  # interrupted before it was sent: nothing was said, no connection needed
            yield nothing_said()
            return
        conn = await self._connection()
        with _livekit_errors():
            if temperature is not None and temperature != conn.temperature:
                await conn.update_session(temperature=temperature)
                self._temperature = temperature
            async with contextlib.aclosing(conn.stream(reply)) as events:
                async for event in events:
                    if isinstance(event, ResponseDone):
                        self._remember(reply, event)
                    yield event

    def _remember(self, reply: ClientReply, done: ResponseDone) -> None:
        """What the reply left in the server's context, for a replay: its instructions and its words."""
        if reply.instructions and reply.instructions.strip():
            self._replay.append(["system", reply.instructions])
        if done.usage.audio_frames or done.text:
            kept = self._latest_kept if reply is self._latest else None
            entry = ["assistant", done.text if kept is None else kept]
            if reply is self._latest:
                self._latest_entry = entry
            self._replay.append(entry)

    def cancel(self) -> None:
        if self._latest is not None:
            self._latest.cancel()

    def truncate(self, heard_ms: float, on_kept: Callable[[str], None] | None = None) -> None:
        """Sent at once (or as soon as the reply's item is known); the kept words are not known here (the
        replay log learns them from the server), so `on_kept` is not called: a running reply reports them in
        its `ResponseDone.text`."""
        if self._latest is not None:
            self._latest.truncate(heard_ms)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
