"""The FastAPI application: own JSON API, Open Inference Protocol v2, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import codedsmooth
from codedsmooth.models import Checkpoint, default_checkpoint_path, load_checkpoint, resolve_device

from .batcher import MicroBatcher
from .engine import InferenceEngine
from .errors import DeadlineExceeded, InvalidInput, NotFound, ServiceError, Unavailable, UnsupportedMediaType
from .inputs import (
    parse_json,
    require_content_type,
    split_v2_body,
    tensor_from_images,
    tensor_from_predict_body,
    tensor_from_v2,
    validation_message,
)
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .schemas import (
    ErrorBody,
    HealthBody,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
    RciInfo,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ServerMetadata,
    V2TensorMetadata,
)
from .settings import ServeSettings, cpu_quota

log = logging.getLogger("codedsmooth.service")

V2_INPUT = "input"
V2_OUTPUTS = {"probabilities": "FP32", "index": "INT64"}
ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}


class ServiceState:
    """What the server holds while it runs: checkpoint, engine, batcher, metrics, readiness."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.checkpoint: Checkpoint | None = None
        self.engine: InferenceEngine | None = None
        self.batcher: MicroBatcher | None = None
        self.ready = False
        self.draining = False
        self.in_flight = 0  # HTTP requests being handled, kept by MetricsMiddleware
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codedsmooth-model")

    def _load(self) -> None:
        torch.set_num_threads(self.settings.threads or cpu_quota())  # on the model thread, as all torch work
        device = resolve_device(self.settings.device)
        path = self.settings.checkpoint or default_checkpoint_path()
        self.checkpoint = load_checkpoint(path, device=device)
        self.engine = InferenceEngine(self.checkpoint, self.settings, device)
        self.engine.warm_up(self.settings.max_batch_size)
        log.info(
            "loaded %s from %s on %s (%s)", self.checkpoint.name, path, device, self.engine.spec.label(),
        )

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self._load)
        s = self.settings
        self.batcher = MicroBatcher(self.engine, self.metrics, self.executor, s.max_batch_size, s.max_delay_ms / 1000.0, s.max_queue_size)
        self.batcher.start()
        self.ready = True
        self.metrics.ready.set(1)

    async def drain(self) -> bool:
        """Stop taking work (503) and wait for what was accepted to finish."""
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is None:
            return True
        return await self.batcher.drain(self.settings.drain_timeout_s)

    async def shutdown(self) -> None:
        await self.drain()
        if self.batcher is not None:
            await self.batcher.stop()
        self.executor.shutdown(wait=True)

    @property
    def rci_info(self) -> RciInfo:
        return RciInfo.from_spec(self.engine.spec)

    def require_ready(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down", retry_after_s=5)
        if not self.ready:
            raise Unavailable("model is loading", retry_after_s=2)

    def require_model(self, name: str) -> Checkpoint:
        self.require_ready()
        if name != self.checkpoint.name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.checkpoint.name!r}")
        return self.checkpoint

    async def infer(self, request: Request, x: torch.Tensor) -> np.ndarray:
        """Queue ``x``, wait for its probabilities; 504 past the deadline, dropped if the client leaves."""
        self.require_ready()
        arrival = request.state.arrival
        deadline = arrival + self.settings.timeout_ms / 1000.0
        fut = self.batcher.submit(x, arrival, deadline)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({fut, watcher}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            fut.cancel()
            if watcher in done:
                raise Unavailable("client disconnected")  # nobody reads this answer
            raise DeadlineExceeded(f"no answer within {self.settings.timeout_ms:g} ms")
        finally:
            watcher.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _json(body) -> Response:
    """Serialise a response model once (FastAPI would validate and encode it again)."""
    return Response(body.model_dump_json(), media_type="application/json")


def _predictions(probs: np.ndarray, classes: list[str]) -> list[Prediction]:
    idx = probs.argmax(1).tolist()
    return [Prediction(label=classes[i], index=i, probabilities=p) for i, p in zip(idx, probs.tolist())]


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = Metrics()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.shutdown()

    app = FastAPI(
        title="codedsmooth",
        version=codedsmooth.__version__,
        description="Image classification with randomized coded inference (coded-smoothing).",
        lifespan=lifespan,
    )
    app.state.service = state
    extra_schemas: dict[str, Any] = {}

    def body_schema(model) -> dict:
        """JSON schema of a body the route parses itself; nested models go to components."""
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        extra_schemas.update(schema.pop("$defs", {}))
        extra_schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(extra_schemas)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, tracker=state)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3]))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal server error")

    # ---- health and metrics -------------------------------------------------

    @app.get("/health/live", response_model=HealthBody, tags=["health"])
    async def live():
        return HealthBody(status="draining" if state.draining else "ok")

    @app.get("/health/ready", response_model=HealthBody, responses={503: {"model": HealthBody}}, tags=["health"])
    async def ready():
        if state.ready and not state.draining:
            return HealthBody(status="ok")
        status = "draining" if state.draining else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- own JSON API -------------------------------------------------------

    @app.get("/v1/models", response_model=list[ModelInfo], responses=ERRORS, tags=["v1"])
    async def models():
        state.require_ready()
        ck = state.checkpoint
        return [
            ModelInfo(
                name=ck.name, input_shape=list(ck.input_shape), classes=ck.classes, method=ck.config.method,
                dataset=ck.config.dataset, test_accuracy=ck.config.test_accuracy, target_block=ck.target_block, rci=state.rci_info,
            )
        ]

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        tags=["v1"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema(PredictRequest)}}}},
    )
    async def predict(request: Request):
        """Classify tensors: `inputs` is a list of items of the model's input shape, raw pixels in [0, 1]."""
        state.require_ready()
        require_content_type(request.headers.get("content-type"), "application/json")
        payload = parse_json(await request.body())
        ck = state.checkpoint
        x = tensor_from_predict_body(payload, ck.input_shape, settings.max_items_per_request)
        probs = await state.infer(request, x)
        return _json(PredictResponse(model=ck.name, predictions=_predictions(probs, ck.classes), rci=state.rci_info))

    @app.post(
        "/v1/predict/image",
        response_model=PredictResponse,
        responses=ERRORS,
        tags=["v1"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "PNG or JPEG images"}},
                            "required": ["files"],
                        }
                    }
                },
            }
        },
    )
    async def predict_image(request: Request):
        """Classify PNG/JPEG images (multipart field `files`), resized and converted as the checkpoint needs."""
        state.require_ready()
        require_content_type(request.headers.get("content-type"), "multipart/form-data")
        ck = state.checkpoint
        try:
            form = await request.form(max_files=settings.max_items_per_request, max_fields=16)
        except ServiceError:
            raise
        except Exception as exc:  # malformed multipart
            raise InvalidInput(f"cannot parse multipart body: {exc}") from None
        try:
            uploads = [f for f in form.getlist("files") + form.getlist("file") if hasattr(f, "read")]
            images = [(f.filename or "upload", await f.read()) for f in uploads]
        finally:
            await form.close()
        x = tensor_from_images(images, ck.input_shape, settings.max_items_per_request)
        probs = await state.infer(request, x)
        return _json(PredictResponse(model=ck.name, predictions=_predictions(probs, ck.classes), rci=state.rci_info))

    # ---- Open Inference Protocol v2 ------------------------------------------

    @app.get("/v2", response_model=V2ServerMetadata, tags=["v2"])
    async def v2_server():
        return V2ServerMetadata(name="codedsmooth", version=codedsmooth.__version__, extensions=["binary_tensor_data"])

    @app.get("/v2/health/live", tags=["v2"])
    async def v2_live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", tags=["v2"])
    async def v2_ready():
        return Response(status_code=200 if state.ready and not state.draining else 503)

    def _v2_metadata(name: str) -> V2ModelMetadata:
        ck = state.require_model(name)
        return V2ModelMetadata(
            name=ck.name,
            versions=["1"],
            platform="pytorch",
            inputs=[V2TensorMetadata(name=V2_INPUT, datatype="FP32", shape=[-1, *ck.input_shape])],
            outputs=[
                V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(ck.classes)]),
                V2TensorMetadata(name="index", datatype="INT64", shape=[-1]),
            ],
            parameters={"rci": state.rci_info},
        )

    @app.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=ERRORS, tags=["v2"])
    async def v2_model(name: str):
        return _v2_metadata(name)

    @app.get("/v2/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERRORS, tags=["v2"])
    async def v2_model_version(name: str, version: str):
        _check_version(version)
        return _v2_metadata(name)

    @app.get("/v2/models/{name}/ready", responses=ERRORS, tags=["v2"])
    async def v2_model_ready(name: str):
        state.require_model(name)
        return Response(status_code=200)

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=ERRORS, tags=["v2"])
    async def v2_model_version_ready(name: str, version: str):
        _check_version(version)
        state.require_model(name)
        return Response(status_code=200)

    infer_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body_schema(V2InferRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": "JSON header of Inference-Header-Content-Length bytes, then binary tensor data"}},
            },
        }
    }

    async def _v2_infer(name: str, request: Request) -> Response:
        ck = state.require_model(name)
        raw = await request.body()
        if request.headers.get("content-encoding") not in (None, "identity"):
            raise UnsupportedMediaType("compressed request bodies are not supported")
        header, binary = split_v2_body(raw, request.headers.get("inference-header-content-length"))
        try:
            req = V2InferRequest.model_validate(header)
        except ValidationError as exc:
            raise InvalidInput(validation_message(exc)) from None
        x = tensor_from_v2(req.inputs, binary, ck.input_shape, settings.max_items_per_request)
        wanted = [o.name for o in req.outputs] if req.outputs else list(V2_OUTPUTS)
        unknown = [n for n in wanted if n not in V2_OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(V2_OUTPUTS)}")
        binary_default = bool((req.parameters or {}).get("binary_data_output", False))
        binary_wanted = {o.name: bool((o.parameters or {}).get("binary_data", binary_default)) for o in (req.outputs or [])}
        probs = await state.infer(request, x)
        arrays = {"probabilities": probs.astype(np.float32), "index": probs.argmax(1).astype(np.int64)}
        outputs, chunks = [], []
        for out_name in wanted:
            arr = arrays[out_name]
            entry: dict[str, Any] = {"name": out_name, "datatype": V2_OUTPUTS[out_name], "shape": list(arr.shape)}
            if binary_wanted.get(out_name, binary_default):
                data = arr.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                entry["data"] = arr.reshape(-1).tolist()
            outputs.append(entry)
        body = V2InferResponse(model_name=ck.name, model_version="1", id=req.id, outputs=outputs).model_dump(exclude_none=True)
        head = json.dumps(body).encode()
        if not chunks:
            return Response(head, media_type="application/json")
        return Response(
            head + b"".join(chunks),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )

    @app.post("/v2/models/{name}/infer", response_model=V2InferResponse, responses=ERRORS, tags=["v2"], openapi_extra=infer_doc)
    async def v2_infer(name: str, request: Request):
        """Open Inference Protocol v2 inference, JSON or with the binary tensor data extension."""
        return await _v2_infer(name, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=ERRORS, tags=["v2"], openapi_extra=infer_doc)
    async def v2_infer_version(name: str, version: str, request: Request):
        _check_version(version)
        return await _v2_infer(name, request)

    return app


def _check_version(version: str) -> None:
    if version not in ("", "1"):
        raise NotFound(f"unknown model version {version!r}; only version 1 exists")
