"""Any prediction endpoint as a query target: Open Inference Protocol v2 (Triton, KServe, MLServer, this server) or
this server's v1, known only by its URL.

An auditor holds no weights, so everything about the requests comes from the endpoint's own metadata
(v2 ``GET /v2/models/{name}``: input name, shape and datatype; v1 ``GET /v1/models``) plus what metadata
cannot say, given as options: the pixel scale, the layout, the class order and the output kind. Inputs are
always (n, C, H, W) in [0, 1] on this side; :class:`Endpoint` converts them on the way out and maps every
answer back to scores over the data set's classes (a label becomes a one-hot row).

Every item sent is one query, counted before it is sent and refused past ``max_queries`` (a hard cap,
:class:`QueryCapReached`). The requests go through the probe's one transport (``probe.transport``), which
``attack --url``'s target uses too: a 429 or 503 with ``Retry-After`` is waited out as told, counted and sent
again (the wait is the endpoint's own defence, so it is reported, not hidden).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch

from .transport import API_KEY_ENV, EndpointRefused, HttpTransport, QueryCapReached, Traffic, raise_for

__all__ = ["API_KEY_ENV", "Endpoint", "EndpointOptions", "EndpointRefused", "Metadata", "QueryCapReached", "Traffic"]
LAYOUTS = ("auto", "NCHW", "NHWC", "flat")
OUTPUT_KINDS = ("auto", "logits", "probabilities", "label")
PROTOCOLS = ("auto", "v2", "v1")
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
INT_TYPES = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
}


@dataclass
class EndpointOptions:
    """How to reach an endpoint and shape its requests: what its metadata cannot say."""

    url: str
    model: str | None = None
    protocol: str = "auto"
    api_key: str | None = None
    pixel_scale: float = 1.0
    layout: str = "auto"
    class_order: list[int] | None = None
    output: str = "auto"
    output_name: str | None = None
    concurrency: int = 8
    max_queries: int | None = None
    timeout_s: float = 60.0
    max_wait_s: float = 120.0  # longest Retry-After waited out; a longer one (a spent quota) stops the audit
    retries: int = 50
    binary: bool = False  # v2 binary tensors (this server's and Triton's extension): a JSON header and raw bytes
    items_per_request: int = 1  # >1 only for an endpoint that answers items independently (no RCI)

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {self.output!r}")
        if self.pixel_scale <= 0:
            raise ValueError(f"pixel scale must be positive, got {self.pixel_scale}")
        if self.class_order is not None and sorted(self.class_order) != list(range(len(self.class_order))):
            raise ValueError(
                f"class order must be a permutation of 0..{len(self.class_order) - 1}, got {self.class_order}"
            )
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be positive, got {self.concurrency}")
        if self.items_per_request < 1:
            raise ValueError(f"items per request must be positive, got {self.items_per_request}")
        if self.binary and self.protocol == "v1":
            raise ValueError("binary tensors are a v2 extension: not with protocol v1")


@dataclass
class Metadata:
    """What the endpoint says about its model."""

    protocol: str
    name: str
    version: str | None
    input_name: str
    datatype: str
    shape: list[int]  # without the batch dimension; -1 where the endpoint leaves it open
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any]
    classes: list[str] | None

    @property
    def sha256(self) -> str | None:
        """The checkpoint's SHA-256 where the endpoint exposes one: this server's ``checkpoint_sha256`` (v2 metadata
        ``parameters``, ``/v1/models``), else the served card's ``model.sha256``."""
        p = self.parameters
        raw = p.get("card")
        card: dict[str, Any] = raw if isinstance(raw, dict) else {}
        for source in (p, card.get("model") or {}):
            if isinstance(source, dict):
                for key in ("checkpoint_sha256", "sha256"):
                    if isinstance(source.get(key), str):
                        return str(source[key])
        return None


def _strings(raw: bytes) -> list[str]:
    """A v2 binary BYTES tensor's elements."""
    out, i = [], 0
    while i + 4 <= len(raw):
        n = int.from_bytes(raw[i : i + 4], "little")
        out.append(raw[i + 4 : i + 4 + n].decode("utf-8", "replace"))
        i += 4 + n
    return out


