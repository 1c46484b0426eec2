"""fast-at and coded-fast-at: the FGSM examples against a hand-made reference, a tiny end-to-end run, and a forced collapse restored.

The collapse is forced the way it happens in practice: after half of training the test's method
trains on single huge FGSM steps (no random start, to the corners of a larger ε-ball), which makes
the model fit its attack; the trainer's own check must notice that PGD accuracy fell while FGSM
accuracy rose, restore the last good epoch's weights and say so.
"""

import json
import logging

import torch
import torch.nn.functional as F

from codedsmooth.cli import build_parser
from codedsmooth.core.attacks import pgd
from codedsmooth.models import build_model, load_checkpoint
from codedsmooth.train import TrainConfig, as_float, train
from codedsmooth.train.adversarial import _Attacking
from codedsmooth.train.objectives import OBJECTIVES, FastAt
from codedsmooth.train.overfitting import CHECK_SIZE, CollapseGuard, held_out_batch
from codedsmooth.train.trainer import _arch_kwargs

EPS = 0.2


def _wong_fgsm(model, x, y, eps, alpha, generator):
    """Wong, Rice and Kolter's FGSM with a random start, as in their code: δ ~ U(−ε, ε), kept in [0, 1]; δ += α·sign(∇); δ clipped to ε."""
    delta = (torch.rand(x.shape, generator=generator, dtype=torch.float64) * 2 - 1).float() * eps
    delta = torch.max(torch.min(delta, 1 - x), -x).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
    delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def test_fast_at_trains_on_one_fgsm_step_of_1_25_eps_from_a_random_start(digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", **_arch_kwargs("small_cnn", digits, 8))
    x, y = as_float(digits.train_x[:32]), digits.train_y[:32]
    cfg = TrainConfig(method="fast-at", at_eps=EPS)
    at = FastAt.attack_settings(cfg, digits.input_shape)
    assert at["steps"] == 1 and abs(at["step_size"] - 1.25 * EPS) < 1e-12 and at["random_start"] is True
    objective = FastAt(cfg, model, model, None, at, torch.Generator(), torch.Generator().manual_seed(5))
    for progress, scale in ((1.0, 1.0), (0.1, 0.1 / 0.3)):  # in the warm-up ε and the step scale by progress / 0.3
        got = objective.examples(x, y, progress)
        objective.at_gen.manual_seed(5)
        with _Attacking(model):
            want = _wong_fgsm(model, x, y, scale * EPS, scale * 1.25 * EPS, torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert float((got - x).abs().max()) <= scale * EPS + 1e-6 and float((got - x).abs().max()) > 0.9 * scale * EPS
        objective.at_gen.manual_seed(5)


def test_fast_at_and_coded_fast_at_train_end_to_end_with_a_check_every_epoch(digits, tmp_path):
    for method in ("fast-at", "coded-fast-at"):
        assert build_parser().parse_args(["train", "--method", method]).method == method
        cfg = TrainConfig(
            method=method,
            epochs=2,
            width=8,
            batch_size=16,
            at_eps=EPS,
            train_size=400,
            out=str(tmp_path / method),
            progress=False,
            seed=0,
        )
        result = train(cfg, data=digits)
        config = json.loads((result.checkpoint / "config.json").read_text())
        at = config["training"]["adversarial_training"]
        assert config["training"]["method"] == method and at["steps"] == 1 and abs(at["step_size"] - 1.25 * EPS) < 1e-12
        assert (config["training"]["mu"] is not None) == (method == "coded-fast-at")
        assert len(config["history"]) == 2 and all("restored_epoch" not in h for h in config["history"])
        for h in config["history"]:
            assert (
                0 <= h["check"]["pgd_accuracy"] <= h["check"]["fgsm_accuracy"] + 0.05
                and h["check"]["fgsm_accuracy"] <= 1
            )
        ck = load_checkpoint(result.checkpoint)
        assert (
            ck.config.method == method and result.test_accuracy > 0.15
        )  # chance: 0.1 (2 epochs of 400 images at ε = 0.2)
    erm = json.loads(
        (
            train(
                TrainConfig(method="erm", epochs=1, width=8, train_size=400, out=str(tmp_path / "erm"), progress=False),
                data=digits,
            ).checkpoint
            / "config.json"
        ).read_text()
    )
    assert "check" not in erm["history"][0]  # only methods that ask for it are checked


class _HugeStepsLater(FastAt):
    """fast-at until half of training, then one huge FGSM step from x itself to the corners of a 0.5-ball: the model fits its attack."""

    def examples(self, xb, yb, progress):
        if progress < 0.5:
            return super().examples(xb, yb, progress)
        with _Attacking(self.model):
            return pgd(self.model, xb, yb, 0.5, steps=1, step_size=10.0, random_start=False)


def test_a_forced_collapse_is_detected_and_the_last_good_weights_restored(digits, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(OBJECTIVES, "fast-at", _HugeStepsLater)
    cfg = TrainConfig(
        method="fast-at", epochs=10, at_eps=EPS, at_warmup=0.0, out=str(tmp_path / "co"), progress=False, seed=0
    )
    with caplog.at_level(logging.WARNING, logger="codedsmooth.train"):
        result = train(cfg, data=digits)
    history = json.loads((result.checkpoint / "config.json").read_text())["history"]
    collapsed = [h for h in history if "restored_epoch" in h]
    assert len(collapsed) == 1 and collapsed[0] is history[-1] and len(history) < cfg.epochs, [
        h.get("check") for h in history
    ]
    last, good = history[-1], history[history[-1]["restored_epoch"] - 1]
    best = max(h["check"]["pgd_accuracy"] for h in history)
    assert (
        last["check"]["pgd_accuracy"] < best - 0.2
        and last["check"]["fgsm_accuracy"] > history[-2]["check"]["fgsm_accuracy"]
    )
    assert good["check"]["pgd_accuracy"] >= best - 0.2
    assert any(
        "catastrophic overfitting" in r.message and f"restored the weights of epoch {good['epoch']}" in r.message
        for r in caplog.records
    )
    # the checkpoint holds the good epoch's weights: the same check on the loaded model reads what that epoch read
    model = load_checkpoint(result.checkpoint).model
    x, y = held_out_batch(digits.test_x, digits.test_y, CHECK_SIZE, cfg.seed + 3)
    at = FastAt.attack_settings(cfg, digits.input_shape)
    check = CollapseGuard(model, as_float(x), y, at, cfg.seed + 4).measure()
    assert (
        abs(check.pgd_accuracy - good["check"]["pgd_accuracy"]) < 1e-6
        and abs(check.fgsm_accuracy - good["check"]["fgsm_accuracy"]) < 1e-6
    )
    assert abs(result.test_accuracy - good["test_accuracy"]) < 1e-9
