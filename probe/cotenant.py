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

import numpy as np
import torch
import torch.nn.functional as F

from codedsmooth.core import CodingSpec, SeededRandomSource
from codedsmooth.models import Checkpoint

from .targets import HttpTarget, RCIModel


def _victim_logits(model: RCIModel, x_victim: torch.Tensor, x_other: torch.Tensor, source) -> torch.Tensor:
    """Victims' logits, victim m's micro-batch being [victim m | one request of its B other items x_other[m]]."""
    m, b = x_other.shape[0], x_other.shape[1]
    z = model.trunk(x_victim)
    others_z = model.trunk(x_other.flatten(0, 1)).view(m, b, *z.shape[1:])
    return model.in_micro_batches(z, others_z, [b], source)


def craft_cotenants(
    ck: Checkpoint, spec: CodingSpec, x_victim, y_victim, clean_pool, steps: int, eot: int, seed: int
) -> torch.Tensor:
    """(M, K-1, *shape) attacker items for M victims, optimised in the batch-scope model.

    The attacker sends K-1 copies of one optimised image: whatever the shuffle and
    permutation, the victim's spline neighbours are then adversarial, which gives
    EOT a consistent gradient (independent items mostly average out over draws).
    """
    model = RCIModel(ck, spec.with_scope("batch"))  # the attacker assumes the batch is coded together
    source = SeededRandomSource(seed)
    m, need = len(x_victim), spec.k - 1
    gen = torch.Generator().manual_seed(seed)
    item = clean_pool[torch.randint(0, len(clean_pool), (m,), generator=gen)].clone().float()
    step = 0.05
    for _ in range(steps):
        item.requires_grad_(True)
        mates = item.unsqueeze(1).expand(m, need, *item.shape[1:])
        loss = sum(
            (
                F.cross_entropy(_victim_logits(model, x_victim, mates, source), y_victim, reduction="sum")
                for _ in range(eot)
            ),
            torch.zeros(()),
        )
        (grad,) = torch.autograd.grad(loss, item)
        item = (item.detach() + step * grad.sign()).clamp(0.0, 1.0)
    return item.unsqueeze(1).expand(m, need, *item.shape[1:]).contiguous()


@torch.no_grad()
def _flips_in_process(ck, spec, x, y, clean_mates, adv_mates, seed, repeats=5) -> dict:
    """Victim labels with clean vs attacker batch-mates, under the same draws of the server's planner."""
    model = RCIModel(ck, spec)
    flips, acc_clean, acc_adv = [], [], []
    for r in range(repeats):
        clean = _victim_logits(model, x, clean_mates, SeededRandomSource(seed + r)).argmax(1)
        attacked = _victim_logits(model, x, adv_mates, SeededRandomSource(seed + r)).argmax(1)
        flips.append(float((clean != attacked).float().mean()))
        acc_clean.append(float((clean == y).float().mean()))
        acc_adv.append(float((attacked == y).float().mean()))
    return {
        "flip_rate": float(np.mean(flips)),
        "victim_accuracy_clean_mates": float(np.mean(acc_clean)),
        "victim_accuracy_attacked": float(np.mean(acc_adv)),
    }


def _flips_over_http(target: HttpTarget, x, adv_mates) -> dict:
    """Victim alone vs victim sent concurrently with its attacker's request, for each victim."""
    endpoint = target.endpoint
    xs = x.numpy().astype(np.float32)
    alone = np.concatenate(endpoint.predict_requests([xs[i : i + 1] for i in range(len(xs))])).argmax(1)
    together = []
    for i in range(len(xs)):
        answers = endpoint.predict_requests([xs[i : i + 1], adv_mates[i].numpy().astype(np.float32)])
        together.append(int(answers[0].argmax(1)[0]))
    labels = np.array(together)
    return {
        "flip_rate": float((alone != labels).mean()),
        "victim_labels_alone": alone.tolist(),
        "victim_labels_with_attacker": labels.tolist(),
    }


def cotenant_report(cfg, ck: Checkpoint, spec: CodingSpec, target, x, y, clean_pool) -> dict:
    if not spec.enabled:
        raise ValueError("the co-tenant probe needs RCI on (with RCI off, batch-mates cannot affect each other)")
    adv = craft_cotenants(ck, spec, x, y, clean_pool, cfg.steps, cfg.eot_samples, cfg.seed)
    result = {"cotenant": {"scope": spec.scope, "k": spec.k, "n": spec.n, "attacker_items_per_victim": spec.k - 1}}
    if isinstance(target, HttpTarget):
        result["cotenant"].update(_flips_over_http(target, x, adv))
    else:
        idx = torch.randint(
            0, len(clean_pool), (len(x), spec.k - 1), generator=torch.Generator().manual_seed(cfg.seed + 7)
        )
        result["cotenant"].update(_flips_in_process(ck, spec, x, y, clean_pool[idx].float(), adv, cfg.seed))
    return result
