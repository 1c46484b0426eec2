"""The one HTTP transport of the probe: every query ``attack --url`` and ``audit`` send goes through it.

It owns the plumbing both need and neither should copy: kept connections on one event loop, ``concurrency``
requests in flight, the API key (``Authorization: Bearer``, from :data:`API_KEY_ENV` by default), the query
count with its hard cap, and the retries. A 429 or 503 with ``Retry-After`` is waited out as told, counted
and sent again (the wait is the endpoint's own defence, so it is reported, not hidden); a ``Retry-After``
longer than ``max_wait_s`` (a spent quota), or a 429 without one (a request that never fits), stops at once.
A 504 (a busy server's deadline) and a dropped pooled connection are retried after a short backoff.
What a request holds and how an answer reads is the caller's (``probe.endpoint``): this module knows HTTP only.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

API_KEY_ENV = "CODEDSMOOTH_API_KEY"  # the same variable as the service's own client (service.client)
Request = tuple[str, dict[str, Any]]  # (path, httpx request arguments)


class QueryCapReached(RuntimeError):
    """The next request would pass the hard cap on total queries."""


class EndpointRefused(ValueError):
    """The endpoint answered a request with a client error (4xx other than a waited-out 429): the request does not fit it."""


@dataclass
class Traffic:
    """What the endpoint cost: queries (items) and requests sent, the 429s and 503s met, and the time waited on them."""

    queries: int = 0
    requests: int = 0
    status: Counter = field(default_factory=Counter)
    waited_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "requests": self.requests,
            "status": {str(k): v for k, v in self.status.items()},
            "waited_s": self.waited_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Traffic:
        return cls(
            int(d["queries"]),
            int(d["requests"]),
            Counter({int(k): int(v) for k, v in d["status"].items()}),
            float(d["waited_s"]),
        )


def raise_for(r: httpx.Response, what: str) -> None:
    """Nothing for a 200; :class:`EndpointRefused` for a client error, ``ConnectionError`` for the rest."""
    if r.status_code == 200:
        return
    try:
        msg = r.json().get("error", r.text)
    except (ValueError, AttributeError):
        msg = r.text
    if 400 <= r.status_code < 500:
        raise EndpointRefused(f"{what}: HTTP {r.status_code}: {str(msg)[:300]}")
    raise ConnectionError(f"{what}: HTTP {r.status_code}: {str(msg)[:300]}")


def retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class HttpTransport:
    """Requests to one base URL, counted, capped and retried; one event loop and connection pool for its lifetime."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 50,
        max_wait_s: float = 120.0,
        max_queries: int | None = None,
        traffic: Traffic | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be positive, got {concurrency}")
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.max_queries = max_queries
        self.traffic = traffic or Traffic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None

    def get(self, path: str) -> httpx.Response:
        """One GET (metadata): not a query, not retried."""
        try:
            return httpx.get(self.url + path, headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"cannot reach a server at {self.url}: {exc}") from None

    def charge(self, items: int) -> None:
        """Count ``items`` queries before they are sent; refused past the cap (nothing is counted then)."""
        cap = self.max_queries
        if cap is not None and self.traffic.queries + items > cap:
            raise QueryCapReached(
                f"the next {items} queries would pass the cap of {cap} (--max-queries); {self.traffic.queries} sent"
            )
        self.traffic.queries += items

    def post_all(self, requests: list[Request]) -> list[httpx.Response]:
        """Send every request (``concurrency`` at a time, on the kept connections); their 200 answers, in order."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            self._http = None
        if self._http is None:
            n = self.concurrency
            self._http = httpx.AsyncClient(
                base_url=self.url,
                timeout=self.timeout_s,
                headers=self.headers,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
        http = self._http
        sem = asyncio.Semaphore(self.concurrency)

        async def one(request: Request) -> httpx.Response:
            async with sem:
                return await self._post(http, *request)

        async def everything() -> list[httpx.Response]:
            return list(await asyncio.gather(*[one(r) for r in requests]))

        return self._loop.run_until_complete(everything())

    async def _post(self, client: httpx.AsyncClient, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                self.traffic.requests += 1
                r = await client.post(path, **kwargs)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError) as exc:
                # a pooled connection closed under us (keep-alive expiry, server restart): a predict is safe to send again
                if last:
                    raise ConnectionError(f"{self.url}: {type(exc).__name__} after {self.retries} retries") from None
                await asyncio.sleep(min(2.0, 0.05 * (attempt + 1)))
                continue
            if r.status_code in (429, 503, 504):
                self.traffic.status[r.status_code] += 1
                wait = retry_after(r) if r.status_code != 504 else None
                if last or (r.status_code == 429 and wait is None):  # a 429 without Retry-After never fits
                    break
                if wait is None:  # a busy server's deadline, or a 503 that does not say: back off
                    wait = min(2.0, 0.1 * (attempt + 1))
                elif wait > self.max_wait_s:
                    raise ConnectionError(
                        f"{self.url} answered {r.status_code} with Retry-After {wait:g} s, longer than "
                        f"{self.max_wait_s:g} s (a spent quota?)"
                    )
                self.traffic.waited_s += wait
                await asyncio.sleep(wait)
                continue
            break
        raise_for(r, f"POST {self.url}{path}")
        return r

    def close(self) -> None:
        """Close the kept connections and the event loop (a later request opens new ones)."""
        if self._loop is not None and not self._loop.is_closed():
            if self._http is not None:
                self._loop.run_until_complete(self._http.aclose())
            self._loop.close()
        self._loop, self._http = None, None
