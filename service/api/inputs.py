"""Codec helpers shared by the protocol routers: content types, JSON, and checking a batch of tensors.

Each protocol's own decoding lives with its router (``v1`` JSON and images, ``v2`` JSON and binary).
Nothing here runs torch kernels: arrays become tensors with ``torch.from_numpy`` only.

JSON is counted before it is parsed: a body holding more JSON values than ``max_items`` items of
the model's input shape can (plus a small envelope) gets 413 after a byte count, before any Python
object is built, so parsing costs at most what a valid request costs (an 8 MB body of a million
one-number items would otherwise take seconds on the event loop). Error texts say what is wrong
in the service's words, never quoting the JSON parser or numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import ValidationError

from codedsmooth.service.errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType, clip, quoted

RANGE_SLACK = 1e-6
JSON_ENVELOPE_VALUES = 256  # JSON values around the tensors: keys, a v2 header's shape, outputs and parameters


def require_content_type(content_type: str | None, expected: str) -> None:
    main = (content_type or "").split(";")[0].strip().lower()
    if main != expected:
        raise UnsupportedMediaType(
            f"content type must be {expected}, got {quoted(content_type) if content_type else 'none'}"
        )


def require_identity_encoding(content_encoding: str | None) -> None:
    """Request bodies are read as sent: a compressed body gets 415 (it is never inflated)."""
    if content_encoding not in (None, "", "identity"):
        raise UnsupportedMediaType(
            f"compressed request bodies are not supported (Content-Encoding {quoted(content_encoding)}); send the body uncompressed"
        )


def max_json_values(input_shape: Sequence[int], max_items: int) -> int:
    """Most JSON values, lists and objects a request of ``max_items`` items of ``input_shape`` holds.

    An item of shape (C, H, W) as nested lists is 1 + C + C·H lists and C·H·W numbers, i.e. as
    many opening brackets and separating commas; the envelope adds the rest.
    """
    per_item = sum(math.prod(input_shape[:depth]) for depth in range(len(input_shape) + 1))
    return max_items * per_item + JSON_ENVELOPE_VALUES


def check_json_size(raw: bytes, input_shape: Sequence[int], max_items: int) -> None:
    """413 for a body that holds more JSON values than a request may, counted on the bytes (no parsing).

    Counts ``,``, ``[`` and ``{``: every value after the first in a list or object follows a comma,
    every list and object opens with a bracket. Commas inside strings count too, which only ever
    refuses sooner: a valid request has no long strings.
    """
    limit = max_json_values(input_shape, max_items)
    if len(raw) <= limit:
        return
    count = raw.count(b",")
    if count <= limit:
        count += raw.count(b"[") + raw.count(b"{")
    if count > limit:
        shape = ", ".join(map(str, input_shape))
        raise PayloadTooLarge(
            f"body holds more than {limit:,} JSON values (counted {count:,}): more than {max_items} items of shape [{shape}] "
            f"need; at most {max_items} items per request"
        )


def parse_json(raw: bytes, input_shape: Sequence[int], max_items: int) -> Any:
    """The JSON body of a request for at most ``max_items`` items of ``input_shape`` (see ``check_json_size``)."""
    if not raw:
        raise BadRequest("empty body; expected JSON")
    check_json_size(raw, input_shape, max_items)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in raw or b"Infinity" in raw:  # not JSON, but common from Python clients; refused below
            return _parse_lenient(raw)
        raise BadRequest(_json_problem(exc)) from None


def _parse_lenient(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(_json_problem(exc)) from None
    except UnicodeDecodeError:
        raise BadRequest("body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None


def _json_problem(exc: json.JSONDecodeError) -> str:
    """What is wrong with a body the JSON parser refused, in the service's words (orjson's errors subclass json's)."""
    reason = exc.msg.lower()
    where = f"line {exc.lineno}, column {exc.colno}"
    if "depth" in reason or "recursion" in reason:
        return f"body is nested too deeply (at {where})"
    if "utf-8" in reason or "surrogate" in reason:
        return f"body is not valid JSON: it is not UTF-8 text (at {where})"
    if "number" in reason:
        return f"body holds a number JSON cannot carry as a float64 (at {where})"
    if "end of data" in reason or "eof" in reason:
        return f"body is not valid JSON: it ends too early (at {where})"
    return f"body is not valid JSON (at {where})"


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{clip(loc, 80)}: {err.get('msg')}")
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
        if "maximum number of dimension" in str(exc):  # more nesting levels than numpy has dimensions
            raise InvalidInput(f"{what} is nested too deeply for a tensor") from None
        reason = (
            "ragged (items or rows of different lengths)"
            if "inhomogeneous" in str(exc)
            else "not nested lists of numbers"
        )
        raise InvalidInput(f"{what} is not a regular tensor: {reason}") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None
    may_hold_bool = raw is None or b"true" in raw or b"false" in raw
    if arr.dtype.kind not in "iuf" or (may_hold_bool and _holds_bool(data)):
        raise InvalidInput(f"{what} must hold numbers only (no strings, booleans, nulls or objects)")
    return arr.astype(np.float32, copy=False)
