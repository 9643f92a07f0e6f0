"""Shared budgets across requests, overall and per client (IP address): a leaf module.

- :class:`Slots` counts things held at once (connections, body readers) against a total and a
  per-client cap;
- :class:`ByteBudget` counts bytes held at once (bodies still arriving, Filestack uploads spooled to
  temp files) against a total and a per-client cap;
- :class:`Rate` counts things per minute per client (the app's inputs added); past it :class:`Throttled`
  (the app routes answer 429, Clarifai's 11005 CONN_THROTTLED, with ``Retry-After``).

Past a cap the caller gets :class:`Full` (the server answers 503, Clarifai's 21354, with ``Retry-After``),
so one client, or many together, cannot take the server's memory, disk or connections.
A cap of 0 or less means no cap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Full(Exception):
    """A budget is spent; ``what`` says which, ``client`` whether it was the client's own share."""

    def __init__(self, what: str, cap: int, per_client: bool):
        self.what, self.cap, self.per_client = what, cap, per_client
        who = "this client's" if per_client else "the server's"
        super().__init__(f"{who} limit of {cap} {what} is reached; retry later")


def _capped(cap: int | None) -> int | None:
    return cap if cap and cap > 0 else None


class Slots:
    """Things held at once: at most ``total`` in all and ``per_client`` per client."""

    def __init__(self, what: str, total: int | None, per_client: int | None = None):
        self.what = what
        self.total, self.per_client = _capped(total), _capped(per_client)
        self.used = 0
        self.by_client: dict[str, int] = {}

    def take(self, client: str) -> None:
        """Hold one for ``client``; raises :class:`Full`."""
        mine = self.by_client.get(client, 0)
        if self.total is not None and self.used >= self.total:
            raise Full(self.what, self.total, False)
        if self.per_client is not None and mine >= self.per_client:
            raise Full(self.what, self.per_client, True)
        self.used += 1
        self.by_client[client] = mine + 1

    def give(self, client: str) -> None:
        self.used -= 1
        left = self.by_client.get(client, 1) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)

    @contextlib.contextmanager
    def held(self, client: str) -> Iterator[None]:
        self.take(client)
        try:
            yield
        finally:
            self.give(client)


class Holding:
    """The bytes one request holds of a :class:`ByteBudget`; :meth:`add` as they come, released at exit."""

    def __init__(self, budget: ByteBudget, client: str):
        self.budget, self.client, self.size = budget, client, 0

    def add(self, n: int) -> None:
        """Count ``n`` more bytes; raises :class:`Full` (and counts nothing) past either cap."""
        b = self.budget
        if b.total is not None and b.used + n > b.total:
            raise Full(b.what, b.total, False)
        mine = b.by_client.get(self.client, 0)
        if b.per_client is not None and mine + n > b.per_client:
            raise Full(b.what, b.per_client, True)
        b.used += n
        b.by_client[self.client] = mine + n
        self.size += n

    def release(self) -> int:
        """Give every byte back; returns how many there were."""
        size, self.size = self.size, 0
        if size:
            b = self.budget
            b.used -= size
            left = b.by_client.get(self.client, size) - size
            if left > 0:
                b.by_client[self.client] = left
            else:
                b.by_client.pop(self.client, None)
        return size


class ByteBudget:
    """Bytes held at once by all requests: at most ``total``, and ``per_client`` per client."""

    def __init__(self, what: str, total: int | None, per_client: int | None = None):
        self.what = what
        self.total, self.per_client = _capped(total), _capped(per_client)
        self.used = 0
        self.by_client: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[Holding]:
        h = Holding(self, client)
        try:
            yield h
        finally:
            h.release()


class Throttled(Exception):
    """A client went over its rate; ``retry_after``: seconds until the request would pass."""

    def __init__(self, what: str, per_minute: int, retry_after: float):
        self.what, self.per_minute, self.retry_after = what, per_minute, retry_after
        super().__init__(f"this client's limit of {per_minute} {what} per minute is reached; "
                         f"retry in {retry_after:.0f} s")


class Rate:
    """Things per minute per client (a token bucket holding at most one minute's worth). A rate of 0
    or less means no cap. ``clock``: seconds (monotonic)."""

    def __init__(self, what: str, per_minute: int | None, clock: Callable[[], float] | None = None):
        self.what, self.per_minute = what, _capped(per_minute)
        self.clock = clock or time.monotonic
        self.buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when)

    def take(self, client: str, n: int = 1) -> None:
        """Spend ``n`` for ``client``; raises :class:`Throttled` (and spends nothing) past the rate."""
        if self.per_minute is None:
            return
        cap, now = float(self.per_minute), self.clock()
        tokens, when = self.buckets.get(client, (cap, now))
        tokens = min(cap, tokens + (now - when) * cap / 60.0)
        if n > tokens:
            wait = (n - tokens) * 60.0 / cap if n <= cap else 60.0
            self.buckets[client] = (tokens, now)
            raise Throttled(self.what, self.per_minute, max(1.0, wait))
        self.buckets[client] = (tokens - n, now)
        if len(self.buckets) > 10_000:  # forget clients whose bucket is full again
            self.buckets = {c: (t, w) for c, (t, w) in self.buckets.items() if t + (now - w) * cap / 60.0 < cap}
