"""Open Inference Protocol v2 (KServe / Triton), with the binary tensor data extension.

Codec, strict where the protocol is: the one input is named ``input``; shapes are integers (not
booleans) and must match the model; ``binary_data_output`` / ``binary_data`` are JSON booleans;
``Inference-Header-Content-Length`` is plain decimal digits; binary bytes after the header must be
exactly what ``binary_data_size`` declares. Health endpoints answer with an empty body (status only).
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

import codedsmooth
from codedsmooth.service.api.handlers import ServiceRoute
from codedsmooth.service.api.inputs import (
    check_batch,
    check_count,
    parse_json,
    require_identity_encoding,
    to_float_array,
    validation_message,
)
from codedsmooth.service.api.openapi import INFER_ERRORS, errors, request_body, schema_ref
from codedsmooth.service.api.schemas import (
    RciInfo,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelParameters,
    V2ServerMetadata,
    V2TensorMetadata,
)
from codedsmooth.service.errors import BadRequest, InvalidInput, NotFound, quoted
from codedsmooth.service.lifecycle import current_lifecycle
from codedsmooth.service.vocabulary import (
    V2_INPUT,
    V2_INPUT_DATATYPE,
    V2_LABEL,
    V2_LABEL_OUTPUTS,
    V2_OUTPUTS,
    V2_PROBABILITIES,
)

router = APIRouter(route_class=ServiceRoute, tags=["v2"])

FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_DIGITS = re.compile(r"[0-9]{1,12}")
NO_BODY = {"description": "status only, empty body", "content": {}}


# ---- codec ------------------------------------------------------------------


def split_body(raw: bytes, header_length: str | None, input_shape, max_items: int) -> tuple[Any, bytes]:
    """The JSON part and the binary tail of a request (binary data extension)."""
    if header_length is None:
        return parse_json(raw, input_shape, max_items), b""
    if not _DIGITS.fullmatch(header_length):
        raise BadRequest(f"Inference-Header-Content-Length must be a decimal integer, got {quoted(header_length)}")
    n = int(header_length)
    if n > len(raw):
        raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(raw)} bytes")
    return parse_json(raw[:n], input_shape, max_items), raw[n:]


def _flag(params: dict | None, key: str, default: bool, where: str) -> bool:
    value = (params or {}).get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} parameter {key!r} must be a JSON boolean, got {quoted(value)}")
    return value


def tensor_from_request(req: V2InferRequest, binary: bytes, input_shape, max_items: int) -> torch.Tensor:
    if len(req.inputs) != 1:
        raise InvalidInput(f"the model takes exactly one input tensor, got {len(req.inputs)}")
    inp = req.inputs[0]
    if inp.name != V2_INPUT:
        raise InvalidInput(f"unknown input {quoted(inp.name)}; the model's input is {V2_INPUT!r}")
    dtype = FLOAT_TYPES.get(inp.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {inp.name!r}: datatype {quoted(inp.datatype)} not supported; use one of {sorted(FLOAT_TYPES)}"
        )
    shape, want = list(inp.shape), [len(input_shape) + 1, *input_shape]
    if len(shape) != want[0] or shape[1:] != list(input_shape) or shape[0] < 0:
        raise InvalidInput(
            f"input {inp.name!r}: shape {quoted(shape)} must be [n, {', '.join(map(str, input_shape))}] with n >= 1"
        )
    check_count(shape[0], max_items, f"input {inp.name!r}")
    count = math.prod(shape)  # Python ints: bounded by the checks above, never overflows
    params = inp.parameters or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size != len(binary):
            raise BadRequest(
                f"input {inp.name!r}: binary_data_size {quoted(size)} but {len(binary)} binary bytes follow the header"
            )
        if size != count * np.dtype(dtype).itemsize:
            raise InvalidInput(f"input {inp.name!r}: {size} bytes do not hold shape {shape} of {inp.datatype}")
        arr = np.frombuffer(binary, dtype=dtype).astype(np.float32)
    else:
        if binary:
            raise BadRequest(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
        if inp.data is None:
            raise InvalidInput(f"input {inp.name!r}: no data and no binary_data_size")
        data = inp.data if isinstance(inp.data, list) else [inp.data]
        arr = to_float_array(data, what=f"input {inp.name!r} data").reshape(-1)
        if arr.size != count:
            raise InvalidInput(f"input {inp.name!r}: {arr.size} values do not fill shape {shape}")
    return check_batch(arr.reshape(shape), input_shape, max_items, what=f"input {inp.name!r}")


def model_outputs(output: str) -> dict[str, str]:
    """The model's output tensors (name -> datatype) when it answers ``output`` (scores, or labels only)."""
    return V2_LABEL_OUTPUTS if output == "labels" else V2_OUTPUTS


