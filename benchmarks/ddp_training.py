"""Epoch time of DDP training on P processes against one process, in one run.

Each configuration is one ``codedsmooth train`` run (P > 1 under torchrun, gloo on CPU or
NCCL on CUDA); the epoch time is the mean over epochs after the first. Each rank trains on
1/P of every epoch with its own batch of K, so on P free cores (or P GPUs) an epoch should
take about 1/P of the time plus the gradient all-reduce.

Usage: python benchmarks/ddp_training.py [--data mnist] [--epochs 3] [--nproc 2] [--method coded] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def run(nproc: int, args, out: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "codedsmooth.cli",
        "train",
        "--data",
        args.data,
        "--method",
        args.method,
        "--epochs",
        str(args.epochs),
        "--width",
        str(args.width),
        "--nproc",
        str(nproc),
        "--out",
        out,
    ]
    if args.device:
        cmd += ["--device", args.device]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["mean_epoch_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--method", default="coded")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, f"{tmp}/one")
        many = run(args.nproc, args, f"{tmp}/many")
    print(
        f"{args.data} {args.method} width {args.width}, {os.cpu_count()} CPUs: epoch 1 process {one:.2f} s, "
        f"{args.nproc} processes {many:.2f} s, ratio {many / one:.2f} (ideal {1 / args.nproc:.2f})"
    )


if __name__ == "__main__":
    main()
