"""Offline trainer: ERM, mixup, coded-smoothing and PGD adversarial training on the same data, model and budget.

``pgd-at`` is Madry et al. (2018): every step trains on L∞ PGD examples (random start, signed
gradient steps, projection onto the ε-ball ∩ [0, 1]) made against the current weights, with
cross-entropy on the adversarial batch only. The examples are made in train mode, the mode the
weights are then updated in (as Madry et al.'s training code does: one graph, one mode), so
BatchNorm normalises with batch statistics both when attacking and when training; its running
statistics are frozen while the attack runs, so only the training forward pass updates them.
One deviation by default: ε (and the step size with it) ramps up linearly over the first
``at_warmup`` = 30 % of the training steps. Short runs of small models at a constant ε = 0.3
can collapse to a constant prediction (a width-8 digits CNN, 3 epochs at ε = 0.1, did in one
seed of three; a width-8 CNN on 4,000 MNIST images at ε = 0.3 stayed at chance for 6 epochs);
with the 30 % ramp none of five digits seeds did. ``at_warmup=0`` gives Madry et al.'s constant ε.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from codedsmooth.core import CodedSmoothing, NSchedule

from codedsmooth.models import build_model, default_arch_for, resolve_device, save_checkpoint
from codedsmooth.probe.attacks import pgd

from .data import DataSplit, as_float, load_dataset

log = logging.getLogger("codedsmooth.train")

METHODS = ("erm", "mixup", "coded", "pgd-at")


@dataclass
class TrainConfig:
    data: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    arch: str | None = None
    width: int | None = None
    method: str = "coded"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 5e-4
    mu: float = 1.0
    n_start: int | None = None
    n_end: int | None = None
    target_block: str | None = None
    mixup_alpha: float = 1.0
    at_eps: float | None = None  # pgd-at: L∞ radius; None: 0.3 on 28×28 grey (MNIST-like) data, else 8/255
    at_steps: int = 10  # pgd-at: PGD steps per training batch
    at_step_size: float | None = None  # pgd-at: None: 2.5 · eps / steps (Madry et al.)
    at_warmup: float = 0.3  # pgd-at: fraction of the training steps over which ε ramps up linearly from 0 (0: Madry's constant ε)
    seed: int = 0
    device: str | None = None
    filler_size: int = 64
    out: str = "runs/checkpoint"
    progress: bool | None = None  # None: a bar only on a terminal

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.mu < 0:
            raise ValueError("--mu must be non-negative")
        if self.at_eps is not None and not 0 < self.at_eps <= 1:
            raise ValueError(f"--at-eps must be in (0, 1] (pixels are in [0, 1]), got {self.at_eps}")
        if self.at_steps < 1:
            raise ValueError("--at-steps must be at least 1")
        if self.at_step_size is not None and self.at_step_size <= 0:
            raise ValueError("--at-step-size must be positive")
        if not 0 <= self.at_warmup < 1:
            raise ValueError(f"--at-warmup must be in [0, 1), got {self.at_warmup}")
        for name in ("n_start", "n_end"):
            value = getattr(self, name)
            if value is not None and value < self.batch_size:
                raise ValueError(f"--{name.replace('_', '-')} must be >= --batch-size (K={self.batch_size}), got {value}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    coded_loss: float
    n: int | None
    test_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    checkpoint: Path
    test_accuracy: float
    history: list[EpochStats] = field(default_factory=list)

    @property
    def mean_epoch_seconds(self) -> float:
        times = [h.seconds for h in self.history[1:]] or [h.seconds for h in self.history]
        return sum(times) / len(times)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = as_float(x[i : i + batch_size]).to(device)
        correct += int((model(xb).argmax(1).cpu() == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


def _arch_kwargs(arch: str, data: DataSplit, width: int | None) -> dict:
    mean, std = data.channel_stats()
    c, h, _ = data.input_shape
    kwargs = {"in_channels": c, "num_classes": len(data.classes), "mean": mean, "std": std}
    if arch == "small_cnn":
        kwargs["image_size"] = h
    if width is not None:
        kwargs["width"] = width
    return kwargs


def adversarial_training_settings(cfg: TrainConfig, input_shape: tuple[int, ...]) -> dict:
    """pgd-at's ε, steps and step size, the ``None`` ones resolved by data shape."""
    mnist_like = tuple(input_shape) == (1, 28, 28)
    eps = cfg.at_eps if cfg.at_eps is not None else (0.3 if mnist_like else 8 / 255)
    step_size = cfg.at_step_size if cfg.at_step_size is not None else 2.5 * eps / cfg.at_steps
    return {
        "eps": eps, "steps": cfg.at_steps, "step_size": step_size, "warmup": cfg.at_warmup,
        "random_start": True, "loss": "ce", "attack_mode": "train",
    }


