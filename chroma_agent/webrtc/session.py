"""One browser peer: microphone -> end of turn -> Conversation -> the agent's voice, state over a data channel.

The browser's mic track is resampled to 16 kHz and cut into turns by Silero VAD (`chroma_agent.vad`, in a
worker thread). Each finished turn goes to
the conversation and the reply streams back as an outbound audio track, paced in real time from a small
buffer so the engine's lookahead (not this process) decides how far generation runs ahead. Speech while the
agent thinks or speaks is a barge-in: the reply is cancelled, queued audio dropped and the conversation
truncated to what was actually played out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from chroma_agent.audio import pcm16_to_mono, to_pcm16
from chroma_agent.engine.conversation import Conversation
from chroma_agent.engine.events import AudioChunk, ResponseDone, ResponseError, TextDelta
from chroma_agent.frames import OUTPUT_RATE
from chroma_agent.vad import VAD_RATE, SileroVad, SpeechStarted, TurnDetector, VadEvent

log = logging.getLogger(__name__)

PACKET_S = 0.020  # one Opus packet per outbound frame; aiortc's Opus encoder resamples to 48 kHz itself


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def use_loopback_only() -> None:
    """Keep this process's WebRTC media on loopback (the playground's start calls it).

    aioice offers every interface except loopback and has no option to choose. The playground serves a
    browser on the same machine, so its media stays on loopback: nothing is exposed on the network, and it
    works on a machine with no network at all. aioice reads the function at call time, so this patch is
    process-wide; it is applied when a playground starts, never on import.
    """
    aioice.ice.get_host_addresses = _loopback_addresses


# --- the agent's voice --------------------------------------------------------------------------------------


class ReplyTrack(MediaStreamTrack):
    """The agent's voice: 20 ms frames paced in real time from a bounded buffer; silence when idle.

    Replies are identified by an id so that audio still in flight for a dropped reply is ignored.
    `on_playing(reply)` fires when a reply's first samples go out, `on_drained(reply)` when its last have.
    """

    kind = "audio"

    def __init__(
        self,
        *,
        on_playing: Callable[[int], None],
        on_drained: Callable[[int], None],
        max_buffered_s: float = 1.0,
    ):
        super().__init__()
        self._frame = round(OUTPUT_RATE * PACKET_S)
        self._max_buffered = round(max_buffered_s * OUTPUT_RATE)
        self._chunks: deque[np.ndarray] = deque()
        self._buffered = 0
        self._space = asyncio.Event()
        self._reply: int | None = None
        self._finished = False
        self._played = 0
        self._on_playing = on_playing
        self._on_drained = on_drained
        self._start: float | None = None
        self._pts = 0

    def start_reply(self, reply: int) -> None:
        self.flush()
        self._reply = reply

    async def push(self, reply: int, pcm: np.ndarray) -> None:
        """Queue a reply's audio; waits while the buffer is full, so the consumer holds back the engine."""
        while self._reply == reply and self._buffered >= self._max_buffered:
            self._space.clear()
            await self._space.wait()
        if self._reply == reply:
            self._chunks.append(pcm)
            self._buffered += len(pcm)

    def finish_reply(self, reply: int) -> None:
        if self._reply == reply:
            self._finished = True

    def flush(self) -> float:
        """Drop the current reply's queued audio; returns how much of it was played out, in ms."""
        heard_ms = self._played * 1000 / OUTPUT_RATE
        self._chunks.clear()
        self._buffered = 0
        self._reply = None
        self._finished = False
        self._played = 0
        self._space.set()
        return heard_ms

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            delay = self._start + self._pts / OUTPUT_RATE - now
            if delay > 0:
                await asyncio.sleep(delay)
        pcm = np.frombuffer(to_pcm16(self._take()), dtype="<i2")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUTPUT_RATE
        frame.time_base = fractions.Fraction(1, OUTPUT_RATE)
        frame.pts = self._pts
        self._pts += self._frame
        return frame

    def _take(self) -> np.ndarray:
        out = np.zeros(self._frame, dtype=np.float32)
        filled = 0
        while filled < self._frame and self._chunks:
            chunk = self._chunks[0]
            n = min(self._frame - filled, len(chunk))
            out[filled:filled + n] = chunk[:n]
            if n == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[n:]
            filled += n
        reply = self._reply
        if filled and reply is not None:
            self._buffered -= filled
            self._space.set()
            if self._played == 0:
                self._on_playing(reply)
            self._played += filled
        if self._finished and not self._chunks and reply is not None:
            self._finished = False
            self._on_drained(reply)
        return out


# --- the peer -----------------------------------------------------------------------------------------------


