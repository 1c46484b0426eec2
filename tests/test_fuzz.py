"""Property-based fuzz of every request body against a real server: JSON, v2 header + binary, multipart.

Fixed example budget, derandomized (the same examples every run). The property: the server never
answers 500 (nor closes the connection), whatever the body; after each kind of body, the metrics port
confirms 0 × 500 (each test checks its own, so they pass in any order).
"""

import json
from collections import Counter

import httpx
import numpy as np
import pytest
from helpers import metric_samples, running_server
from hypothesis import HealthCheck, given, settings, strategies as st

from codedsmooth.service.errors import MAX_ERROR_CHARS

BUDGET = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)
SEEN: Counter = Counter()  # (body kind, status) -> count

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=40,
)
numbers = (
    st.floats(-2, 2)
    | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300])
    | st.integers(-3, 3)
    | st.booleans()
    | st.none()
    | st.just("0.5")
)
dims = st.integers(-3, 10) | st.sampled_from([2**32, 2**63, 2**64, 2**70, 1.0, True, False, "8", None])


def nested(leaf, depth):
    if depth == 0:
        return leaf
    return st.lists(nested(leaf, depth - 1), min_size=0, max_size=9)


predict_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "inputs": st.one_of(
                json_values, nested(numbers, 4), st.lists(st.just(np.full((1, 8, 8), 0.5).tolist()), max_size=40)
            )
        }
    ),
    st.fixed_dictionaries({"inputs": nested(numbers, 3)}, optional={"extra": json_values}),
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_delay_ms=1, max_body_bytes=1_000_000) as srv:
        srv.model = httpx.get(srv.url + "/v1/models").json()[0]["name"]
        with httpx.Client(base_url=srv.url, timeout=30) as client:  # one keep-alive connection for all examples
            srv.client = client
            yield srv


LIBRARY_PHRASES = ("maximum number of dimension", "inhomogeneous", "unexpected character", "(char ", "Traceback")


def _check(kind: str, r: httpx.Response) -> None:
    SEEN[(kind, r.status_code)] += 1
    assert r.status_code == 200 or 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
    if r.status_code != 200:
        message = r.json().get("error")
        assert isinstance(message, str)
        assert len(message) <= MAX_ERROR_CHARS + 40, (kind, len(message))  # cut, with the length it had
        assert not any(p in message for p in LIBRARY_PHRASES), (kind, message)  # the service's words, not a library's


def _statuses(server) -> Counter:
    statuses: Counter = Counter()
    for (name, labels), value in metric_samples(server).items():
        if name == "codedsmooth_requests_total":
            statuses[dict(labels)["status"]] += value
    return statuses


def _fuzz(server, kind: str, examples) -> None:
    """Run the hypothesis test ``examples``; then the server's own count agrees: 0 × 500, and the budget ran."""
    before = sum(v for (k, _), v in SEEN.items() if k == kind)
    examples()
    statuses = _statuses(server)
    ran = sum(v for (k, _), v in SEEN.items() if k == kind) - before
    print(
        f"fuzz {kind}: {ran} examples, by status: {dict(sorted((st, n) for (k, st), n in SEEN.items() if k == kind))}; server counted {dict(statuses)}"
    )
    assert statuses.get("500", 0) == 0
    assert ran >= 200  # the budget ran (hypothesis may stop a strategy early once it is exhausted)


def test_fuzz_v1_json(server):
    @BUDGET
    @given(
        body=predict_bodies,
        raw=st.one_of(st.none(), st.binary(max_size=200)),
        content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
    )
    def examples(body, raw, content_type):
        data = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
        headers = {"content-type": content_type} if content_type else {}
        _check("v1 json", server.client.post("/v1/predict", content=data, headers=headers))

    _fuzz(server, "v1 json", examples)


v2_inputs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "INPUT", "", "x"]) | st.integers(),
        "shape": st.one_of(st.just([1, 1, 8, 8]), st.lists(dims, max_size=5), dims),
        "datatype": st.sampled_from(["FP32", "FP16", "FP64", "INT64", "BYTES", "BOOL", "fp32"]) | st.integers(),
    },
    optional={
        "data": st.one_of(st.just([0.5] * 64), st.lists(numbers, max_size=70), nested(numbers, 3), json_values),
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-5, 600) | st.booleans() | st.text(max_size=3) | st.just(256)}
        ),
    },
)
v2_headers = st.fixed_dictionaries(
    {"inputs": st.lists(v2_inputs, max_size=3) | json_values},
    optional={
        "id": st.text(max_size=5) | st.integers(),
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_output": st.booleans() | st.sampled_from(["false", "true", 0, 1, None])}
        ),
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["probabilities", "index", "logits"]) | st.integers()},
                optional={
                    "parameters": st.fixed_dictionaries(
                        {}, optional={"binary_data": st.booleans() | st.sampled_from(["no", 1, None])}
                    )
                },
            ),
            max_size=3,
        )
        | json_values,
    },
)


def test_fuzz_v2_header_and_binary(server):
    @BUDGET
    @given(
        header=v2_headers,
        binary=st.one_of(st.just(b""), st.just(np.full(64, 0.5, dtype=np.float32).tobytes()), st.binary(max_size=300)),
        length=st.one_of(
            st.none(),
            st.just("exact"),
            st.text(alphabet="0123456789_+-x", min_size=1, max_size=6),
            st.integers(-10, 10**6).map(str),
        ),
        model=st.sampled_from(["{model}", "nope", "{model}/versions/1", "{model}/versions/2"]),
    )
    def examples(header, binary, length, model):
        head = json.dumps(header, allow_nan=True).encode()
        headers = {"content-type": "application/octet-stream" if length else "application/json"}
        if length == "exact":
            headers["inference-header-content-length"] = str(len(head))
        elif length is not None:
            headers["inference-header-content-length"] = length
        path = "/v2/models/" + model.format(model=server.model) + "/infer"
        _check("v2", server.client.post(path, content=head + (binary if length else b""), headers=headers))

    _fuzz(server, "v2", examples)


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


files_strategy = st.lists(
    st.tuples(
        st.sampled_from(["files", "file", "picture", ""]),
        st.text(max_size=10),
        st.one_of(
            st.binary(max_size=300),
            st.integers(0, 255).map(_png),
            st.integers(0, 255).map(lambda v: _png(v)[: 20 + v % 40]),
        ),
        st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain"]),
    ),
    max_size=5,
)


def test_fuzz_multipart(server):
    @BUDGET
    @given(
        files=files_strategy,
        garbage=st.one_of(st.none(), st.binary(max_size=300)),
        boundary=st.sampled_from(["", "; boundary=abc", "; boundary=", '; boundary="x"']),
    )
    def examples(files, garbage, boundary):
        if garbage is None and files:
            r = server.client.post(
                "/v1/predict/image", files=[(field, (name, data, ctype)) for field, name, data, ctype in files]
            )
        else:
            r = server.client.post(
                "/v1/predict/image", content=garbage or b"", headers={"content-type": "multipart/form-data" + boundary}
            )
        _check("multipart", r)

    _fuzz(server, "multipart", examples)
