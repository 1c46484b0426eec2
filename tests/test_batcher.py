"""The micro-batcher in-process: batching by count and delay, isolation of a failing request, drops before compute."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from codedsmooth.models import load_checkpoint
from codedsmooth.service.batcher import MicroBatcher
from codedsmooth.service.engine import InferenceEngine
from codedsmooth.service.errors import DeadlineExceeded, Unavailable
from codedsmooth.service.metrics import Metrics
from codedsmooth.service.settings import ServeSettings


class RecordingEngine(InferenceEngine):
    """The real engine, recording each device batch and failing any batch that holds a negative (poisoned) input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []

    def run(self, inputs):
        self.batches.append([int(x.shape[0]) for x in inputs])
        if any(bool((x < 0).any()) for x in inputs):
            raise RuntimeError("poisoned input")
        return super().run(inputs)


@pytest.fixture()
def engine(tiny_checkpoint):
    return RecordingEngine(load_checkpoint(tiny_checkpoint), ServeSettings(rci=False), torch.device("cpu"))


def _run(engine, coro_fn, **kw):
    async def main():
        batcher = MicroBatcher(
            engine, Metrics(), ThreadPoolExecutor(1), kw.get("max_batch", 8), kw.get("delay", 0.05), kw.get("queue", 16)
        )
        batcher.start()
        try:
            return await coro_fn(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batches_by_count_and_keeps_order(engine):
    async def go(b):
        now = time.monotonic()
        futs = [b.submit(torch.rand(n, 1, 8, 8), now, now + 10) for n in (3, 3, 3, 1)]
        return await asyncio.gather(*futs)

    results = _run(engine, go, max_batch=8)
    assert [r.shape[0] for r in results] == [3, 3, 3, 1]
    assert engine.batches[0] == [3, 3]  # the third request would exceed 8 items: it waits for the next batch
    assert sum(map(sum, engine.batches)) == 10


def test_a_failing_request_does_not_sink_its_batch_mates(engine):
    async def go(b):
        now = time.monotonic()
        good = [b.submit(torch.rand(1, 1, 8, 8), now, now + 10) for _ in range(3)]
        bad = b.submit(torch.full((1, 1, 8, 8), -1.0), now, now + 10)
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        return results

    *good, bad = _run(engine, go)
    assert all(r.shape == (1, 10) for r in good)
    assert isinstance(bad, RuntimeError) and "poisoned" in str(bad)


def test_cancelled_and_expired_requests_are_dropped_before_compute(engine):
    async def go(b):
        now = time.monotonic()
        cancelled = b.submit(torch.rand(2, 1, 8, 8), now, now + 10)
        cancelled.cancel()
        expired = b.submit(torch.rand(3, 1, 8, 8), now - 5, now - 1)
        live = b.submit(torch.rand(1, 1, 8, 8), now, now + 10)
        out = await live
        with pytest.raises(DeadlineExceeded):
            await expired
        return out

    out = _run(engine, go)
    assert out.shape == (1, 10)
    assert engine.batches == [[1]]  # neither the cancelled (2) nor the expired (3) request reached the model


def test_full_queue_and_draining_refuse_at_once(engine):
    async def go(b):
        now = time.monotonic()
        b.draining = True
        with pytest.raises(Unavailable, match="shutting down"):
            b.submit(torch.rand(1, 1, 8, 8), now, now + 10)
        b.draining = False
        return True

    assert _run(engine, go)

    async def fill(b):
        now = time.monotonic()
        accepted, refused = 0, 0
        for _ in range(10):
            try:
                b.submit(torch.rand(1, 1, 8, 8), now, now + 10)
                accepted += 1
            except Unavailable as exc:
                refused += 1
                assert exc.headers["Retry-After"]
        return accepted, refused

    accepted, refused = _run(engine, fill, queue=4)
    assert accepted == 4 and refused == 6
