"""A bounded inference queue: searches run in a few threads beside the event loop, a few more may wait, the rest
are turned away at once (503 with Retry-After) instead of piling up until every client times out."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """Every slot and every queue place is taken; ``retry_after`` (whole seconds) is a fair time to come back."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: too many searches at once; retry in {retry_after} s")
        self.retry_after = retry_after


class SearchGate:
    """At most ``workers`` calls run at once and at most ``queue_size`` wait; one more is refused with
    :class:`Overloaded`. A call leaves its place only when its thread has finished (a client that gives up does
    not free a slot its search still occupies), so the bound holds for the CPU, not just for the sockets."""

    def __init__(self, workers: int, queue_size: int):
        if workers < 1 or queue_size < 0:
            raise ValueError(f"need workers >= 1 and queue_size >= 0, got {workers} and {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._pool: ThreadPoolExecutor | None = None  # started on first use, again after a shutdown
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._rejected = 0
        self._seconds = 0.05  # moving average of one call's run time, for Retry-After

    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self._running,
                "waiting": self._admitted - self._running,
                "rejected": self._rejected,
                "workers": self.workers,
                "queue_size": self.queue_size,
            }

    def reserve(self) -> Place:
        """Take a place (running or waiting) now, or raise :class:`Overloaded`. A request reserves its place before
        it reads its upload, so a request that would be refused is refused before its body is buffered."""
        with self._lock:
            if self._admitted >= self.capacity:
                self._rejected += 1
                raise Overloaded(self._retry_after())
            self._admitted += 1
        return Place(self)

    async def run(self, fn: Callable[..., T], *args: Any, place: Place | None = None) -> tuple[T, float, float]:
        """Run ``fn(*args)`` in a worker thread; returns (result, seconds waited, seconds run). With ``place`` (from
        :meth:`reserve`) the call uses it; the place is given back when the thread has finished."""
        if place is None:
            place = self.reserve()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lookalike-search")
            pool = self._pool
        place.handed = True
        submitted = time.perf_counter()
        times: list[float] = []

        def call() -> T:
            start = time.perf_counter()
            with self._lock:
                self._running += 1
            try:
                return fn(*args)
            finally:
                end = time.perf_counter()
                times[:] = [start - submitted, end - start]
                with self._lock:
                    self._running -= 1
                    self._seconds = 0.8 * self._seconds + 0.2 * (end - start)

        try:
            future = pool.submit(call)
        except BaseException:
            place.handed = False
            place.release()
            raise
        future.add_done_callback(lambda _: place.finish())
        result = await asyncio.wrap_future(future)
        return result, times[0], times[1]

    def _retry_after(self) -> int:
        """Seconds until the queue has probably drained: queued calls x average run time / threads, 1 to 30."""
        return max(1, min(30, math.ceil(self._admitted * self._seconds / self.workers)))

    def shutdown(self) -> None:
        """Stop the threads (queued calls are cancelled); the next call starts new ones (an app may be restarted)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class Place:
    """A reserved place in the gate. ``release()`` gives it back unless it was handed to :meth:`SearchGate.run`
    (then the worker thread gives it back when the call ends); giving back twice is harmless."""

    def __init__(self, gate: SearchGate):
        self._gate = gate
        self._done = False
        self.handed = False

    def release(self) -> None:
        if not self.handed:
            self.finish()

    def finish(self) -> None:
        with self._gate._lock:
            if self._done:
                return
            self._done = True
            self._gate._admitted -= 1
