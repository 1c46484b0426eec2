import pytest
import torch

from codedsmooth.train import TrainConfig, load_dataset, train


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, digits):
    """A small coded-smoothing CNN on digits, trained in a few seconds."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = TrainConfig(
        method="coded", epochs=4, width=8, batch_size=16, out=str(out), progress=False, seed=0, filler_size=32
    )
    train(cfg, data=digits)
    return out


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield
