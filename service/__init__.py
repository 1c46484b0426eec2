"""The inference service, in rooms: ``http/`` (uvicorn runner, connections, admission, the app's wiring),
``api/`` (v1, v2, model control, codecs, bodies, OpenAPI, error answers), ``access/`` (API keys, limits),
``repository/`` (the repository's files; the registry of loaded models), ``ray/`` (Ray Serve); and the
lifecycle, micro-batcher, engine, metrics, settings, errors, vocabulary, HTTP client and launcher.
Each room imports only those below it (import-linter contracts in pyproject.toml).

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
