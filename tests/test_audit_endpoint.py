"""The audit's endpoint adapter against a real server: the metadata it reads, and how it shapes requests and reads
answers (layouts, pixel scale, class order, logits, labels) against independent torch/numpy computations."""

import hashlib

import numpy as np
import pytest
import torch
from helpers import running_server

from codedsmooth.models import load_checkpoint
from codedsmooth.probe.endpoint import Endpoint, EndpointOptions, QueryCapReached


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1) as s:
        yield s


def test_metadata_of_both_protocols(server, tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    with Endpoint(EndpointOptions(server.url)) as v2, Endpoint(EndpointOptions(server.url, protocol="v1")) as v1:
        for e in (v2, v1):
            assert (
                e.meta.name == ck.name
                and e.meta.shape == list(ck.input_shape)
                and e.n_classes == len(ck.config.classes)
            )
        assert (v2.meta.protocol, v2.meta.input_name, v2.meta.datatype, v2.meta.version) == ("v2", "input", "FP32", "1")
        assert v1.meta.protocol == "v1"
        assert ck.sha256 is not None and len(ck.sha256) == 64
        assert (
            v2.meta.sha256
            == v1.meta.sha256
            == hashlib.sha256(ck.path.joinpath("model.safetensors").read_bytes()).hexdigest()
        )


def test_both_protocols_answer_the_checkpoints_probabilities_and_every_query_counts(server, tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    x = digits.test_x[:5].float() / 255 if digits.test_x.dtype == torch.uint8 else digits.test_x[:5].float()
    with torch.no_grad():
        want = torch.softmax(ck.model.eval()(x), 1)
    for protocol in ("v2", "v1"):
        with Endpoint(EndpointOptions(server.url, protocol=protocol, max_queries=7)) as e:
            torch.testing.assert_close(e.predict_proba(x), want, atol=1e-4, rtol=0)
            assert e.queries == 5 and e.traffic.requests == 5
            with pytest.raises(QueryCapReached):
                e.predict_proba(x)
            assert e.queries == 5  # refused before anything was sent


def test_layouts_scale_class_order_and_output_kinds(server):
    rng = np.random.default_rng(0)
    items = rng.random((2, 3, 4, 5)).astype(np.float32)
    with Endpoint(EndpointOptions(server.url, layout="NHWC", pixel_scale=255.0)) as e:
        assert np.array_equal(e.encode(items), np.stack([np.moveaxis(i, 0, -1) for i in items]) * 255)
    with Endpoint(EndpointOptions(server.url, layout="flat")) as e:
        assert e.encode(items).shape == (2, 60) and np.array_equal(e.encode(items)[1], items[1].ravel())
    logits = rng.normal(size=(2, 10))
    order = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]  # output j is the data set's class order[j]
    with Endpoint(EndpointOptions(server.url, output="logits", class_order=order)) as e:
        got = e.decode(
            {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [2, 10], "data": logits.ravel().tolist()}]}, 2
        )
        soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for j, c in enumerate(order):
            np.testing.assert_allclose(got[:, c], soft[:, j], rtol=1e-5)
        labels = e.decode({"outputs": [{"name": "index", "datatype": "INT64", "shape": [2], "data": [0, 4]}]}, 2)
        assert labels.argmax(1).tolist() == [3, 4] and labels.sum() == 2 and not e.returns_scores
