"""The inference service: lifecycle, model repository, micro-batcher, engine, protocol routers (v1, v2, repository), errors, metrics, settings, uvicorn runner.

Importing this package imports nothing heavy: ``create_app`` and ``ServeSettings`` load on first use.
"""

__all__ = ["create_app", "ServeSettings"]


def __getattr__(name: str):
    if name == "create_app":
        from codedsmooth.service.http.app import create_app

        return create_app
    if name == "ServeSettings":
        from codedsmooth.service.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
