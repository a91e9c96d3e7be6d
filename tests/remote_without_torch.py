"""Run by tests/test_torch_free.py inside a venv that has no torch: the LiveKit plugin in remote mode, end to end.

    python remote_without_torch.py URL API_KEY USER_WAV SYSTEM_PROMPT FRAMES

Prints one JSON line: what was imported, and what the reply was. Everything here must work without torch: the
protocol, the realtime client, the plugin's remote mode, the public API package, the worker and its command.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import sys


def main() -> None:
    url, key, wav, prompt, frames = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    has_torch = importlib.util.find_spec("torch") is not None

    import soundfile as sf
    from livekit import rtc
    from livekit.plugins import chroma

    import chroma_agent
    import chroma_agent.cli
    # importable without torch: the protocol, and the packaged worker as `start --server-url` runs it
    for name in ("chroma_agent.realtime_protocol", "chroma_agent.worker"):
        importlib.import_module(name)
    from chroma_agent.frames import FRAME_S

    samples, rate = sf.read(wav, dtype="int16")

    async def converse() -> dict:
        model = chroma.RealtimeModel(base_url=url, api_key=key, voice="golden", instructions=prompt,
                                     temperature=0.0, max_reply_seconds=frames * FRAME_S)
        session = model.session()
        step = rate // 100
        for i in range(0, len(samples), step):
            chunk = samples[i:i + step]
            session.push_audio(rtc.AudioFrame(chunk.tobytes(), rate, 1, len(chunk)))
        session.commit_audio()
        event = await session.generate_reply()
        audio, text = [], ""
        async for message in event.message_stream:
            async def read_text(stream=message.text_stream):
                nonlocal text
                async for delta in stream:
                    text += delta

            reader = asyncio.create_task(read_text())
            audio += [frame async for frame in message.audio_stream]
            await reader
        connections = session.conversation.connections
        await session.aclose()
        return {"frames": len(audio), "samples": [f.samples_per_channel for f in audio][:1], "text": text,
                "connections": connections}

    result = asyncio.run(asyncio.wait_for(converse(), 60))
    try:  # the worker's command line, as a remote worker starts it
        chroma_agent.cli.main(["start", "--help"])
    except SystemExit as exc:
        result["start_help"] = exc.code
    else:
        result["start_help"] = 0
    result.update(has_torch=has_torch, torch_loaded="torch" in sys.modules, version=chroma_agent.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
