"""coded-at and trades: one training step against a hand-made one, the checkpoint's record, serving, the CLI.

The hand-made step rebuilds the trainer's first batch, initial weights and adversarial batch from
the seed, computes the loss with plain torch ops (cross-entropy as −log softmax, the coded loss
from the spline matrices E and D, KL by its formula) and takes the first SGD step by hand.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from codedsmooth.cli import build_parser, main
from codedsmooth.core import SplineCode
from codedsmooth.core.attacks import pgd
from codedsmooth.core.spec import DEFAULT_CODED_POINTS, DEFAULT_DATA_POINTS
from codedsmooth.models import build_model, load_checkpoint
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.settings import ServeSettings
from codedsmooth.train import TrainConfig, as_float, train
from codedsmooth.train.trainer import _arch_kwargs

K, N, EPS, STEPS, STEP_SIZE, LR, WD, SEED = 16, 24, 0.1, 3, 0.05, 0.05, 5e-4, 3
MU = 300.0  # large enough that the coded term moves the weights visibly at initialisation, where the block is nearly linear


def _kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per item, by its formula."""
    q = logits.exp() / logits.exp().sum(1, keepdim=True)
    return (p * (p.log() - q.log())).sum(1)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    return -logp[torch.arange(len(y)), y].mean()


def _first_batch(data):
    sampler = DistributedSampler(range(len(data.train_x)), num_replicas=1, rank=0, shuffle=True, seed=SEED)
    sampler.set_epoch(0)
    idx = torch.tensor(list(iter(sampler)), dtype=torch.int64)[:K]
    return as_float(data.train_x[idx]), data.train_y[idx]


def _initial_model(data):
    torch.manual_seed(SEED)
    return build_model("small_cnn", **_arch_kwargs("small_cnn", data, 4))


def _trades_reference_examples(model, x, generator):
    """The TRADES reference loop: x + 0.001·N(0, 1), then signed steps on the summed KL, clipped to the ball and [0, 1]."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
    x_adv = x + 0.001 * torch.randn(x.shape, generator=generator)
    for _ in range(STEPS):
        x_adv = x_adv.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_kl(p, model(x_adv)).sum(), x_adv)
        x_adv = x_adv.detach() + STEP_SIZE * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    return x_adv.detach()


def _hand_loss(method, model, x, y):
    """(loss, coded loss) of the first step, with the adversarial batch built from the trainer's attack seed."""
    gen = torch.Generator().manual_seed(SEED + 2)
    if method == "trades":
        x_adv = _trades_reference_examples(model, x, gen)
        logits = model(x)
        p = logits.exp() / logits.exp().sum(1, keepdim=True)
        return _ce(logits, y) + 2.5 * _kl(p, model(x_adv)).mean(), torch.zeros(())
    x_adv = pgd(model, x, y, EPS, steps=STEPS, step_size=STEP_SIZE, random_start=True, generator=gen)
    trunk, block = model.split("head")
    z = trunk(x_adv)
    out = block(z)
    code = SplineCode(K, N, data_kind=DEFAULT_DATA_POINTS, coded_kind=DEFAULT_CODED_POINTS)
    coded_z = (code.E @ z.reshape(K, -1)).reshape(N, *z.shape[1:])
    decoded = code.D @ block(coded_z)
    closs = MU * (decoded - out).pow(2).sum(1).mean()
    return _ce(out, y) + closs, closs


@pytest.mark.parametrize("method", ["coded-at", "trades"])
def test_one_training_step_matches_a_hand_made_step(method, digits, tmp_path):
    cfg = TrainConfig(
        method=method,
        epochs=1,
        max_steps=1,
        width=4,
        batch_size=K,
        n_start=N,
        n_end=N,
        mu=MU,
        trades_beta=2.5,
        at_eps=EPS,
        at_steps=STEPS,
        at_step_size=STEP_SIZE,
        at_warmup=0.0,
        lr=LR,
        weight_decay=WD,
        seed=SEED,
        out=str(tmp_path / method),
        progress=False,
    )
    res = train(cfg, data=digits)
    after = load_checkpoint(res.checkpoint).model.state_dict()

    model = _initial_model(digits).train()
    x, y = _first_batch(digits)
    loss, closs = _hand_loss(method, model, x, y)
    stats = res.history[0]
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    assert stats.coded_loss == pytest.approx(closs.item(), rel=1e-5, abs=1e-9)
    if method == "coded-at":
        assert closs.item() > 1e-3 * loss.item()  # the coded term is really there
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    # OneCycleLR's first step: lr = max_lr / 25, momentum 0.95; nesterov SGD's first step moves by lr·(1 + m)·(g + wd·w)
    step = LR / 25 * (1 + 0.95)
    for name, g in zip(names, grads):
        w0 = dict(model.named_parameters())[name].detach()
        expected = w0 - step * (g + WD * w0)
        assert torch.allclose(after[name], expected, rtol=1e-4, atol=1e-6), name
        assert not torch.allclose(after[name], w0)


