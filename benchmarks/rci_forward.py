"""RCI forward vs plain forward, in one run: prints time ratios at N = K and the default N (1.5K).

RCI is what the server runs for a micro-batch of K items in batch scope: ``plan_groups`` (one
group, a permutation from the OS CSPRNG) and ``apply_plan`` on the trunk's output.

Usage: python benchmarks/rci_forward.py [--device cpu|cuda] [--k 64] [--width 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

from codedsmooth.core import SplineCode, SystemRandomSource, apply_plan, default_n_end, plan_groups  # noqa: E402
from codedsmooth.models import build_model, resolve_device  # noqa: E402


def _rci(block, z, code, source):
    plan = plan_groups([len(z)], "batch", code.k, 0, source)
    return apply_plan(block, z, z[:0], plan, code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--device", default=None)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--width", type=int, default=64, help="PreActResNet-18 width (64 = standard)")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    k = args.k
    setups = {
        "small_cnn 8x8 (digits)": (build_model("small_cnn", image_size=8, in_channels=1), (1, 8, 8)),
        f"preact_resnet18 w{args.width} 32x32": (build_model("preact_resnet18", width=args.width), (3, 32, 32)),
    }
    print(f"device={device} K={k} threads={torch.get_num_threads()}")
    for label, (model, shape) in setups.items():
        model = model.to(device).eval()
        trunk, block = model.split()
        x = torch.rand(k, *shape, device=device)
        source = SystemRandomSource()
        codes = {n: SplineCode(k, n, device=device) for n in (k, default_n_end(k))}
        with torch.inference_mode():
            fns = {"plain": lambda model=model, x=x: model(x)}
            for n, code in codes.items():
                fns[f"rci N={n}"] = lambda code=code, block=block, trunk=trunk, x=x, source=source: _rci(
                    block, trunk(x), code, source
                )
            med = interleaved_medians(fns, rounds=args.rounds, sync=sync)
        base = med["plain"]
        parts = [f"plain {base * 1e3:.2f} ms"]
        for n in codes:
            parts.append(f"rci N={n}: {med[f'rci N={n}'] * 1e3:.2f} ms, ratio {med[f'rci N={n}'] / base:.3f}")
        print(f"{label}: " + " | ".join(parts))


if __name__ == "__main__":
    main()
