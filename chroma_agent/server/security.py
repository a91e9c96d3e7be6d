"""Optional API key, compared in constant time, and kept out of every log line.

Browsers cannot set headers on a WebSocket, so the key may arrive in the query string (`?api-key=`) or in a
subprotocol (`openai-insecure-api-key.KEY`); uvicorn writes the request line, query included, to its access
log, and websockets writes request headers at debug level. :func:`install_log_redaction` puts one filter on
those loggers (and on the handlers already installed) that rewrites any such secret to ``[redacted]``: the
configured key wherever it appears, and any value of a query parameter, header or subprotocol that carries
keys, wrong keys included (a wrong key is often someone's real key for another service).
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from urllib.parse import unquote_plus

from fastapi import Request

from chroma_agent.server.errors import APIError

REDACTED = "[redacted]"

# Query parameters and headers whose values are secrets (names compared lower-case, `_` read as `-`).
_SECRET_NAMES = frozenset({"api-key", "apikey", "key", "authorization", "proxy-authorization", "x-api-key",
                           "access-token", "token", "openai-api-key"})
# name=value pairs inside a URL's query string; names may be percent-encoded (`api%2Dkey`), which Starlette
# decodes before the key is checked, so they must be decoded here too.
_QUERY_PAIR = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;\s\"'#]+)=(?P<value>[^&;\s\"'#]*)")
# Header lines as websockets logs them ("< Authorization: Bearer KEY") and as people paste them.
_HEADER = re.compile(r"(?i)\b(?P<name>proxy-authorization|authorization|x-api-key|api-key)(?P<sep>\s*:\s*)"
                     r"(?P<scheme>(?:bearer|basic)\s+)?(?P<value>[^\s,\"']+)")
_SUBPROTOCOL_KEY = re.compile(r"(?i)(?P<prefix>openai-insecure-api-key\.)[^\s,\"']+")
# Loggers that write request lines or headers: uvicorn's access and error logs (websockets logs to the latter).
_REDACTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "chroma_agent")


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


def request_key(request: Request) -> str | None:
    """The key an HTTP request carries: `Authorization: Bearer KEY` or `api-key: KEY`."""
    return bearer_token(request.headers.get("authorization")) or request.headers.get("api-key")


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for HTTP routes: `Authorization: Bearer KEY` (or `api-key: KEY`, as Azure clients send)."""
    if not key_matches(request.app.state.settings.api_key, request_key(request)):
        raise APIError(401, "invalid or missing API key", type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _secret_name(name: str) -> bool:
    return unquote_plus(name).strip().lower().replace("_", "-") in _SECRET_NAMES


def redact(text: str, secrets: frozenset[str] = frozenset()) -> str:
    """``text`` with every API key in it replaced by ``[redacted]``."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "=" in text:
        text = _QUERY_PAIR.sub(lambda m: f"{m['lead']}{m['name']}={REDACTED}" if _secret_name(m["name"])
                               and m["value"] else m[0], text)
    if ":" in text:
        text = _HEADER.sub(lambda m: f"{m['name']}{m['sep']}{m['scheme'] or ''}{REDACTED}", text)
    return _SUBPROTOCOL_KEY.sub(lambda m: f"{m['prefix']}{REDACTED}", text)


class SecretRedactor(logging.Filter):
    """Rewrites log records so that no API key reaches a handler; never drops a record."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def add_secret(self, secret: str | None) -> None:
        if secret:
            with self._lock:
                self._secrets = self._secrets | {secret}

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v, secrets) if isinstance(v, str) else v for k, v in record.args.items()}
        # A header logged as ("< %s: %s", "Authorization", "Bearer KEY") is only recognisable once formatted.
        # uvicorn's access formatter needs its 5 arguments, and they were redacted one by one above.
        if record.args and record.name != "uvicorn.access":
            try:
                message = record.getMessage()
            except (TypeError, ValueError):  # a malformed record: leave it to logging's own error handling
                return True
            cleaned = redact(message, secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        # A traceback may quote a URL or a header; formatters reuse exc_text when it is set.
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info), secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


_TRACEBACKS = logging.Formatter()


_redactor = SecretRedactor()


def install_log_redaction(api_key: str | None = None) -> SecretRedactor:
    """Redact API keys from uvicorn's, websockets' and our logs; call after uvicorn configured its logging.

    Idempotent; every server's key is added to the one process-wide filter, which sits on the loggers that log
    requests and on the handlers already attached to them and to the root logger (records that propagate from
    other loggers pass those).
    """
    _redactor.add_secret(api_key)
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        logger.addFilter(_redactor)  # addFilter ignores a filter already there
        for handler in logger.handlers:
            handler.addFilter(_redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redactor)
    return _redactor
