"""What one place says about a client's rate and quota: a keys-file line, its ``rate@MODEL`` /
``quota@MODEL``, or a model's ``serving.json``.

Each limit is a value, ``None`` (no limit) or :data:`INHERIT` (this place says nothing: what applies
without it holds). The three answers are kept apart by type, so "no limit" can never be mistaken for
"not given". ``Access.resolve`` layers them into the limits a request is charged to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Inherit(enum.Enum):
    """The type of :data:`INHERIT` (an enum member: one value, kept by pickling, e.g. into Ray)."""

    INHERIT = "inherit"

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT = Inherit.INHERIT


@dataclass(frozen=True)
class LimitOverride:
    """A rate (items per second) and a quota (items per window), each a value, None (no limit) or ``INHERIT``."""

    rate: float | None | Inherit = INHERIT
    quota: int | None | Inherit = INHERIT

    def over(self, rate: float | None, quota: int | None) -> tuple[float | None, int | None]:
        """This override's rate and quota, with ``rate`` / ``quota`` where it inherits."""
        return (rate if self.rate is INHERIT else self.rate), (quota if self.quota is INHERIT else self.quota)


NO_OVERRIDE = LimitOverride()
