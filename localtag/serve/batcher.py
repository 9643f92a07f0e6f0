"""Request batching for the server: images from concurrent requests share one model batch.

Callers ``await batcher.submit(tensor)`` with one preprocessed image and get back its per-concept
values: the image encoder embeds the batch, the tagger maps it to values. A single inference thread runs one batch at a time: the first image after an idle spell
waits at most ``window`` seconds for company, and while a batch runs the next one fills up, so under
load batches are full without any waiting. Admission (how many images may be in the server at once)
is the server's job; the queue here only ever holds admitted images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..core.encoder import ImageEncoder
from ..core.tagger import Tagger

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, tagger: Tagger, encoder: ImageEncoder, *, max_batch: int = 32, window: float = 0.005,
                 on_batch: Callable[[int], None] | None = None):
        self.tagger = tagger
        self.encoder = encoder
        self.max_batch = max(1, max_batch)
        self.window = max(0.0, window)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="localtag-infer")
        self.images = 0  # images encoded so far

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="localtag-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, tensor: torch.Tensor) -> np.ndarray:
        """One preprocessed image [3, H, W] → its values [concepts]."""
        if self._queue is None:
            raise RuntimeError("batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((tensor, fut))
        if self._queue.qsize() >= self.max_batch - 1:
            self._full.set()
        return await fut

    def _compute(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self.tagger.values(self.encoder.encode(torch.stack(tensors)))

    async def _collect(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        queue = self._queue
        batch = [await queue.get()]
        if self.window and queue.qsize() < self.max_batch - 1:
            # wait for company: until the batch could be full, or the window has passed
            self._full.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.window)
        while len(batch) < self.max_batch and not queue.empty():
            batch.append(queue.get_nowait())
        return [item for item in batch if not item[1].done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                values = await loop.run_in_executor(self._pool, self._compute, [t for t, _ in batch])
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                log.exception("inference failed for a batch of %d", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.images += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, fut), row in zip(batch, values, strict=True):
                if not fut.done():
                    fut.set_result(row)
