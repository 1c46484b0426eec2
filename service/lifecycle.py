"""The server's lifecycle: loading, readiness, admission, in-flight counting and draining, in one object.

``Lifecycle`` is the only holder of request-path state. Every HTTP request is admitted through it
by ``admission.AdmissionMiddleware``, which stamps its arrival and deadlines, counts it in flight,
checks its API key (``access``, with ``--api-keys-file``) and records its status. Routes reach the
lifecycle with ``current_lifecycle(request)``; a route that serves a model takes it with
:meth:`Lifecycle.use_model` (held until the request is answered, so an unload waits for it), and
every predict route queues its items through :meth:`Lifecycle.infer`, which charges them to the
client's limits first. The models themselves are the ``repository``'s (one, or a model repository).

Threads: torch work (load, warm-up, inference) of every model runs on the single model thread; image decoding
(Pillow and numpy only) runs on a separate decode thread; neither runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from fastapi import Request

from codedsmooth.service.access.control import CLIENT, HELD, Access
from codedsmooth.service.access.limits import LocalLimiter
from codedsmooth.service.access.quota_state import close_counters, open_counters
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.errors import ClientGone, DeadlineExceeded, Unavailable
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.repository.registry import Repository, ServedModel, end_model_threads
from codedsmooth.service.settings import ServeSettings, cpu_quota

log = logging.getLogger("codedsmooth.service")

Phase = Literal["loading", "ready", "draining", "stopped"]
EngineFactory = Callable[..., InferenceEngine]  # (checkpoint, settings, device) -> engine
MODEL = "codedsmooth.model"  # scope["state"] key: the ServedModel a request was routed to


@dataclass(frozen=True)
class Admission:
    """When a request arrived, when its answer is due, and by when its body must have arrived."""

    arrival: float  # time.monotonic()
    deadline: float
    body_deadline: float


class Lifecycle:
    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics | None = None,
        engine_factory: EngineFactory | None = None,
        limiter=None,
    ):
        """``limiter``: where the per-client counters live (default: in this process; Ray Serve replicas share one)."""
        self.settings = settings
        self.metrics = metrics or Metrics(by_model=settings.model_repository is not None)
        self._watch_task: asyncio.Task | None = None
        self.engine_factory = engine_factory or InferenceEngine
        self.phase: Phase = "loading"
        self.in_flight = 0
        self._no_requests: asyncio.Event | None = None  # set while in_flight == 0 (made on the loop)
        self._drain_task: asyncio.Task | None = None
        self._stop_now = asyncio.Event()  # set by stop_now(): the drain stops waiting for accepted work
        self.model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codedsmooth-model")
        self.decode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codedsmooth-decode")
        self.repository = Repository(settings, self.metrics, self.engine_factory, self.model_executor)
        self._own_limiter: LocalLimiter | None = (
            None  # this process's counters (quota windows kept in SQLite unless --quota-state none)
        )
        if settings.api_keys_file and limiter is None:
            limiter = self._own_limiter = LocalLimiter(
                open_counters(settings.quota_state, settings.api_keys_file, settings.quota_flush_ms / 1000.0)
            )
        self.access = (
            Access(settings, self.metrics, self.repository.known_names, limiter) if settings.api_keys_file else None
        )  # None: open to anyone

    # ---- loading -----------------------------------------------------------

    def _load(self) -> None:
        torch.set_num_threads(self.settings.threads or cpu_quota())  # on the model thread, as all torch work
        self.repository.load_all()

    async def start(self) -> None:
        self._no_requests = asyncio.Event()
        if self.in_flight == 0:
            self._no_requests.set()
        await asyncio.get_running_loop().run_in_executor(self.model_executor, self._load)
        self.repository.start()
        if self.access is not None:
            self.access.check_overrides()  # the models are loaded now
            self._watch_task = asyncio.get_running_loop().create_task(
                self.access.watch(), name="codedsmooth-keys-watch"
            )
        if self.phase == "loading":  # a drain may have begun while loading
            self.phase = "ready"
        self.update_ready()

    def update_ready(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        """Serving, with every model the repository marks required loaded."""
        return self.phase == "ready" and self.repository.required_loaded

    @property
    def draining(self) -> bool:
        return self.phase in ("draining", "stopped")

    @property
    def model_busy(self) -> bool:
        """Whether the model thread is still running a device batch."""
        return any(b.model_running for b in self.repository.batchers())

    # ---- admission ---------------------------------------------------------

    def admit(self, arrival: float | None = None) -> Admission:
        """Count a request in flight; its deadlines run from ``arrival`` (when its first byte was read; default: now)."""
        now = time.monotonic() if arrival is None else arrival
        deadline = now + self.settings.timeout_ms / 1000.0
        self.in_flight += 1
        self.metrics.in_flight.inc()
        if self._no_requests is not None:
            self._no_requests.clear()
        return Admission(
            arrival=now, deadline=deadline, body_deadline=min(deadline, now + self.settings.body_timeout_s)
        )

    def release(self, admission: Admission, endpoint: str, status: int, model: ServedModel | None = None) -> None:
        """The request is answered: count it (by the model it was routed to, with a repository) and let go of its model."""
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        if self.in_flight == 0 and self._no_requests is not None:
            self._no_requests.set()
        if model is not None:
            model.holders -= 1
        name = model.name if model is not None else None
        self.metrics.count_request(endpoint, status, model=name)
        self.metrics.observe_latency(endpoint, time.monotonic() - admission.arrival, model=name)

    def require_ready(self) -> None:
        if self.draining:
            raise Unavailable("server is shutting down", retry_after_s=5)
        if self.phase != "ready":
            raise Unavailable("model is loading", retry_after_s=2)

    def describe_model(self, name: str) -> ServedModel:
        """The model ``name`` names (an alias: its first loaded model), for metadata; 404 when there is none."""
        self.require_ready()
        return self.repository.describe(name)

    def use_model(self, request: Request, name: str | None) -> ServedModel:
        """Route the request to ``name`` (None: the default model; an alias: a weighted draw) and hold that model until it is answered."""
        self.require_ready()
        state = request.scope["state"]
        if MODEL in state:  # one model per request
            return state[MODEL]
        model = self.repository.default_model() if name is None else self.repository.resolve(name)
        model.holders += 1
        state[MODEL] = model
        return model

    # ---- work --------------------------------------------------------------

    async def decode(self, fn: Callable[..., Any], *args) -> Any:
        """Run a decoder (Pillow/numpy, never torch kernels) on the decode thread."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_executor, fn, *args)

    async def infer(self, request: Request, x: torch.Tensor, model: ServedModel) -> np.ndarray:
        """Charge ``x``'s items to the client (429 over a limit), queue it on ``model``, wait for its probabilities; 504 past the deadline, 499 (dropped) if the client leaves."""
        self.require_ready()
        state = request.scope["state"]
        admission: Admission = state["admission"]

        batcher = model.batcher
        assert batcher is not None  # started with its model

        def submit() -> asyncio.Future:
            return batcher.submit(x, admission.arrival, admission.deadline)

        client = state.get(CLIENT)  # set by the admission when keys are required
        if client is None:
            fut = submit()
        else:
            assert self.access is not None  # a client is set only where keys are required
            fut = await self.access.queue(
                client, len(x), submit, model, state.get(HELD)
            )  # settles the admission's hold
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait(
                {fut, watcher},
                timeout=max(0.0, admission.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if fut in done:
                return fut.result()
            fut.cancel()
            if watcher in done:
                raise ClientGone("client disconnected")  # nobody reads this answer
            raise DeadlineExceeded(f"no answer within {self.settings.timeout_ms:g} ms")
        finally:
            watcher.cancel()

    # ---- draining and stopping ---------------------------------------------

    def begin_drain(self) -> asyncio.Task:
        """Start draining (once); later calls return the same task."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="codedsmooth-drain")
        return self._drain_task

    async def drain(self) -> bool:
        return await self.begin_drain()

    def stop_now(self) -> None:
        """Cut the drain short (a second signal): every accepted request not yet answered gets 503 now."""
        self._stop_now.set()

    async def _drain(self) -> bool:
        """Refuse new work (503), let accepted work finish within the drain timeout, answer the rest 503."""
        start = time.monotonic()
        end = start + self.settings.drain_timeout_s
        self.phase = "draining"
        self.metrics.ready.set(0)
        log.info("draining: refusing new requests, finishing %d in flight", self.in_flight)
        finished = True
        batchers = self.repository.batchers()
        if batchers:
            for batcher in batchers:
                batcher.draining = True
            drained = asyncio.ensure_future(_drain_all(batchers, max(0.0, end - time.monotonic())))
            cut = asyncio.ensure_future(self._stop_now.wait())
            await asyncio.wait({drained, cut}, return_when=asyncio.FIRST_COMPLETED)
            cut.cancel()
            finished = drained.done() and drained.result()
            drained.cancel()
            if not finished:
                failed = sum(b.fail_pending() for b in batchers)
                if self._stop_now.is_set():
                    log.warning("stopping now: answered %d accepted requests with 503", failed)
                else:
                    log.warning(
                        "drain timeout of %gs passed: answered %d accepted requests with 503",
                        self.settings.drain_timeout_s,
                        failed,
                    )
        # Let the handlers write their answers; a client still sending its body is not waited for.
        try:
            if self._no_requests is not None:  # None: never started, no handler to wait for
                await asyncio.wait_for(
                    self._no_requests.wait(), timeout=max(0.05, min(0.5, end + 0.5 - time.monotonic()))
                )
        except asyncio.TimeoutError:
            pass
        log.info(
            "drained in %.2fs (%s, %d still in flight); stopping",
            time.monotonic() - start,
            "complete" if finished else "timed out",
            self.in_flight,
        )
        return finished

    async def stop(self) -> None:
        await self.drain()
        self.phase = "stopped"
        if self._watch_task is not None:
            self._watch_task.cancel()
        for batcher in self.repository.batchers():
            await batcher.stop()
        # Do not wait for a model call still running past the drain timeout.
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        end_model_threads(self.repository.models.values())
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        if self._own_limiter is not None:
            close_counters(self._own_limiter.counters)  # the last quota charges are written before exit


def current_lifecycle(request: Request) -> Lifecycle:
    """The lifecycle of the app serving ``request`` (routes reach all serving state through it)."""
    return request.app.state.lifecycle


async def _drain_all(batchers, timeout_s: float) -> bool:
    return all(await asyncio.gather(*(b.drain(timeout_s) for b in batchers)))


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
