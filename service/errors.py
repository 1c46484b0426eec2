"""Errors the service answers with, each mapped to an HTTP status and a JSON ``{"error": ...}`` body."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers


class BadRequest(ServiceError):
    status = 400


class InvalidInput(ServiceError):
    status = 422


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    """Queue full, not ready, or draining: retry later."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, {"Retry-After": str(retry_after_s)})


class DeadlineExceeded(ServiceError):
    status = 504
