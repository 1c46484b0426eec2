"""Who may query, and how much: API keys checked on admission, items charged to per-client limits.

With ``--api-keys-file`` (see ``.keys`` for the format) every request but those on ``OPEN_PATHS``
needs ``Authorization: Bearer <key>``; the admission middleware calls :meth:`Access.authenticate`
before reading the body, and a missing or unknown key gets 401 + ``WWW-Authenticate: Bearer``.
The client is kept in ``scope["state"][CLIENT]``. Every predict route passes through
``Lifecycle.infer``, which charges the request's items with :meth:`Access.queue` as it is
queued: over the client's rate limit or quota it gets 429 + ``Retry-After`` and nothing is
queued or run. A charge is refunded only when the request is then refused before it is queued
(queue full, draining); once queued it counts, whatever its answer (504, 503 of a drain cut
short, a client that left), since the model may have run for it.

Open paths: the health checks (``/health/*``, ``/v2/health/*``: orchestrators probe them without
keys) and the API's description (``/docs``, ``/redoc``, ``/openapi.json``: they describe the
software, not this deployment: no model name, key or limit). Everything else, the metadata
routes and unknown paths included, needs a key.

Each refused request is logged once (warning) with its client's name or ``unknown key``, never
the key. The keys file is checked for changes every second by :meth:`Access.watch`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

from codedsmooth.service.access.keys import UNKNOWN, Client, KeysFile
from codedsmooth.service.access.limits import CounterKey, Limits, LocalLimiter
from codedsmooth.service.errors import TooManyRequests, Unauthorized, Unavailable, quoted
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.settings import ServeSettings

log = logging.getLogger("codedsmooth.access")
T = TypeVar("T")
REFUSAL_LOG_EVERY_S = 10.0

CLIENT = "codedsmooth.client"  # scope["state"] key: the authenticated keys.Client
HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})  # FastAPI's defaults, which the app keeps
OPEN_PATHS = HEALTH_PATHS | DOC_PATHS


class Access:
    """The keys table in force, the limits it sets, and the counters they are charged to (``limiter``)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics, known_models: Callable[[], tuple[set[str], set[str]]], limiter=None):
        """``known_models``: the server's (models, aliases) now, against which the keys file's per-model limits are checked."""
        self.settings = settings
        self.metrics = metrics
        assert settings.api_keys_file is not None  # made only where keys are required
        self.keys = KeysFile(settings.api_keys_file)
        self.limiter = limiter or LocalLimiter()
        self._refusals: dict[str, list] = {}  # client name -> [when last logged, refusals since]
        self.known_models = known_models
        self._labelled(self.keys.table.names)
        log.info("API keys required: %d clients in %s", len(self.keys.table.clients), self.keys.path)

    def _log_refusal(self, name: str, what: str) -> None:
        """One warning line per client at most every ``REFUSAL_LOG_EVERY_S``, with the count of refusals it stands for.

        Every refusal is counted in the metrics; the log is bounded so that a client sending bad keys
        as fast as it can costs the operator one line per interval, not one per request.
        """
        now = time.monotonic()
        last, since = self._refusals.get(name, (-math.inf, 0))
        if now - last < REFUSAL_LOG_EVERY_S:
            self._refusals[name] = [last, since + 1]
            return
        more = f"; {since} more refusals of this client since its last line" if since else ""
        log.warning("refused client %s: %s%s", name, what, more)
        self._refusals[name] = [now, 0]

    def _labelled(self, names: list[str]) -> None:
        """Create every client's series at 0, so rates and alerts see a client before its first request."""
        m = self.metrics
        m.keys_clients.set(len(names))
        m.client_refused.labels(UNKNOWN, "401")
        for name in names:
            m.client_requests.labels(name)
            m.client_items.labels(name)
            m.client_refused.labels(name, "429")

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS

    def authenticate(self, authorization: list[str], method: str, path: str) -> Client:
        """The client a request's ``Authorization`` header values name; ``Unauthorized`` (logged, counted) otherwise."""
        client, problem = None, ""
        if not authorization:
            problem = "no API key: send the header Authorization: Bearer <key>"
        elif len(authorization) > 1:
            problem = "more than one Authorization header"
        else:
            scheme, _, key = authorization[0].strip().partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                problem = "the Authorization header must be Bearer <key>"
            else:
                client = self.keys.table.find(key)
                if client is None:
                    problem = "unknown API key"
        if client is None:
            self._log_refusal(UNKNOWN, f"{method} {quoted(path)}: {problem} (401)")
            self.metrics.client_refused.labels(UNKNOWN, "401").inc()
            raise Unauthorized(problem, invalid_token=bool(authorization))
        self.metrics.client_requests.labels(client.name).inc()
        return client

    def resolve(self, client: Client, model=None) -> list[tuple[CounterKey, Limits]]:
        """The one place a request's effective limits are decided, each with the counters it is charged to.

        Overall: the client's line (``rate=`` / ``quota=``) over the server's ``--rate-limit`` / ``--quota``.
        On ``model`` (a repository's, or None): the line's ``rate@MODEL=`` / ``quota@MODEL=`` over the
        model's per-key limits from its serving.json, over none; charged only where that limits anything.
        """
        s = self.settings
        rate, quota = client.limits.over(s.rate_limit, s.quota)
        charges = [(CounterKey(client.name), Limits(rate=rate, burst=s.max_batch_size, quota=quota, window_s=s.quota_window_s))]
        if model is not None:
            rate, quota = client.on_model(model.name).over(*model.key_limits.over(None, None))
            if rate is not None or quota is not None:
                limits = Limits(rate=rate, burst=model.settings.max_batch_size, quota=quota, window_s=s.quota_window_s)
                charges.append((CounterKey(client.name, model.name), limits))
        return charges

    async def queue(self, client: Client, items: int, submit: Callable[[], T], model=None) -> T:
        """Charge ``items`` to ``client`` (and to its counters on ``model`` when the model or the client's line limits it there), then
        ``submit()`` (which queues the request) and return what it returns.

        Over a limit: ``TooManyRequests`` (logged, counted), nothing stays charged and ``submit`` is
        never called. When ``submit`` refuses (``Unavailable``: queue full, draining) the charges are given back.
        """
        charges = self.resolve(client, model)
        taken: list[tuple[CounterKey, Limits]] = []
        for key, limits in charges:
            if not limits.any:
                continue
            decision = await self.limiter.charge(key, items, limits)
            if not decision.allowed:
                for k, lim in taken:
                    await self.limiter.refund(k, items, lim)
                on = f" on model {key.model!r}" if key.model is not None else ""
                when = f"retry after {decision.retry_after_s} s" if decision.retry_after_s > 0 else "do not retry it"
                self._log_refusal(client.name, f"{decision.reason}{on}; {when} (429)")
                self.metrics.client_refused.labels(client.name, "429").inc()
                raise TooManyRequests(f"{decision.reason}{on}; {when}", decision.retry_after_s)
            taken.append((key, limits))
        try:
            queued = submit()
        except Unavailable:
            for key, limits in taken:
                await self.limiter.refund(key, items, limits)
            raise
        self.metrics.client_items.labels(client.name).inc(items)
        return queued

    def check_overrides(self) -> None:
        """Warn of each ``rate@MODEL`` / ``quota@MODEL`` of the keys file that names no model of this server (it would
        limit nothing: a misspelt name, or an alias, whose requests are charged to the model they reach)."""
        models, aliases = self.known_models()
        for client, kind, model in self.keys.table.model_overrides():
            if model not in models:
                what = "an alias; per-model limits name the models it routes to" if model in aliases else "no model of this server"
                log.warning("%s: client %r: %s@%s names %s (%s); it limits nothing", self.keys.path, client, kind, model, what, ", ".join(sorted(models)))

    def poll(self) -> None:
        """Reload the keys file if it changed: log and count the outcome."""
        reload = self.keys.poll()
        if reload is None:
            return
        if reload.error is None:
            self._labelled(self.keys.table.names)
            self.metrics.keys_reloads.labels("ok").inc()
            log.info("reloaded %s: %d clients", self.keys.path, reload.clients)
            self.check_overrides()
        else:
            self.metrics.keys_reloads.labels("error").inc()
            log.error("%s", reload.error)

    async def watch(self) -> None:
        """Poll the keys file every ``keys.interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.keys.interval_s)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive any surprise; the table in force stays
                log.exception("checking %s failed; keeping the table in force", self.keys.path)