class _FrozenBatchNormStats:
    """Within the block, BatchNorm layers still normalise with batch statistics (train mode) but
    do not update their running mean/variance."""

    def __init__(self, model: torch.nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0  # running = (1 − 0) · running + 0 · batch
        return self

    def __exit__(self, *exc):
        for m, (momentum, tracked) in zip(self.layers, self.saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _pgd_examples(model, xb, yb, at: dict, generator: torch.Generator, progress: float = 1.0) -> torch.Tensor:
    """Madry et al.'s training attack against the current weights, in train mode.

    ``progress`` is the fraction of training done; during the warm-up ε and the step size
    scale by progress / warmup."""
    scale = min(1.0, progress / at["warmup"]) if at["warmup"] > 0 else 1.0
    if scale <= 0:
        return xb
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # only ∇ₓ is needed while attacking
    try:
        with _FrozenBatchNormStats(model):
            return pgd(model, xb, yb, scale * at["eps"], steps=at["steps"], step_size=scale * at["step_size"], random_start=True, generator=generator)
    finally:
        for p in params:
            p.requires_grad_(True)


def _filler_pool(data: DataSplit, size: int, generator: torch.Generator) -> torch.Tensor:
    """Clean training inputs, class-balanced, for request-scoped RCI padding."""
    per_class = max(1, math.ceil(size / len(data.classes)))
    picks = []
    for c in range(len(data.classes)):
        idx = (data.train_y == c).nonzero().flatten()
        if len(idx):
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    chosen = torch.cat(picks)[:size]
    return as_float(data.train_x[chosen])


def train(cfg: TrainConfig, data: DataSplit | None = None) -> TrainResult:
    """Train one model and write its checkpoint to ``cfg.out``."""
    cfg.validate()
    device = resolve_device(cfg.device)
    data = data or load_dataset(cfg.data, cfg.data_dir, image_size=cfg.image_size)
    arch = cfg.arch or default_arch_for(data.input_shape)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    arch_kwargs = _arch_kwargs(arch, data, cfg.width)
    model = build_model(arch, **arch_kwargs).to(device)
    target = cfg.target_block or model.default_target
    trunk, block = model.split(target)
    k = cfg.batch_size
    schedule = NSchedule(
        n_start=cfg.n_start or k,
        n_end=cfg.n_end or int(math.ceil(1.5 * k)),
        epochs=cfg.epochs,
    )
    coded = CodedSmoothing(block, k=k, n=schedule(0), mu=cfg.mu) if cfg.method == "coded" else None

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data.train_x) / k)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.method == "mixup" else None
    at = adversarial_training_settings(cfg, data.input_shape) if cfg.method == "pgd-at" else None
    at_gen = torch.Generator().manual_seed(cfg.seed + 2)

    history: list[EpochStats] = []
    show_bar = cfg.progress
    for epoch in range(cfg.epochs):
        model.train()
        n_now = schedule(epoch) if coded is not None else None
        if coded is not None:
            coded.set_coded_points(n_now)
        order = torch.randperm(len(data.train_x), generator=gen)
        total = closs_total = 0.0
        seen = 0
        start = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if show_bar is None else not show_bar)
        for step in bar:
            idx = order[step * k : (step + 1) * k]
            xb = as_float(data.train_x[idx]).to(device)
            yb = data.train_y[idx].to(device)
            closs = torch.zeros((), device=device)
            if beta is not None:
                lam = float(beta.sample())
                perm = torch.randperm(len(idx), generator=gen).to(device)
                logits = model(lam * xb + (1 - lam) * xb[perm])
                loss = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm])
            elif at is not None:
                progress = (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch)
                loss = F.cross_entropy(model(_pgd_examples(model, xb, yb, at, at_gen, progress)), yb)
            elif coded is not None:
                logits, closs = coded(trunk(xb))
                loss = F.cross_entropy(logits, yb) + closs
                if coded.last_skip_reason and epoch == 0:
                    log.info("coded loss skipped for one batch: %s", coded.last_skip_reason)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            closs_total += closs.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        seconds = time.perf_counter() - start
        acc = evaluate(model, data.test_x, data.test_y, device)
        stats = EpochStats(epoch + 1, total / seen, closs_total / seen, n_now, acc, seconds)
        history.append(stats)
        log.info(
            "epoch %d/%d loss %.4f coded_loss %.4f N %s test_acc %.4f (%.2fs)",
            stats.epoch, cfg.epochs, stats.loss, stats.coded_loss, n_now if n_now is not None else "-", acc, seconds,
        )

    model.eval()
    final_acc = history[-1].test_accuracy
    config = {
        "name": f"{data.name}-{arch}-{cfg.method}",
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "input_shape": list(data.input_shape),
        "classes": data.classes,
        "normalization": {"mean": arch_kwargs["mean"], "std": arch_kwargs["std"], "input_range": [0.0, 1.0]},
        "training": {
            "method": cfg.method,
            "epochs": cfg.epochs,
            "batch_size": k,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "mu": cfg.mu if cfg.method == "coded" else None,
            "n_schedule": asdict(schedule) if cfg.method == "coded" else None,
            "mixup_alpha": cfg.mixup_alpha if cfg.method == "mixup" else None,
            "adversarial_training": at,
            "device": str(device),
        },
        "coding": {
            "k": k,
            "n": schedule.n_end,
            "data_points": "equispaced",
            "coded_points": "chebyshev-lobatto",
            "target_block": target,
        },
        "dataset": data.name,
        "test_accuracy": final_acc,
        "history": [asdict(h) for h in history],
    }
    filler = _filler_pool(data, cfg.filler_size, torch.Generator().manual_seed(cfg.seed + 1))
    path = save_checkpoint(cfg.out, model.cpu(), config, filler)
    return TrainResult(path, final_acc, history)
