"""Dynamic batching: one queue and one worker that stack concurrent requests into one
model call, like Triton's ``max_queue_delay_microseconds``.

Used by the offload server (on its event loop, :mod:`edgeloop.serve.offload`) and by the
device runtime's micro-batching (on a loop of its own, :class:`BatchThread`, for callers
in threads); it sits below both, which are peers and never import each other.

Requests wait in a queue; the worker takes the oldest and, until ``max_batch`` samples
of the same sample shape are waiting or the oldest has waited ``max_delay_ms``, lets more
arrive; then it runs ``infer`` once on the stacked inputs, in a thread so the loop keeps
accepting requests, and hands each caller its own rows. ``max_batch=1`` turns batching
off. A request of more samples than ``max_batch`` runs as a batch of its own. If
``infer`` fails on a stacked batch, its requests are rerun one by one, so only the
request that causes the failure gets the exception (``infer``'s own).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgeloop._request import BadRequest, Feed
from edgeloop.errors import UsageError

__all__ = ["BatchStats", "BatchThread", "Batcher"]

_KEPT = 10_000      # queue delays and run times remembered for the percentiles

Infer = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]


@dataclass
class BatchStats:
    """What the batcher counts (times in seconds; ``to_dict`` gives milliseconds)."""

    batches: int = 0
    samples: int = 0
    batched_requests: int = 0
    errors: int = 0          # requests ``infer`` failed on, alone
    queue_delays_s: deque[float] = field(default_factory=lambda: deque(maxlen=_KEPT))
    run_s: deque[float] = field(default_factory=lambda: deque(maxlen=_KEPT))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int, samples: int, queued_s: list[float], run_s: float) -> None:
        """Count one batch (callers in other threads count theirs too: hence the lock)."""
        with self.lock:
            self.batches += 1
            self.samples += samples
            self.batched_requests += requests
            self.queue_delays_s.extend(queued_s)
            self.run_s.append(run_s)

    def error(self) -> None:
        with self.lock:
            self.errors += 1

    def batch_dict(self) -> dict[str, object]:
        """Batch counts, mean sizes and percentiles, in milliseconds."""
        def pct(xs: deque[float], q: float) -> float | None:
            return float(np.percentile(np.asarray(xs), q) * 1e3) if xs else None

        return {
            "batches": self.batches, "samples": self.samples,
            "mean_batch_size": self.samples / self.batches if self.batches else None,
            "mean_requests_per_batch": (self.batched_requests / self.batches
                                        if self.batches else None),
            "queue_delay_p50_ms": pct(self.queue_delays_s, 50),
            "queue_delay_p99_ms": pct(self.queue_delays_s, 99),
            "run_p50_ms": pct(self.run_s, 50),
        }


@dataclass
class _Pending:
    feed: Feed
    future: asyncio.Future[tuple[list[np.ndarray], int]]
    queued: float


class Batcher:
    """The queue and its single worker; ``submit`` and ``run_forever`` run on one event
    loop. ``infer`` takes arrays named after the model's inputs and returns outputs whose
    first axis follows the samples (checked when requests were stacked)."""

    def __init__(self, infer: Infer, *, max_batch: int, max_delay_ms: float, max_queue: int,
                 stats: BatchStats, callers: Callable[[], int] | None = None,
                 in_thread: bool = True) -> None:
        self.infer = infer
        self.callers = callers      # requests in flight, when known: none else can join
        self.in_thread = in_thread  # run infer off the loop (a server's loop keeps serving)
        self.max_batch = max_batch
        self.delay_s = max_delay_ms / 1e3
        self.max_queue = max_queue
        self.stats = stats
        self.pending: deque[_Pending] = deque()
        self.waiting: Counter[tuple[tuple[int, ...], ...]] = Counter()   # rows per shape
        self.arrived = asyncio.Event()

    async def submit(self, feed: Feed) -> tuple[list[np.ndarray], int]:
        """This feed's outputs and the number of samples in the batch it ran in."""
        if len(self.pending) >= self.max_queue:
            raise BadRequest(503, f"busy: {len(self.pending)} requests queued")
        future: asyncio.Future[tuple[list[np.ndarray], int]] = (
            asyncio.get_running_loop().create_future())
        self.pending.append(_Pending(feed, future, time.perf_counter()))
        self.waiting[feed.sample_shape] += feed.rows
        self.arrived.set()
        return await future

    async def run_forever(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            oldest = self.pending[0]
            shape = oldest.feed.sample_shape
            deadline = oldest.queued + self.delay_s
            while self.waiting[shape] < self.max_batch:
                if self.callers is not None and len(self.pending) >= self.callers():
                    break              # every caller in flight is queued: nobody to wait for
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), left)
            batch = self._take(shape)
            try:
                await self._run(batch)
            except Exception as e:  # a bug here must fail this batch, not stall the queue
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    def _take(self, shape: tuple[tuple[int, ...], ...]) -> list[_Pending]:
        """The oldest requests of ``shape`` up to ``max_batch`` samples (always at least
        the oldest one), removed from the queue."""
        batch: list[_Pending] = []
        rows = 0
        keep: deque[_Pending] = deque()
        while self.pending:
            p = self.pending.popleft()
            if (p.feed.sample_shape == shape and (not batch or rows + p.feed.rows
                                                  <= self.max_batch)):
                batch.append(p)
                rows += p.feed.rows
            else:
                keep.append(p)
            if rows >= self.max_batch:
                break
        keep.extend(self.pending)
        self.pending = keep
        self.waiting[shape] -= rows
        if not self.waiting[shape]:
            del self.waiting[shape]
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        live = [p for p in batch if not p.future.done()]   # callers that went away
        if not live:
            return
        try:
            feeds = [p.feed for p in live]
            outs = (await asyncio.to_thread(self._stacked, feeds) if self.in_thread
                    else self._stacked(feeds))
        except Exception as e:   # the stacked batch failed
            if len(live) > 1:
                for p in live:       # find the request that causes it; the rest succeed
                    await self._run([p])
                return
            self.stats.error()
            live[0].future.set_exception(e)
            return
        total = sum(p.feed.rows for p in live)
        self.stats.add(requests=len(live), samples=total,
                       queued_s=[started - p.queued for p in live],
                       run_s=time.perf_counter() - started)
        start = 0
        for p in live:
            mine = [o[start:start + p.feed.rows] for o in outs] if len(live) > 1 else outs
            start += p.feed.rows
            if not p.future.done():
                p.future.set_result((mine, total))

    def _stacked(self, feeds: list[Feed]) -> list[np.ndarray]:
        if len(feeds) == 1:
            return list(self.infer(feeds[0].arrays))
        stacked = {n: np.concatenate([f.arrays[n] for f in feeds]) for n in feeds[0].arrays}
        outs = list(self.infer(stacked))
        total = sum(f.rows for f in feeds)
        if any(o.ndim == 0 or o.shape[0] != total for o in outs):
            raise ValueError("outputs do not follow the sample axis")   # rerun one by one
        return outs


