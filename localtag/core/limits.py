"""Byte-capped reads of streamed bodies (a leaf module): request bodies, downloads, Directus assets.

A declared ``Content-Length`` over the cap is refused before anything is read; otherwise the body is
read chunk by chunk and refused as soon as it passes the cap, so nothing larger is ever held.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable


class TooLarge(Exception):
    """The body is (or says it is) over ``cap`` bytes; ``size`` is the declared length, if any."""

    def __init__(self, cap: int, size: int | None = None):
        self.cap = cap
        self.size = size
        super().__init__(f"{size} bytes is over the {cap}-byte limit" if size is not None
                         else f"over the {cap}-byte limit")


def check_declared(length: str | None, cap: int) -> None:
    """Raise :class:`TooLarge` when a ``Content-Length`` header says more than ``cap``."""
    if length and length.strip().isdigit() and int(length) > cap:
        raise TooLarge(cap, int(length))


def read_capped(chunks: Iterable[bytes], cap: int, length: str | None = None) -> bytes:
    check_declared(length, cap)
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise TooLarge(cap)
        out.append(chunk)
    return b"".join(out)


async def cap_stream(chunks: AsyncIterable[bytes], cap: int, length: str | None = None) -> AsyncIterator[bytes]:
    """The chunks as they come, raising :class:`TooLarge` as soon as they pass ``cap`` (for streaming parsers)."""
    check_declared(length, cap)
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise TooLarge(cap)
        yield chunk


async def read_capped_async(chunks: AsyncIterable[bytes], cap: int, length: str | None = None) -> bytes:
    return b"".join([chunk async for chunk in cap_stream(chunks, cap, length)])