class Endpoint:
    """A prediction endpoint as the attacks see it: ``predict_proba(x)`` on (n, C, H, W) inputs in [0, 1], one
    query per item, each item its own request (a randomized server codes a request's items together)."""

    def __init__(self, options: EndpointOptions, traffic: Traffic | None = None):
        options.validate()
        self.options = options
        self.transport = HttpTransport(
            options.url,
            api_key=options.api_key,
            concurrency=options.concurrency,
            timeout_s=options.timeout_s,
            retries=options.retries,
            max_wait_s=options.max_wait_s,
            max_queries=options.max_queries,
            traffic=traffic,
        )
        self.url = self.transport.url
        self.meta = self._metadata()
        self._scores_seen: bool | None = None  # what the last answer held: scores (True) or a label (False)

    @property
    def traffic(self) -> Traffic:
        return self.transport.traffic

    # -- the attacks' interface (as probe.targets' targets) --
    @property
    def queries(self) -> int:
        return self.traffic.queries

    @property
    def name(self) -> str:
        return f"{self.url} ({self.meta.protocol}, model {self.meta.name})"

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over the data set's classes (probabilities; a one-hot row when the endpoint answers labels)."""
        if len(x) == 0:
            return torch.zeros(0, self.n_classes or 0)
        items = x.detach().cpu().float().numpy()
        step = self.options.items_per_request
        answers = self.predict_requests([items[i : i + step] for i in range(0, len(items), step)])
        return torch.from_numpy(np.concatenate(answers)).float()

    def predict_label(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x).argmax(1)

    def predict_requests(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Each (n_i, C, H, W) array as its own request, sent concurrently; its items' scores per request.
        Every item is a query, all counted (and checked against the cap) before any is sent."""
        self.transport.charge(sum(len(r) for r in requests))
        built = [self._request(items) for items in requests]
        answers = self.transport.post_all(built)
        return [self._answer(r, len(items)) for r, items in zip(answers, requests, strict=True)]

    # -- metadata --
    def _get(self, path: str) -> httpx.Response:
        return self.transport.get(path)

    def _v1_models(self) -> list[dict[str, Any]] | None:
        r = self._get("/v1/models")
        if r.status_code == 401:
            raise_for(r, f"GET {self.url}/v1/models (pass --api-key or set {API_KEY_ENV})")
        return r.json() if r.status_code == 200 and isinstance(r.json(), list) else None

    def _metadata(self) -> Metadata:
        o = self.options
        v1 = self._v1_models() if o.protocol in ("auto", "v1") or o.model is None else None
        model = o.model
        if model is None:
            if not v1:
                raise ValueError(f"{self.url} lists no models on GET /v1/models: name the model with --model")
            model = v1[0]["name"]
        info = next((m for m in v1 or [] if m.get("name") == model), None)
        protocol = o.protocol
        if protocol == "v1" and info is None:
            raise ValueError(
                f"{self.url} serves no model {model!r} on GET /v1/models"
                + (f"; it serves {[m['name'] for m in v1]}" if v1 else "")
            )
        if protocol in ("auto", "v2"):
            r = self._get(f"/v2/models/{model}")
            if r.status_code == 200:
                m = r.json()
                inp = (m.get("inputs") or [{}])[0]
                shape = [int(s) for s in inp.get("shape", [])]
                if shape and shape[0] == -1:
                    shape = shape[1:]
                versions = m.get("versions") or []
                return Metadata(
                    "v2",
                    model,
                    str(versions[-1]) if versions else None,
                    inp.get("name", "input"),
                    inp.get("datatype", "FP32"),
                    shape,
                    list(m.get("outputs") or []),
                    dict(m.get("parameters") or {}),
                    list(info["classes"]) if info else None,
                )
            if protocol == "v2" or info is None:
                raise_for(r, f"GET {self.url}/v2/models/{model}")
                raise ValueError(f"GET {self.url}/v2/models/{model}: HTTP {r.status_code}")
        assert info is not None
        return Metadata(
            "v1",
            model,
            str(info.get("version")) if info.get("version") is not None else None,
            "inputs",
            "FP32",
            [int(s) for s in info["input_shape"]],
            [],
            {k: v for k, v in info.items() if k in ("rci", "card", "checkpoint_sha256")},
            list(info.get("classes") or []) or None,
        )

    @property
    def n_classes(self) -> int | None:
        if self.options.class_order:
            return len(self.options.class_order)
        if self.meta.classes:
            return len(self.meta.classes)
        for out in self.meta.outputs:
            shape = out.get("shape") or []
            if out.get("datatype") in FLOAT_TYPES and len(shape) >= 2 and int(shape[-1]) > 1:
                return int(shape[-1])
        return None

    def layout(self, image_shape: tuple[int, ...]) -> str:
        """The layout sent: the option, or (``auto``) the one the metadata's shape implies for (C, H, W) images."""
        if self.options.layout != "auto":
            return self.options.layout
        shape = self.meta.shape
        c, h, w = image_shape
        if len(shape) == 1:
            return "flat"
        if len(shape) == 3 and shape[-1] == c and shape[0] != c:
            return "NHWC"
        return "NCHW"

    def encode(self, items: np.ndarray) -> np.ndarray:
        """(n, C, H, W) in [0, 1] → the endpoint's layout and scale."""
        layout = self.layout(items.shape[1:])
        out = items * self.options.pixel_scale
        if layout == "NHWC":
            out = out.transpose(0, 2, 3, 1)
        elif layout == "flat":
            out = out.reshape(len(out), -1)
        return np.ascontiguousarray(out)

    # -- requests --
    def _request(self, items: np.ndarray) -> tuple[str, dict[str, Any]]:
        data = self.encode(items)
        dtype = self.meta.datatype
        if dtype in INT_TYPES:
            data = np.rint(data).astype(INT_TYPES[dtype])
        elif dtype in FLOAT_TYPES:
            data = data.astype(FLOAT_TYPES[dtype])
        if self.meta.protocol == "v1":
            path = f"/v1/models/{self.meta.name}/predict" if self.options.model else "/v1/predict"
            return path, {"json": {"inputs": data.tolist()}}
        path = f"/v2/models/{self.meta.name}/infer"
        tensor: dict[str, Any] = {"name": self.meta.input_name, "shape": list(data.shape), "datatype": dtype}
        body: dict[str, Any] = {"inputs": [tensor]}
        if self.options.output_name:
            body["outputs"] = [{"name": self.options.output_name}]
        if not self.options.binary:
            tensor["data"] = data.flatten().tolist()
            return path, {"json": body}
        raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        if self.options.output_name:
            body["outputs"][0]["parameters"] = {"binary_data": True}
        else:
            body["parameters"] = {"binary_data_output": True}
        head = json.dumps(body).encode()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        return path, {"content": head + raw, "headers": headers}

    def decode(self, payload: dict[str, Any], n: int) -> np.ndarray:
        """A response → (n, classes) scores over the data set's classes."""
        kind = self.options.output
        if self.meta.protocol == "v1":
            preds = payload["predictions"]
            if kind != "label" and all("probabilities" in p for p in preds):
                return self._scores(np.array([p["probabilities"] for p in preds], dtype=np.float64), kind)
            return self._one_hot(np.array([p["index"] for p in preds]))
        outputs = payload.get("outputs") or []
        if self.options.output_name:
            outputs = [o for o in outputs if o.get("name") == self.options.output_name]
            if not outputs:
                raise EndpointRefused(f"the endpoint's answer has no output {self.options.output_name!r}")
        scores = [
            o
            for o in outputs
            if o.get("datatype") in FLOAT_TYPES and len(o.get("shape", [])) >= 2 and int(o["shape"][-1]) > 1
        ]
        if scores and kind != "label":
            o = scores[0]
            return self._scores(np.asarray(o["data"], dtype=np.float64).reshape(n, -1), kind)
        labels = [o for o in outputs if o.get("datatype") in INT_TYPES or o.get("datatype") == "BYTES"]
        if labels:
            o = labels[0]
            if o["datatype"] == "BYTES":
                names = self.meta.classes or []
                values = [names.index(v) if v in names else int(v) for v in o["data"]]
                return self._one_hot(np.asarray(values).reshape(n))
            return self._one_hot(np.asarray(o["data"]).reshape(n))
        if scores:  # --output label on an endpoint that answers scores: keep only the top label
            return self._one_hot(np.asarray(scores[0]["data"], dtype=np.float64).reshape(n, -1).argmax(1))
        raise EndpointRefused(f"the endpoint's answer has no score or label output: {[o.get('name') for o in outputs]}")

    @property
    def returns_scores(self) -> bool:
        return self._scores_seen is not False and self.options.output != "label"

    def _reorder(self, scores: np.ndarray) -> np.ndarray:
        order = self.options.class_order
        if order is None:
            return scores
        out = np.empty_like(scores)
        out[:, order] = scores
        return out

    def _scores(self, s: np.ndarray, kind: str) -> np.ndarray:
        self._scores_seen = True
        if kind == "auto":
            kind = "probabilities" if s.min() >= 0 and np.allclose(s.sum(1), 1.0, atol=1e-3) else "logits"
        if kind == "logits":
            s = np.exp(s - s.max(1, keepdims=True))
            s = s / s.sum(1, keepdims=True)
        return self._reorder(s.astype(np.float32))

    def _one_hot(self, labels: np.ndarray) -> np.ndarray:
        self._scores_seen = False
        k = self.n_classes or int(labels.max()) + 1
        out = np.zeros((len(labels), k), dtype=np.float32)
        out[np.arange(len(labels)), labels.astype(int)] = 1.0
        return self._reorder(out)

    def _answer(self, r: httpx.Response, n: int) -> np.ndarray:
        if r.headers.get("inference-header-content-length") is None:
            return self.decode(r.json(), n)
        head = int(r.headers["inference-header-content-length"])  # v2 binary: a JSON header, then raw tensors
        payload = json.loads(r.content[:head])
        offset = head
        for out in payload.get("outputs") or []:
            size = (out.get("parameters") or {}).pop("binary_data_size", None)
            if size is not None:
                raw = r.content[offset : offset + size]
                offset += size
                if out["datatype"] == "BYTES":  # each element: a little-endian uint32 length, then its bytes
                    out["data"] = _strings(raw)
                    continue
                numeric = FLOAT_TYPES.get(out["datatype"]) or INT_TYPES.get(out["datatype"])
                if numeric is None:
                    raise EndpointRefused(
                        f"binary output {out.get('name')!r} of datatype {out['datatype']} is not read"
                    )
                out["data"] = np.frombuffer(raw, dtype=np.dtype(numeric).newbyteorder("<")).tolist()
        return self.decode(payload, n)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
