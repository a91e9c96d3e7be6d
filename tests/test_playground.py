"""The WebRTC playground without a browser: turn detection, the reply track, and a real aiortc peer pair."""

from __future__ import annotations

import asyncio
import fractions
import json
import socket
import time

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from chroma_agent.audio import resample, to_pcm16
from chroma_agent.cli import build_parser, main
from chroma_agent.config import PlaygroundSettings
from chroma_agent.frames import OUTPUT_RATE as REPLY_RATE
from chroma_agent.vad import VAD_RATE, WINDOW, SileroVad, SpeechStarted, TurnDetector, TurnEnded
from chroma_agent.webrtc.playground import TINY_MAX_REPLY_S, create_app, open_engine, reach_hint
from chroma_agent.webrtc.session import ReplyTrack

MIC_RATE = 48_000


def loud_prob(window: np.ndarray) -> float:
    """A stand-in for Silero: any window with a loud sample is speech."""
    return float(np.abs(window).max() > 0.1)


def tone(seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * VAD_RATE)) / VAD_RATE
    return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float, rate: int = VAD_RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def feed(detector: TurnDetector, audio: np.ndarray, chunk: int = 320) -> list[tuple[int, object]]:
    """Push `audio` in 20 ms chunks; returns (samples pushed when it fired, event)."""
    out = []
    for start in range(0, len(audio), chunk):
        out += [(start + chunk, e) for e in detector.push(audio[start:start + chunk])]
    return out


# --- turn detection ---------------------------------------------------------------------------------------


def test_turn_detector_needs_200ms_of_speech_and_500ms_of_silence():
    audio = np.concatenate([silence(1.0), tone(0.1), silence(0.4), tone(1.0), silence(0.7)])
    events = feed(TurnDetector(loud_prob), audio)
    assert [type(e) for _, e in events] == [SpeechStarted, TurnEnded]  # the 100 ms blip is not a turn
    (started_at, _), (ended_at, turn) = events
    speech_start = round(1.5 * VAD_RATE)
    assert speech_start + 0.2 * VAD_RATE <= started_at <= speech_start + 0.2 * VAD_RATE + WINDOW + 320
    speech_end = speech_start + VAD_RATE
    assert speech_end + 0.5 * VAD_RATE <= ended_at <= speech_end + 0.5 * VAD_RATE + WINDOW + 320
    # The turn is the input from ~300 ms before the speech (its onset is never clipped) through the pause.
    turn_start = speech_start // WINDOW * WINDOW - 10 * WINDOW
    assert len(turn.audio) == ended_at // WINDOW * WINDOW - turn_start
    np.testing.assert_array_equal(turn.audio, audio[turn_start: turn_start + len(turn.audio)])


def test_turn_detector_caps_long_turns():
    events = feed(TurnDetector(loud_prob, max_turn_s=1.0), tone(2.1))
    assert [type(e) for _, e in events] == [SpeechStarted, TurnEnded, SpeechStarted, TurnEnded]
    assert all(len(e.audio) == 32 * WINDOW for _, e in events if isinstance(e, TurnEnded))


def test_silero_finds_the_turn_in_real_speech(golden_dir):
    speech, rate = sf.read(str(golden_dir / "user1.wav"), dtype="float32")
    assert rate == VAD_RATE
    audio = np.concatenate([silence(0.5), speech, silence(1.0)])
    events = feed(TurnDetector(SileroVad()), audio)
    assert [type(e) for _, e in events] == [SpeechStarted, TurnEnded]
    assert len(speech) < len(events[1][1].audio) < len(speech) + VAD_RATE


# --- the reply track --------------------------------------------------------------------------------------


def test_reply_track_plays_paced_frames_then_silence_and_reports_what_was_heard():
    async def run():
        playing, drained = [], []
        track = ReplyTrack(on_playing=playing.append, on_drained=drained.append)
        rng = np.random.default_rng(0)
        chunks = [rng.uniform(-0.5, 0.5, 1920).astype(np.float32) for _ in range(3)]
        track.start_reply(7)
        for chunk in chunks:
            await track.push(7, chunk)
        track.finish_reply(7)
        t0 = time.monotonic()
        frames = [await track.recv() for _ in range(15)]
        elapsed = time.monotonic() - t0
        return frames, elapsed, playing, drained, chunks

    frames, elapsed, playing, drained, chunks = asyncio.run(run())
    assert elapsed >= 14 * 0.020 - 0.005  # real time: the first frame goes at once, then one per 20 ms
    assert all(f.sample_rate == REPLY_RATE and f.samples == 480 and f.layout.name == "mono" for f in frames)
    assert [f.pts for f in frames] == [480 * i for i in range(15)]
    played = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    expected = np.frombuffer(to_pcm16(np.concatenate(chunks)), dtype="<i2")
    np.testing.assert_array_equal(played[: len(expected)], expected)
    assert not played[len(expected):].any()  # idle: silence
    assert playing == [7] and drained == [7]


