"""A model repository on Ray Serve replicas: every replica serves every model, and an explicit load or unload sent
to one replica through the proxy reaches every replica (a real local Ray, 2 CPUs, started by this module).

Which replica answers a request is the proxy's choice, so "every replica" is checked by many requests: after an
unload that reached only one of two replicas, each request would still have an even chance of an answer.
Synchronised on answers and ``serve.status()``, never on sleeps.
"""

import shutil

import httpx
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from helpers import GOOD_ITEM  # noqa: E402
from ray_helpers import RayServer  # noqa: E402

from codedsmooth.train import TrainConfig, train  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRIES = 24  # requests per check: a model left on one of two replicas answers all of them with chance 2^-24


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_checkpoint, digits):
    root = tmp_path_factory.mktemp("ray-repo") / "models"
    root.mkdir()
    shutil.copytree(tiny_checkpoint, root / "coded")
    train(
        TrainConfig(
            method="erm",
            epochs=1,
            width=8,
            batch_size=16,
            out=str(root / "erm"),
            progress=False,
            seed=1,
            filler_size=32,
            max_steps=5,
        ),
        data=digits,
    )
    return root


def _answers(url: str, model: str) -> list[int]:
    with httpx.Client(timeout=60) as client:
        return [
            client.post(f"{url}/v1/models/{model}/predict", json={"inputs": [GOOD_ITEM]}).status_code
            for _ in range(TRIES)
        ]


def test_replicas_serve_the_repository_and_loads_reach_every_replica(repository):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        server = RayServer(
            None,
            model_repository=str(repository),
            model_control="explicit",
            replicas=2,
            ray_address=ray.get_runtime_context().gcs_address,
            rci=False,
            max_delay_ms=2,
            num_cpus=1,
        )
        try:
            server.wait_ready()
            url = server.url
            names = {m["name"] for m in httpx.get(url + "/v1/models", timeout=30).json()}
            assert names == {"coded", "erm"}
            assert set(_answers(url, "coded")) == {200} and set(_answers(url, "erm")) == {200}
            unload = httpx.post(f"{url}/v2/repository/models/erm/unload", timeout=120)
            assert unload.status_code == 200, unload.text
            assert 200 not in _answers(url, "erm")  # on no replica any more
            assert set(_answers(url, "coded")) == {200}  # the other model untouched
            load = httpx.post(f"{url}/v2/repository/models/erm/load", timeout=120)
            assert load.status_code == 200 and load.json()["state"] == "READY", load.text
            assert set(_answers(url, "erm")) == {200}  # back on every replica
            (repository / "coded" / "model.safetensors").rename(repository / "coded" / "weights.moved")
            broken = httpx.post(f"{url}/v2/repository/models/coded/load", timeout=120)
            assert broken.status_code == 400 and "model.safetensors" in broken.json()["error"], broken.text
            assert set(_answers(url, "coded")) == {200}  # the loaded version keeps serving on every replica
        finally:
            (repository / "coded" / "weights.moved").exists() and (repository / "coded" / "weights.moved").rename(
                repository / "coded" / "model.safetensors"
            )
            server.terminate(60)
    finally:
        serve.shutdown()
        ray.shutdown()
