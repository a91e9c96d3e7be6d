"""What can go wrong between a realtime client and the server, each saying what to do about it."""

from __future__ import annotations

from chroma_agent.realtime_protocol import ProtocolError

__all__ = [
    "ConnectionLost",
    "RealtimeClientError",
    "RequestRefused",
    "ServerBusy",
    "ServerRefused",
    "ServerTimeout",
    "ServerUnreachable",
]


class RealtimeClientError(Exception):
    """Something between this client and the server failed; the message says what (never the API key)."""


class ServerUnreachable(RealtimeClientError):
    """No session could be started: nothing answers at the URL, or the server closed before a session."""


class ConnectionLost(RealtimeClientError):
    """The connection broke (or was closed); a new one is a new server conversation."""


class ServerTimeout(RealtimeClientError):
    """The server did not answer in time (the connection is given up)."""


class ServerBusy(RealtimeClientError):
    """Every conversation slot of the server is taken (close code 1013): try again later."""

    def __init__(self, url: str, detail: str | None = None):
        message = f"the Chroma server at {url} is full: every conversation slot is in use; try again later"
        super().__init__(message + (f" ({detail})" if detail else ""))
        self.url, self.detail = url, detail


class ServerRefused(RealtimeClientError):
    """The server answered the handshake (or ``/v1/models``) with an HTTP error: a wrong key, a wrong URL."""

    def __init__(self, url: str, status: int):
        if status in (401, 403):
            message = (f"the Chroma server at {url} refused the API key (HTTP {status}): pass the server's key as "
                       "api_key= or in CHROMA_API_KEY")
        elif status == 404:
            message = (f"no Chroma realtime endpoint at {url} (HTTP 404): base_url should be the server's root "
                       "URL, e.g. http://host:8000")
        else:
            message = f"the Chroma server at {url} answered HTTP {status}"
        super().__init__(message)
        self.url, self.status = url, status


class RequestRefused(RealtimeClientError):
    """The server refused a client event (an ``error`` event naming it); ``code`` is the protocol's."""

    def __init__(self, what: str, error: ProtocolError):
        super().__init__(f"the Chroma server refused {what}: {error.message} ({error.code})")
        self.what, self.error, self.code = what, error, error.code
