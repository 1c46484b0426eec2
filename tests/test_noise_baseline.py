"""The noise baseline: Gaussian draws from the random sources, and the server's --input-noise-sigma."""

import httpx
import numpy as np
import torch
from helpers import running_server
from scipy import stats

from codedsmooth.core import SeededRandomSource, SystemRandomSource
from codedsmooth.core.randomness import gaussian, uniforms
from codedsmooth.models import load_checkpoint
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.settings import ServeSettings
from codedsmooth.train import as_float


def test_gaussian_draws_are_standard_normal():
    draws = gaussian(SystemRandomSource(), 20_000).double().numpy()
    assert stats.kstest(draws, "norm").pvalue > 1e-4
    assert stats.normaltest(draws).pvalue > 1e-4
    u = uniforms(SystemRandomSource(), 50_000).numpy()
    assert 0 < u.min() and u.max() <= 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    odd = gaussian(SeededRandomSource(5), 3, 5)  # an odd count uses half a Box-Muller pair
    assert odd.shape == (3, 5) and odd.dtype == torch.float32
    assert torch.equal(odd, gaussian(SeededRandomSource(5), 3, 5))


def test_engine_adds_the_noise_it_draws_before_the_model(tiny_checkpoint, digits):
    ck = load_checkpoint(tiny_checkpoint)
    sigma = 0.3
    engine = InferenceEngine(
        ck, ServeSettings(rci=False, input_noise_sigma=sigma, rci_seed=7, rci_check_rate=0), torch.device("cpu")
    )
    requests = [as_float(digits.test_x[:1]), as_float(digits.test_x[1:4])]
    served = engine.run(requests).probabilities
    for x, probs in zip(requests, served):  # a seeded source restarts for every request
        noisy = x + sigma * gaussian(SeededRandomSource(7), *x.shape)
        with torch.no_grad():
            expected = torch.softmax(ck.model.eval()(noisy), 1).numpy()
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        clean = torch.softmax(ck.model(requests[1]), 1).numpy()
    assert np.abs(served[1] - clean).max() > 1e-3  # the noise reached the model


def test_server_draws_fresh_noise_for_every_request(tiny_checkpoint, digits):
    item = {"inputs": digits.test_x[:1].tolist()}
    with running_server(tiny_checkpoint, rci=False, input_noise_sigma=0.2, max_delay_ms=1) as server:
        answers = {
            tuple(
                httpx.post(server.url + "/v1/predict", json=item, timeout=30).json()["predictions"][0]["probabilities"]
            )
            for _ in range(5)
        }
    assert len(answers) == 5
    with running_server(tiny_checkpoint, rci=False, max_delay_ms=1) as server:
        answers = {
            tuple(
                httpx.post(server.url + "/v1/predict", json=item, timeout=30).json()["predictions"][0]["probabilities"]
            )
            for _ in range(3)
        }
    assert len(answers) == 1
