"""A support widget's backend: a LiveKit token endpoint per site, and the demo page.

Each visitor gets a room of their own and a short-lived token to join it; the token's room configuration
dispatches the ``chroma`` agent into that room with the site's voice and instructions as its job metadata
(the worker's per-call JSON, see ``chroma_agent.worker_config.CallSettings``). The API secret only signs
tokens: it is never sent to the browser or written to the log.

    export LIVEKIT_URL=wss://<project>.livekit.cloud LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/support_widget/server.py --port 8080      # then open http://localhost:8080/?site=demo

The endpoint follows LiveKit's standard token-endpoint format (POST JSON, 201 with ``server_url`` and
``participant_token``), at ``POST /api/sites/<site id>/token``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from livekit import api
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("chroma.support_widget")

STATIC = Path(__file__).resolve().parent / "static"
AGENT_NAME = "chroma"
TOKEN_TTL = datetime.timedelta(minutes=10)  # only for joining: a connected call outlives its token
ROOM_EMPTY_TIMEOUT_S = 60  # a room nobody joined closes after this
ROOM_DEPARTURE_TIMEOUT_S = 20  # and after the visitor leaves
SITE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Site:
    """One website using the widget: the agent's voice and instructions there, and where it may run."""

    voice: str | None
    instructions: str
    greeting: str | None = None
    # Pages allowed to ask for tokens (their Origin header): ("https://shop.example.com",). Empty: any page.
    origins: tuple[str, ...] = ()

    def call_settings(self) -> dict[str, str]:
        """The agent's job metadata: the worker's per-call settings."""
        data = {"voice": self.voice, "instructions": self.instructions, "greeting": self.greeting}
        return {k: v for k, v in data.items() if v}


# site id -> the agent's settings on that site. Voices are names stored in the worker's CHROMA_VOICES_DIR
# (clone one with examples/clone_voice.py).
SITES: dict[str, Site] = {
    "demo": Site(
        voice="support-anna",
        instructions="You are Anna, the support assistant on this website. Answer briefly and naturally, in "
                     "spoken language. If you cannot help, offer to have a colleague email the visitor.",
        greeting="Greet the visitor, say you are Anna from support and ask how you can help.",
    ),
    "acme-shop": Site(
        voice="acme-sam",
        instructions="You are Sam, the voice assistant of the ACME online shop. Help with orders, delivery "
                     "and returns. Keep answers short; never ask for card numbers or passwords.",
        greeting="Welcome the visitor to the ACME shop and ask what they are looking for.",
        origins=("https://shop.acme.example",),
    ),
}


class ConfigError(RuntimeError):
    """The server cannot start: the message names the environment variable to set (and never its value)."""


@dataclass(frozen=True)
class LiveKitSettings:
    url: str
    api_key: str
    api_secret: str = field(repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LiveKitSettings:
        env = os.environ if env is None else env
        names = ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
        values = {var: (env.get(var) or "").strip() for var in names}
        missing = [var for var, value in values.items() if not value]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"{', '.join(missing)} {verb} not set: the token endpoint signs LiveKit tokens "
                              "with your project's URL, API key and API secret")
        if not values["LIVEKIT_URL"].startswith(("wss://", "ws://", "https://", "http://")):
            raise ConfigError("LIVEKIT_URL must start with wss:// (or ws://, https://, http://)")
        return cls(values["LIVEKIT_URL"], values["LIVEKIT_API_KEY"], values["LIVEKIT_API_SECRET"])


class UnknownSiteError(KeyError):
    pass


def get_site(site_id: str, sites: Mapping[str, Site] | None = None) -> Site:
    """The site's settings; :class:`UnknownSiteError` for a malformed or unknown id."""
    sites = SITES if sites is None else sites
    if not isinstance(site_id, str) or not SITE_ID.match(site_id) or site_id not in sites:
        raise UnknownSiteError(site_id)
    return sites[site_id]


def new_identity() -> str:
    return f"visitor-{secrets.token_hex(6)}"


def room_for(site_id: str) -> str:
    """A new room per visitor: ``support-<site>-<random>``."""
    return f"support-{site_id}-{secrets.token_hex(6)}"


