"""Square against RCI: the reference attack vs the adaptive one at m ∈ {1, 2, 4} readings per candidate.

The target is the served function in this process: the default checkpoint under RCI in request
scope (``probe.targets.RCIModel``), answering probabilities with fresh randomness per query; the
last two rows of each budget attack the same model without RCI, for the query cost RCI adds. The
images are a class-stratified random sample of the embedded MNIST test split (``--per-class``
per class, drawn with ``--seed``). For each attack and budget it prints:

- claimed: the accuracy the attack reports (reference Square: the images it did not stop on a
  negative reading; adaptive: the images not confirmed broken),
- fresh: the accuracy of its adversarials on ``--draws`` fresh draws of an independent RCI model
  (per image, the share of draws with the label on top, averaged), the served function's accuracy,
- plain: their accuracy on the model without RCI,
- the queries per image: median and 90th percentile, and the run's seconds.

Usage: python benchmarks/square_adaptive.py [--per-class 5] [--eps 0.3] [--budgets 1000 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from codedsmooth.models import load_checkpoint
from codedsmooth.probe.square import adaptive_square_attack, square_attack
from codedsmooth.probe.targets import RCIModel
from codedsmooth.train import load_dataset

DEFAULT_CHECKPOINT = "codedsmooth/default_checkpoint"


def stratified(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` random indices of every class of ``y``, drawn with ``seed``, in class order."""
    g = torch.Generator().manual_seed(seed)
    picks = [
        idx[torch.randperm(len(idx), generator=g)[:per_class]]
        for idx in (torch.nonzero(y == c).flatten() for c in y.unique())
    ]
    return torch.cat(picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--draws", type=int, default=16, help="fresh draws per adversarial for the 'fresh' accuracy")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ck = load_checkpoint(args.checkpoint)
    data = load_dataset(ck.config.dataset)
    idx = stratified(data.test_y, args.per_class, args.seed)
    x, y = data.test_x[idx].float(), data.test_y[idx]
    plain = RCIModel(ck, ck.coding_spec(enabled=False))
    served = RCIModel(ck, ck.coding_spec(enabled=True, scope="request"), seed=1)
    judge = RCIModel(ck, ck.coding_spec(enabled=True, scope="request"), seed=2)

    def probs(batch):
        with torch.no_grad():
            return served(batch).softmax(1)

    def plain_probs(batch):
        with torch.no_grad():
            return plain(batch).softmax(1)

    @torch.no_grad()
    def fresh_accuracy(x_adv):
        return float(torch.stack([judge(x_adv).argmax(1) == y for _ in range(args.draws)]).float().mean())

    @torch.no_grad()
    def plain_accuracy(x_adv):
        return float((plain(x_adv).argmax(1) == y).float().mean())

    attacks = [("reference Square", probs, None)]
    for m in (1, 2, 4):
        attacks.append((f"adaptive m={m} max", probs, {"score_queries": m, "statistic": "max"}))
    attacks += [
        ("adaptive m=4 q0.75", probs, {"score_queries": 4, "statistic": "quantile"}),
        ("adaptive m=2 mean", probs, {"score_queries": 2, "statistic": "mean"}),
        ("no RCI: reference", plain_probs, None),
        ("no RCI: m=2 max", plain_probs, {"score_queries": 2, "statistic": "max"}),
    ]
    print(
        f"{ck.name}, RCI request scope, "
        f"{len(y)} images ({args.per_class} per class, seed {args.seed}), ε = {args.eps}, re-query on, confirm 4"
    )
    print(f"clean: fresh {fresh_accuracy(x):.3f}, plain {plain_accuracy(x):.3f}")
    print(
        f"{'attack':<20} {'budget':>6} {'claimed':>8} {'fresh':>6} {'plain':>6} {'q median':>8} {'q p90':>6} {'s':>5}"
    )
    for budget in args.budgets:
        for name, score_fn, kw in attacks:
            started = time.monotonic()
            gen = torch.Generator().manual_seed(args.seed)
            if kw is None:
                x_adv, used = square_attack(score_fn, x, y, args.eps, budget, generator=gen)
                claimed = float((used >= budget).float().mean())
            else:
                res = adaptive_square_attack(score_fn, x, y, args.eps, budget, generator=gen, **kw)
                x_adv, used, claimed = res.x_adv, res.queries, 1 - float(res.broken.float().mean())
            seconds = time.monotonic() - started
            q = used.float()
            print(
                f"{name:<20} {budget:>6} {claimed:>8.3f} {fresh_accuracy(x_adv):>6.3f} {plain_accuracy(x_adv):>6.3f} "
                f"{q.median():>8.0f} {q.quantile(0.9):>6.0f} {seconds:>5.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
