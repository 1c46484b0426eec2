"""Errors the service answers with (their status, message and headers), and how client values enter a message.

Pure on purpose (no FastAPI, no Starlette): the HTTP client raises these too. The mapping of any
failure to an HTTP answer is ``codedsmooth.service.api.handlers``. Every error body is JSON
``{"error": "<what is wrong>"}``, in the service's own words, never a library's. A value the client sent is quoted in a message only through :func:`quoted` (cut to
``QUOTE_CHARS``), and every message is cut to ``MAX_ERROR_CHARS`` as it is answered, so an error
body stays small whatever the request held.
"""

from __future__ import annotations

import reprlib
from typing import Any

CLIENT_CLOSED = 499  # nginx's "client closed request": counted, never sent (nobody is listening)
UNREACHABLE = 0  # the client's status for a server that gave no answer (connection refused or reset)
QUOTE_CHARS = 60  # most characters of one client-supplied value quoted in an error message
MAX_ERROR_CHARS = 500  # most characters of any error message

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = QUOTE_CHARS
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = _QUOTE.maxdict = 4
_QUOTE.maxlevel = 2


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marking the cut with how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def quoted(value: Any) -> str:
    """A value the client sent, for an error message: its repr, short (long strings and lists are cut, with "...").

    The one way requests' contents enter error messages: a 7 MB input name or 600,000 unknown
    keys come back as a few dozen characters, and quoting costs no more than the cut.
    """
    if isinstance(value, (str, bytes)) and len(value) > QUOTE_CHARS:
        head = repr(value[:QUOTE_CHARS])
        return f"{head[:-1]}...{head[-1]} ({len(value):,} {'bytes' if isinstance(value, bytes) else 'characters'})"
    return clip(_QUOTE.repr(value), 2 * QUOTE_CHARS)


class ServiceError(Exception):
    """An error answer of the service: its HTTP status, message and headers.

    The server raises the subclasses below and answers them; the HTTP client
    (``service.client``) raises this class with the status the server answered
    (``UNREACHABLE`` when no answer came).
    """

    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, headers: dict[str, str] | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    status = 400


class InvalidInput(ServiceError):
    status = 422


class Unauthorized(ServiceError):
    """No API key, or one the keys file does not hold (``WWW-Authenticate: Bearer``, RFC 6750)."""

    status = 401

    def __init__(self, message: str, invalid_token: bool = False):
        challenge = 'Bearer realm="codedsmooth"' + (', error="invalid_token"' if invalid_token else "")
        super().__init__(message, {"WWW-Authenticate": challenge})


class TooManyRequests(ServiceError):
    """Over a client's rate limit or quota; ``Retry-After``: whole seconds until the same request would fit (absent when it never will)."""

    status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, {"Retry-After": str(int(retry_after_s))} if retry_after_s > 0 else None)


class Forbidden(ServiceError):
    """A route this server's configuration does not allow (e.g. model load/unload without --model-control explicit)."""

    status = 403


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class NotFound(ServiceError):
    status = 404


class RequestTimeout(ServiceError):
    """The body did not arrive in time; the connection is closed after the answer."""

    status = 408

    def __init__(self, message: str):
        super().__init__(message, {"Connection": "close"})


class ClientGone(ServiceError):
    """The client closed the connection before its answer; recorded as 499, nothing is sent."""

    status = CLIENT_CLOSED


class Unavailable(ServiceError):
    """Queue full, not ready, or draining: retry later."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    status = 504
