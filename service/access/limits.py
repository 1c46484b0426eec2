"""Per-client limits on items: a token bucket (rate) and a quota per window, and where their counters live.

:class:`Counters` is the arithmetic only (the clock is an argument): for each client a token
bucket of ``burst`` items refilled at ``rate`` items per second, and a quota of ``quota`` items
per window of ``window_s`` seconds, the window starting at the client's first item after the
previous one ended. A charge of ``n`` items is all or nothing: it is taken from both when both
have room, and otherwise refused with the whole seconds until it would fit (at least 1), or with
none (0) when it never can: more items than the whole quota, or than the bucket's burst. The
counters of one server process are a :class:`LocalLimiter` (its quota windows kept in SQLite by
``.quota_state`` unless ``--quota-state none``); Ray Serve replicas share one
``codedsmooth.service.access.shared_limits.SharedLimiter`` (the same counters in one Ray actor).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple


class CounterKey(NamedTuple):
    """Whose counters a charge goes to: a client's overall ones (``model`` None), or its own on one model."""

    client: str
    model: str | None = None


@dataclass(frozen=True)
class Limits:
    """One client's limits. ``rate``: items per second (None: no rate limit); ``quota``: items per window (None: none)."""

    rate: float | None
    burst: int
    quota: int | None
    window_s: float

    @property
    def any(self) -> bool:
        return self.rate is not None or self.quota is not None


@dataclass(frozen=True)
class Decision:
    """The outcome of a charge: allowed, or refused with why and in how many whole seconds the same request would fit (0: never)."""

    allowed: bool
    retry_after_s: int = 0
    reason: str = ""


ALLOWED = Decision(True)
EPSILON = 1e-6  # items and seconds: float rounding never turns "fits exactly at Retry-After" into a refusal


MAX_RETRY_AFTER_S = 366 * 86400  # a wait longer than a year is reported as a year


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(min(seconds, MAX_RETRY_AFTER_S) - EPSILON))


class Counters:
    """Every client's token bucket ``[tokens, updated]`` and quota window ``[start, used]``."""

    def __init__(self) -> None:
        self.buckets: dict[CounterKey, list[float]] = {}
        self.windows: dict[CounterKey, list[float]] = {}

    def _tokens(self, client: CounterKey, limits: Limits, now: float) -> float:
        assert limits.rate is not None  # called for a rate-limited client only
        tokens, updated = self.buckets.get(client, (float(limits.burst), now))
        return min(float(limits.burst), tokens + max(0.0, now - updated) * limits.rate)

    def _window(self, client: CounterKey, limits: Limits, now: float) -> tuple[float, float]:
        start, used = self.windows.get(client, (now, 0.0))
        if now + EPSILON >= start + limits.window_s:
            return now, 0.0
        return start, used

    def charge(self, client: CounterKey, items: int, limits: Limits, now: float) -> Decision:
        refusals: list[Decision] = []
        if limits.quota is not None:
            start, used = self._window(client, limits, now)
            if items > limits.quota:  # never fits: no Retry-After (0), whatever the other limits say
                never = (
                    "this key may send no items"
                    if limits.quota == 0
                    else f"a request of {items} items can never fit the quota of {limits.quota:g} items per {limits.window_s:g} s"
                )
                return Decision(False, 0, never)
            elif used + items > limits.quota:
                left = int(limits.quota - used)
                refusals.append(
                    Decision(
                        False,
                        _whole_seconds(start + limits.window_s - now),
                        f"quota of {limits.quota} items per {limits.window_s:g} s used ({left} left, {items} asked)",
                    )
                )
        if limits.rate is not None:
            if (
                items > limits.burst
            ):  # never fits the bucket: no Retry-After (waiting would only loop), whatever the other limits say
                return Decision(
                    False,
                    0,
                    f"a request of {items} items can never fit the rate limit's burst of {limits.burst} items; send at most {limits.burst} items per request",
                )
            tokens = self._tokens(client, limits, now)
            if tokens + EPSILON < items:
                refusals.append(
                    Decision(
                        False,
                        _whole_seconds((items - tokens) / limits.rate),
                        f"rate limit of {limits.rate:g} items/s (burst {limits.burst}) reached",
                    )
                )
        if refusals:
            return max(refusals, key=lambda d: d.retry_after_s)
        if limits.quota is not None:
            self.windows[client] = [start, used + items]
        if limits.rate is not None:
            self.buckets[client] = [max(0.0, tokens - items), now]
        return ALLOWED

    def refund(self, client: CounterKey, items: int, limits: Limits, now: float) -> None:
        """Give back a charge whose request was refused before it was queued."""
        if limits.quota is not None and client in self.windows:
            self.windows[client][1] = max(0.0, self.windows[client][1] - items)
        if limits.rate is not None and client in self.buckets:
            tokens = self._tokens(client, limits, now)
            self.buckets[client] = [min(float(limits.burst), tokens + items), now]


class LocalLimiter:
    """The counters of one server process (its event loop is their only user); ``counters``: e.g. kept in SQLite
    (``.quota_state``), default in memory."""

    def __init__(self, counters: Counters | None = None):
        self.counters = counters or Counters()

    async def charge(self, client: CounterKey, items: int, limits: Limits) -> Decision:
        return self.counters.charge(client, items, limits, time.monotonic())

    async def refund(self, client: CounterKey, items: int, limits: Limits) -> None:
        self.counters.refund(client, items, limits, time.monotonic())
