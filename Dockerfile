# chroma-agent on a CUDA GPU: the engine server (`serve`, default), the LiveKit worker (`start`) or the
# WebRTC playground (`playground`). Model weights and voice profiles live in volumes, not in the image.
# Every setting is a CHROMA_* variable (README: Configuration), so `docker run -e CHROMA_MODEL=... IMAGE`
# configures the default command without repeating it.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    CHROMA_VOICES_DIR=/voices \
    CHROMA_MODEL=FlashLabs/Chroma-4B \
    CHROMA_DEVICE=cuda \
    CHROMA_DTYPE=bfloat16 \
    CHROMA_HOST=0.0.0.0

# libsndfile: audio decoding; curl: the healthcheck.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libsndfile1 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 chroma \
    && mkdir -p /models /voices \
    && chown chroma:chroma /models /voices

WORKDIR /app
# Dependencies first so code changes do not re-download torch. PyPI's Linux torch wheels are CUDA builds.
COPY pyproject.toml constraints.txt README.md ./
COPY chroma_agent ./chroma_agent
COPY plugin ./plugin
RUN pip install "torch==2.13.0" \
    && pip install -c constraints.txt ".[gpu]"

USER 10001
VOLUME ["/models", "/voices"]
EXPOSE 8000 8080 8081
# The server answers /health; the worker (start) sets CHROMA_HEALTH_URL to livekit-agents' own endpoint.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"${CHROMA_HEALTH_URL:-http://127.0.0.1:${CHROMA_PORT:-8000}/health}\" || exit 1"]
ENTRYPOINT ["chroma-agent"]
# serve on CHROMA_HOST:8000 (CHROMA_PORT moves it) with the model, device and voice of the environment.
CMD ["serve"]
