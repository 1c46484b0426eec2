"""Differentiable attack primitives: FGSM, PGD, APGD, their losses and step rules. Pure torch, no I/O.

``model_fn(x) -> logits`` may draw fresh randomness on every call (RCI); EOT
averages the input gradient over ``eot_samples`` calls. Inputs are raw pixels
in [0, 1] and every attack stays in the L∞ ball of radius ``eps`` and in [0, 1].
The trainer (PGD adversarial training) and the attack client (``codedsmooth.probe``)
both call these, so the rules (PGD's step size, APGD's step-size schedule) are
written once.

References: FGSM (Goodfellow et al. 2015), PGD (Madry et al. 2018), EOT (Athalye
et al. 2018), APGD with the CE and DLR losses (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor], torch.Tensor]
# a per-item loss of (logits, y) that PGD may maximise instead of a named one (TRADES's KL to clean probabilities)
ItemLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Literal["ce", "dlr", "dlr-targeted"]
LOSSES: tuple[Loss, ...] = get_args(Loss)


# ----------------------------------------------------------------------------- losses


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted Difference of Logits Ratio, per item: −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3).

    Shift- and scale-invariant in the logits; needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    y_on_top = logits.argmax(1) == y
    z_other = torch.where(y_on_top, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, per item: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4) / 2); needs at least 4 classes."""
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def _per_item_loss(
    name: str | ItemLoss, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
) -> torch.Tensor:
    if callable(name):
        return name(logits, y)
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    if name == "dlr-targeted":
        if target is None:
            raise ValueError("the dlr-targeted loss needs target classes")
        return dlr_targeted_loss(logits, y, target)
    raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")


def _loss_and_grad(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | ItemLoss,
    eot_samples: int,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∇ₓ of the summed per-item loss, per-item loss, logits), each averaged over ``eot_samples`` calls."""
    x = x.detach().requires_grad_(True)
    grad = torch.zeros_like(x)
    loss_sum: torch.Tensor | None = None
    logits_sum: torch.Tensor | None = None
    with torch.enable_grad():  # attacks may be called from inside no_grad/eval code
        for _ in range(eot_samples):
            logits = model_fn(x)
            per_item = _per_item_loss(loss, logits, y, target)
            (g,) = torch.autograd.grad(per_item.sum(), x)
            grad += g
            loss_sum = per_item.detach() if loss_sum is None else loss_sum + per_item.detach()
            logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
    assert loss_sum is not None and logits_sum is not None, "eot_samples must be at least 1"
    return grad / eot_samples, loss_sum / eot_samples, logits_sum / eot_samples


def input_gradient(
    model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eot_samples: int = 1, loss: str = "ce"
) -> torch.Tensor:
    """∇ₓ of the summed loss (cross-entropy by default), averaged over ``eot_samples`` calls of ``model_fn``."""
    return _loss_and_grad(model_fn, x, y, loss, eot_samples)[0]


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = (
        torch.rand(x.shape, generator=generator, device="cpu", dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        * 2
        - 1
    )
    return project(x + eps * noise, x, eps)


# ----------------------------------------------------------------------------- FGSM, PGD


def fgsm(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eps: float, eot_samples: int = 1) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al. 2015)."""
    grad = input_gradient(model_fn, x, y, eot_samples)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's default step size, 2.5 · ε / steps (Madry et al. 2018): enough to cross the ball in fewer than the steps."""
    return 2.5 * eps / max(steps, 1)


def _keep_better(
    best_x: torch.Tensor,
    best_loss: torch.Tensor,
    best_fooled: torch.Tensor,
    x_new: torch.Tensor,
    loss_new: torch.Tensor,
    fooled_new: torch.Tensor,
) -> None:
    """In place, per item: a misclassified point beats a classified one; otherwise the higher loss wins."""
    take = (fooled_new & ~best_fooled) | ((fooled_new == best_fooled) & (loss_new > best_loss))
    best_x[take] = x_new[take]
    best_loss[take] = loss_new[take]
    best_fooled |= fooled_new