def _bytes_tensor(labels: list[str]) -> bytes:
    """A BYTES tensor in the binary data extension: each element as its 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (label.encode() for label in labels))


def encode_response(
    req: V2InferRequest,
    model_name: str,
    probs: np.ndarray,
    version: int = 1,
    classes: list[str] | None = None,
    output: str = "scores",
) -> Response:
    """The answer's tensors: probabilities and index, or (``output == "labels"``) the top-1 label (class name) and index only."""
    available = model_outputs(output)
    wanted = [o.name for o in req.outputs] if req.outputs else list(available)
    binary_default = _flag(req.parameters, "binary_data_output", False, "request")
    binary_wanted = {
        o.name: _flag(o.parameters, "binary_data", binary_default, f"output {quoted(o.name)}")
        for o in (req.outputs or [])
    }
    index = probs.argmax(1).astype(np.int64)
    outputs, chunks = [], []
    for out_name in wanted:
        entry: dict[str, Any] = {
            "name": out_name,
            "datatype": available[out_name],
            "shape": [len(probs)] if out_name != V2_PROBABILITIES else list(probs.shape),
        }
        if out_name == V2_LABEL:
            labels = [(classes or [])[i] for i in index.tolist()]
            data, values = _bytes_tensor(labels), labels
        else:
            arr = probs.astype(np.float32) if out_name == V2_PROBABILITIES else index
            data, values = arr.tobytes(), arr.reshape(-1).tolist()
        if binary_wanted.get(out_name, binary_default):
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = values
        outputs.append(entry)
    body = V2InferResponse(model_name=model_name, model_version=str(version), id=req.id, outputs=outputs).model_dump(
        exclude_none=True
    )
    head = json.dumps(body).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def _check_request(req: V2InferRequest, output: str = "scores") -> None:
    """Everything about the outputs that can be refused before compute."""
    available = model_outputs(output)
    unknown = [o.name for o in (req.outputs or []) if o.name not in available]
    if unknown:
        raise InvalidInput(f"unknown output(s) {quoted(unknown)}; this model has {list(available)}")
    default = _flag(req.parameters, "binary_data_output", False, "request")
    for o in req.outputs or []:
        _flag(o.parameters, "binary_data", default, f"output {quoted(o.name)}")


# ---- routes -----------------------------------------------------------------


@router.get("/v2", response_model=V2ServerMetadata)
async def server_metadata():
    return V2ServerMetadata(name="codedsmooth", version=codedsmooth.__version__, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", response_class=Response, responses={200: NO_BODY})
async def health_live():
    return Response(status_code=200)


@router.get(
    "/v2/health/ready",
    response_class=Response,
    responses={200: NO_BODY, 503: {**NO_BODY, "description": "loading or draining; empty body"}},
)
async def health_ready(request: Request):
    return Response(status_code=200 if current_lifecycle(request).ready else 503)


def _metadata(request: Request, name: str, version: str = "") -> V2ModelMetadata:
    model = current_lifecycle(request).describe_model(name)
    _check_version(version, model)
    ck = model.checkpoint
    return V2ModelMetadata(
        name=name,
        versions=[str(model.version)],
        platform="pytorch",
        inputs=[V2TensorMetadata(name=V2_INPUT, datatype=V2_INPUT_DATATYPE, shape=[-1, *ck.input_shape])],
        outputs=[
            V2TensorMetadata(
                name=out, datatype=datatype, shape=[-1, len(ck.classes)] if out == V2_PROBABILITIES else [-1]
            )
            for out, datatype in model_outputs(model.settings.output).items()
        ],
        parameters=V2ModelParameters(
            rci=RciInfo.from_spec(model.engine.spec), card=ck.card, checkpoint_sha256=ck.sha256
        ),
    )


def _check_version(version: str, model) -> None:
    if version not in ("", str(model.version)):
        raise NotFound(f"unknown model version {quoted(version)}; version {model.version} is loaded")


@router.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=errors(404, 503))
async def model_metadata(name: str, request: Request):
    return _metadata(request, name)


@router.get("/v2/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=errors(404, 503))
async def model_version_metadata(name: str, version: str, request: Request):
    return _metadata(request, name, version)


@router.get("/v2/models/{name}/ready", response_class=Response, responses={200: NO_BODY, **errors(404, 503)})
async def model_ready(name: str, request: Request):
    current_lifecycle(request).describe_model(name)
    return Response(status_code=200)


@router.get(
    "/v2/models/{name}/versions/{version}/ready", response_class=Response, responses={200: NO_BODY, **errors(404, 503)}
)
async def model_version_ready(name: str, version: str, request: Request):
    _check_version(version, current_lifecycle(request).describe_model(name))
    return Response(status_code=200)


INFER_DOC = request_body(
    {
        "application/json": schema_ref(V2InferRequest),
        "application/octet-stream": {
            "type": "string",
            "format": "binary",
            "description": "JSON header of Inference-Header-Content-Length bytes, then binary tensor data",
        },
    }
)
INFER_RESPONSES = {
    200: {
        "description": "JSON, or with binary outputs: a JSON header of Inference-Header-Content-Length bytes, then the binary tensors",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **errors(404),
    **INFER_ERRORS,
}


async def _infer(name: str, request: Request, version: str = "") -> Response:
    lc = current_lifecycle(request)
    model = lc.use_model(request, name)
    _check_version(version, model)
    ck, max_items = model.checkpoint, model.settings.max_items_per_request
    assert max_items is not None  # validated settings have it (max_batch_size by default)
    require_identity_encoding(request.headers.get("content-encoding"))
    raw = await request.body()
    header, binary = split_body(raw, request.headers.get("inference-header-content-length"), ck.input_shape, max_items)
    try:
        req = V2InferRequest.model_validate(header)
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from None
    x = tensor_from_request(req, binary, ck.input_shape, max_items)
    _check_request(req, model.settings.output)
    probs = await lc.infer(request, x, model)
    return encode_response(req, model.name, probs, model.version, ck.classes, model.settings.output)


@router.post(
    "/v2/models/{name}/infer", response_model=V2InferResponse, responses=INFER_RESPONSES, openapi_extra=INFER_DOC
)
async def infer(name: str, request: Request):
    """Open Inference Protocol v2 inference, JSON or with the binary tensor data extension; ``model_name`` names the model that ran."""
    return await _infer(name, request)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=V2InferResponse,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_DOC,
)
async def infer_version(name: str, version: str, request: Request):
    return await _infer(name, request, version)
