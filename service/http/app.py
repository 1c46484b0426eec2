"""The FastAPI application: wires the lifecycle, the protocol routers, error mapping and the OpenAPI document.

``/metrics`` is not here: it is served on its own listener (``metrics_host:metrics_port``, see
``codedsmooth.service.http.server``), never on the public port.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

import codedsmooth
from codedsmooth.service.api import management, v1, v2
from codedsmooth.service.api.handlers import install_error_handlers
from codedsmooth.service.api.openapi import install_openapi
from codedsmooth.service.http.admission import AdmissionMiddleware
from codedsmooth.service.lifecycle import EngineFactory, Lifecycle
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.settings import ServeSettings


def create_app(
    settings: ServeSettings | None = None,
    engine_factory: EngineFactory | None = None,
    metrics: Metrics | None = None,
    limiter=None,
) -> FastAPI:
    """``engine_factory(checkpoint, settings, device)`` replaces ``InferenceEngine`` (tests inject slowed doubles);
    ``limiter`` holds the per-client counters (default: in this process; see ``codedsmooth.service.access.limits``)."""
    lifecycle = Lifecycle(settings or ServeSettings(), metrics, engine_factory, limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await lifecycle.start()
        yield
        await lifecycle.stop()

    app = FastAPI(
        title="codedsmooth",
        version=codedsmooth.__version__,
        description="Image classification with randomized coded inference (coded-smoothing).",
        lifespan=lifespan,
        redirect_slashes=False,  # paths are exact: "/v1/models/" is 404 JSON, never a redirect built from the Host header
    )
    app.state.lifecycle = lifecycle
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(management.router)
    install_error_handlers(app)
    install_openapi(app, keys_required=lifecycle.access is not None)
    routes = [*v1.router.routes, *v2.router.routes, *management.router.routes]
    app.add_middleware(AdmissionMiddleware, lifecycle=lifecycle, routes=routes)
    return app