class BatchThread:
    """A :class:`Batcher` on an event loop of its own (a daemon thread), for callers in
    threads: :meth:`submit` blocks until this caller's rows are back.

    Here the batcher knows how many callers are in flight (in :meth:`submit`, or
    :meth:`announced` by a server that is reading their requests), so it never waits for
    company that cannot come: a lone caller runs at once, in its own thread, and a batch
    runs as soon as every caller in flight has joined it (or ``max_delay_ms`` has passed).
    ``infer`` runs on the loop's thread: nothing else needs that loop meanwhile."""

    def __init__(self, infer: Infer, *, max_batch: int, max_delay_ms: float,
                 max_queue: int = 4096, stats: BatchStats | None = None) -> None:
        self.stats = stats if stats is not None else BatchStats()   # may be shared
        self._inside = 0                 # callers in submit()
        self._announced = 0              # callers on their way (e.g. HTTP requests)
        self._count = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                         name="edgeloop-batcher")
        self._thread.start()

        async def start() -> tuple[Batcher, asyncio.Task[None]]:
            b = Batcher(infer, max_batch=max_batch, max_delay_ms=max_delay_ms,
                        max_queue=max_queue, stats=self.stats, callers=self._callers,
                        in_thread=False)
            return b, asyncio.create_task(b.run_forever())

        self.infer = infer
        self._batcher, self._worker = asyncio.run_coroutine_threadsafe(
            start(), self._loop).result()

    def submit(self, feed: Feed) -> tuple[list[np.ndarray], int]:
        """``feed``'s outputs and its batch's sample count; ``infer``'s exception if it
        failed on this feed alone."""
        if self._loop.is_closed():
            raise UsageError("micro-batching was closed (the runtime was closed)")
        with self._count:
            self._inside += 1
            alone = self._inside == 1 and self._announced <= 1
        try:
            if alone:         # nobody to batch with: skip the two hops to the loop and back
                return self._alone(feed)
            f: Future[tuple[list[np.ndarray], int]] = asyncio.run_coroutine_threadsafe(
                self._batcher.submit(feed), self._loop)
            return f.result()
        finally:
            with self._count:
                self._inside -= 1

    def _callers(self) -> int:
        return max(self._inside, self._announced)

    @contextlib.contextmanager
    def announced(self) -> Iterator[None]:
        """Count a caller that will submit (a request being read): until it does, others
        wait for it (up to ``max_delay_ms``) rather than run without it."""
        with self._count:
            self._announced += 1
        try:
            yield
        finally:
            with self._count:
                self._announced -= 1

    def _alone(self, feed: Feed) -> tuple[list[np.ndarray], int]:
        t0 = time.perf_counter()
        try:
            outs = list(self.infer(feed.arrays))
        except Exception:
            self.stats.error()
            raise
        self.stats.add(requests=1, samples=feed.rows, queued_s=[0.0],
                       run_s=time.perf_counter() - t0)
        return outs, feed.rows

    def close(self) -> None:
        """Stop the worker and its thread (pending callers get an error)."""
        if self._loop.is_closed():
            return

        async def stop() -> None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
