"""The report's models: train a checkpoint, or reuse one trained with the same settings, and read its training time."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from codedsmooth.models import Method, load_checkpoint
from codedsmooth.train import TrainConfig, train

from .config import ReportConfig

log = logging.getLogger("codedsmooth.report")


def checkpoint_plan(
    cfg: ReportConfig, method: str, seed: int, n_train: int, size: int | None = None
) -> tuple[Path, int, int | None]:
    """(directory, epochs, training subset) of one of the report's models. A model trained on ``size`` of the
    ``n_train`` training items gets about as many optimiser steps as one trained on all of them
    (``epochs × n_train / size``, rounded up), so a smaller training set is not also a shorter training."""
    if size is None or size >= n_train:
        return Path(cfg.runs) / f"{method}-seed{seed}", cfg.epochs, None
    return Path(cfg.runs) / "sizes" / f"{method}-n{size}-seed{seed}", math.ceil(cfg.epochs * n_train / size), size


def ensure_checkpoint(cfg: ReportConfig, method: Method, seed: int, data, size: int | None = None) -> Path:
    """The model's directory, trained now unless a checkpoint of the same method, epochs, seed, width, data and training-set size is there."""
    n_train = len(data.train_y)
    path, epochs, subset = checkpoint_plan(cfg, method, seed, n_train, size)
    if path.exists() and not cfg.retrain:
        try:
            ck = load_checkpoint(path)
            t = ck.config.training
            hp = t.model_dump()  # the hyper-parameters as the trainer recorded them
            seen = getattr(
                t, "train_images", n_train
            )  # checkpoints written before the record trained on the whole split
            adversarial = hp.get("adversarial_training") or {}
            same_eps = cfg.at_eps is None or not adversarial or abs(adversarial.get("eps", -1.0) - cfg.at_eps) < 1e-9
            if same_eps and (
                t.method,
                hp["epochs"],
                hp["seed"],
                ck.config.arch_kwargs.get("width"),
                ck.config.dataset,
                seen,
            ) == (
                method,
                epochs,
                seed,
                cfg.width,
                cfg.data,
                subset or n_train,
            ):
                log.info("reusing %s", path)
                return path
        except ValueError:
            pass
    log.info("training %s seed %d (%d epochs, %d training items)", method, seed, epochs, subset or n_train)
    train(
        TrainConfig(
            data=cfg.data,
            method=method,
            epochs=epochs,
            seed=seed,
            width=cfg.width,
            out=str(path),
            max_steps=cfg.max_steps,
            train_size=subset,
            at_eps=cfg.at_eps,
        ),
        data=data,
    )
    return path


def training_seconds(path: Path) -> float:
    """Training time recorded in a checkpoint (the sum of its epochs), whether trained now or reused."""
    return float(sum(h.get("seconds", 0.0) for h in load_checkpoint(path).config.history))