def pgd(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    eot_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    restarts: int = 1,
    loss: str | ItemLoss = "ce",
    keep_best: bool = False,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """L∞ PGD (Madry et al. 2018); with ``eot_samples > 1`` it is EOT-PGD (Athalye et al. 2018).

    With ``keep_best`` (implied by ``restarts > 1``) each image gets, over all iterates of all
    restarts, one that is misclassified if any was, else the one of highest loss; otherwise the
    last iterate of the single run is returned (the historical behaviour). For a randomized
    ``model_fn`` "misclassified" and "loss" are judged on the mean of ``eot_samples`` calls.
    ``loss`` is "ce", "dlr" or a callable ``(logits, y) -> per-item loss`` to maximise.
    ``start``, when given, is the first iterate of every restart, used as given (in place of
    ``random_start``'s uniform draw; it is projected only by the first step).
    """
    if restarts < 1:
        raise ValueError("restarts must be at least 1")
    if not callable(loss) and loss not in ("ce", "dlr"):
        raise ValueError(f"pgd loss must be ce or dlr, got {loss!r}")
    step_size = step_size if step_size is not None else pgd_step_size(eps, steps)
    x = x.detach()
    keep_best = keep_best or restarts > 1
    best_x = x.clone()
    best_loss = torch.full((len(x),), -math.inf, device=x.device)
    best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    x_adv = x.clone()
    for _ in range(restarts):
        x_adv = (
            start.detach().clone()
            if start is not None
            else _uniform_start(x, eps, generator)
            if random_start
            else x.clone()
        )
        for _ in range(steps + (1 if keep_best else 0)):
            grad, item_loss, logits = _loss_and_grad(model_fn, x_adv, y, loss, eot_samples)
            if keep_best:  # the point whose loss was just measured
                _keep_better(
                    best_x, best_loss, best_fooled, x_adv, item_loss.to(best_loss.dtype), logits.argmax(1) != y
                )
            x_adv = project(x_adv + step_size * grad.sign(), x, eps)
        # with keep_best the loop measured every iterate: steps + 1 points, the last step's result unused
    return (best_x if keep_best else x_adv).detach()


# ----------------------------------------------------------------------------- APGD


def apgd(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    loss: str = "ce",
    restarts: int = 1,
    generator: torch.Generator | None = None,
    *,
    eot: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    target_classes: int = 9,
    trace: list[ApgdTrace] | None = None,
) -> torch.Tensor:
    """L∞ Auto-PGD (Croce & Hein 2020) with the CE, DLR or targeted-DLR loss.

    Step size starts at 2ε and is halved, at the checkpoints of :func:`apgd_checkpoints`, for each image
    where (1) the loss rose in at most ``rho`` of the steps since the last checkpoint, or
    (2) the step size was not halved at the last checkpoint and the best loss has not improved
    since; a halved image restarts from its best point. The update carries momentum:
    z = P(x + η·sign(∇)), x' = P(x + α(z − x) + (1 − α)(x − x_prev)) with α = ``momentum`` = 0.75
    (α = 1 on the first step), P the projection onto the ε-ball ∩ [0, 1].

    Returns per image a misclassified iterate if any restart found one, else the iterate of
    highest loss. ``loss="dlr-targeted"`` runs one restart per target class, taking the
    ``target_classes`` most likely wrong classes of the clean input in turn (APGD-T), each
    ``restarts`` times. ``eot`` averages gradients, losses and logits over that many calls of
    a randomized ``model_fn``. When ``trace`` is a list, an :class:`ApgdTrace` (per-image best loss
    and step size) after every iteration of every run is appended to it.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    if restarts < 1 or steps < 1 or eot < 1:
        raise ValueError("steps, restarts and eot must be at least 1")
    x = x.detach()
    best_x = x.clone()
    best_loss = torch.full((len(x),), -math.inf, device=x.device, dtype=torch.float64)
    best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    targets: list[torch.Tensor | None] = [None]
    if loss == "dlr-targeted":
        with torch.no_grad():
            clean = torch.stack([model_fn(x).detach() for _ in range(eot)]).mean(0)
        n_classes = clean.shape[1]
        order = clean.sort(dim=1, descending=True).indices
        wrong = order[order != y[:, None]].view(len(x), n_classes - 1)  # wrong classes, most likely first
        targets = [wrong[:, i] for i in range(min(target_classes, n_classes - 1))]
    for target in targets:
        for _ in range(restarts):
            todo = ~best_fooled
            if not bool(todo.any()):
                return best_x.detach()
            idx = todo.nonzero().flatten()
            run_x, run_loss, run_fooled = _apgd_run(
                model_fn,
                x[idx],
                y[idx],
                eps,
                steps,
                loss,
                generator,
                eot,
                rho,
                momentum,
                None if target is None else target[idx],
                trace,
            )
            sub_x, sub_loss, sub_fooled = best_x[idx], best_loss[idx], best_fooled[idx]
            _keep_better(sub_x, sub_loss, sub_fooled, run_x, run_loss.to(sub_loss.dtype), run_fooled)
            best_x[idx], best_loss[idx], best_fooled[idx] = sub_x, sub_loss, sub_fooled
    return best_x.detach()


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD may halve its step size: p_j · ``steps`` with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), in the reference code's integer arithmetic."""
    k = max(int(0.22 * steps), 1)
    decr, k_min = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], 0
    while at + k <= steps:
        at += k
        out.append(at)
        k = max(k - decr, k_min)
    return out


