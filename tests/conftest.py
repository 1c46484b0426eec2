import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

import pytest
import torch

from codedsmooth.train import TrainConfig, load_dataset, train


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def _trained_once(tmp_path_factory, name: str, cfg: TrainConfig, data) -> Path:
    """The checkpoint ``cfg`` trains, made once per run: under xdist the first worker trains it into the run's
    shared temporary directory (under a lock) and the others read it (the tests only read checkpoints)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp(name) / name
        train(dataclasses.replace(cfg, out=str(out)), data=data)
        return out
    root = tmp_path_factory.getbasetemp().parent / "shared-checkpoints"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # left by a worker that failed half-way
            train(dataclasses.replace(cfg, out=str(out)), data=data)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, digits):
    """A small coded-smoothing CNN on digits, trained in a few seconds."""
    cfg = TrainConfig(method="coded", epochs=4, width=8, batch_size=16, progress=False, seed=0, filler_size=32)
    return _trained_once(tmp_path_factory, "tiny", cfg, digits)


@pytest.fixture(scope="session")
def plain_erm_checkpoint(tmp_path_factory, digits):
    """A plain ERM CNN on digits (no coding), the model the label-only attacks are validated on."""
    cfg = TrainConfig(method="erm", epochs=3, width=8, batch_size=16, progress=False, seed=0)
    return _trained_once(tmp_path_factory, "erm", cfg, digits)


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield


# ---- parallel runs (pytest-xdist, ``-n 2 --dist loadgroup``; see tests/README.md) -------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` a module's tests run on one worker, so its module-scoped servers and models
    are made once; every Ray test shares one group, so two local Ray clusters never share the machine's cores.
    (Marks only: without xdist they change nothing.)"""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = "ray" if item.get_closest_marker("ray") else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _alone_when_marked(request, tmp_path_factory):
    """Under xdist, a test marked ``alone`` (it loads the CPUs on purpose, or bounds latencies) runs while no other
    worker runs a test: it takes an exclusive lock that every other test takes shared. A turnstile lock, taken
    first by both, keeps the exclusive taker from waiting forever behind back-to-back shared ones."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
    exclusive = request.node.get_closest_marker("alone") is not None
    with open(root / "alone.turnstile", "a") as turnstile, open(root / "alone.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
