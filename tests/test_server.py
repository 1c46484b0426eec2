"""The server on a real port: agreement with in-process inference, v2 with tritonclient, metrics, isolation."""

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from helpers import metric_samples, running_server
from PIL import Image

from codedsmooth.core.spec import DEFAULT_DECODE_TOLERANCE
from codedsmooth.models import load_checkpoint
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.settings import ServeSettings


def predict(url, x: torch.Tensor) -> np.ndarray:
    r = httpx.post(url + "/v1/predict", json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)


@pytest.fixture(scope="module")
def plain_server(tiny_checkpoint):
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=2) as server:
        yield server


def test_rci_off_equals_in_process_model_exactly(plain_server, tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    x = digits.test_x[:7]
    got = predict(plain_server.url, x)
    with torch.no_grad():
        expected = torch.softmax(ck.model(x), 1).numpy()
    np.testing.assert_array_equal(got, expected)
    body = httpx.post(plain_server.url + "/v1/predict", json={"inputs": x[:1].tolist()}).json()
    assert body["rci"]["enabled"] is False
    assert body["predictions"][0]["label"] == ck.classes[int(expected[0].argmax())]


def test_rci_on_with_fixed_seed_equals_in_process_engine(tiny_checkpoint, digits):
    x = digits.test_x[:5]
    for scope in ("request", "batch"):
        settings = ServeSettings(rci_seed=123, rci_scope=scope, coded_points=20, rci_check_rate=0)
        engine = InferenceEngine(load_checkpoint(tiny_checkpoint), settings, torch.device("cpu"))
        expected = engine.run([x]).probabilities[0]
        with running_server(
            tiny_checkpoint, rci_seed=123, rci_scope=scope, coded_points=20, rci_check_rate=0
        ) as server:
            got = predict(server.url, x)
            body = httpx.post(server.url + "/v1/predict", json={"inputs": x[:1].tolist()}).json()
            (info,) = httpx.get(server.url + "/v1/models").json()
        np.testing.assert_array_equal(got, expected)
        assert body["rci"] == {"enabled": True, "scope": scope}  # a prediction says whether and how it was coded
        assert info["rci"] == {  # the model list has the whole spec
            "enabled": True,
            "scope": scope,
            "group_size": 16,
            "coded_points": 20,
            "data_point_kind": "equispaced",
            "coded_point_kind": "chebyshev-gauss",
            "decode_tolerance": DEFAULT_DECODE_TOLERANCE if scope == "request" else 0.0,
        }


async def _concurrent(url, bodies):
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*[client.post(url + "/v1/predict", json=b) for b in bodies])


def _victim_under_batch_mates(server, victim, mates):
    bodies = [{"inputs": victim.tolist()}] + [{"inputs": m.tolist()} for m in mates]
    before = metric_samples(server)
    responses = asyncio.run(_concurrent(server.url, bodies))
    after = metric_samples(server)
    assert all(r.status_code == 200 for r in responses)
    batches = after[("codedsmooth_batch_requests_count", ())] - before.get(("codedsmooth_batch_requests_count", ()), 0)
    requests = after[("codedsmooth_batch_requests_sum", ())] - before.get(("codedsmooth_batch_requests_sum", ()), 0)
    assert requests == len(bodies) and batches < requests, "requests were not batched together"
    return np.array(responses[0].json()["predictions"][0]["probabilities"])


def test_request_scope_result_does_not_depend_on_batch_mates(tiny_checkpoint, digits):
    victim = digits.test_x[:1]
    gen = torch.Generator().manual_seed(0)
    noisy = [torch.rand(3, 1, 8, 8, generator=gen) for _ in range(4)]
    bright = [torch.ones(3, 1, 8, 8) for _ in range(4)]
    with running_server(
        tiny_checkpoint, rci_seed=7, rci_scope="request", max_delay_ms=300, max_batch_size=64
    ) as server:
        alone = predict(server.url, victim)[0]
        with_noise = _victim_under_batch_mates(server, victim, noisy)
        with_bright = _victim_under_batch_mates(server, victim, bright)
    # Same batch shapes, very different contents: bit-identical answers.
    np.testing.assert_array_equal(with_noise, with_bright)
    # Alone, the device batch has another size, so BLAS may sum in another order: float32 rounding only.
    np.testing.assert_allclose(with_noise, alone, rtol=0, atol=1e-6)


