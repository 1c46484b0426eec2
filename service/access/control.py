"""Who may query, and how much: API keys checked on admission, items charged to per-client limits.

With ``--api-keys-file`` (see ``.keys`` for the format) every request but those on ``OPEN_PATHS``
needs ``Authorization: Bearer <key>``; the admission middleware calls :meth:`Access.authenticate`
before reading the body, and a missing or unknown key gets 401 + ``WWW-Authenticate: Bearer``.
The client is kept in ``scope["state"][CLIENT]``. An empty keys file fails closed: every request
gets 401 saying the server has no keys loaded.

Refuse before working: on a predict route (:func:`charges_items`) the admission then calls
:meth:`Access.hold`, which charges **one item** to the client's own counters from the request
line and headers alone. A client with no room left for even one item gets 429 there, before its
body is read, parsed or decoded, so a refused flood costs microseconds a request. Every predict
route then passes through ``Lifecycle.infer``, which settles with :meth:`Access.queue` once the
item count is known: the hold is given back and the request's items are charged as one charge
(over the client's rate limit or quota: 429 + ``Retry-After``, nothing charged, nothing queued).
A hold whose request never reaches the charge (a bad body, an unknown model) is given back when it
is answered (:meth:`Access.release`). A charge is refunded only when the request is then refused
before it is queued (queue full, draining); once queued it counts, whatever its answer (504, 503
of a drain cut short, a client that left), since the model may have run for it.

Open paths: the health checks (``/health/*``, ``/v2/health/*``: orchestrators probe them without
keys) and the API's description (``/docs``, ``/redoc``, ``/openapi.json``: they describe the
software, not this deployment: no model name, key or limit). Everything else, the metadata
routes and unknown paths included, needs a key.

Refusals are logged through a :class:`~.refusals.RefusalLog` with the client's name or ``unknown``,
never the key: one warning line per client and status per interval, with the count. The keys
file is checked for changes every second by :meth:`Access.watch`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from codedsmooth.service.access.keys import UNKNOWN, Client, KeysFile
from codedsmooth.service.access.limits import CounterKey, Limits, LocalLimiter
from codedsmooth.service.access.refusals import RefusalLog
from codedsmooth.service.errors import TooManyRequests, Unauthorized, Unavailable, quoted
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.settings import ServeSettings

log = logging.getLogger("codedsmooth.access")
T = TypeVar("T")

CLIENT = "codedsmooth.client"  # scope["state"] key: the authenticated keys.Client
HELD = "codedsmooth.held"  # scope["state"] key: the Hold charged on admission, settled by Access.queue
# The routes that charge items (v1 JSON and images, by default model or by name; v2 infer, with or without a version).
PREDICT_PATHS = re.compile(r"/v1(/models/[^/]+)?/predict(/image)?|/v2/models/[^/]+(/versions/[^/]+)?/infer")
NO_KEYS = "this server has no API keys loaded: every request is refused until its operator adds a key"
HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
DOC_PATHS = frozenset(
    {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)  # FastAPI's defaults, which the app keeps
OPEN_PATHS = HEALTH_PATHS | DOC_PATHS


def charges_items(method: str, path: str) -> bool:
    """Whether a request to ``path`` is one whose items are charged (a predict route), as far as its request line tells."""
    return method == "POST" and PREDICT_PATHS.fullmatch(path) is not None


@dataclass
class Hold:
    """Items charged on admission, before the body is read, to the client's own counters (``key``, under ``limits``).

    ``settled``: taken over by the request's charge (:meth:`Access.queue`) or given back (:meth:`Access.release`).
    """

    key: CounterKey
    limits: Limits
    items: int = 1
    settled: bool = False


class Access:
    """The keys table in force, the limits it sets, and the counters they are charged to (``limiter``)."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics,
        known_models: Callable[[], tuple[set[str], set[str]]],
        limiter=None,
    ):
        """``known_models``: the server's (models, aliases) now, against which the keys file's per-model limits are checked."""
        self.settings = settings
        self.metrics = metrics
        assert settings.api_keys_file is not None  # made only where keys are required
        self.keys = KeysFile(settings.api_keys_file)
        self.limiter = limiter or LocalLimiter()
        self.refusals = RefusalLog(log)  # every refusal is counted in the metrics; the log is bounded
        self.known_models = known_models
        self._client_series: dict[tuple, Any] = {}  # (metric, client[, status]) -> its series (see _series)
        self._labelled(self.keys.table.names)
        log.info("API keys required: %d clients in %s", len(self.keys.table.clients), self.keys.path)
        self._warn_if_empty()

    def _log_refusal(self, name: str, status: int, what: Callable[[], str]) -> None:
        self.refusals.refused(f"client {name}", str(status), what)

    def _warn_if_empty(self) -> None:
        if not self.keys.table.clients:
            log.warning("keys file %s holds no keys: every request is refused (401) until one is added", self.keys.path)

    def _labelled(self, names: list[str]) -> None:
        """Create every client's series at 0, so rates and alerts see a client before its first request."""
        m = self.metrics
        m.keys_clients.set(len(names))
        m.client_refused.labels(client=UNKNOWN, status="401")
        for name in names:
            m.client_requests.labels(client=name)
            m.client_items.labels(client=name)
            m.client_refused.labels(client=name, status="429")

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS

    def authenticate(self, authorization: list[str], method: str, path: str) -> Client:
        """The client a request's ``Authorization`` header values name; ``Unauthorized`` (logged, counted) otherwise."""
        client, problem = None, ""
        if not self.keys.table.clients:
            problem = NO_KEYS
        elif not authorization:
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
            self._log_refusal(UNKNOWN, 401, lambda: f"{method} {quoted(path)}: {problem} (401)")
            self._series(self.metrics.client_refused, client=UNKNOWN, status="401").inc()
            raise Unauthorized(problem, invalid_token=bool(authorization))
        self._series(self.metrics.client_requests, client=client.name).inc()
        return client

    def _series(self, metric, **labels: str):
        """``metric``'s series for a client (and status), looked up once: a refused flood costs a dict lookup per
        request, not prometheus' labels(). Bounded by the keys files' names, plus "unknown", times two statuses."""
        key = (id(metric), *labels.items())
        series = self._client_series.get(key)
        if series is None:
            series = self._client_series[key] = metric.labels(**labels)
        return series

    def resolve(self, client: Client, model=None) -> list[tuple[CounterKey, Limits]]:
        """The one place a request's effective limits are decided, each with the counters it is charged to.

        Overall: the client's line (``rate=`` / ``quota=``) over the server's ``--rate-limit`` / ``--quota``.
        On ``model`` (a repository's, or None): the line's ``rate@MODEL=`` / ``quota@MODEL=`` over the
        model's per-key limits from its serving.json, over none; charged only where that limits anything.
        """
        s = self.settings
        rate, quota = client.limits.over(s.rate_limit, s.quota)
        charges = [
            (CounterKey(client.name), Limits(rate=rate, burst=s.max_batch_size, quota=quota, window_s=s.quota_window_s))
        ]
        if model is not None:
            rate, quota = client.on_model(model.name).over(*model.key_limits.over(None, None))
            if rate is not None or quota is not None:
                limits = Limits(rate=rate, burst=model.settings.max_batch_size, quota=quota, window_s=s.quota_window_s)
                charges.append((CounterKey(client.name, model.name), limits))
        return charges

    async def hold(self, client: Client) -> Hold | None:
        """Charge one item to ``client``'s own counters before the body is read (None: the client has no limit there).

        One item is what every predict request holds at least, so the hold never refuses a request
        that its charge would let through; a client without room for one gets ``TooManyRequests``
        (logged, counted) at once, and no body of its is read. Its ``Retry-After`` is when one item
        fits (a lower bound for a larger request).
        """
        key, limits = self.resolve(client)[0]
        if not limits.any:
            return None
        decision = await self.limiter.charge(key, 1, limits)
        if not decision.allowed:
            self._refuse(client, key, decision.reason, decision.retry_after_s, " (checked before reading the body)")
        return Hold(key, limits)

    async def release(self, held: Hold) -> None:
        """Give back a hold that no charge took over (its request was answered before its items were charged)."""
        if not held.settled:
            held.settled = True
            await self.limiter.refund(held.key, held.items, held.limits)

    def _refuse(self, client: Client, key: CounterKey, reason: str, retry_after_s: int, note: str = "") -> NoReturn:
        on = f" on model {key.model!r}" if key.model is not None else ""
        when = f"retry after {retry_after_s} s" if retry_after_s > 0 else "do not retry it"
        self._log_refusal(client.name, 429, lambda: f"{reason}{on}; {when}{note} (429)")
        self._series(self.metrics.client_refused, client=client.name, status="429").inc()
        raise TooManyRequests(f"{reason}{on}; {when}", retry_after_s)

    async def queue(
        self, client: Client, items: int, submit: Callable[[], T], model=None, held: Hold | None = None
    ) -> T:
        """Charge ``items`` to ``client`` (and to its counters on ``model`` when the model or the client's line limits it there), then
        ``submit()`` (which queues the request) and return what it returns.

        ``held``: the request's :meth:`hold`, given back just before the charge (in one step of the
        event loop with the local counters, so no other request can take its room in between): the
        request's items are charged once, all or nothing.
        Over a limit: ``TooManyRequests`` (logged, counted), nothing stays charged and ``submit`` is
        never called. When ``submit`` refuses (``Unavailable``: queue full, draining) the charges are given back.
        """
        if held is not None:
            await self.release(held)
        charges = self.resolve(client, model)
        taken: list[tuple[CounterKey, Limits]] = []
        for key, limits in charges:
            if not limits.any:
                continue
            decision = await self.limiter.charge(key, items, limits)
            if not decision.allowed:
                for k, lim in taken:
                    await self.limiter.refund(k, items, lim)
                self._refuse(client, key, decision.reason, decision.retry_after_s)
            taken.append((key, limits))
        try:
            queued = submit()
        except Unavailable:
            for key, limits in taken:
                await self.limiter.refund(key, items, limits)
            raise
        self._series(self.metrics.client_items, client=client.name).inc(items)
        return queued

    def check_overrides(self) -> None:
        """Warn of each ``rate@MODEL`` / ``quota@MODEL`` of the keys file that names no model of this server (it would
        limit nothing: a misspelt name, or an alias, whose requests are charged to the model they reach)."""
        models, aliases = self.known_models()
        for client, kind, model in self.keys.table.model_overrides():
            if model not in models:
                what = (
                    "an alias; per-model limits name the models it routes to"
                    if model in aliases
                    else "no model of this server"
                )
                log.warning(
                    "%s: client %r: %s@%s names %s (%s); it limits nothing",
                    self.keys.path,
                    client,
                    kind,
                    model,
                    what,
                    ", ".join(sorted(models)),
                )

    def poll(self) -> None:
        """Reload the keys file if it changed: log and count the outcome."""
        reload = self.keys.poll()
        if reload is None:
            return
        if reload.error is None:
            self._labelled(self.keys.table.names)
            self.metrics.keys_reloads.labels(result="ok" if reload.clients else "empty").inc()
            log.info("reloaded %s: %d clients", self.keys.path, reload.clients)
            self._warn_if_empty()
            self.check_overrides()
        else:
            self.metrics.keys_reloads.labels(result="error").inc()
            log.error("%s", reload.error)

    async def watch(self) -> None:
        """Poll the keys file every ``keys.interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.keys.interval_s)
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watch must outlive any surprise; the table in force stays
                log.exception("checking %s failed; keeping the table in force", self.keys.path)
