"""The inference service: FastAPI app, micro-batcher, coding groups, protocol schemas, metrics, settings."""

from .app import create_app
from .settings import ServeSettings

__all__ = ["create_app", "ServeSettings"]
