"""RCI as served: the engine and the attacker's model are one function, and the server's answers never repeat."""

import asyncio

import httpx
import numpy as np
import pytest
import torch
from helpers import running_server

from codedsmooth.core import SeededRandomSource, SystemRandomSource
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.targets import RCIModel
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.settings import ServeSettings
from codedsmooth.train import as_float


def _engine(ck, **settings):
    return InferenceEngine(ck, ServeSettings(rci_check_rate=0, **settings), torch.device("cpu"))


@pytest.mark.parametrize("tolerance", [0.0, None])
def test_engine_and_attacker_model_agree_in_request_scope(tiny_checkpoint, digits, tolerance):
    ck = load_checkpoint(tiny_checkpoint)
    sizes = [1, 3, 1, 20, 16]  # one-item, multi-item, larger than K = 16, exactly K
    x = torch.rand(sum(sizes), *ck.input_shape, generator=torch.Generator().manual_seed(0))
    requests = list(x.split(sizes))
    engine = _engine(ck, rci_seed=11, rci_decode_tolerance=tolerance)
    served = np.concatenate(engine.run(requests).probabilities)
    model = RCIModel(ck, ck.coding_spec(decode_tolerance=tolerance))
    assert model.spec == engine.spec
    with torch.no_grad():
        logits = model.serve(model.trunk(x), sizes, SeededRandomSource(11, per_unit=True))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), served, rtol=0, atol=1e-6)


def test_engine_and_attacker_model_agree_in_batch_scope(tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    victim = as_float(digits.test_x[:1])
    mates = torch.rand(
        20, *ck.input_shape, generator=torch.Generator().manual_seed(1)
    )  # 21 items: a full group and a padded one
    engine = _engine(ck, rci_seed=5, rci_scope="batch")
    served = engine.run([victim] + list(mates.split(1))).probabilities[0]
    model = RCIModel(ck, ck.coding_spec(scope="batch"))
    assert model.spec == engine.spec
    with torch.no_grad():
        logits = model.in_micro_batches(
            model.trunk(victim), model.trunk(mates).unsqueeze(0), [1] * 20, SeededRandomSource(5, per_unit=True)
        )
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), served, rtol=0, atol=1e-6)
    # and the victim's answer depends on its batch-mates (the model is the batch-coupled function)
    other = engine.run([victim] + list(torch.rand_like(mates).split(1))).probabilities[0]
    assert np.abs(np.log(other) - np.log(served)).max() > 1e-3  # log-probabilities: far beyond float32 rounding


def test_unseeded_engines_draw_from_the_os_and_differ(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    a, b = _engine(ck), _engine(ck)
    assert isinstance(a.random_source(), SystemRandomSource)
    x = [torch.rand(1, *ck.input_shape, generator=torch.Generator().manual_seed(2))]
    assert not np.array_equal(a.run(x).probabilities[0], b.run(x).probabilities[0])
    assert isinstance(_engine(ck, rci_seed=1).random_source(), SeededRandomSource)


def test_seeded_engine_warns_at_start(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="codedsmooth.engine"):
        _engine(load_checkpoint(tiny_checkpoint), rci_seed=3)
    assert "rci_seed is set" in caplog.text


async def _identical_requests(url, body, count):
    async with httpx.AsyncClient(timeout=60) as client:
        sem = asyncio.Semaphore(8)

        async def one():
            async with sem:
                r = await client.post(url + "/v1/predict", json=body)
                r.raise_for_status()
                return tuple(r.json()["predictions"][0]["probabilities"])

        return await asyncio.gather(*[one() for _ in range(count)])


def test_identical_requests_never_get_the_plain_answer_nor_the_same_answer_twice(tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    x = as_float(digits.test_x[:1])
    with torch.no_grad():
        plain = tuple(torch.softmax(ck.model(x), 1)[0].tolist())
    with running_server(tiny_checkpoint, max_delay_ms=1) as server:
        answers = asyncio.run(_identical_requests(server.url, {"inputs": x.tolist()}, 200))
    assert plain not in answers
    assert len(set(answers)) == len(answers) == 200
    # the answers are still the model's: RCI moves probabilities, mostly not the label
    labels = [int(np.argmax(a)) for a in answers]
    assert labels.count(int(np.argmax(plain))) >= 150
