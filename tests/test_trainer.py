import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from codedsmooth.models import load_checkpoint
from codedsmooth.train import TrainConfig, load_dataset, train


@pytest.mark.parametrize("method", ["erm", "mixup", "coded"])
def test_each_method_learns_digits(method, digits, tmp_path):
    res = train(
        TrainConfig(method=method, epochs=3, width=8, batch_size=32, out=str(tmp_path / method), progress=False),
        data=digits,
    )
    assert res.test_accuracy > 0.5  # chance is 0.1
    ck = load_checkpoint(res.checkpoint)
    assert ck.config.method == method
    assert len(ck.config.history) == 3
    if method == "coded":
        ns = [h["n"] for h in ck.config.history]
        assert ns[0] == 32 and ns[-1] == 48
        assert all(h["coded_loss"] > 0 for h in ck.config.history)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match=r"n_end must be >= batch_size \(K=32\), got 16"):
        TrainConfig(batch_size=32, n_end=16).validate()
    with pytest.raises(ValueError, match="method must be one of .*'sgd'"):
        TrainConfig(method="sgd").validate()


def test_imagefolder_built_on_the_fly(tmp_path):
    rng = np.random.default_rng(0)
    for cls, base in (("dark", 40), ("light", 210)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(12):
            arr = np.clip(base + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / cls / f"{i}.png")
    data = load_dataset("imagefolder", tmp_path / "data", image_size=8)
    assert data.classes == ["dark", "light"] and data.input_shape == (3, 8, 8)
    assert len(data.train_x) + len(data.test_x) == 24
    res = train(
        TrainConfig(
            data="imagefolder",
            arch="small_cnn",
            method="coded",
            epochs=5,
            width=4,
            batch_size=6,
            lr=0.05,
            out=str(tmp_path / "ck"),
            progress=False,
        ),
        data=data,
    )
    assert res.test_accuracy >= 0.5


def test_cli_train_writes_checkpoint_and_rejects_bad_options(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "codedsmooth.cli",
            "train",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--width",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"] == str(out)
    assert "epoch 1/1" in proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "codedsmooth.cli", "train", "--data", "cifar10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "data_dir" in bad.stderr and "Traceback" not in bad.stderr


def test_import_from_a_directory_with_its_own_models_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import codedsmooth.core, codedsmooth.models; import models"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "the user folder was imported" in proc.stderr  # the user's own `models` is theirs
    proc = subprocess.run(
        [sys.executable, "-c", "import codedsmooth.core, codedsmooth.models"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_pgd_at_trains_loads_and_is_more_robust_than_erm(digits, tmp_path):
    from helpers import correct_per_image

    from codedsmooth.core.attacks import pgd

    eps = 0.1
    robust = {}
    for method in ("erm", "pgd-at"):
        cfg = TrainConfig(
            method=method,
            epochs=3,
            width=8,
            batch_size=32,
            at_eps=eps,
            at_steps=5,
            seed=0,
            out=str(tmp_path / method),
            progress=False,
        )
        res = train(cfg, data=digits)
        ck = load_checkpoint(res.checkpoint)
        assert ck.config.method == method
        model = ck.model.eval()
        x_adv = pgd(model, digits.test_x, digits.test_y, eps, steps=20, generator=torch.Generator().manual_seed(0))
        robust[method] = float(correct_per_image(model, x_adv, digits.test_y).float().mean())
        if method == "pgd-at":
            assert res.test_accuracy > 0.85
            at = ck.config.training.model_dump()["adversarial_training"]
            assert at == {
                "eps": eps,
                "steps": 5,
                "step_size": 2.5 * eps / 5,
                "warmup": 0.3,
                "random_start": True,
                "loss": "ce",
                "attack_mode": "train",
            }
        else:
            assert ck.config.training.model_dump()["adversarial_training"] is None
    print(f"digits, PGD-20 at eps {eps}: robust accuracy {robust}")
    assert robust["pgd-at"] > robust["erm"] + 0.1, robust


def test_adversarial_training_defaults_follow_the_data_and_bn_stats_stay_frozen_while_attacking():
    from codedsmooth.train.adversarial import FrozenBatchNormStats, adversarial_training_settings

    mnist_like = adversarial_training_settings(TrainConfig(method="pgd-at"), (1, 28, 28))
    assert mnist_like["eps"] == 0.3 and mnist_like["steps"] == 10 and abs(mnist_like["step_size"] - 0.075) < 1e-12
    cifar_like = adversarial_training_settings(TrainConfig(method="pgd-at", at_steps=7), (3, 32, 32))
    assert abs(cifar_like["eps"] - 8 / 255) < 1e-12 and abs(cifar_like["step_size"] - 2.5 * (8 / 255) / 7) < 1e-12
    with pytest.raises(ValueError, match=r"at_eps must be in \(0, 1\]"):
        TrainConfig(method="pgd-at", at_eps=2.0).validate()
    bn = torch.nn.BatchNorm2d(3).train()
    with FrozenBatchNormStats(bn):
        bn(torch.randn(8, 3, 4, 4) + 5)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0 and bn.momentum == 0.1
    bn(torch.randn(8, 3, 4, 4) + 5)
    assert float(bn.running_mean.min()) > 0.3


def test_every_method_is_one_registered_objective_that_agrees_with_the_method_vocabulary():
    from codedsmooth.models import METHODS
    from codedsmooth.models.config import ADVERSARIAL_METHODS, CODED_METHODS
    from codedsmooth.train.objectives import OBJECTIVES

    assert set(OBJECTIVES) == set(METHODS)
    assert {m for m, o in OBJECTIVES.items() if o.uses_code} == set(CODED_METHODS)
    cfg = TrainConfig()
    assert {m for m, o in OBJECTIVES.items() if o.attack_settings(cfg, (1, 28, 28)) is not None} == set(
        ADVERSARIAL_METHODS
    )
