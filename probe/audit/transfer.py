"""The audit's transfer attack: white-box adversarials of a local surrogate model, sent to the endpoint.

An auditor without the endpoint's weights may still hold a model of its own for the same task. The
adversarials are the report's transfer source (``probe.report.stages.transfer_source``: APGD-CE on the
surrogate without RCI), so ``report`` and ``audit`` run one transfer attack; crafting them costs no query.
Each is then sent to the endpoint: it counts broken only when ``confirm`` fresh answers (at least one) all
miss the label, stopped at the first that does not, as the other attacks confirm their breaks.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from codedsmooth.models import Checkpoint

from ..attacks import QueryOutcome
from ..report.stages import transfer_source
from ..suite import SuiteConfig


class SurrogateTransfer:
    """Transfer from ``--surrogate``: APGD-CE on the surrogate, each adversarial confirmed at the endpoint."""

    access: ClassVar[str] = "labels"  # the endpoint's answers are read as labels only
    threat: ClassVar[str] = "transfer"
    steps: ClassVar[int] = SuiteConfig.apgd_steps  # the report's APGD budget on the surrogate

    @staticmethod
    def query_only(
        target,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        budget: int,
        votes: int,
        confirm: int,
        seed: int,
        surrogate: Checkpoint | None = None,
    ) -> QueryOutcome:
        """The surrogate's adversarials for ``x``, then at most ``max(confirm, 1)`` queries per image (``votes``
        plays no part: a transfer proposes one input per image, it does not search)."""
        if surrogate is None:
            raise ValueError("the transfer attack needs a surrogate checkpoint (--surrogate)")
        checks = max(confirm, 1)
        if checks > budget:
            raise ValueError(f"a budget of {budget} queries is below the transfer's {checks} confirmations")
        x_adv = transfer_source(SuiteConfig(seed=seed), surrogate, x, y, eps).clamp(0.0, 1.0)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)  # in the ball whatever the surrogate's rounding
        used = torch.zeros(len(x), dtype=torch.long)
        pending = torch.arange(len(x))
        for _ in range(checks):
            if not len(pending):
                break
            wrong = target.predict_proba(x_adv[pending]).argmax(1).cpu() != y[pending]
            used[pending] += 1
            pending = pending[wrong]
        broken = torch.zeros(len(x), dtype=torch.bool)
        broken[pending] = True
        return QueryOutcome(x_adv, used, broken)
