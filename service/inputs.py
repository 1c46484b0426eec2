"""Codec helpers shared by the protocol routers: content types, JSON, and checking a batch of tensors.

Each protocol's own decoding lives with its router (``v1`` JSON and images, ``v2`` JSON and binary).
Nothing here runs torch kernels: arrays become tensors with ``torch.from_numpy`` only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import ValidationError

from .errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType

RANGE_SLACK = 1e-6


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


def check_count(n: int, max_items: int, what: str) -> None:
    if n == 0:
        raise InvalidInput(f"{what} is empty; send at least one item")
    if n > max_items:
        raise PayloadTooLarge(f"{what} has {n} items; at most {max_items} per request")


def check_batch(x: np.ndarray, input_shape: tuple[int, ...], max_items: int, what: str = "inputs") -> torch.Tensor:
    """Shape, count, finiteness and [0, 1] range of a (n, C, H, W) array → float32 tensor."""
    if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InvalidInput(f"{what} must have shape [n, {', '.join(map(str, input_shape))}], got {list(x.shape)}")
    check_count(int(x.shape[0]), max_items, what)
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise InvalidInput(f"{what} values must be raw pixels in [0, 1]; got range [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _holds_bool(data: list) -> bool:
    """Whether nested lists hold a JSON boolean anywhere (numpy would read it as 0 or 1)."""
    if data and isinstance(data[0], list):
        return any(isinstance(row, list) and _holds_bool(row) for row in data)
    return any(type(v) is bool for v in data)


def to_float_array(data: Any, what: str = "inputs", raw: bytes | None = None) -> np.ndarray:
    """Nested lists of numbers → float32 array. ``raw``: the JSON text, to skip the boolean scan when it has none."""
    if not isinstance(data, list):
        raise InvalidInput(f"{what} must be a list of tensors (nested lists of numbers), got {type(data).__name__}")
    if not data:
        raise InvalidInput(f"{what} is empty; send at least one item")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        reason = "ragged (items or rows of different lengths)" if "inhomogeneous" in str(exc) else str(exc)
        raise InvalidInput(f"{what} is not a regular tensor: {reason}") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None
    may_hold_bool = raw is None or b"true" in raw or b"false" in raw
    if arr.dtype.kind not in "iuf" or (may_hold_bool and _holds_bool(data)):
        raise InvalidInput(f"{what} must hold numbers only (no strings, booleans, nulls or objects)")
    return arr.astype(np.float32, copy=False)
