"""Sparse decode in request scope: its error against the full decode, and its speed, in one run.

Part 1 (error): a trained checkpoint's test split, each image a one-item request at
K and N of the checkpoint; the full and the sparse decode run on the same plan (same
draws), so the only difference is the skipped coded samples. Prints, per tolerance,
the coded samples the block runs on per group, the max |logit difference| and the
label agreement.
Part 2 (speed): the server's engine on device batches of one-item requests, request
scope at K = 32, N = 48 (full and sparse decode) against RCI off, on PreActResNet-18
(target block layer4) and small_cnn 28×28 (target block head).

With ``--json PATH`` it also writes what it printed, as numbers, with the machine it ran on:
``benchmarks/results/sparse_decode.json`` is such a run, and the README's cost/benefit table takes
its throughput ratio at the served settings from there (``python -m codedsmooth.probe.costs``).

Usage: python benchmarks/sparse_decode.py [--checkpoint DIR] [--device cpu|cuda] [--batch 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoints import make_checkpoint  # noqa: E402
from _timing import interleaved_medians  # noqa: E402

from codedsmooth.core import SeededRandomSource, apply_plan, plan_groups, sparse_width  # noqa: E402
from codedsmooth.core.spec import DEFAULT_DECODE_TOLERANCE  # noqa: E402
from codedsmooth.models import default_checkpoint_path, load_checkpoint, resolve_device  # noqa: E402
from codedsmooth.service.engine import InferenceEngine, resolve_spec  # noqa: E402
from codedsmooth.service.settings import ServeSettings  # noqa: E402
from codedsmooth.train import as_float, load_dataset  # noqa: E402

TOLERANCES = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@torch.inference_mode()
def error_table(path: Path) -> dict:
    ck = load_checkpoint(path)
    data = load_dataset(ck.config.dataset, image_size=ck.input_shape[-1])
    x, y = as_float(data.test_x), data.test_y
    spec = resolve_spec(ck, ServeSettings())
    code = spec.code()
    trunk, block = ck.coded_split()  # as the engine runs it
    z, filler_z = trunk(x), trunk(ck.filler)
    plan = plan_groups([1] * len(x), "request", spec.k, len(filler_z), SeededRandomSource(0))
    full = apply_plan(block, z, filler_z, plan, code)
    plain = block(z)
    print(f"{ck.name}: {len(x)} test images as one-item requests, K={spec.k}, N={spec.n}")
    out = {
        "checkpoint": ck.name,
        "images": len(x),
        "k": spec.k,
        "n": spec.n,
        "seed": 0,
        "full_accuracy": float((full.argmax(1) == y).float().mean()),
        "plain_accuracy": float((plain.argmax(1) == y).float().mean()),
        "rows": [],
    }
    print(
        f"  full decode: block on {spec.n} coded samples per group, accuracy {out['full_accuracy']:.4f} (plain model {out['plain_accuracy']:.4f})"
    )
    for tol in TOLERANCES:
        sparse = apply_plan(block, z, filler_z, plan, code, tol)
        diff = float((sparse - full).abs().max())
        agree = float((sparse.argmax(1) == full.argmax(1)).float().mean())
        acc = float((sparse.argmax(1) == y).float().mean())
        mark = "  <- default" if tol == DEFAULT_DECODE_TOLERANCE else ""
        print(
            f"  tol {tol:g}: block on {sparse_width(code, tol)} of {spec.n}, max |logit diff| {diff:.2e}, label agreement {agree:.4f}, accuracy {acc:.4f}{mark}"
        )
        out["rows"].append(
            {
                "tolerance": tol,
                "block_runs_on": sparse_width(code, tol),
                "max_logit_diff": diff,
                "label_agreement": agree,
                "labels_changed": int((sparse.argmax(1) != full.argmax(1)).sum()),
                "accuracy": acc,
                "default": tol == DEFAULT_DECODE_TOLERANCE,
            }
        )
    return out


SPEED_MODELS = ("preact_resnet18", "small_cnn", "checkpoint")


def speed_table(
    device: torch.device, batch: int, rounds: int, tolerances: list[float], checkpoint: Path, models=SPEED_MODELS
) -> list[dict]:
    rows = []
    print(
        f"engine throughput, device batches of {batch} one-item requests, request scope K=32 N=48, device={device}, threads={torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            path = (
                checkpoint
                if name == "checkpoint"
                else make_checkpoint(Path(tmp) / name, name, width=64 if name == "preact_resnet18" else 32, k=32, n=48)
            )
            ck = load_checkpoint(path, device=device)
            rows.append(_speed_row(ck.name if name == "checkpoint" else name, ck, device, batch, rounds, tolerances))
    return rows


def _speed_row(label: str, ck, device: torch.device, batch: int, rounds: int, tolerances: list[float]) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    engines = {
        "rci off": InferenceEngine(ck, ServeSettings(rci=False), device),
        "request, full decode": InferenceEngine(ck, ServeSettings(rci_decode_tolerance=0, rci_check_rate=0), device),
    }
    tolerance_of = {"rci off": None, "request, full decode": 0.0}
    engines["served defaults"] = InferenceEngine(
        ck, ServeSettings(), device
    )  # what `serve` runs: request scope, default tolerance and check rate
    tolerance_of["served defaults"] = resolve_spec(ck, ServeSettings()).decode_tolerance
    for tol in tolerances:
        engines[f"request, sparse {tol:g}"] = InferenceEngine(
            ck, ServeSettings(rci_decode_tolerance=tol, rci_check_rate=0), device
        )
        tolerance_of[f"request, sparse {tol:g}"] = tol
    x = [t for t in torch.rand(batch, *ck.input_shape, device=device).split(1)]
    med = interleaved_medians({name: (lambda e=e: e.run(x)) for name, e in engines.items()}, rounds=rounds, sync=sync)
    base = med["rci off"]
    parts = [f"{name}: {batch / med[name]:.0f} items/s ({base / med[name]:.2f}x of rci off)" for name in engines]
    print(f"  {label}: " + " | ".join(parts))
    return {
        "model": label,
        "architecture": ck.config.arch,
        "batch": batch,
        "rounds": rounds,
        "engines": [
            {
                "name": name,
                "rci": name != "rci off",
                "decode_tolerance": tolerance_of[name],
                "served_defaults": name == "served defaults",
                "items_per_s": batch / med[name],
                "throughput_vs_rci_off": base / med[name],
            }
            for name in engines
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument(
        "--checkpoint", default=None, help="trained checkpoint for the error table (default: the shipped one)"
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=32, help="one-item requests per device batch (default: 32)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument(
        "--tolerances",
        type=float,
        nargs="+",
        default=[DEFAULT_DECODE_TOLERANCE, 3e-2, 1e-1],
        help="sparse-decode tolerances to time",
    )
    ap.add_argument(
        "--json", default=None, help="also write the results as JSON to this path (with the machine it ran on)"
    )
    ap.add_argument(
        "--speed-models",
        nargs="+",
        choices=SPEED_MODELS,
        default=list(SPEED_MODELS),
        help="models of the speed table: random-weight PreActResNet-18 and small_cnn, and --checkpoint's (default: all three)",
    )
    args = ap.parse_args()
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path()
    load_before = os.getloadavg()
    errors = error_table(checkpoint)
    device = resolve_device(args.device)
    speed = speed_table(device, args.batch, args.rounds, args.tolerances, checkpoint, args.speed_models)
    if args.json:
        environment = {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
        }
        record = {
            "benchmark": "benchmarks/sparse_decode.py",
            "argv": sys.argv[1:],
            "environment": environment,
            "default_decode_tolerance": DEFAULT_DECODE_TOLERANCE,
            "error": errors,
            "speed": speed,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
