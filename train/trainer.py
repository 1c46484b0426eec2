"""Offline trainer: ERM, mixup and coded-smoothing on the same data, model and budget."""

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

from .data import DataSplit, as_float, load_dataset

log = logging.getLogger("codedsmooth.train")


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
    seed: int = 0
    device: str | None = None
    filler_size: int = 64
    out: str = "runs/checkpoint"
    progress: bool | None = None  # None: a bar only on a terminal

    def validate(self) -> None:
        if self.method not in ("erm", "mixup", "coded"):
            raise ValueError(f"--method must be erm, mixup or coded, got {self.method!r}")
        if self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.mu < 0:
            raise ValueError("--mu must be non-negative")
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
