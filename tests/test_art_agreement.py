"""An independent check of the attack code: our FGSM, PGD and Square against the
adversarial-robustness-toolbox (ART) on a plain model trained here, at the same settings.

FGSM and PGD must agree within 2 accuracy points, Square within 5 at the same query budget.
Run with ``pytest -s tests/test_art_agreement.py`` to see the figures.

Square is compared in its ART-compatible form. Our default Square departs from ART in two
ways, both of which make it stronger: it redraws a window that would leave the image unchanged
(as the reference code does; ART queries it anyway), and it lets windows touch the last row and
column (the reference code and ART draw the corner with numpy's exclusive upper bound, so they
never do). With both switched to ART's behaviour the two agree; the default must be at least as
strong as ART.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("art", reason="the ART check needs the dev extra (adversarial-robustness-toolbox)")

from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent, SquareAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402
from helpers import correct_per_image  # noqa: E402

from codedsmooth.core.attacks import fgsm, pgd  # noqa: E402
from codedsmooth.models import load_checkpoint  # noqa: E402
from codedsmooth.probe.square import square_attack  # noqa: E402
from codedsmooth.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.slow

EPS = 0.1
PGD_STEPS, PGD_STEP_SIZE = 20, 0.01
SQUARE_QUERIES, SQUARE_P_INIT = 200, 0.8


@pytest.fixture(scope="module")
def plain(digits, tmp_path_factory):
    """A plain (no RCI) ERM small CNN on the 8×8 digits, and ART's wrapper of the same module."""
    out = tmp_path_factory.mktemp("art") / "erm"
    train(
        TrainConfig(method="erm", epochs=4, width=16, batch_size=32, seed=0, out=str(out), progress=False), data=digits
    )
    model = load_checkpoint(out).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    art_model = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    x, y = digits.test_x.float(), digits.test_y
    return model, art_model, x, y


def _acc(model, x_adv, y) -> float:
    return float(correct_per_image(model, torch.as_tensor(x_adv, dtype=torch.float32), y).float().mean())


def test_fgsm_and_pgd_agree_with_art(plain):
    model, art_model, x, y = plain
    xn, yn = x.numpy(), y.numpy()
    clean = _acc(model, x, y)

    ours_fgsm = _acc(model, fgsm(model, x, y, EPS), y)
    art_fgsm = _acc(
        model,
        FastGradientMethod(art_model, norm=np.inf, eps=EPS, num_random_init=0, batch_size=512).generate(xn, yn),
        y,
    )

    ours_pgd = _acc(model, pgd(model, x, y, EPS, steps=PGD_STEPS, step_size=PGD_STEP_SIZE, random_start=False), y)
    art_pgd_attack = ProjectedGradientDescent(
        art_model,
        norm=np.inf,
        eps=EPS,
        eps_step=PGD_STEP_SIZE,
        max_iter=PGD_STEPS,
        num_random_init=0,
        batch_size=512,
        verbose=False,
    )
    art_pgd = _acc(model, art_pgd_attack.generate(xn, yn), y)

    print(f"\nART agreement on {len(x)} digits test images, eps {EPS}: clean {clean:.4f}")
    print(f"  FGSM: ours {ours_fgsm:.4f}  ART {art_fgsm:.4f}  diff {100 * (ours_fgsm - art_fgsm):+.2f} points")
    print(
        f"  PGD-{PGD_STEPS} (step {PGD_STEP_SIZE}, no random start): ours {ours_pgd:.4f}  ART {art_pgd:.4f}  diff {100 * (ours_pgd - art_pgd):+.2f} points"
    )
    assert ours_fgsm < clean - 0.1 and ours_pgd < ours_fgsm  # the comparison is not between saturated numbers
    assert abs(ours_fgsm - art_fgsm) <= 0.02
    assert abs(ours_pgd - art_pgd) <= 0.02


def test_square_agrees_with_art_at_the_same_query_budget(plain):
    model, art_model, x, y = plain

    def logits(batch):
        with torch.no_grad():
            return model(batch)

    def ours(**variant):
        x_adv, used = square_attack(
            logits,
            x,
            y,
            EPS,
            queries=SQUARE_QUERIES,
            p_init=SQUARE_P_INIT,
            scores="logits",
            generator=torch.Generator().manual_seed(0),
            **variant,
        )
        assert int(used.max()) <= SQUARE_QUERIES
        return _acc(model, x_adv, y)

    like_art = ours(redraw=False, reference_windows=True)
    default = ours()
    np.random.seed(0)  # ART draws from numpy's global generator
    # ART: one query for the stripes, then max_iter candidate queries per image
    art_attack = SquareAttack(
        art_model,
        norm=np.inf,
        eps=EPS,
        max_iter=SQUARE_QUERIES - 1,
        p_init=SQUARE_P_INIT,
        nb_restarts=1,
        batch_size=512,
        verbose=False,
    )
    x_art = art_attack.generate(x.numpy(), y.numpy())
    assert float(np.abs(x_art - x.numpy()).max()) <= EPS + 1e-6
    art = _acc(model, x_art, y)
    clean = _acc(model, x, y)
    print(
        f"\n  Square ({SQUARE_QUERIES} queries, p_init {SQUARE_P_INIT}, eps {EPS}): clean {clean:.4f}  ART {art:.4f}"
        f"  ours ART-compatible {like_art:.4f} (diff {100 * (like_art - art):+.2f} points)  ours default {default:.4f}"
    )
    assert like_art < clean - 0.1
    assert abs(like_art - art) <= 0.05
    assert default <= art + 0.02
