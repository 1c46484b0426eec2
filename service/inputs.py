"""Turning request bodies into input tensors, with a clear error for every way they can be wrong."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import orjson
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from .errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType

RANGE_SLACK = 1e-6
V2_FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def require_content_type(content_type: str | None, expected: str) -> None:
    main = (content_type or "").split(";")[0].strip().lower()
    if main != expected:
        raise UnsupportedMediaType(f"content type must be {expected}, got {content_type or 'none'!r}")


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise BadRequest("empty body; expected JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in raw or b"Infinity" in raw:  # not JSON, but common from Python clients; refused below
            return _parse_lenient(raw)
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def _parse_lenient(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def check_batch(x: np.ndarray, input_shape: tuple[int, ...], max_items: int, what: str = "inputs") -> torch.Tensor:
    """Shape, count, finiteness and [0, 1] range of a (n, C, H, W) array → float32 tensor."""
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInput(f"{what} must have shape [n, {', '.join(map(str, input_shape))}], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInput(f"{what} is empty; send at least one item")
    if x.shape[0] > max_items:
        raise PayloadTooLarge(f"{what} has {x.shape[0]} items; at most {max_items} per request")
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise InvalidInput(f"{what} values must be raw pixels in [0, 1]; got range [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def to_float_array(data: Any, what: str = "inputs") -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"{what} must be a list of tensors (nested lists of numbers), got {type(data).__name__}")
    if not data:
        raise InvalidInput(f"{what} is empty; send at least one item")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        reason = "ragged (items or rows of different lengths)" if "inhomogeneous" in str(exc) else str(exc)
        raise InvalidInput(f"{what} is not a regular tensor: {reason}") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{what} must hold numbers only (no strings, booleans, nulls or objects)")
    return arr.astype(np.float32, copy=False)


def tensor_from_predict_body(payload: Any, input_shape, max_items: int) -> torch.Tensor:
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InvalidInput('body must be a JSON object with an "inputs" list')
    extra = sorted(set(payload) - {"inputs"})
    if extra:
        raise InvalidInput(f"unknown field(s) {extra}; only \"inputs\" is accepted")
    return check_batch(to_float_array(payload["inputs"]), input_shape, max_items)


def tensor_from_images(images: list[tuple[str, bytes]], input_shape, max_items: int) -> torch.Tensor:
    """Decode PNG/JPEG files, convert to the model's channels, resize to its H×W, scale to [0, 1]."""
    if not images:
        raise InvalidInput('send at least one image in a multipart field named "files"')
    if len(images) > max_items:
        raise PayloadTooLarge(f"{len(images)} images; at most {max_items} per request")
    channels, height, width = input_shape
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise InvalidInput(f"image {name!r} is {img.format}; only PNG and JPEG are accepted")
                img = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidInput(f"image {name!r} cannot be decoded: {exc}") from None
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
    return check_batch(np.stack(arrays), input_shape, max_items, what="images")


def split_v2_body(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON part and the binary tail of a v2 request (binary data extension)."""
    if header_length is None:
        return parse_json(raw), b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if n < 0 or n > len(raw):
        raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(raw)} bytes")
    return parse_json(raw[:n]), raw[n:]


def tensor_from_v2(inputs: list, binary: bytes, input_shape, max_items: int) -> torch.Tensor:
    if len(inputs) != 1:
        raise InvalidInput(f"the model takes exactly one input tensor, got {len(inputs)}")
    inp = inputs[0]
    dtype = V2_FLOAT_TYPES.get(inp.datatype)
    if dtype is None:
        raise InvalidInput(f"input {inp.name!r}: datatype {inp.datatype!r} not supported; use one of {sorted(V2_FLOAT_TYPES)}")
    shape = list(inp.shape)
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise InvalidInput(f"input {inp.name!r}: shape {shape} must be non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    params = inp.parameters or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise BadRequest(f"input {inp.name!r}: binary_data_size {size!r} but {len(binary)} binary bytes follow the header")
        if size != count * np.dtype(dtype).itemsize:
            raise InvalidInput(f"input {inp.name!r}: {size} bytes do not hold shape {shape} of {inp.datatype}")
        arr = np.frombuffer(binary, dtype=dtype).astype(np.float32)
    else:
        if inp.data is None:
            raise InvalidInput(f"input {inp.name!r}: no data and no binary_data_size")
        data = inp.data if isinstance(inp.data, list) else [inp.data]
        arr = to_float_array(data, what=f"input {inp.name!r} data").reshape(-1)
        if arr.size != count:
            raise InvalidInput(f"input {inp.name!r}: {arr.size} values do not fill shape {shape}")
    return check_batch(arr.reshape(shape), input_shape, max_items, what=f"input {inp.name!r}")
