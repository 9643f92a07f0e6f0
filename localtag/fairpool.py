"""Decode work shared fairly between requests (a leaf module).

:class:`FairPool` runs blocking calls on a few threads like an executor, but keeps one queue per
owner (a request) and serves the owners in turn, so one request with many heavy images never stalls
the others behind it. :class:`PixelBudget` bounds the pixels being decoded at once across all
requests; :class:`RequestPixels` bounds the pixels one request may decode in all.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class FairPool:
    def __init__(self, workers: int, name: str = "localtag-decode"):
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        self._free = self.workers
        self._queues: OrderedDict[object, deque] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, owner: object, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, in ``owner``'s turn."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queues.setdefault(owner, deque()).append((fn, args, fut))
        self._dispatch(loop)
        return await fut

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._free and self._queues:
            owner, q = next(iter(self._queues.items()))
            fn, args, fut = q.popleft()
            if q:
                self._queues.move_to_end(owner)  # round robin: this owner waits for the others' turns
            else:
                del self._queues[owner]
            if fut.done():  # the caller went away
                continue
            self._free -= 1
            done = self._pool.submit(fn, *args)
            done.add_done_callback(lambda d, fut=fut: loop.call_soon_threadsafe(self._finished, loop, d, fut))

    def _finished(self, loop: asyncio.AbstractEventLoop, done, fut: asyncio.Future) -> None:
        self._free += 1
        if not fut.done():
            if done.exception() is not None:
                fut.set_exception(done.exception())
            else:
                fut.set_result(done.result())
        self._dispatch(loop)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PixelBudget:
    """Pixels being decoded at once (thread-safe, blocking): a decode waits until its pixels fit.

    A single image larger than the whole budget counts as the whole budget, so it runs alone."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.used = 0
        self._cond = threading.Condition()

    def reserve(self, pixels: int) -> int:
        pixels = min(max(0, pixels), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.total)
            self.used += pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.used -= pixels
            self._cond.notify_all()


class RequestPixels:
    """One request's pixel allowance: ``take`` returns False once the request is over it."""

    def __init__(self, total: int):
        self.total = total
        self.spent = 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        with self._lock:
            if self.spent + pixels > self.total:
                return False
            self.spent += pixels
            return True