def test_batch_scope_result_depends_on_batch_mates(tiny_checkpoint, digits):
    victim = digits.test_x[:1]
    gen = torch.Generator().manual_seed(0)
    noisy = [torch.rand(3, 1, 8, 8, generator=gen) for _ in range(4)]
    with running_server(
        tiny_checkpoint,
        rci_seed=7,
        rci_scope="batch",
        coded_points=16,
        max_delay_ms=300,
        max_batch_size=64,
        rci_check_rate=1.0,
    ) as server:
        alone = predict(server.url, victim)[0]
        with_noise = _victim_under_batch_mates(server, victim, noisy)
        samples = metric_samples(server)
    assert np.abs(with_noise - alone).max() > 1e-3  # far beyond float32 rounding
    # every batch was also checked against the uncoded model: flips are counted over all items
    assert samples[("codedsmooth_rci_checked_items_total", ())] == 1 + 1 + 12
    assert 0 <= samples[("codedsmooth_rci_label_flips_total", ())] <= 14


def test_metrics_count_what_was_sent(tiny_checkpoint, digits):
    with running_server(tiny_checkpoint, max_delay_ms=1) as server:
        sizes = [1, 2, 3, 4, 5]
        for n in sizes:
            predict(server.url, digits.test_x[:n])
        httpx.post(server.url + "/v1/predict", json={"inputs": []})
        s = metric_samples(server)
    assert s[("codedsmooth_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == len(sizes)
    assert s[("codedsmooth_requests_total", (("endpoint", "/v1/predict"), ("status", "422")))] == 1
    assert s[("codedsmooth_request_latency_seconds_count", (("endpoint", "/v1/predict"),))] == len(sizes) + 1
    assert s[("codedsmooth_batch_size_sum", ())] == sum(sizes)
    assert s[("codedsmooth_queue_wait_seconds_count", ())] == len(sizes)
    assert s[("codedsmooth_inference_seconds_count", ())] == s[("codedsmooth_batch_size_count", ())]
    assert s[("codedsmooth_rci_coding_groups_sum", ())] == len(sizes)  # one group per request of <= K items
    assert s[("codedsmooth_model_ready", ())] == 1


def test_tritonclient_health_metadata_and_infer(plain_server, tiny_checkpoint, digits):
    import tritonclient.http as httpclient

    ck = load_checkpoint(tiny_checkpoint)
    client = httpclient.InferenceServerClient(url=plain_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(ck.name)
    meta = client.get_model_metadata(ck.name)
    assert meta["inputs"][0]["shape"] == [-1, *ck.input_shape]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "index"]
    x = digits.test_x[:4].numpy()
    with torch.no_grad():
        expected = torch.softmax(ck.model(torch.from_numpy(x)), 1).numpy()
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("index", binary_data=binary),
        ]
        result = client.infer(ck.name, [inp], outputs=outputs)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
        np.testing.assert_array_equal(result.as_numpy("index"), expected.argmax(1))
    # no outputs named: all outputs come back in binary
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer(ck.name, [inp]).as_numpy("probabilities"), expected)
    with pytest.raises(Exception, match="unknown model"):
        client.get_model_metadata("nope")
    client.close()


def test_image_endpoint_matches_tensor_endpoint(plain_server, digits):
    x = digits.test_x[:3]
    pixels = (x * 255).round().to(torch.uint8)
    files = []
    for i, img in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(img[0].numpy(), mode="L").save(buf, format="PNG")
        files.append(("files", (f"{i}.png", buf.getvalue(), "image/png")))
    r = httpx.post(plain_server.url + "/v1/predict/image", files=files)
    assert r.status_code == 200, r.text
    got = np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, predict(plain_server.url, pixels.float() / 255), atol=1e-6)


def test_openapi_document_describes_the_api(plain_server):
    doc = httpx.get(plain_server.url + "/openapi.json").json()
    for path in ("/v1/predict", "/v1/predict/image", "/v1/models", "/v2/models/{name}/infer", "/health/ready"):
        assert path in doc["paths"], path
    assert "/metrics" not in doc["paths"]  # on the metrics port only
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schemas = doc["components"]["schemas"]

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].split("/")[-1]
                assert name in schemas, node["$ref"]
            for v in node.values():
                resolve(v)
        elif isinstance(node, list):
            for v in node:
                resolve(v)

    resolve(doc)
    assert "inputs" in schemas[body["$ref"].split("/")[-1]]["properties"]
    assert "422" in doc["paths"]["/v1/predict"]["post"]["responses"]


def test_deadline_passes_in_queue_gives_504(tiny_checkpoint, digits):
    with running_server(tiny_checkpoint, max_delay_ms=400, timeout_ms=100, max_batch_size=64) as server:
        r = httpx.post(server.url + "/v1/predict", json={"inputs": digits.test_x[:1].tolist()})
        assert r.status_code == 504 and "error" in r.json()
        assert httpx.get(server.url + "/health/ready").status_code == 200
        s = metric_samples(server)
        assert s[("codedsmooth_requests_total", (("endpoint", "/v1/predict"), ("status", "504")))] == 1
