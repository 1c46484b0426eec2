"""Co-tenant probe: an attacker's request shares a micro-batch with a victim's and tries to flip its label.

The victim sends one item; the attacker sends one request of K-1 items in the
same micro-batch. Both are planned by the server's own planner
(``codedsmooth.core.plan_groups``) in the server's scope: in ``batch`` scope the
attacker's items can land in the victim's coding group, so the victim's decoded
output depends on them; in ``request`` scope the planner never groups them, so
the victim's answer cannot move. The attacker optimises its items (anything in
[0, 1]) to raise the victim's loss in the batch-scope model, with EOT over the
server's draws.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.nn.functional as F

from codedsmooth.core import CodingPlan, CodingSpec, SeededRandomSource, apply_plan, plan_groups
from codedsmooth.models import Checkpoint

from .targets import HttpTarget


class MicroBatchModel:
    """Victims' logits when each victim's one-item request shares a micro-batch with one other request."""

    def __init__(self, ck: Checkpoint, spec: CodingSpec):
        self.spec = spec
        self.trunk, self.block = ck.model.eval().split(ck.target_block)
        self.code = spec.code()
        with torch.no_grad():
            self.filler_z = self.trunk(ck.filler.float())

    def __call__(self, x_victim: torch.Tensor, x_other: torch.Tensor, source) -> torch.Tensor:
        """``x_victim`` (M, ...), ``x_other`` (M, B, ...): victim m's micro-batch is [victim m | its B other items]."""
        m, b = x_other.shape[0], x_other.shape[1]
        z = self.trunk(torch.cat([torch.cat([x_victim[i : i + 1], x_other[i]]) for i in range(m)]))
        plans = [plan_groups([1, b], self.spec.scope, self.spec.k, self.filler_z.shape[0], source) for _ in range(m)]
        out = apply_plan(self.block, z, self.filler_z, CodingPlan.concat(plans), self.code, self.spec.decode_tolerance)
        return out[:: 1 + b]


def craft_cotenants(ck: Checkpoint, spec: CodingSpec, x_victim, y_victim, clean_pool, steps: int, eot: int, seed: int) -> torch.Tensor:
    """(M, K-1, *shape) attacker items for M victims, optimised in the batch-scope model.

    The attacker sends K-1 copies of one optimised image: whatever the shuffle and
    permutation, the victim's spline neighbours are then adversarial, which gives
    EOT a consistent gradient (independent items mostly average out over draws).
    """
    model = MicroBatchModel(ck, spec.with_scope("batch"))  # the attacker assumes the batch is coded together
    source = SeededRandomSource(seed)
    m, need = len(x_victim), spec.k - 1
    gen = torch.Generator().manual_seed(seed)
    item = clean_pool[torch.randint(0, len(clean_pool), (m,), generator=gen)].clone().float()
    step = 0.05
    for _ in range(steps):
        item.requires_grad_(True)
        mates = item.unsqueeze(1).expand(m, need, *item.shape[1:])
        loss = sum(F.cross_entropy(model(x_victim, mates, source), y_victim, reduction="sum") for _ in range(eot))
        (grad,) = torch.autograd.grad(loss, item)
        item = (item.detach() + step * grad.sign()).clamp(0.0, 1.0)
    return item.unsqueeze(1).expand(m, need, *item.shape[1:]).contiguous()


@torch.no_grad()
def _flips_in_process(ck, spec, x, y, clean_mates, adv_mates, seed, repeats=5) -> dict:
    """Victim labels with clean vs attacker batch-mates, under the same draws of the server's planner."""
    model = MicroBatchModel(ck, spec)
    flips, acc_clean, acc_adv = [], [], []
    for r in range(repeats):
        clean = model(x, clean_mates, SeededRandomSource(seed + r)).argmax(1)
        attacked = model(x, adv_mates, SeededRandomSource(seed + r)).argmax(1)
        flips.append(float((clean != attacked).float().mean()))
        acc_clean.append(float((clean == y).float().mean()))
        acc_adv.append(float((attacked == y).float().mean()))
    return {"flip_rate": float(np.mean(flips)), "victim_accuracy_clean_mates": float(np.mean(acc_clean)), "victim_accuracy_attacked": float(np.mean(acc_adv))}


def _flips_over_http(target: HttpTarget, x, adv_mates) -> dict:
    """Victim alone vs victim sent concurrently with its attacker's request, for each victim."""
    client = target.client
    xs = x.numpy().astype(np.float32)
    alone = np.concatenate(asyncio.run(client.predict_requests_async([xs[i : i + 1] for i in range(len(xs))]))).argmax(1)
    together = []
    for i in range(len(xs)):
        answers = asyncio.run(client.predict_requests_async([xs[i : i + 1], adv_mates[i].numpy().astype(np.float32)]))
        together.append(int(answers[0].argmax(1)[0]))
    together = np.array(together)
    return {"flip_rate": float((alone != together).mean()), "victim_labels_alone": alone.tolist(), "victim_labels_with_attacker": together.tolist()}


def cotenant_report(cfg, ck: Checkpoint, spec: CodingSpec, target, x, y, clean_pool) -> dict:
    if not spec.enabled:
        raise ValueError("the co-tenant probe needs RCI on (with RCI off, batch-mates cannot affect each other)")
    adv = craft_cotenants(ck, spec, x, y, clean_pool, cfg.steps, cfg.eot_samples, cfg.seed)
    result = {"cotenant": {"scope": spec.scope, "k": spec.k, "n": spec.n, "attacker_items_per_victim": spec.k - 1}}
    if isinstance(target, HttpTarget):
        result["cotenant"].update(_flips_over_http(target, x, adv))
    else:
        idx = torch.randint(0, len(clean_pool), (len(x), spec.k - 1), generator=torch.Generator().manual_seed(cfg.seed + 7))
        result["cotenant"].update(_flips_in_process(ck, spec, x, y, clean_pool[idx].float(), adv, cfg.seed))
    return result