class PeerSession:
    """One browser tab: its RTCPeerConnection, its conversation (whose id it shares) and its turns."""

    def __init__(
        self,
        conversation: Conversation,
        *,
        detector: TurnDetector | None = None,
        notice: str | None = None,
        on_closed: Callable[[PeerSession], None] | None = None,
    ):
        self.id = conversation.id
        self.conversation = conversation
        self.state = "listening"
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = ReplyTrack(on_playing=self._on_playing, on_drained=self._on_drained)
        self._detector = detector or TurnDetector(SileroVad())
        self._notice = notice
        self._on_closed = on_closed
        self._channel: Any = None
        self._turns: asyncio.Queue[tuple[np.ndarray, float]] = asyncio.Queue()  # (audio, when it ended)
        self._turn = 0
        self._responding: int | None = None  # the turn whose reply may still be heard
        self._generated: int | None = None  # the last turn whose reply the engine finished
        self._barge_ins = 0
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    async def accept(self, offer_sdp: str) -> RTCSessionDescription:
        """Answer the browser's offer (all candidates inside: no trickle, no STUN)."""
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if not any(t.kind == "audio" for t in self.pc.getTransceivers()):
            raise ValueError("the offer has no audio track")
        self.pc.addTrack(self.track)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self._spawn(self._answer_turns())
        log.info("session %s: offer accepted", self.id)
        return self.pc.localDescription

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.track.flush()
        self.conversation.close()
        await self.pc.close()
        log.info("session %s: closed after %d turns", self.id, self._turn)
        if self._on_closed is not None:
            self._on_closed(self)

    # --- peer connection events ---------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._read_mic(track))

    def _on_datachannel(self, channel: Any) -> None:
        self._channel = channel
        self._send("hello", notice=self._notice)
        self._send("state", state=self.state)

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("session %s: connection %s", self.id, state)
        if state in ("failed", "closed"):
            await self.close()

    # --- microphone -> turns ------------------------------------------------------------------------------

    async def _read_mic(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            # Resampling and Silero run in a worker thread: the loop only moves audio. One frame at a time, so
            # the detector (and the resampler inside it) sees the stream in order.
            for event in await asyncio.to_thread(self._detect, frame):
                self._on_vad(event)

    def _detect(self, frame: av.AudioFrame) -> list[VadEvent]:
        # aiortc's audio decoders (Opus, G.711) all give packed 16-bit frames
        pcm = pcm16_to_mono(frame.to_ndarray().tobytes(), len(frame.layout.channels))
        return self._detector.push(pcm, frame.sample_rate)

    def _on_vad(self, event: VadEvent) -> None:
        if isinstance(event, SpeechStarted):
            self._send("vad", speech=True)
            if self.state in ("thinking", "speaking"):
                self._barge_in()
            return
        self._send("vad", speech=False)
        self._turns.put_nowait((event.audio, time.perf_counter()))

    def _barge_in(self) -> None:
        self._barge_ins += 1
        heard_ms = self.track.flush()
        turn, self._responding = self._responding, None
        if turn is not None:
            # Cancels the reply if it is still generating; either way the context keeps only what was heard.
            pending = self.conversation.truncate(heard_ms)
            if self._generated == turn:  # a finished reply reports what was kept here, once the engine knows
                loop, heard = asyncio.get_running_loop(), round(heard_ms)

                def report(job) -> None:
                    kept = {"text": job.result()} if job.exception() is None and job.result() is not None else {}
                    with contextlib.suppress(RuntimeError):  # the session's loop is gone
                        loop.call_soon_threadsafe(lambda: self._send("barge_in", turn=turn, heard_ms=heard, **kept))

                pending.add_done_callback(report)
            else:  # a reply still generating reports what was kept in its turn_done
                self._send("barge_in", turn=turn, heard_ms=round(heard_ms))
        log.info("session %s: barge-in on turn %s after %.0f ms of audio", self.id, turn, heard_ms)
        self._set_state("listening")

    # --- turns -> replies ---------------------------------------------------------------------------------

    async def _answer_turns(self) -> None:
        while True:
            await self._answer(*await self._turns.get())

    async def _answer(self, audio: np.ndarray, ended: float) -> None:
        self._turn += 1
        turn = self._turn
        barge_ins = self._barge_ins
        seconds = len(audio) / VAD_RATE
        log.info("session %s: turn %d: %.2f s of user audio", self.id, turn, seconds)
        self._send("user_turn", turn=turn, seconds=round(seconds, 2))
        self._set_state("thinking")
        try:
            await self.conversation.add_user_audio(audio, VAD_RATE)
        except ValueError as exc:
            self._fail(turn, str(exc))
            return
        if self._barge_ins != barge_ins:
            return  # the user went on talking: answer once they are done
        self._responding = turn
        self.track.start_reply(turn)
        first_audio = True
        async for event in self.conversation.respond():
            stale = self._responding != turn
            if isinstance(event, AudioChunk) and not stale:
                if first_audio:
                    first_audio = False
                    self._send("first_audio", turn=turn, ms=round((time.perf_counter() - ended) * 1000))
                await self.track.push(turn, event.pcm)
            elif isinstance(event, TextDelta) and not stale:
                self._send("transcript", turn=turn, text=event.text)
            elif isinstance(event, ResponseDone):
                self._generated = turn
                ttfa = event.timings.time_to_first_audio_ms
                self._send("turn_done", turn=turn, reason=event.reason, text=event.text,
                           ttfa_ms=None if ttfa is None else round(ttfa),
                           audio_ms=round(event.timings.audio_ms))
            elif isinstance(event, ResponseError):
                self._fail(turn, event.message)
        self.track.finish_reply(turn)

    def _fail(self, turn: int, message: str) -> None:
        log.warning("session %s: turn %d failed: %s", self.id, turn, message)
        self._send("error", turn=turn, message=message)
        if self._responding == turn:
            self._responding = None
            self.track.flush()
        self._set_state("listening")

    def _on_playing(self, reply: int) -> None:
        if reply == self._responding:
            self._set_state("speaking")

    def _on_drained(self, reply: int) -> None:
        if reply == self._responding:
            self._responding = None
            self._set_state("listening")

    # --- plumbing -----------------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._send("state", state=state)

    def _send(self, kind: str, **fields: Any) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps({"type": kind, **fields}))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("session %s: %s failed", self.id, task.get_coro().__qualname__, exc_info=task.exception())
        if not self._closed:
            self._spawn(self.close())