def test_reply_track_buffer_is_bounded_and_flush_drops_the_rest():
    async def run():
        track = ReplyTrack(on_playing=lambda r: None, on_drained=lambda r: None, max_buffered_s=0.2)
        track.start_reply(1)
        chunk = np.full(1920, 0.25, dtype=np.float32)  # 80 ms
        for _ in range(3):
            await track.push(1, chunk)
        blocked = asyncio.create_task(track.push(1, chunk))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # 240 ms queued >= 200 ms: the producer waits
        for _ in range(5):  # 100 ms out
            await track.recv()
        await asyncio.wait_for(blocked, 1.0)
        heard_ms = track.flush()
        stale = asyncio.create_task(track.push(1, chunk))  # audio of a dropped reply is ignored
        await asyncio.wait_for(stale, 1.0)
        rest = [await track.recv() for _ in range(3)]
        return heard_ms, rest

    heard_ms, rest = asyncio.run(run())
    assert heard_ms == pytest.approx(100.0)
    assert not any(f.to_ndarray().any() for f in rest)


# --- a real peer pair -------------------------------------------------------------------------------------


class ClipMicrophone(MediaStreamTrack):
    """A browser's microphone stand-in: plays a 48 kHz clip in real time, then silence."""

    kind = "audio"

    def __init__(self, clip: np.ndarray):
        super().__init__()
        self.pcm = np.frombuffer(to_pcm16(clip), dtype="<i2")
        self.pos = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        n = MIC_RATE // 50
        if self.start is None:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.pos / MIC_RATE - time.monotonic()))
        chunk = np.zeros(n, dtype="<i2")
        part = self.pcm[self.pos:self.pos + n]
        chunk[: len(part)] = part
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, self.pos, fractions.Fraction(1, MIC_RATE)
        self.pos += n
        return frame


