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


# ---- parallel runs (pytest-xdist, ``-n 2``; see tests/README.md) ----------------------------------------------------

RAY_MODULES = "test_ray_"  # modules that start Ray are named so: the parallel scheduler runs them one after another
FIRST = (  # the longest units, longest first (the rest: most tests first)
    "ray",
    "test_distributed.py",
    "test_report.py",
    "test_docker.py",
    "test_attacks.py",
    "test_repository.py",
    "test_audit.py",
    "test_art_agreement.py",
    "test_fast_at.py",
    "test_trainer.py",
    "test_adversarial_methods.py",
)


class _ByModule:
    """pytest-xdist's scheduler for ``-n N`` (its default ``--dist load``): each module's tests on one worker, so
    its module-scoped servers and models are made once; every Ray module in one unit, so two local Ray clusters
    never share the cores; the longest units first, so none starts last and leaves the other worker idle.
    (pytest-xdist's own ``loadgroup`` marks no longer take effect on pytest 9.)"""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":
            return None  # an explicit --dist is the caller's choice
        from xdist.scheduler import LoadFileScheduling

        class ByModule(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = super()._split_scope(nodeid)
                return "ray" if Path(path).name.startswith(RAY_MODULES) else path

            def _assign_work_unit(self, node) -> None:
                def rank(unit: str) -> tuple[int, int]:
                    name = Path(unit).name
                    return (FIRST.index(name) if name in FIRST else len(FIRST), -len(self.workqueue[unit]))

                for unit in sorted(self.workqueue, key=rank):
                    self.workqueue.move_to_end(unit)
                super()._assign_work_unit(node)

        return ByModule(config, log)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_ByModule(), "codedsmooth-by-module")


def pytest_collection_modifyitems(config, items):
    """A module that starts Ray must be named ``test_ray_*.py`` (the parallel scheduler groups them by name)."""
    misnamed = sorted(
        {
            item.path.name
            for item in items
            if item.get_closest_marker("ray") and not item.path.name.startswith(RAY_MODULES)
        }
    )
    if misnamed:
        raise pytest.UsageError(f"modules marked ray must be named {RAY_MODULES}*.py: {misnamed}")


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