def test_pgd_with_a_per_item_loss_and_a_given_start_is_the_reference_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.rand(6, 1, 3, 4)
    y = torch.randint(0, 5, (6,))
    with torch.no_grad():
        p = F.softmax(model(x) + torch.randn(6, 5), dim=1)
    start = x + 0.01 * torch.randn(x.shape)
    got = pgd(model, x, y, 0.2, steps=4, step_size=0.07, loss=lambda logits, _y: _kl(p, logits), start=start)
    ref = start.clone()
    for _ in range(4):
        ref = ref.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_kl(p, model(ref)).sum(), ref)
        ref = torch.min(torch.max(ref.detach() + 0.07 * g.sign(), x - 0.2), x + 0.2).clamp(0.0, 1.0)
    assert torch.equal(got, ref)
    # a callable cross-entropy is the named one
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    named = pgd(model, x, y, 0.2, steps=4, generator=gen())
    called = pgd(
        model, x, y, 0.2, steps=4, generator=gen(), loss=lambda logits, t: F.cross_entropy(logits, t, reduction="none")
    )
    assert torch.equal(named, called)


@pytest.fixture(scope="module")
def adversarial_checkpoints(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("adv")
    return {
        m: train(
            TrainConfig(
                method=m,
                epochs=2,
                width=8,
                batch_size=32,
                at_eps=0.1,
                at_steps=2,
                seed=0,
                out=str(out / m),
                progress=False,
            ),
            data=digits,
        )
        for m in ("coded-at", "trades")
    }


@pytest.mark.parametrize("method", ["coded-at", "trades"])
def test_checkpoint_records_the_method_and_its_settings_and_serves(method, adversarial_checkpoints, digits):
    res = adversarial_checkpoints[method]
    assert res.test_accuracy > 0.8  # chance is 0.1
    ck = load_checkpoint(res.checkpoint)
    t = ck.config.training.model_dump()
    assert ck.config.method == method and ck.config.name.endswith(method)
    at = t["adversarial_training"]
    assert (at["eps"], at["steps"], at["warmup"], at["attack_mode"]) == (0.1, 2, 0.3, "train")
    assert at["step_size"] == pytest.approx(2.5 * 0.1 / 2)
    if method == "coded-at":
        assert (
            t["mu"] == 1.0 and t["n_schedule"] == {"n_start": 32, "n_end": 48, "epochs": 2} and t["trades_beta"] is None
        )
        assert (at["loss"], at["random_start"]) == ("ce", True)
        assert all(h["coded_loss"] > 0 for h in ck.config.history)
    else:
        assert t["trades_beta"] == 6.0 and t["mu"] is None and t["n_schedule"] is None
        assert (at["loss"], at["random_start"]) == ("kl", "normal(0, 0.001)")
    x = as_float(digits.test_x[:64])
    engine = InferenceEngine(ck, ServeSettings(rci=True, rci_scope="request"), torch.device("cpu"))
    probs = torch.from_numpy(engine.run([x[:40], x[40:]]).probabilities[0])
    assert probs.shape == (40, 10) and torch.allclose(probs.sum(1), torch.ones(40), atol=1e-4)
    with torch.no_grad():
        plain = ck.model.eval()(x[:40]).argmax(1)
    assert float((probs.argmax(1) == plain).float().mean()) >= 0.9


def test_cli_takes_the_new_methods_and_trades_beta(tmp_path, capsys):
    out = tmp_path / "trades"
    argv = [
        "train",
        "--data",
        "digits",
        "--method",
        "trades",
        "--trades-beta",
        "2.5",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--width",
        "4",
        "--at-steps",
        "2",
    ]
    assert main(argv + ["--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checkpoint"] == str(out)
    training = json.loads((out / "config.json").read_text())["training"]
    assert (training["method"], training["trades_beta"]) == ("trades", 2.5)
    assert main(argv + ["--trades-beta", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "codedsmooth train: error: trades_beta must be a non-negative number, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", "--method", "codedat"])
    assert exc.value.code == 2 and "'coded-at', 'trades'" in capsys.readouterr().err