class ApgdTrace(NamedTuple):
    """One APGD iteration as ``apgd(trace=...)`` records it, per image."""

    best_loss: torch.Tensor  # the best loss so far
    step_size: torch.Tensor  # the step size for the next iteration (after this iteration's check)


def _apgd_run(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    loss: str,
    generator: torch.Generator | None,
    eot: int,
    rho: float,
    momentum: float,
    target: torch.Tensor | None,
    trace: list[ApgdTrace] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(x)
    view = (n,) + (1,) * (x.dim() - 1)
    step = torch.full(view, 2.0 * eps, device=x.device, dtype=x.dtype)
    x_adv = _uniform_start(x, eps, generator)
    grad, cur_loss, logits = _loss_and_grad(model_fn, x_adv, y, loss, eot, target)
    fooled = logits.argmax(1) != y
    x_fooled = torch.where(fooled.view(view), x_adv, x)
    x_best, loss_best, grad_best = x_adv.clone(), cur_loss.clone(), grad.clone()

    checks = set(apgd_checkpoints(steps))
    last_check = 0
    n_increase = torch.zeros(n, device=x.device)
    prev_loss = cur_loss.clone()
    loss_best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(n, dtype=torch.bool, device=x.device)
    x_prev = x_adv.clone()
    for i in range(steps):
        with torch.no_grad():
            a = momentum if i > 0 else 1.0
            z = project(x_adv + step * grad.sign(), x, eps)
            x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
            x_prev, x_adv = x_adv, x_new
        grad, cur_loss, logits = _loss_and_grad(model_fn, x_adv, y, loss, eot, target)
        with torch.no_grad():
            now_fooled = logits.argmax(1) != y
            x_fooled[now_fooled] = x_adv[now_fooled]
            fooled |= now_fooled
            n_increase += (cur_loss > prev_loss).float()
            prev_loss = cur_loss.clone()
            better = cur_loss > loss_best
            x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], cur_loss[better]
            if i + 1 in checks:
                oscillating = n_increase <= rho * (i + 1 - last_check)
                stalled = ~reduced_at_check & (loss_best_at_check >= loss_best)
                halve = oscillating | stalled
                step[halve] /= 2.0
                x_adv[halve] = x_best[halve]
                grad[halve] = grad_best[halve]
                reduced_at_check = halve
                loss_best_at_check = loss_best.clone()
                last_check = i + 1
                n_increase.zero_()
            if trace is not None:
                trace.append(ApgdTrace(loss_best.clone(), step.flatten().clone()))
    out = torch.where(fooled.view(view), x_fooled, x_best)
    return out.detach(), loss_best, fooled
