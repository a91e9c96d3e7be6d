"""A voice agent speaking with Chroma: `python examples/basic_agent.py dev` (with LIVEKIT_URL and keys set).

CHROMA_MODEL picks the checkpoint (default FlashLabs/Chroma-4B), CHROMA_VOICE a stored voice.
"""

import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobExecutorType, JobProcess, cli
from livekit.plugins import chroma, silero

MODEL = os.environ.get("CHROMA_MODEL", "FlashLabs/Chroma-4B")
VOICE = os.environ.get("CHROMA_VOICE")  # None: the engine's default voice


def prewarm(proc: JobProcess) -> None:
    chroma.RealtimeModel(model=MODEL).prewarm()  # load the model once; every call shares it
    proc.userdata["vad"] = silero.VAD.load()


# Jobs as threads of one process, so they share the model; give it time to load.
server = AgentServer(setup_fnc=prewarm, job_executor_type=JobExecutorType.THREAD,
                     initialize_process_timeout=900)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(llm=chroma.RealtimeModel(model=MODEL, voice=VOICE), vad=ctx.proc.userdata["vad"])
    await session.start(agent=Agent(instructions="You are a friendly support agent. Keep answers short."),
                        room=ctx.room)
    session.generate_reply(instructions="Greet the caller and ask how you can help.")


if __name__ == "__main__":
    cli.run_app(server)
