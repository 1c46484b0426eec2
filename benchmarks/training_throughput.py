"""Training throughput on Fashion-MNIST: images/s of each method's optimiser step, by batch size and thread count.

One timed slice of ``--steps`` optimiser steps (after ``--warmup`` untimed ones) per (method,
batch size, threads), on batches drawn from the 60,000 training images in the trainer's way:
the method's own ``Objective`` from the registry (its attack, its coded loss), then backward and
an SGD step, on the default architecture for 28×28 grey images. A full epoch's time is
60,000 / (images/s). Prints images/s and the ratios measured in this run: each method against
erm at the same batch size and threads (the coded method's overhead is coded / erm), 2 threads
against 1, and each batch size against the smallest; writes all of it as JSON (``--out``).

Usage: python benchmarks/training_throughput.py [--methods erm coded fast-at] [--batch-sizes 32 64 128]
       [--threads 1 2] [--steps 20] [--warmup 3] [--channels-last] [--out throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from codedsmooth.core import CodedSmoothing, default_n_end
from codedsmooth.models import METHODS, build_model, default_arch_for
from codedsmooth.train import TrainConfig, as_float, load_dataset
from codedsmooth.train.objectives import OBJECTIVES
from codedsmooth.train.trainer import _arch_kwargs


def images_per_second(
    data, method: str, batch: int, steps: int, warmup: int, channels_last: bool, seed: int = 0
) -> float:
    """Images/s over ``steps`` optimiser steps of ``method`` at batch size ``batch`` (the first ``warmup`` steps untimed)."""
    cfg = TrainConfig(method=method, batch_size=batch, seed=seed)
    arch = default_arch_for(data.input_shape)
    torch.manual_seed(seed)
    model = build_model(arch, **_arch_kwargs(arch, data, None))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trunk, block = model.split(model.default_target)
    objective_cls = OBJECTIVES[method]
    coded = CodedSmoothing(block, k=batch, n=default_n_end(batch), mu=cfg.mu) if objective_cls.uses_code else None
    at = objective_cls.attack_settings(cfg, data.input_shape)
    gen = torch.Generator().manual_seed(seed)
    objective = objective_cls(cfg, model, trunk, coded, at, gen, torch.Generator().manual_seed(seed + 2))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    order = torch.randperm(len(data.train_x), generator=gen)
    model.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = order[(step * batch) % len(order) :][:batch]
        xb = as_float(data.train_x[idx])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss, _ = objective(xb, data.train_y[idx], 1.0)  # progress 1: the full ε, as after the warm-up
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    ap.add_argument(
        "--data", default="fashion-mnist", help="data set (default: fashion-mnist, found as codedsmooth train finds it)"
    )
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--methods", nargs="+", default=["erm", "mixup", "coded", "pgd-at", "fast-at", "coded-fast-at"], choices=METHODS
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps per cell")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed slice")
    ap.add_argument("--channels-last", action="store_true", help="model and batches in channels_last memory format")
    ap.add_argument("--out", default=None, help="write the table and ratios as JSON here")
    args = ap.parse_args()
    data = load_dataset(args.data, args.data_dir)
    methods = list(dict.fromkeys(["erm", *args.methods]))  # erm is the reference of the ratios
    cells = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            for method in methods:
                ips = images_per_second(data, method, batch, args.steps, args.warmup, args.channels_last)
                cells.append(
                    {
                        "method": method,
                        "batch_size": batch,
                        "threads": threads,
                        "images_per_second": ips,
                        "epoch_seconds": len(data.train_x) / ips,
                    }
                )
                print(
                    f"{method:14s} batch {batch:4d} threads {threads}  {ips:9.1f} images/s  epoch of {len(data.train_x):,} ≈ {len(data.train_x) / ips:8.1f} s",
                    flush=True,
                )
                _write(args, data, cells)
    ratios = _ratios(cells, min(args.batch_sizes))
    print(
        f"\n{args.data}: {len(data.train_x):,} training images; {args.steps} timed steps per cell; channels_last {args.channels_last}"
    )
    print(
        "time per image against erm at the same batch size and threads (erm images/s ÷ method images/s), and the other ratios:"
    )
    for r in ratios:
        extra = "".join(f"  {k} ×{v:.2f}" for k, v in r.items() if k.startswith("vs_") and k != "vs_erm")
        if r["method"] != "erm" or extra:
            print(
                f"  {r['method']:14s} batch {r['batch_size']:4d} threads {r['threads']}: {1 / r['vs_erm']:.2f}× erm's time{extra}"
            )
    _write(args, data, cells)


def _ratios(cells: list[dict], smallest: int) -> list[dict]:
    """Images/s ratios: against erm (same batch, threads), against 1 thread (same method, batch), against the smallest batch."""
    at = {(c["method"], c["batch_size"], c["threads"]): c["images_per_second"] for c in cells}
    ratios = []
    for (method, batch, threads), ips in at.items():
        row = {"method": method, "batch_size": batch, "threads": threads}
        if ("erm", batch, threads) in at:
            row["vs_erm"] = ips / at[("erm", batch, threads)]
        if (method, batch, 1) in at and threads != 1:
            row["vs_1_thread"] = ips / at[(method, batch, 1)]
        if batch != smallest and (method, smallest, threads) in at:
            row[f"vs_batch_{smallest}"] = ips / at[(method, smallest, threads)]
        ratios.append(row)
    return ratios


def _write(args: argparse.Namespace, data, cells: list[dict]) -> None:
    """The cells so far and their ratios as JSON (after every cell, so a cut-short run keeps what it measured)."""
    if not args.out:
        return
    result = {
        "data": args.data,
        "train_images": len(data.train_x),
        "steps": args.steps,
        "warmup": args.warmup,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "cells": cells,
        "ratios": _ratios(cells, min(args.batch_sizes)),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