async def post_offer(app, pc: RTCPeerConnection) -> httpx.Response:
    await pc.setLocalDescription(await pc.createOffer())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://playground") as http:
        return await http.post("/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})


@pytest.fixture(scope="module")
def two_turns(golden_dir) -> np.ndarray:
    """Speech, a pause long enough to end the turn, speech again (over the reply: a barge-in), silence."""
    speech, rate = sf.read(str(golden_dir / "user1.wav"), dtype="float32")
    speech = resample(speech[: 2 * rate], rate, MIC_RATE)
    return np.concatenate([silence(0.3, MIC_RATE), speech, silence(2.0, MIC_RATE), speech,
                           silence(5.0, MIC_RATE)])


@pytest.mark.timeout(60)
def test_peer_pair_two_turns_with_barge_in(make_engine, golden_voice, two_turns):
    # A short lookahead keeps turn 1 generating when it is talked over, so the barge-in cancels it.
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=2, max_reply_s=4.0, lookahead_s=0.5)
    app = create_app(engine)

    async def run():
        pc = RTCPeerConnection()
        pc.addTrack(ClipMicrophone(two_turns))
        channel = pc.createDataChannel("events")
        messages: list[dict] = []
        channel.on("message", lambda m: messages.append(json.loads(m)))
        loud: list[float] = []  # arrival times of agent frames with sound

        async def listen(track):
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                pcm = frame.to_ndarray().astype(np.float32) / 32768
                if np.sqrt(np.mean(pcm**2)) > 0.05:
                    loud.append(time.monotonic())

        pc.on("track", lambda track: asyncio.ensure_future(listen(track)))
        response = await post_offer(app, pc)
        assert response.status_code == 200, response.text
        answer = response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        assert "127.0.0.1" in answer["sdp"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = [m for m in messages if m["type"] == "turn_done"]
            if len(done) == 2 and messages[-1] == {"type": "state", "state": "listening"}:
                break
            await asyncio.sleep(0.1)
        state = pc.connectionState
        await pc.close()
        for _ in range(50):
            if engine.live_sessions == 0:
                break
            await asyncio.sleep(0.1)
        return messages, loud, state

    messages, loud, state = asyncio.run(run())
    assert state == "connected"
    kinds = [m["type"] for m in messages]
    assert kinds[:2] == ["hello", "state"]
    done = {m["turn"]: m for m in messages if m["type"] == "turn_done"}
    assert sorted(done) == [1, 2], kinds
    # Turn 1 was talked over: cancelled, and the context keeps the part of the reply that was played out.
    barge = [m for m in messages if m["type"] == "barge_in"]
    assert [m["turn"] for m in barge] == [1] and 0 < barge[0]["heard_ms"] < 2500
    assert done[1]["reason"] == "cancelled" and "text" not in barge[0]
    assert kinds.index("barge_in") < kinds.index("turn_done")
    streamed = {t: "".join(m["text"] for m in messages if m["type"] == "transcript" and m["turn"] == t)
                for t in (1, 2)}
    assert streamed[1].startswith(done[1]["text"])
    # Turn 2 played to its end: the streamed transcript is the reply's.
    assert done[2]["reason"] == "max_frames" and done[2]["audio_ms"] == 4000
    assert streamed[2] == done[2]["text"]
    for turn in (1, 2):
        assert done[turn]["ttfa_ms"] is not None
        first = [m for m in messages if m["type"] == "first_audio" and m["turn"] == turn]
        assert len(first) == 1 and first[0]["ms"] >= done[turn]["ttfa_ms"]
    states = [m["state"] for m in messages if m["type"] == "state"]
    assert states == ["listening", "thinking", "speaking", "listening", "thinking", "speaking", "listening"]
    # The agent's audio arrived over RTP: about 1 s of turn 1 and 4 s of turn 2 (20 ms frames).
    assert len(loud) >= (barge[0]["heard_ms"] + 4000) / 20 * 0.8
    assert engine.live_sessions == 0  # the browser left: its conversation slot is free again


def test_offer_errors(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)
    app = create_app(engine)

    async def run():
        no_audio = RTCPeerConnection()
        no_audio.createDataChannel("events")
        bad = await post_offer(app, no_audio)
        await no_audio.close()
        busy_conv = await engine.open_conversation()
        with_audio = RTCPeerConnection()
        with_audio.addTrack(ClipMicrophone(silence(0.1, MIC_RATE)))
        busy = await post_offer(app, with_audio)
        await with_audio.close()
        busy_conv.close()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pg") as http:
            wrong_type = await http.post("/offer", json={"sdp": "v=0", "type": "answer"})
            page = await http.get("/")
            script = await http.get("/app.js")
        return bad, busy, wrong_type, page, script

    bad, busy, wrong_type, page, script = asyncio.run(run())
    assert bad.status_code == 400 and "no audio" in bad.json()["detail"]
    assert busy.status_code == 503
    assert wrong_type.status_code == 422
    assert engine.live_sessions == 0  # refused offers give their slot back
    assert page.status_code == 200 and "Chroma playground" in page.text
    assert script.status_code == 200
    for text in (page.text, script.text):  # everything is served from here: no CDN
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_the_page_says_before_any_click_what_the_model_is_and_how_to_reach_it(make_engine, golden_voice):
    engine = make_engine(golden_default_voice=golden_voice, max_sessions=1)

    async def get(app, path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pg") as http:
            return await http.get(path)

    with_notice = asyncio.run(get(create_app(engine, notice="random weights: noise"), "/info"))
    assert with_notice.json() == {"notice": "random weights: noise"}
    assert asyncio.run(get(create_app(engine), "/info")).json() == {"notice": None}
    page = asyncio.run(get(create_app(engine), "/")).text
    # The microphone needs localhost or https: the page explains the SSH tunnel, and warns when it is neither.
    assert 'id="insecure"' in page and 'id="remote-hint"' in page and "ssh -N -L" in page
    assert "ssh -N -L 9000:localhost:9000" in reach_hint("0.0.0.0", 9000)
    assert "https" in reach_hint("127.0.0.1", 8080) and "SSH" in reach_hint("127.0.0.1", 8080)


# --- the command --------------------------------------------------------------------------------------------


def test_playground_command_defaults_and_usage_errors(capsys, golden_dir):
    settings = PlaygroundSettings.from_args(build_parser().parse_args(["playground"]), env={})
    assert (settings.model, settings.host, settings.port, settings.device) == ("tiny", "127.0.0.1", 8080, "auto")
    assert main(["playground", "--voice-audio", str(golden_dir / "voice.wav")]) == 2
    assert "--voice-audio and CHROMA_VOICE_TEXT / --voice-text go together" in capsys.readouterr().err
    assert main(["playground", "--model", "some/where", "--port", "0"]) == 2
    assert "needs a voice" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["playground", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


def test_open_engine_tiny_builds_the_checkpoint_and_a_voice(tmp_path):
    engine, voice = open_engine("tiny", tiny_dir=tmp_path / "tiny")
    try:
        assert (tmp_path / "tiny" / "config.json").is_file()
        assert voice.name == "tiny-demo"
        assert engine.config.max_reply_s == TINY_MAX_REPLY_S
    finally:
        engine.close()
