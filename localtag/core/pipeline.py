"""The batch pipeline: jobs → fetch → decode + preprocess → batches → image encoder → results.

clip-retrieval's runner in one class: it composes the stages and owns no model code of its own. One
pipeline serves ``localtag tag``, ``embed``, ``retag --embed-missing``, ``eval`` and ``directus
sync``; the server prepares single images with :meth:`Pipeline.prepare_tensor` and batches them
across requests itself (:mod:`localtag.serve.batcher`). Stages:

- **fetch**: a path or bytes source is read by the decode worker itself; a callable source (a URL or
  Directus fetcher) runs in an I/O pool of ``fetchers`` threads, an ``async def`` source on the
  pipeline's own event loop, so slow networks never hold a decode worker.
- **decode + preprocess** in ``workers`` threads (Pillow and torch release the GIL): :mod:`localtag.core.decode`
  then :class:`~localtag.core.preprocess.Preprocess` (resize and crop, kept as uint8). ``fast=True``
  decodes JPEGs in draft mode (DCT scaling, see :data:`DRAFT_MARGIN`); on CUDA with ``fast`` the
  JPEG bytes go to the device, which decodes them in batches (:mod:`localtag.core.device_decode`).
- **encode** in its own thread: :class:`~localtag.core.encoder.ImageEncoder` (precision, pinned copies,
  one batch in flight while the next is prepared), so decoding, inference and the consumer (scoring,
  writing) overlap.

Everything in flight is bounded: ``2 × batch_size + workers`` jobs fetching or decoding, at most two
batches at the encoder, so memory stays flat over a run of millions of images. Results come back in
input order; a job that fails carries its :class:`~localtag.core.errors.ImageError` and never stops the
run. With an embedding cache (:class:`EmbeddingCache`), a job whose content hash is cached skips
decoding and the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import decode, errors
from .device_decode import jpeg_header
from .encoder import ImageEncoder
from .errors import ImageError
from .preprocess import Prepared

log = logging.getLogger(__name__)

#: a path, bytes, a fetcher (plain or ``async``), or the error that stopped the source from listing it
Source = str | Path | bytes | Callable[[], bytes] | Callable[[], Awaitable[bytes]] | ImageError
#: ``fast`` decoding: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale whose short side is still
#: at least ``DRAFT_MARGIN`` × the model's input size; the exact bicubic resize does the rest.
DRAFT_MARGIN = 2


@dataclass
class Job:
    key: str
    source: Source
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    job: Job
    embedding: np.ndarray | None = None
    error: ImageError | None = None
    digest: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


class EmbeddingCache(Protocol):
    """What the pipeline needs of a cache (:class:`localtag.core.cache.EmbeddingCache` is one)."""

    def get(self, digest: str) -> np.ndarray | None: ...
    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None: ...
    def file_digest(self, path: str, size: int, mtime_ns: int) -> str | None: ...
    def remember_files(self, items: Iterable[tuple[str, int, int, str]]) -> None: ...


#: inputs failed by an unexpected exception in this process (each logged with its traceback)
UNEXPECTED = {"count": 0}


def unexpected(e: BaseException) -> ImageError:
    """An exception no input can cause: logged with its traceback, counted, and failing the one input
    as an internal error (Clarifai 98004, internal issue), never as a corrupt image."""
    UNEXPECTED["count"] += 1
    log.error("internal error while preparing an input (%d so far)", UNEXPECTED["count"], exc_info=e)
    return ImageError(errors.INTERNAL, f"internal error: {type(e).__name__}: {e}")


def _as_error(e: BaseException) -> ImageError:
    if isinstance(e, ImageError):
        return e
    return ImageError(errors.FETCH_FAILED, f"{type(e).__name__}: {e}")


class Pipeline:
    """Embed jobs at the speed the encoder allows; see the module docstring.

    ``batch_size`` None: the encoder's (which measures it on CUDA when its setting is ≤ 0).
    ``hash_inputs``: give every result its content sha256 even without a cache (batch runs store it).
    ``device_decode`` (default: CUDA and ``fast``) sends JPEG bytes to the device for decoding.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        *,
        batch_size: int | None = None,
        workers: int = 2,
        fast: bool = False,
        cache: EmbeddingCache | None = None,
        fetchers: int = 16,
        device_decode: bool | None = None,
        hash_inputs: bool = False,
    ):
        self.encoder = encoder
        self.hash_inputs = hash_inputs  # every result carries its content sha256, with or without a cache
        self._batch_size = batch_size
        self.workers = max(1, workers)
        self.fetchers = max(1, fetchers)
        self.max_pixels = encoder.max_pixels
        self.max_bytes = encoder.max_bytes
        self.fast = fast
        self.cache = cache
        self.pre = encoder.pre
        wanted = (encoder.cuda and fast) if device_decode is None else device_decode
        self.device_decode = wanted and self.pre.split
        self.draft = DRAFT_MARGIN * encoder.image_size if fast else None
        self._cache_failed = False

    @classmethod
    def from_settings(cls, encoder: ImageEncoder, settings, cache: EmbeddingCache | None = None,
                      **kwargs: Any) -> Pipeline:
        return cls(encoder, workers=settings.workers, fast=settings.fast_decode, cache=cache, **kwargs)

    @property
    def batch_size(self) -> int:
        return self._batch_size if self._batch_size and self._batch_size > 0 else self.encoder.batch_size

    # -- one image (the server) --------------------------------------------------------------------
    def prepare_tensor(self, data: bytes, *, draft: int | None = None,
                       on_size: Callable[[int, int], None] | None = None) -> Prepared:
        """Bytes → a normalised float tensor (``Prepared.tensor``) or an error: one image, for callers
        that batch themselves. :meth:`run` uses a cheaper uint8 form. ``draft`` (default: the
        pipeline's) and ``on_size`` go to :func:`localtag.core.decode.decode`."""
        return self._prepare_data(data, "tensor", draft=draft or self.draft, on_size=on_size)

    # -- one job -----------------------------------------------------------------------------------
    def _prepare_source(self, job: Job, mode: str) -> Prepared:
        src = job.source
        if isinstance(src, ImageError):  # a source that could not even be listed (see localtag.core.sources)
            return Prepared(error=src)
        stat = None
        if self._use_cache and isinstance(src, str | Path):
            # a file read before, unchanged since (same size and mtime): its digest without reading it
            try:
                path = os.path.abspath(src)
                st = os.stat(path)
                stat = (path, st.st_size, st.st_mtime_ns)
            except OSError:
                pass  # read_source says what is wrong
            digest = self._cache_call(self.cache.file_digest, *stat) if stat else None
            hit = self._cache_call(self.cache.get, digest) if digest else None
            if hit is not None:
                return Prepared(digest=digest, embedding=hit)
        try:
            data = decode.read_source(src, self.max_bytes)
        except ImageError as e:
            return Prepared(error=e)
        prepared = self._prepare_data(data, mode)
        if stat is not None and prepared.digest is not None:
            prepared.seen = (*stat, prepared.digest)
        return prepared

    def _prepare_data(self, data: bytes, mode: str, *, draft: int | None = None,
                      on_size: Callable[[int, int], None] | None = None) -> Prepared:
        """Bytes → cache hit, or decoded pixels (``mode`` "pixels"), or a float tensor ("tensor")."""
        digest = None
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ImageError(errors.FETCH_FAILED, f"the source gave {type(data).__name__}, not bytes")
            data = decode.read_source(data, self.max_bytes)
            if self._use_cache or self.hash_inputs:
                digest = hashlib.sha256(data).hexdigest()
            if self._use_cache:
                hit = self._cache_call(self.cache.get, digest)
                if hit is not None:
                    return Prepared(digest=digest, embedding=hit)
            if mode == "pixels" and self.device_decode:
                header = jpeg_header(data, self.max_pixels)
                if header is not None:
                    return Prepared(digest=digest, jpeg=data, orientation=header[0], megapixels=header[1])
            img = decode.decode(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                draft=draft or self.draft, on_size=on_size)
            if mode == "pixels" and self.pre.split:
                return Prepared(digest=digest, pixels=self.pre.pixels(img))
            return Prepared(digest=digest, tensor=self.pre.tensor(img))
        except ImageError as e:
            return Prepared(digest=digest, error=e)
        except Exception as e:  # noqa: BLE001 - not bad input (decode says that): a bug, told as one
            return Prepared(digest=digest, error=unexpected(e))

    @property
    def _use_cache(self) -> bool:
        return self.cache is not None and not self._cache_failed

    def _cache_call(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a broken cache slows the run down, never fails it
            if not self._cache_failed:
                log.warning("embedding cache failed (%s: %s); going on without it", type(e).__name__, e)
            self._cache_failed = True
            return None

    # -- a run -------------------------------------------------------------------------------------
    def run(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Embed every job; yields one :class:`Result` per job, in input order."""
        bs = self.batch_size
        max_inflight = bs * 2 + self.workers
        stages = _Stages(self)
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        model = threading.Thread(target=_model_loop, args=(self.encoder, self.draft, todo, done),
                                 name="localtag-encode", daemon=True)
        model.start()
        window: deque[tuple[Job, Future]] = deque()
        pending: list[tuple[Job, Prepared]] = []
        n_model = 0
        at_model = 0
        it = iter(jobs)
        exhausted = False
        try:
            while True:
                while not exhausted and len(window) < max_inflight:
                    try:
                        job = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    window.append((job, stages.submit(job)))
                while at_model:  # hand out whatever the model has finished, without waiting
                    try:
                        item = done.get_nowait()
                    except queue.Empty:
                        break
                    at_model -= 1
                    yield from self._results(item)
                if not window:
                    break
                job, fut = window.popleft()
                prepared = fut.result()
                pending.append((job, prepared))
                n_model += prepared.needs_model
                if n_model >= bs or len(pending) >= 4 * bs:
                    todo.put(pending)
                    at_model += 1
                    pending, n_model = [], 0
                    while at_model >= 2:  # at most two batches at the model: wait for the oldest
                        at_model -= 1
                        yield from self._results(done.get())
            if pending:
                todo.put(pending)
                at_model += 1
            while at_model:
                at_model -= 1
                yield from self._results(done.get())
        finally:
            for _, fut in window:
                fut.cancel()
            todo.put(None)
            stages.close()
            model.join(timeout=60)

    def _results(self, item) -> list[Result]:
        if isinstance(item, BaseException):
            raise item
        pending, embs, errors = item
        out: list[Result] = []
        fresh: list[tuple[str, np.ndarray]] = []
        k = m = 0
        for job, p in pending:
            if p.error is not None:
                out.append(Result(job, error=p.error, digest=p.digest))
            elif p.embedding is not None:
                out.append(Result(job, embedding=p.embedding, digest=p.digest, cached=True))
            else:
                err = errors.get(m)
                m += 1
                if err is not None:
                    out.append(Result(job, error=err, digest=p.digest))
                    continue
                emb = embs[k]
                k += 1
                if p.digest is not None:
                    fresh.append((p.digest, emb))
                out.append(Result(job, embedding=emb, digest=p.digest))
        if fresh and self._use_cache:
            self._cache_call(self.cache.put_many, fresh)
        seen = [p.seen for _, p in pending if p.seen is not None]
        if seen and self._use_cache:
            self._cache_call(self.cache.remember_files, seen)
        return out


class _Stages:
    """The fetch and decode pools of one run (the event loop only if an ``async def`` source shows up)."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.cpu = ThreadPoolExecutor(pipe.workers, thread_name_prefix="localtag-decode")
        self._io: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def submit(self, job: Job) -> Future:
        src = job.source
        if not callable(src):
            return self.cpu.submit(self.pipe._prepare_source, job, "pixels")
        if inspect.iscoroutinefunction(src):
            first = asyncio.run_coroutine_threadsafe(src(), self.loop())
        else:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.pipe.fetchers, thread_name_prefix="localtag-fetch")
            first = self._io.submit(src)
        return self._chain(first)

    def _chain(self, first: Future) -> Future:
        out: Future = Future()

        def fetched(f: Future) -> None:
            try:
                data = f.result()
            except BaseException as e:  # noqa: BLE001 - the fetch fails this job alone
                _settle(out, Prepared(error=_as_error(e)))
                return
            try:
                nxt = self.cpu.submit(self.pipe._prepare_data, data, "pixels")
            except RuntimeError:  # the run was closed meanwhile
                out.cancel()
                return
            nxt.add_done_callback(lambda g: out.cancel() if g.cancelled() else _settle(out, g.result()))

        first.add_done_callback(fetched)
        return out

    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="localtag-fetch-loop",
                                                 daemon=True)
            self._loop_thread.start()
        return self._loop

    def close(self) -> None:
        self.cpu.shutdown(wait=True, cancel_futures=True)
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            async def cancel_all() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(timeout=10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop_thread.join(timeout=10)
                self._loop.close()


def _settle(fut: Future, value: Prepared) -> None:
    if not fut.done():  # a run closed early cancels what it no longer waits for
        try:
            fut.set_result(value)
        except Exception:  # noqa: BLE001 - cancelled in between
            pass


def _model_loop(encoder: ImageEncoder, draft: int | None, todo: queue.Queue, done: queue.Queue) -> None:
    """The encoder thread: batches in, ``(pending, embeddings, errors)`` out, in order.

    On CUDA batch k+1 is launched before batch k is collected, so the device never waits for the host.
    """
    prev = None
    while True:
        if prev is not None:
            try:
                batch = todo.get_nowait()
            except queue.Empty:
                done.put(_collect(encoder, prev))
                prev = None
                batch = todo.get()
        else:
            batch = todo.get()
        if batch is None:
            return
        try:
            launched = (batch, encoder.launch([p for _, p in batch if p.needs_model], draft=draft))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            launched = e
        if prev is not None:
            done.put(_collect(encoder, prev))
            prev = None
        if isinstance(launched, BaseException) or not encoder.asynchronous:
            done.put(launched if isinstance(launched, BaseException) else _collect(encoder, launched))
        else:
            prev = launched


def _collect(encoder: ImageEncoder, launched):
    batch, handle = launched
    try:
        embs, errors = encoder.collect(handle)
    except BaseException as e:  # noqa: BLE001
        return e
    return batch, embs, errors


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` items (``itertools.batched`` of Python 3.12)."""
    it = iter(items)
    while part := list(islice(it, max(1, size))):
        yield part
