"""Co-tenant probe: an attacker's requests share a device batch with a victim's and try to flip its label.

In ``batch`` scope the attacker's items can land in the victim's coding group,
so the victim's decoded output depends on them; the attacker optimises its own
K-1 items (anything in [0, 1]) to raise the victim's loss, with EOT over the
permutation. In ``request`` scope the victim is coded only with trusted filler.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.nn.functional as F

from codedsmooth.core import SplineCode, rci_forward_with_companions
from codedsmooth.models import Checkpoint

from .targets import CodingSpec, HttpTarget


def craft_cotenants(ck: Checkpoint, spec: CodingSpec, x_victim, y_victim, clean_pool, steps: int, eot: int, seed: int) -> torch.Tensor:
    """(M, K-1, *shape) attacker items for M victims, optimised in the batch-scope model.

    The attacker sends K-1 copies of one optimised image: whatever the permutation,
    the victim's spline neighbours are then adversarial, which gives EOT a
    consistent gradient (independent items mostly average out over permutations).
    """
    model = ck.model.eval()
    trunk, block = model.split(ck.target_block)
    code = SplineCode(spec.k, spec.n)
    gen = torch.Generator().manual_seed(seed)
    m, need = len(x_victim), spec.k - 1
    with torch.no_grad():
        z_victim = trunk(x_victim)
    item = clean_pool[torch.randint(0, len(clean_pool), (m,), generator=gen)].clone()
    step = 0.05
    for _ in range(steps):
        item.requires_grad_(True)
        z_item = trunk(item)
        z_mates = z_item.unsqueeze(1).expand(m, need, *z_item.shape[1:])
        loss = sum(
            F.cross_entropy(rci_forward_with_companions(block, z_victim, z_mates, code, gen), y_victim, reduction="sum")
            for _ in range(eot)
        )
        (grad,) = torch.autograd.grad(loss, item)
        item = (item.detach() + step * grad.sign()).clamp(0.0, 1.0)
    return item.unsqueeze(1).expand(m, need, *item.shape[1:]).contiguous()


@torch.no_grad()
def _labels_in_process(ck, spec, x_victim, companions_x, seed) -> torch.Tensor:
    trunk, block = ck.model.split(ck.target_block)
    code = SplineCode(spec.k, spec.n)
    z = trunk(x_victim)
    zc = trunk(companions_x.flatten(0, 1)).view(len(x_victim), spec.k - 1, *z.shape[1:])
    return rci_forward_with_companions(block, z, zc, code, torch.Generator().manual_seed(seed)).argmax(1)


def _flips_in_process(ck, spec, x, y, clean_mates, adv_mates, seed, repeats=5) -> dict:
    """Victim labels with clean vs attacker batch-mates, under the same random draws."""
    filler = ck.filler[torch.randint(0, len(ck.filler), (len(x), spec.k - 1), generator=torch.Generator().manual_seed(seed))]
    flips, acc_clean, acc_adv = [], [], []
    for r in range(repeats):
        if spec.scope == "batch":
            clean = _labels_in_process(ck, spec, x, clean_mates, seed + r)
            attacked = _labels_in_process(ck, spec, x, adv_mates, seed + r)
        else:  # the attacker's items never enter the victim's group: its companions are filler either way
            clean = _labels_in_process(ck, spec, x, filler, seed + r)
            attacked = _labels_in_process(ck, spec, x, filler, seed + r)
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
    attack_spec = CodingSpec(True, "batch", spec.k, spec.n)  # the attacker assumes the batch is coded together
    adv = craft_cotenants(ck, attack_spec, x, y, clean_pool, cfg.steps, cfg.eot_samples, cfg.seed)
    result = {"cotenant": {"scope": spec.scope, "k": spec.k, "n": spec.n, "attacker_items_per_victim": spec.k - 1}}
    if isinstance(target, HttpTarget):
        result["cotenant"].update(_flips_over_http(target, x, adv))
    else:
        idx = torch.randint(0, len(clean_pool), (len(x), spec.k - 1), generator=torch.Generator().manual_seed(cfg.seed + 7))
        result["cotenant"].update(_flips_in_process(ck, spec, x, y, clean_pool[idx], adv, cfg.seed))
    return result
