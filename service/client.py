"""HTTP client of the service (httpx): one request per call, or one request per item concurrently."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np


class ServiceError(RuntimeError):
    pass


class CodedSmoothClient:
    def __init__(self, url: str, timeout: float = 60.0, concurrency: int = 32, retries: int = 20):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.concurrency = concurrency
        self.retries = retries

    def models(self) -> list[dict]:
        r = httpx.get(self.url + "/v1/models", timeout=self.timeout)
        _raise_for(r)
        return r.json()

    async def _post(self, client: httpx.AsyncClient, items: np.ndarray) -> np.ndarray:
        for attempt in range(self.retries + 1):
            try:
                r = await client.post("/v1/predict", json={"inputs": items.tolist()})
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError) as exc:
                # a pooled connection closed under us (keep-alive expiry, server restart): a predict is
                # safe to send again
                if attempt == self.retries:
                    raise ServiceError(f"{self.url}: {type(exc).__name__} after {self.retries} retries") from exc
                await asyncio.sleep(min(2.0, 0.05 * (attempt + 1)))
                continue
            if r.status_code in (503, 504) and attempt < self.retries:  # queue full or the deadline passed in a busy server: back off
                await asyncio.sleep(min(2.0, float(r.headers.get("retry-after", "0.1")) * 0.1 * (attempt + 1)))
                continue
            _raise_for(r)
            return np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)
        raise ServiceError("unreachable")

    async def predict_requests_async(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Send each array as its own request, ``concurrency`` at a time; probabilities per request."""
        sem = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits) as client:

            async def one(items):
                async with sem:
                    return await self._post(client, items)

            return await asyncio.gather(*[one(items) for items in requests])

    def predict(self, items: np.ndarray) -> np.ndarray:
        """One request holding all ``items``."""
        return asyncio.run(self.predict_requests_async([items]))[0]

    def predict_each(self, items: np.ndarray) -> np.ndarray:
        """One request per item (how independent clients call the service)."""
        out = asyncio.run(self.predict_requests_async([items[i : i + 1] for i in range(len(items))]))
        return np.concatenate(out)


def _raise_for(r: httpx.Response) -> None:
    if r.status_code != 200:
        try:
            msg = r.json().get("error", r.text)
        except ValueError:
            msg = r.text
        raise ServiceError(f"HTTP {r.status_code} from {r.request.url}: {msg}")
