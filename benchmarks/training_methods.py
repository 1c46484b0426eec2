"""ERM vs mixup vs coded-smoothing on the embedded digits data, same budget, several seeds.

Prints test accuracy (mean ± std over seeds) per method and the epoch-time ratios
coded/erm and mixup/erm measured in this run.

Usage: python benchmarks/training_methods.py [--epochs 30] [--seeds 0 1 2] [--k 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from codedsmooth.train import TrainConfig, load_dataset, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    data = load_dataset("digits")
    results: dict[str, list] = {m: [] for m in ("erm", "mixup", "coded")}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in results:
                cfg = TrainConfig(
                    method=method,
                    epochs=args.epochs,
                    batch_size=args.k,
                    seed=seed,
                    device=args.device,
                    out=f"{tmp}/{method}-{seed}",
                    progress=False,
                )
                results[method].append(train(cfg, data=data))
    print(
        f"digits, small_cnn, {args.epochs} epochs, K={args.k}, N {args.k}->{int(1.5 * args.k + 0.999)}, seeds {args.seeds}"
    )
    erm_time = statistics.mean(r.mean_epoch_seconds for r in results["erm"])
    for method, runs in results.items():
        accs = [r.test_accuracy for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        t = statistics.mean(r.mean_epoch_seconds for r in runs)
        print(
            f"{method:6s} test acc {statistics.mean(accs) * 100:.2f} ± {sd * 100:.2f} %  epoch {t:.3f} s  time ratio vs erm {t / erm_time:.3f}"
        )


if __name__ == "__main__":
    main()
