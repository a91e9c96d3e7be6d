"""Running the app under uvicorn: in the foreground (`chroma-agent serve`) or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from chroma_agent.engine.engine import Engine
from chroma_agent.server.app import create_app
from chroma_agent.server.connections import CleanRefusalWebSocketProtocol, guarded_http_protocol
from chroma_agent.server.memory import limit_heap_growth
from chroma_agent.server.security import install_log_redaction
from chroma_agent.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Streams still open at shutdown get this long to finish before their connections are dropped.
_GRACEFUL_SHUTDOWN_S = 5
# Kernel send buffer of every accepted connection (inherited from the listening socket). Loopback and LAN
# autotuning grows it to megabytes: a minute of streamed audio that a stalled client would never hear, while
# the engine keeps generating to fill it. Linux doubles the value asked for: 128 KiB gives 256 KiB, ~4 s of
# base64 PCM16 at 24 kHz (what a client that stops reading absorbs before the stall guard starts counting).
_SEND_BUFFER_BYTES = 128 * 1024


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; binding before the model loads makes a taken port fail at once, not after minutes."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _config(app: FastAPI, settings: ServerSettings, log_level: str) -> uvicorn.Config:
    http = guarded_http_protocol(header_timeout_s=settings.header_timeout_s,
                                 max_header_bytes=settings.max_header_bytes,
                                 max_connections=settings.max_connections)
    # uvicorn's own frame limit sits above ours, so an oversized message gets our clear error, not a bare 1009.
    config = uvicorn.Config(app, log_level=log_level, ws_max_size=2 * settings.max_ws_message_bytes,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S, server_header=False,
                            http=http, ws=CleanRefusalWebSocketProtocol)
    # After uvicorn.Config: it (re)configures uvicorn's loggers and handlers, and the filter must sit on them.
    install_log_redaction(settings.api_key)
    return config


def serve(engine: Engine, settings: ServerSettings, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM); the caller closes the engine afterwards."""
    server = uvicorn.Server(_config(create_app(engine, settings), settings, log_level))
    # Process-wide, so only here where the server owns the process (not in ServerThread, which embeds it).
    limit_heap_growth()
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d (API key %s, %d engine slots)", settings.model_name, host, port,
             "required" if settings.api_key else "off", engine.config.max_sessions)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        log.info("stopped")


class ServerThread:
    """uvicorn serving `app` from a background thread on a free port (tests, or embedding in another program)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(_config(app, app.state.settings, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
