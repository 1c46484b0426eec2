"""The service's shape: a light package import, protocols importable and testable alone, a generic batcher."""

import inspect

from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import run_in_fresh_interpreter


def test_importing_the_package_does_not_import_the_app():
    code = (
        "import sys, codedsmooth.service as s\n"
        "heavy = [m for m in ('codedsmooth.service.http.app', 'fastapi', 'uvicorn', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(s.create_app) and 'codedsmooth.service.http.app' in sys.modules\n"
    )
    run_in_fresh_interpreter(code)


def test_the_http_client_imports_neither_fastapi_nor_starlette():
    code = (
        "import sys, codedsmooth.service.client\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')]\n"
        "assert not heavy, heavy\n"
    )
    run_in_fresh_interpreter(code)


def test_each_protocol_router_is_usable_alone():
    from codedsmooth.service.api import v1, v2
    from codedsmooth.service.api.handlers import install_error_handlers
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
        v2.split_body(b"{}", "3_0_1", (1, 8, 8), 32)


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


def test_rci_info_and_coding_spec_round_trip_through_json():
    """The one mapping between the public rci object and the spec, both ways, for every kind of spec."""
    import dataclasses

    from codedsmooth.core import CodingSpec, TrainedCoding
    from codedsmooth.service.api.schemas import RciInfo

    specs = [CodingSpec.plain()]
    for points in ("chebyshev-gauss", "chebyshev-lobatto"):
        trained = TrainedCoding(k=8, n=12, target_block="head", coded_points=points)
        for scope in ("request", "batch"):
            for tol in (None, 0.0, 0.05):
                specs.append(CodingSpec.resolve(trained, scope=scope, decode_tolerance=tol))
            specs.append(CodingSpec.resolve(trained, scope=scope, k=6, enabled=False))
    specs = list(dict.fromkeys(specs))  # batch scope always decodes in full: some coincide
    assert len(specs) >= 10
    for spec in specs:
        info = RciInfo.from_spec(spec)
        assert RciInfo.model_validate_json(info.model_dump_json()).to_spec() == spec
    # every field of the spec is carried (a new spec field without a public name fails here)
    assert len(RciInfo.model_fields) == len(dataclasses.fields(CodingSpec))


def test_the_client_raises_the_service_error_with_the_status_answered():
    import httpx

    from codedsmooth.service import client
    from codedsmooth.service.errors import ServiceError

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/predict")
    answer = httpx.Response(422, json={"error": "inputs: wrong shape"}, request=request)
    try:
        client._raise_for(answer)
    except ServiceError as exc:
        assert exc.status == 422 and "wrong shape" in exc.message
    else:
        raise AssertionError("no error raised for a 422")