def issue_token(site_id: str, identity: str, *, settings: LiveKitSettings | None = None,
                room: str | None = None, name: str | None = None, sites: Mapping[str, Site] | None = None,
                ttl: datetime.timedelta = TOKEN_TTL) -> str:
    """A token for `identity` to join its own room, with the ``chroma`` agent dispatched there for `site_id`.

    The visitor may publish only their microphone and may not change their own metadata or attributes (the
    worker reads ``chroma.*`` participant attributes, which would override the site's settings).
    """
    site = get_site(site_id, sites)
    settings = settings or LiveKitSettings.from_env()
    room = room or room_for(site_id)
    grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                             can_publish_data=True, can_publish_sources=["microphone"],
                             can_update_own_metadata=False)
    config = api.RoomConfiguration(
        empty_timeout=ROOM_EMPTY_TIMEOUT_S, departure_timeout=ROOM_DEPARTURE_TIMEOUT_S,
        agents=[api.RoomAgentDispatch(agent_name=AGENT_NAME, metadata=json.dumps(site.call_settings()))],
    )
    token = (api.AccessToken(settings.api_key, settings.api_secret)
             .with_identity(identity).with_name(name or "Website visitor").with_ttl(ttl)
             .with_grants(grants).with_room_config(config)
             .with_attributes({"support.site": site_id}))
    return token.to_jwt()


SERVER_CHOSEN = ("room_name", "participant_identity", "participant_metadata", "participant_attributes",
                 "room_config")


class TokenRequest(BaseModel):
    """LiveKit's standard token request; only ``participant_name`` may be chosen by the page."""

    model_config = ConfigDict(extra="forbid")

    participant_name: str | None = Field(None, max_length=64)
    # Chosen by the server: a page that sends them gets a 400, as the standard asks.
    room_name: Any = None
    participant_identity: Any = None
    participant_metadata: Any = None
    participant_attributes: Any = None
    room_config: Any = None


class TokenResponse(BaseModel):
    server_url: str
    participant_token: str
    room_name: str
    participant_identity: str


def create_app(settings: LiveKitSettings | None = None, *,
               sites: Mapping[str, Site] | None = None) -> FastAPI:
    """The app; without `settings` they come from the environment: a missing one fails here, at startup."""
    settings = settings or LiveKitSettings.from_env()
    sites = dict(SITES if sites is None else sites)
    for site_id in sites:
        if not SITE_ID.match(site_id):
            raise ConfigError(f"site id {site_id!r}: use lowercase letters, digits and '-'")
    app = FastAPI(title="Chroma support widget", docs_url=None, redoc_url=None)
    origins = sorted({origin for site in sites.values() for origin in site.origins})
    if origins:  # pages on other origins may call the token endpoint (the per-site check is below)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["POST"],
                           allow_headers=["content-type"])

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/sites/{site_id}/token", status_code=201, response_model=TokenResponse)
    async def token(site_id: str, request: Request, body: TokenRequest | None = None) -> TokenResponse:
        try:
            site = get_site(site_id, sites)
        except UnknownSiteError:
            raise HTTPException(404, "unknown site") from None
        origin = request.headers.get("origin")
        if site.origins and origin not in site.origins:
            raise HTTPException(403, "this page may not start calls for that site")
        body = body or TokenRequest()
        chosen = [name for name in SERVER_CHOSEN if getattr(body, name) is not None]
        if chosen:
            raise HTTPException(400, f"{', '.join(chosen)}: chosen by the server, leave out")
        identity, room = new_identity(), room_for(site_id)
        jwt = issue_token(site_id, identity, settings=settings, room=room, name=body.participant_name,
                          sites=sites)
        log.info("site %s: token for %s in room %s", site_id, identity, room)  # never the token or the secret
        return TokenResponse(server_url=settings.url, participant_token=jwt, room_name=room,
                             participant_identity=identity)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the support widget and its LiveKit token endpoint.",
                                     epilog="environment: LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        app = create_app()
    except ConfigError as exc:
        print(f"support_widget: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
