"""A client of a ``chroma-agent serve`` server's ``/v1/realtime`` WebSocket: the OpenAI Realtime protocol as
:mod:`chroma_agent.realtime_protocol` defines it, replies as the engine's own events.

:class:`RealtimeClient` says where the server is (URL, API key, timeouts). Its :meth:`~RealtimeClient.connect`
opens one :class:`ClientConnection`: one WebSocket, which is one server-side conversation (one engine slot,
freed when the socket closes). The LiveKit plugin's remote mode, the tests and the examples use it.

Each connection has a writer task (client events go out in the order they were made, so a truncate takes
effect before anything sent after it) and a reader task that parses every server event into its typed model
and dispatches it: to the request waiting for it (matched by what answers it, or by the ``event_id`` an error
names), or to the running reply. A reply's events go into a small bounded inbox; when its consumer falls
behind, the reader stops reading, TCP pushes back, and the server (which awaits every send and never
generates more than ``lookahead_s`` ahead of what it sent) pauses the reply once the socket buffers are full.
Nothing is buffered without bound.

A lost connection ends its running reply with a `ResponseError` (``kind="connection_lost"``) and refuses
every later call with :class:`ConnectionLost`. Reconnecting is a new server conversation: the caller decides
whether and what to replay (the plugin keeps a replay log of text turns).

Failures are :class:`RealtimeClientError` subclasses, each saying what to do about it (busy: try later;
refused: fix the request or the key; lost or unreachable: reconnect). Messages never carry the API key.
"""

from chroma_agent.realtime_client.client import RealtimeClient, display_url, realtime_url
from chroma_agent.realtime_client.connection import ClientConnection
from chroma_agent.realtime_client.errors import (
    ConnectionLost,
    RealtimeClientError,
    RequestRefused,
    ServerBusy,
    ServerRefused,
    ServerTimeout,
    ServerUnreachable,
)
from chroma_agent.realtime_client.reply import INBOX_EVENTS, ClientReply, nothing_said

__all__ = [
    "INBOX_EVENTS",
    "ClientConnection",
    "ClientReply",
    "ConnectionLost",
    "RealtimeClient",
    "RealtimeClientError",
    "RequestRefused",
    "ServerBusy",
    "ServerRefused",
    "ServerTimeout",
    "ServerUnreachable",
    "display_url",
    "nothing_said",
    "realtime_url",
]
