"""Repeated resource errors logged once per interval, with a count (a leaf module).

Under a flood (a full file table makes asyncio log "socket.accept() out of system resource" with a
traceback for every try; refused connections come by the thousand) one line per interval says what
happened and how often: ``… (1234 more like this in the last 10 s)``.
"""

from __future__ import annotations

import logging
import re
import time

#: messages that repeat under resource pressure, throttled by :class:`ThrottleFilter`
NOISY = ("out of system resource", "Too many open files", "Exceeded concurrency limit", "refused:")
INTERVAL = 10.0


class ThrottleFilter(logging.Filter):
    """Lets the first record of each noisy kind through, then one per ``interval`` carrying the count
    of those dropped since; the traceback is kept only on the first."""

    def __init__(self, interval: float = INTERVAL, patterns: tuple[str, ...] = NOISY):
        super().__init__()
        self.interval = interval
        self.patterns = patterns
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record is not ours to judge
            return True
        if not any(p in msg for p in self.patterns):
            return True
        key = f"{record.name}:{re.sub(r'[0-9]+', '#', msg)[:160]}"  # the same line but for numbers (addresses, sizes)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        dropped = self._dropped.pop(key, 0)
        self._last[key] = now
        if last is not None:
            record.exc_info = None
            record.exc_text = None
        if dropped:
            record.msg = f"{msg} ({dropped} more like this in the last {now - last:.0f} s)"
            record.args = ()
        return True


def install(*names: str) -> ThrottleFilter:
    """One shared :class:`ThrottleFilter` on each named logger (asyncio's and the server's by default)."""
    names = names or ("asyncio", "uvicorn.error", "localtag.serve.http_config", "localtag.serve.server", "localtag.serve.service")
    flt = ThrottleFilter()
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ThrottleFilter) for f in logger.filters):
            logger.addFilter(flt)
    return flt
