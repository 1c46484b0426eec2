"""The CIFAR-10 path on small synthetic CIFAR-shaped data: python batches → four methods on
PreActResNet-18 → RCI at layer4 → an adaptive attack (the GPU run uses the same code)."""

import os
import pickle

import numpy as np
import pytest
import torch

from codedsmooth.core.attacks import apgd
from codedsmooth.models import load_checkpoint
from codedsmooth.probe.targets import RCIModel
from codedsmooth.train import TrainConfig, as_float, load_dataset, train


def _write_cifar10(root, per_batch=16, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]

    def batch(n):
        y = rng.integers(0, 10, n)
        # a class-dependent mean colour, so the classes can be learned at all
        x = np.clip(rng.normal(25 * y[:, None], 40, (n, 3072)), 0, 255).astype(np.uint8)
        return {b"data": x, b"labels": [int(v) for v in y]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    return folder


def test_cifar10_batches_load_with_their_shapes_and_classes(tmp_path):
    _write_cifar10(tmp_path)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        data = load_dataset("cifar10", where)
        assert tuple(data.train_x.shape) == (80, 3, 32, 32) and tuple(data.test_x.shape) == (16, 3, 32, 32)
        assert data.train_x.dtype == torch.uint8 and data.classes[3] == "class3"


def test_cifar10_batches_that_run_code_or_are_wrong_are_refused(tmp_path):
    folder = _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refuses to load"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(ValueError, match="data_batch_3.*3072"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.slow
def test_four_methods_train_on_cifar_shapes_and_rci_attacks_run_at_layer4(tmp_path):
    _write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    x = as_float(data.test_x[:6])
    y = data.test_y[:6]
    pool = as_float(data.train_x[:32])
    for method in ("erm", "mixup", "coded", "pgd-at"):
        out = tmp_path / method
        train(
            TrainConfig(
                data="cifar10",
                data_dir=str(tmp_path),
                method=method,
                width=4,
                batch_size=8,
                epochs=1,
                max_steps=2,
                at_steps=2,
                filler_size=16,
                out=str(out),
                progress=False,
            ),
            data=data,
        )
        ck = load_checkpoint(out)
        assert ck.config.arch == "preact_resnet18" and ck.target_block == "layer4" and ck.input_shape == (3, 32, 32)
        if method == "pgd-at":
            assert abs(ck.config.training.adversarial_training["eps"] - 8 / 255) < 1e-12
        for scope in ("request", "batch"):
            model = RCIModel(ck, ck.coding_spec(scope=scope), pool, seed=1)
            x_adv = apgd(model, x, y, 8 / 255, steps=2, eot=2)
            assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
            assert model(x_adv).shape == (6, 10)
