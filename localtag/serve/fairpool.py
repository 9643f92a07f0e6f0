"""Decode work shared fairly between requests (a leaf module).

:class:`FairPool` runs blocking calls on a few threads like an executor, but keeps one queue per
owner (a request) and serves the owners in turn, so one request with many heavy images never stalls
the others behind it; it also bounds the pixels being decoded at once across all requests.
:class:`RequestPixels` bounds the pixels one request may decode in all.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class FairPool:
    """Threads for blocking calls, served to owners in turn, within a budget of ``cost`` (pixels).

    A call waits in its owner's queue (never on a thread) until a thread is free and its cost fits
    beside the calls running; a call costing more than the whole budget runs alone."""

    def __init__(self, workers: int, budget: int | None = None, name: str = "localtag-decode"):
        self.workers = max(1, workers)
        self.budget = budget if budget and budget > 0 else None
        self.used = 0  # cost of the calls running
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        self._free = self.workers
        self._queues: OrderedDict[object, deque] = OrderedDict()

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, owner: object, fn: Callable, *args: Any, cost: int = 0) -> Any:
        """``fn(*args)`` on a worker thread, in ``owner``'s turn, once ``cost`` fits the budget."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        cost = min(max(0, cost), self.budget) if self.budget else 0
        self._queues.setdefault(owner, deque()).append((fn, args, fut, cost))
        self._dispatch(loop)
        return await fut

    def _fits(self, cost: int) -> bool:
        return self.budget is None or self.used == 0 or self.used + cost <= self.budget

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._free and self._queues:
            owner = next((o for o, q in self._queues.items() if self._fits(q[0][3])), None)
            if owner is None:  # nothing fits beside what runs: wait for it to finish
                return
            q = self._queues[owner]
            fn, args, fut, cost = q.popleft()
            if q:
                self._queues.move_to_end(owner)  # round robin: this owner waits for the others' turns
            else:
                del self._queues[owner]
            if fut.done():  # the caller went away
                continue
            self._free -= 1
            self.used += cost
            done = self._pool.submit(fn, *args)
            done.add_done_callback(
                lambda d, fut=fut, cost=cost: loop.call_soon_threadsafe(self._finished, loop, d, fut, cost))

    def _finished(self, loop: asyncio.AbstractEventLoop, done, fut: asyncio.Future, cost: int) -> None:
        self._free += 1
        self.used -= cost
        if not fut.done():
            if done.exception() is not None:
                fut.set_exception(done.exception())
            else:
                fut.set_result(done.result())
        self._dispatch(loop)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
