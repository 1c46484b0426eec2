"""The service's shape: a light package import, protocols importable and testable alone, a generic batcher."""

import inspect

from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import run_in_fresh_interpreter


def test_importing_the_package_does_not_import_the_app():
    code = (
        "import sys, codedsmooth.service as s\n"
        "heavy = [m for m in ('codedsmooth.service.app', 'fastapi', 'uvicorn', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(s.create_app) and 'codedsmooth.service.app' in sys.modules\n"
    )
    run_in_fresh_interpreter(code)


def test_each_protocol_router_is_usable_alone():
    from codedsmooth.service import v1, v2
    from codedsmooth.service.errors import install_error_handlers
    from codedsmooth.service.lifecycle import Lifecycle
    from codedsmooth.service.settings import ServeSettings

    for router, probe, expected in ((v1.router, "/health/ready", 503), (v2.router, "/v2/health/ready", 503)):
        app = FastAPI()
        app.state.lifecycle = Lifecycle(ServeSettings())  # never started: loading
        app.include_router(router)
        install_error_handlers(app)
        with TestClient(app) as client:
            assert client.get(probe).status_code == expected
    # the v2 codec alone: strict framing
    import pytest

    from codedsmooth.service.errors import BadRequest

    with pytest.raises(BadRequest):
        v2.split_body(b"{}", "3_0_1")


def test_the_batcher_knows_nothing_of_rci():
    from codedsmooth.service import batcher

    source = inspect.getsource(batcher)
    for word in ("rci_", ".stats", "flips", "filler", "residual"):
        assert word not in source, word  # the engine's statistics become metrics in metrics.BatchObserver


def test_items_per_request_cannot_exceed_a_device_batch():
    import pytest
    from pydantic import ValidationError

    from codedsmooth.service.settings import ServeSettings

    assert ServeSettings().max_items_per_request == ServeSettings().max_batch_size
    assert ServeSettings(max_batch_size=8).max_items_per_request == 8
    with pytest.raises(ValidationError, match="must not exceed max_batch_size"):
        ServeSettings(max_batch_size=8, max_items_per_request=9)
    with pytest.raises(ValidationError, match="metrics_port must differ"):
        ServeSettings(port=9000, metrics_port=9000)
