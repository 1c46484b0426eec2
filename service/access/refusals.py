"""Refusals in the log, rate-limited and aggregated: one line per (who, reason) per interval, with the count.

A client that sends bad keys, a used-up quota or malformed requests as fast as it can costs the
operator one line per interval and reason, not one per request; every refusal is still counted in
the metrics by whoever refuses it. The clock is an argument so the arithmetic is tested without
waiting. Only the event loop's thread calls it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

REFUSAL_LOG_EVERY_S = 10.0
MAX_TRACKED = 1024  # distinct (who, reason) pairs remembered at once; beyond it they are pooled as OTHERS
OTHERS = "others"


class RefusalLog:
    """Writes the first refusal of a (who, reason) pair at once, then at most one line per ``interval_s`` for it.

    A line after the first says how many refusals of the pair it stands for since the pair's last
    line. The pairs it remembers are bounded (``max_tracked``): pairs quiet for an interval are
    forgotten first, and when all are recent a new sender is pooled under ``who=OTHERS``, so many
    peers cannot grow it or the log without bound either.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval_s: float = REFUSAL_LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED,
    ):
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self.clock = clock
        self.max_tracked = max_tracked
        self._pairs: dict[tuple[str, str], list[float]] = {}  # (who, reason) -> [time of its last line, refusals since]

    def refused(self, who: str, reason: str, detail: Callable[[], str] | str = "") -> bool:
        """Count one refusal of ``who`` for ``reason``; write a line when its pair is due. Whether a line was written.

        ``detail``: what the line says after ``who`` (default: ``reason``); a callable is called only
        when a line is written, so building it costs nothing for the refusals a line stands for.
        """
        now = self.clock()
        key = (who, reason)
        entry = self._pairs.get(key)
        if entry is None and len(self._pairs) >= self.max_tracked:
            self._forget_quiet(now)
            if len(self._pairs) >= self.max_tracked:
                key = (OTHERS, reason)
                entry = self._pairs.get(key)
        if entry is not None and now - entry[0] < self.interval_s:
            entry[1] += 1
            return False
        since = int(entry[1]) if entry is not None else 0
        text = detail() if callable(detail) else (detail or reason)
        more = f"; {since} more like it since the last line" if since else ""
        self.logger.log(self.level, "refused %s: %s%s", key[0], text, more)
        self._pairs[key] = [now, 0]
        return True

    def _forget_quiet(self, now: float) -> None:
        """Drop the pairs whose last line is an interval old (a later refusal of theirs is written at once anyway;
        the count they held is in the metrics, not in a line)."""
        for key in [k for k, (last, _) in self._pairs.items() if now - last >= self.interval_s]:
            del self._pairs[key]
