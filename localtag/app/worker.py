"""The app's background worker: what ``PostInputs`` accepted (stored pending) is fetched, decoded,
embedded and recorded here, as Clarifai does it (the call answers at once with each input pending;
``GetInput`` / ``GetInputCount`` show the progress).

One worker per server (its lifespan starts and stops it). It takes pending inputs from the store in
batches (:meth:`~localtag.app.store.AppStore.claim`: pending → in progress), fetches URLs (the guarded
fetcher) and reads base64 inputs' blobs, embeds the batch with the server's encoder pipeline (in a thread)
and records each input's end state in one transaction (:meth:`~localtag.app.store.AppStore.finish`):
processed with its embedding, or failed with the reason. At start it puts inputs a crash left in progress
back to pending, so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..core import errors
from ..core.errors import ImageError
from .store import STATUS_FAILED, STATUS_OK, AppStore, NewInput

log = logging.getLogger(__name__)

#: inputs taken per round (one pipeline run)
BATCH = 32
#: how often the queue is looked at without a wake-up (inputs another process added)
POLL_S = 2.0


class AppWorker:
    """``embed_images(list of bytes) → list of embedding | ImageError`` (blocking), ``fetch(url) → bytes``."""

    def __init__(self, store: AppStore, key: str, embed_images: Callable[[list[bytes]], list],
                 fetch: Callable[[str], Awaitable[bytes]], batch: int = BATCH):
        self.store, self.key, self.embed_images, self.fetch, self.batch = store, key, embed_images, fetch, batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def wake(self) -> None:
        """New pending inputs: look now."""
        self._wake.set()

    async def start(self) -> None:
        n = await asyncio.to_thread(self.store.requeue)
        if n:
            log.info("app worker: %d input(s) left in progress are pending again", n)
        self._task = asyncio.create_task(self._run(), name="app-worker")

    async def stop(self) -> None:
        """Stop after the round in flight is cancelled; its inputs stay in progress and the next start
        puts them back to pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                took = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the worker outlives one bad round
                log.error("app worker: %s: %s; its inputs are pending again", type(e).__name__, e)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.requeue)
                took = 0  # then wait POLL_S before trying again
            if took:
                continue
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def round(self) -> int:
        """Process one batch of pending inputs; returns how many were taken."""
        todo = await asyncio.to_thread(self.store.claim, self.batch)
        if not todo:
            return 0
        got = await asyncio.gather(*(self._bytes(t) for t in todo), return_exceptions=True)
        done: dict[str, list[NewInput]] = {}
        ok: list[tuple[NewInput, bytes]] = []
        for t, g in zip(todo, got, strict=True):
            n = NewInput(t["id"], url=t["url"], blob=t["blob"])
            done.setdefault(t["app"], []).append(n)
            if not isinstance(g, BaseException) and len(g) > self.store.max_blob_bytes:
                g = ImageError(errors.TOO_MANY_BYTES, f"{len(g)} bytes is over the {self.store.max_blob_bytes}-byte blob limit")
            if isinstance(g, BaseException):
                n.status, n.details = STATUS_FAILED, str(g) or type(g).__name__
                if not isinstance(g, ImageError):
                    log.warning("app input %s: %s: %s", t["id"], type(g).__name__, g)
            else:
                ok.append((n, g))
        if ok:
            embs = await asyncio.to_thread(self.embed_images, [data for _, data in ok])
            for (n, data), e in zip(ok, embs, strict=True):
                if isinstance(e, ImageError):
                    n.status, n.details = STATUS_FAILED, str(e)
                else:
                    n.status, n.embedding = STATUS_OK, e
                    if n.blob is None:  # a URL's bytes are kept too (content-addressed)
                        n.blob = await asyncio.to_thread(self.store.put_blob, data)
        for app, inputs in done.items():
            await asyncio.to_thread(self.store.finish, app, inputs, self.key)
        return len(todo)

    async def _bytes(self, t: dict[str, Any]) -> bytes:
        if t["blob"]:
            return await asyncio.to_thread(self.store.read_blob, t["blob"])
        if not t["url"]:
            raise ImageError(errors.CORRUPT, "the input has neither bytes nor a URL")
        return await self.fetch(t["url"])
