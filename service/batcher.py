"""Micro-batcher: one asyncio queue, batches by item count and delay, model off the event loop.

The delay timer starts when the batch's first request arrived, so a request
that already waited behind a running batch is not held any longer. Requests
whose client went away or whose deadline passed are dropped before compute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from codedsmooth.service.engine import BatchResult, InferenceEngine
from codedsmooth.service.errors import DeadlineExceeded, Unavailable
from codedsmooth.service.metrics import Metrics, ModelMetrics

log = logging.getLogger("codedsmooth.batcher")


@dataclass
class Work:
    inputs: torch.Tensor  # (n, *input_shape) float32, made from numpy without torch kernels
    arrival: float  # time.monotonic()
    deadline: float
    future: asyncio.Future = field(repr=False)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


BatchCallback = Callable[[BatchResult, float, int], None]  # (engine result, model seconds, requests in the batch)


class MicroBatcher:
    """Generic: queues requests, forms device batches, runs ``engine.run`` on the model thread.

    What a batch's result *means* (RCI statistics and their metrics) is ``on_batch``'s business.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        metrics: Metrics | ModelMetrics,
        executor: ThreadPoolExecutor,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        on_batch: BatchCallback | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.on_batch = on_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue: asyncio.Queue[Work] = asyncio.Queue(maxsize=max_queue_size)
        self.executor = executor  # the single model thread, shared with loading and warm-up
        self.draining = False
        self.refusal = "server is shutting down"  # what a request submitted while draining is told
        self.busy = False
        self._held: Work | None = None  # a request that did not fit the last batch
        self._running: list[Work] = []  # the batch on the model thread now
        self.waiting = 0  # accepted requests not yet sent to the model: queued, held, or being gathered into a batch
        self.model_running = (
            False  # true while engine.run executes on the model thread (even if the loop gave up waiting)
        )
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="codedsmooth-batcher")

    @property
    def idle(self) -> bool:
        return self.queue.empty() and self._held is None and not self.busy

    def submit(self, inputs: torch.Tensor, arrival: float, deadline: float) -> asyncio.Future:
        """Queue one request; raises ``Unavailable`` at once when draining or full."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise Unavailable(self.refusal, retry_after_s=5)
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Work(inputs, arrival, deadline, fut))
        except asyncio.QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise Unavailable(f"queue full ({self.queue.maxsize} requests waiting)", retry_after_s=1) from None
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        return fut

    async def _next_batch(self) -> list[Work]:
        first = self._held or await self.queue.get()
        self._held = None
        self.busy = True  # from here until the batch is answered, the batcher is not idle
        batch, items = [first], first.size
        until = first.arrival + self.max_delay_s
        while items < self.max_batch_size:
            try:
                work = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    work = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if items + work.size > self.max_batch_size:
                self._held = work
                break
            batch.append(work)
            items += work.size
        self.waiting -= len(batch)  # leaving for the model (or dropped just before it)
        self.metrics.queue_depth.set(self.waiting)
        return batch

    def _live(self, batch: list[Work]) -> list[Work]:
        now = time.monotonic()
        live = []
        for work in batch:
            if work.future.done():  # cancelled: the client went away or its handler timed out
                self.metrics.rejected.labels("cancelled").inc()
            elif now >= work.deadline:
                self.metrics.rejected.labels("deadline").inc()
                work.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            else:
                live.append(work)
                self.metrics.queue_wait.observe(now - work.arrival)
        return live

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._next_batch())
            try:
                if not batch:
                    continue
                self._running = batch
                start = time.perf_counter()
                result: BatchResult = await loop.run_in_executor(
                    self.executor, self._run_engine, [w.inputs for w in batch]
                )
                if self.on_batch is not None:
                    self.on_batch(result, time.perf_counter() - start, len(batch))
                for work, probs in zip(batch, result.probabilities):
                    if not work.future.done():
                        work.future.set_result(probs)
            except Exception as exc:  # a failing batch: retry each request alone so one cannot sink the rest
                log.exception("batch of %d requests failed; retrying one by one", len(batch))
                await self._run_one_by_one(batch, exc)
            finally:
                self._running = []
                self.busy = False

    def _run_engine(self, inputs: list[torch.Tensor]) -> BatchResult:
        """On the model thread."""
        self.model_running = True
        try:
            return self.engine.run(inputs)
        finally:
            self.model_running = False

    async def _run_one_by_one(self, batch: list[Work], first_error: Exception) -> None:
        loop = asyncio.get_running_loop()
        for work in batch:
            if work.future.done():
                continue
            try:
                result = await loop.run_in_executor(self.executor, self._run_engine, [work.inputs])
                if not work.future.done():
                    work.future.set_result(result.probabilities[0])
            except Exception as exc:  # noqa: BLE001
                if not work.future.done():
                    work.future.set_exception(exc)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, wait until queued and running work is done. True if it finished in time."""
        self.draining = True
        end = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    def fail_pending(self, message: str = "server is shutting down", retry_after_s: int = 5) -> int:
        """Answer every accepted request not yet answered (queued, held or running) with 503. Returns how many."""
        failed = 0
        for work in ([self._held] if self._held else []) + _drain_queue(self.queue) + list(self._running):
            if not work.future.done():
                work.future.set_exception(Unavailable(message, retry_after_s=retry_after_s))
                failed += 1
        self._held = None
        self.waiting = 0
        self.metrics.queue_depth.set(0)
        if failed:
            self.metrics.rejected.labels("drain_timeout").inc(failed)
        return failed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.fail_pending("server stopped")


def _drain_queue(queue: asyncio.Queue) -> list[Work]:
    items = []
    while True:
        try:
            items.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            return items
