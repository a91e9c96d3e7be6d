"""Optional API key, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from chroma_agent.server.errors import APIError


def key_matches(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for HTTP routes: `Authorization: Bearer KEY` (or `api-key: KEY`, as Azure clients send)."""
    expected = request.app.state.settings.api_key
    given = bearer_token(request.headers.get("authorization")) or request.headers.get("api-key")
    if not key_matches(expected, given):
        raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
