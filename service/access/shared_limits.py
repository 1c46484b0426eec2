"""Per-client limits shared by every Ray Serve replica: the counters of ``.limits`` in one named Ray actor.

``codedsmooth serve --replicas N --api-keys-file …`` starts :class:`LimitsActor` (named
``ACTOR_NAME`` in the namespace ``NAMESPACE``) before the replicas; each replica charges it
through a :class:`SharedLimiter`, so a client's rate and quota hold for the deployment as a whole
whichever replica Ray's router picks. The actor runs one call at a time (a charge is all or
nothing across replicas) on one clock (``time.monotonic`` of its process).

Its life: the actor belongs to the ``serve`` command's driver, which holds its handle while
serving (a non-detached actor ends with its last handle), so it ends with the command (or with a
local Ray it started). Its quota windows are kept in SQLite as a single server's are
(``.quota_state``: beside the keys file unless ``--quota-state``; written every
``--quota-flush-ms``, and on the driver's graceful stop), so a new ``serve`` and a restart of the
actor by Ray (``max_restarts=-1``, when its process dies) start from them, losing at most the last
flush interval's charges; rate buckets start full. With ``--quota-state none`` a restart starts
every client's quota window afresh. While it is down or restarting, predict requests get 503 +
``Retry-After`` (never unlimited answers).

This module imports ray (as ``codedsmooth.service.ray.serve`` does); nothing else in ``codedsmooth`` imports it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from codedsmooth.service.access.limits import CounterKey, Decision, Limits
from codedsmooth.service.access.quota_state import NONE, close_counters, open_counters
from codedsmooth.service.errors import Unavailable

log = logging.getLogger("codedsmooth.ray")

ACTOR_NAME = "codedsmooth-limits"
NAMESPACE = "codedsmooth"


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1)  # type: ignore[call-overload]  # ray's stubs lack the actor options
class LimitsActor:
    """The shared counters: one charge at a time."""

    def __init__(self, quota_state: str | None = None, api_keys_file: str | None = None, flush_s: float = 0.2):
        """``quota_state`` / ``api_keys_file``: where the quota windows are kept (absolute paths; the driver's settings)."""
        self.counters = open_counters(quota_state, api_keys_file, flush_s)
        self.started = time.time()

    def charge(self, client: CounterKey, items: int, limits: Limits) -> Decision:
        return self.counters.charge(client, items, limits, time.monotonic())

    def refund(self, client: CounterKey, items: int, limits: Limits) -> None:
        self.counters.refund(client, items, limits, time.monotonic())

    def close(self) -> None:
        """Write the quota windows not yet written (the driver's graceful stop)."""
        close_counters(self.counters)

    def state(self) -> dict:
        """Started when (epoch seconds) and how many clients it counts (a restart shows as a later start)."""
        return {"started": self.started, "clients": len(set(self.counters.buckets) | set(self.counters.windows))}


def start_limits_actor(quota_state: str | None = None, api_keys_file: str | None = None, flush_s: float = 0.2):
    """The shared counters' actor (created by the driver before the replicas; reused if it exists)."""
    absolute = [str(Path(p).resolve()) if p and p != NONE else p for p in (quota_state, api_keys_file)]
    options = LimitsActor.options  # type: ignore[attr-defined]  # ray.remote adds .options; its stubs do not say so
    actor = options(name=ACTOR_NAME, namespace=NAMESPACE, get_if_exists=True).remote(*absolute, flush_s)
    ray.get(actor.state.remote())
    log.info("per-client limits shared by all replicas in actor %s/%s", NAMESPACE, ACTOR_NAME)
    return actor


class SharedLimiter:
    """A replica's way to the shared counters (the interface of ``limits.LocalLimiter``)."""

    def __init__(self):
        self._actor = None

    def _handle(self):
        if self._actor is None:
            self._actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        return self._actor

    async def _call(self, method: str, *args):
        try:
            return await getattr(self._handle(), method).remote(*args)
        except (ray.exceptions.RayError, ValueError) as exc:  # ValueError: no actor of that name (yet)
            log.warning(
                "the shared per-client limits are unavailable (%s: %s): answering 503",
                type(exc).__name__,
                str(exc)[:300],
            )
            self._actor = None  # look it up again next time
            raise Unavailable("per-client limits are unavailable; retry", retry_after_s=1) from None

    async def charge(self, client: CounterKey, items: int, limits: Limits) -> Decision:
        return await self._call("charge", client, items, limits)

    async def refund(self, client: CounterKey, items: int, limits: Limits) -> None:
        await self._call("refund", client, items, limits)
