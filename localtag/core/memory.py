"""Process memory (a leaf module): resident size, and giving freed heap back to the system.

After a large decode glibc keeps the freed pages in its arenas, so RSS stays at the peak; ``trim``
asks it to return them (``malloc_trim``), a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = None


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim() -> bool:
    """Return free heap memory to the system (glibc ``malloc_trim(0)``); False where unavailable."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    return bool(_libc.malloc_trim(0))
