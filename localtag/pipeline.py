"""The batch pipeline: jobs → fetch → decode + preprocess → batches → model → results.

One pipeline serves ``localtag tag``, ``embed``, ``retag``, ``directus sync`` and the server. Stages:

- **fetch**: a path or bytes source is read by the decode worker itself; a callable source (a URL or
  Directus fetcher) runs in an I/O pool of ``fetchers`` threads, an ``async def`` source on the
  pipeline's own event loop, so slow networks never hold a decode worker.
- **decode + preprocess** in ``workers`` threads (Pillow and torch release the GIL). A worker applies
  open_clip's own PIL transforms (resize, crop) and keeps the result as uint8; the per-pixel part
  (ToTensor + Normalize: the same operations in the same order, so bit-identical) runs once per
  batch. ``fast=True`` decodes JPEGs in draft mode (DCT scaling, see :data:`DRAFT_MARGIN`). On CUDA
  with ``fast``, JPEG bytes go to the GPU, which decodes them in batches (nvjpeg), resizes, crops and
  normalises them there.
- **model** in its own thread, so decoding, inference and the consumer (scoring, writing) overlap.
  On CUDA the host batch is pinned and copied non-blocking, the model runs under bf16 autocast (fp16
  where bf16 is unsupported) in channels_last, optionally ``torch.compile``-d, and batch k+1 is
  launched before the results of batch k are copied back.

Everything in flight is bounded: ``2 × batch_size + workers`` jobs fetching or decoding, at most two
batches at the model, so memory stays flat over a run of millions of images. Results come back in
input order; a job that fails carries its :class:`~localtag.images.ImageError` and never stops the
run. With an embedding cache (:class:`EmbeddingCache`), a job whose content hash is cached skips
decoding and the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import images
from .images import ImageError

log = logging.getLogger(__name__)

Source = str | Path | bytes | Callable[[], bytes] | Callable[[], Awaitable[bytes]]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".heic", ".avif"}
#: ``fast`` decoding: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale whose short side is still
#: at least ``DRAFT_MARGIN`` × the model's input size; the exact bicubic resize does the rest.
DRAFT_MARGIN = 2
#: CUDA: at most this many decoded pixels on the GPU at once (nvjpeg output before the resize).
DEVICE_DECODE_PIXELS = 256_000_000
_CPU_BATCH = 32


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
    def get(self, digest: str) -> np.ndarray | None: ...
    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None: ...


@dataclass
class _Prepared:
    digest: str | None = None
    tensor: torch.Tensor | None = None  # [3, S, S] float32, normalised (``prepare``)
    embedding: np.ndarray | None = None  # a cache hit
    error: ImageError | None = None
    pixels: torch.Tensor | None = None  # [S, S, 3] uint8, resized and cropped (``run``)
    jpeg: bytes | None = None  # undecoded JPEG for device decoding (``run`` on CUDA with ``fast``)
    orientation: int = 1  # EXIF orientation of ``jpeg``
    megapixels: float = 0.0  # size of ``jpeg`` once decoded
    seen: tuple[str, int, int, str] | None = None  # (path, size, mtime_ns, digest) of a file just read

    @property
    def needs_model(self) -> bool:
        return self.error is None and self.embedding is None


class Preprocess:
    """The tagger's open_clip transform, split at ``ToTensor``.

    ``geometry`` is open_clip's own resize / crop / mode steps (PIL images, or CHW uint8 tensors on
    any device); :meth:`normalize` is its ``ToTensor`` + ``Normalize`` applied to a whole uint8 batch
    with the same float32 operations in the same order, so ``normalize(pixels(img))`` equals
    ``transform(img)`` bit for bit. A transform that does not end in ToTensor + Normalize is not split
    (``split`` False) and is applied whole, per image.
    """

    def __init__(self, transform: Callable):
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.transform = transform
        steps = list(getattr(transform, "transforms", []))
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        self.split = cut is not None and cut == len(steps) - 2 and isinstance(steps[-1], Normalize)
        if self.split:
            self.geometry = Compose(steps[:cut])
            self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

    def pixels(self, img) -> torch.Tensor:
        """A decoded PIL image → resized, cropped [S, S, 3] uint8 (what ToTensor would read)."""
        out = self.geometry(img)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return torch.from_numpy(np.array(out, dtype=np.uint8))

    def normalize(self, batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 [N, 3, S, S] (any memory layout, any device) → normalised float32 [N, 3, S, S]."""
        if self.mean.device != batch.device:
            self.mean, self.std = self.mean.to(batch.device), self.std.to(batch.device)
        x = batch.to(torch.float32).div_(255)
        x = x.sub_(self.mean).div_(self.std)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def _short_side(size) -> int:
    return int(min(size)) if isinstance(size, list | tuple) else int(size)


def _as_error(e: BaseException) -> ImageError:
    if isinstance(e, ImageError):
        return e
    return ImageError(images.FETCH_FAILED, f"{type(e).__name__}: {e}")


class Pipeline:
    """Embed jobs at the speed the model allows; see the module docstring.

    ``batch_size`` ≤ 0 chooses it: 32 on CPU, on CUDA the smallest power of two whose throughput is
    within 5 % of the best that fits in memory. ``device_decode`` (default: CUDA and ``fast``) sends
    JPEG bytes to the device for decoding. ``compile`` wraps the image tower in ``torch.compile``.
    """

    def __init__(
        self,
        tagger,
        *,
        batch_size: int = 32,
        workers: int = 2,
        max_pixels: int = 85_000_000,
        max_bytes: int = 20_000_000,
        fast: bool = False,
        cache: EmbeddingCache | None = None,
        fetchers: int = 16,
        device_decode: bool | None = None,
        compile: bool = False,
    ):
        self.tagger = tagger
        self._batch_size = batch_size
        self.workers = max(1, workers)
        self.fetchers = max(1, fetchers)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.fast = fast
        self.cache = cache
        self.compile = compile
        cuda = tagger.device.type == "cuda"
        self.device_decode = (cuda and fast) if device_decode is None else device_decode
        self.pre = Preprocess(tagger.preprocess)
        self.device_decode = self.device_decode and self.pre.split
        self.draft = DRAFT_MARGIN * _short_side(tagger.image_size) if fast else None
        self._engine: _Engine | None = None
        self._cache_failed = False

    @classmethod
    def from_settings(cls, tagger, settings, cache: EmbeddingCache | None = None) -> Pipeline:
        return cls(tagger, batch_size=settings.batch_size, workers=settings.workers,
                   max_pixels=settings.max_pixels, max_bytes=settings.max_bytes,
                   fast=settings.fast_decode, cache=cache, compile=getattr(settings, "compile", False))

    @property
    def batch_size(self) -> int:
        if self._batch_size <= 0:
            self._batch_size = auto_batch_size(self.tagger)
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = value

    # -- one job -----------------------------------------------------------------------------------
    def prepare(self, job: Job) -> _Prepared:
        """Fetch, hash, (cache lookup), decode and preprocess one job to a normalised float tensor.

        For callers that batch themselves (the server); :meth:`run` uses a cheaper uint8 form.
        """
        try:
            src = job.source
            if callable(src):
                data = asyncio.run(src()) if inspect.iscoroutinefunction(src) else src()
            else:
                data = images.read_source(src, self.max_bytes)
        except Exception as e:  # noqa: BLE001 - a fetcher's own failure fails this job alone
            return _Prepared(error=_as_error(e))
        return self._prepare_data(data, "tensor")

    def _prepare_source(self, job: Job, mode: str) -> _Prepared:
        src = job.source
        stat = None
        if self._use_cache and isinstance(src, str | Path) and hasattr(self.cache, "file_digest"):
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
                return _Prepared(digest=digest, embedding=hit)
        try:
            data = images.read_source(src, self.max_bytes)
        except ImageError as e:
            return _Prepared(error=e)
        prepared = self._prepare_data(data, mode)
        if stat is not None and prepared.digest is not None:
            prepared.seen = (*stat, prepared.digest)
        return prepared

    def _prepare_data(self, data: bytes, mode: str) -> _Prepared:
        """Bytes → cache hit, or decoded pixels (``mode`` "pixels"), or a float tensor ("tensor")."""
        digest = None
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ImageError(images.FETCH_FAILED, f"the source gave {type(data).__name__}, not bytes")
            data = images.read_source(data, self.max_bytes)
            if self._use_cache:
                digest = hashlib.sha256(data).hexdigest()
                hit = self._cache_call(self.cache.get, digest)
                if hit is not None:
                    return _Prepared(digest=digest, embedding=hit)
            if mode == "pixels" and self.device_decode:
                header = _jpeg_header(data, self.max_pixels)
                if header is not None:
                    return _Prepared(digest=digest, jpeg=data, orientation=header[0], megapixels=header[1])
            img = images.decode(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes, draft=self.draft)
            if mode == "pixels" and self.pre.split:
                return _Prepared(digest=digest, pixels=self.pre.pixels(img))
            return _Prepared(digest=digest, tensor=self.tagger.preprocess(img))
        except ImageError as e:
            return _Prepared(digest=digest, error=e)
        except Exception as e:  # noqa: BLE001 - one bad input fails alone
            return _Prepared(digest=digest, error=ImageError(images.CORRUPT, f"{type(e).__name__}: {e}"))

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
        if self._engine is None:
            self._engine = _Engine(self)
        stages = _Stages(self)
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        model = threading.Thread(target=_model_loop, args=(self._engine, todo, done),
                                 name="localtag-model", daemon=True)
        model.start()
        window: deque[tuple[Job, Future]] = deque()
        pending: list[tuple[Job, _Prepared]] = []
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
        if seen and self._use_cache and hasattr(self.cache, "remember_files"):
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
                _settle(out, _Prepared(error=_as_error(e)))
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


def _settle(fut: Future, value: _Prepared) -> None:
    if not fut.done():  # a run closed early cancels what it no longer waits for
        try:
            fut.set_result(value)
        except Exception:  # noqa: BLE001 - cancelled in between
            pass


def _model_loop(engine: _Engine, todo: queue.Queue, done: queue.Queue) -> None:
    """The model thread: batches in, ``(pending, embeddings, errors)`` out, in order.

    On CUDA batch k+1 is launched before batch k is collected, so the device never waits for the host.
    """
    prev = None
    while True:
        if prev is not None:
            try:
                batch = todo.get_nowait()
            except queue.Empty:
                done.put(_collect(engine, prev))
                prev = None
                batch = todo.get()
        else:
            batch = todo.get()
        if batch is None:
            return
        try:
            launched = (batch, engine.launch([p for _, p in batch if p.needs_model]))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            launched = e
        if prev is not None:
            done.put(_collect(engine, prev))
            prev = None
        if isinstance(launched, BaseException) or not engine.asynchronous:
            done.put(launched if isinstance(launched, BaseException) else _collect(engine, launched))
        else:
            prev = launched


def _collect(engine: _Engine, launched):
    batch, handle = launched
    try:
        embs, errors = engine.collect(handle)
    except BaseException as e:  # noqa: BLE001
        return e
    return batch, embs, errors


@dataclass
class _Launch:
    out: Any = None  # np.ndarray on CPU, a pinned tensor being filled on CUDA
    errors: dict[int, ImageError] = field(default_factory=dict)
    event: Any = None
    n: int = 0


class _Engine:
    """The model side of a pipeline: prepared items → L2-normalised float32 embeddings."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.tagger = pipe.tagger
        self.pre = pipe.pre
        self.device = self.tagger.device
        self.cuda = self.device.type == "cuda"
        self.asynchronous = self.cuda
        self.dtype = None
        if self.cuda:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.forward = self.tagger.model.encode_image
        self.compiled = False
        if pipe.compile:
            try:
                self.forward = torch.compile(self.tagger.model.encode_image, dynamic=False)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - compile is an optimisation only
                log.warning("torch.compile unavailable (%s); running eagerly", e)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def launch(self, items: list[_Prepared]) -> _Launch:
        if not items:
            return _Launch(out=np.zeros((0, 0), dtype=np.float32))
        parts: list[tuple[list[int], torch.Tensor]] = []
        errors: dict[int, ImageError] = {}
        pix = [i for i, p in enumerate(items) if p.pixels is not None]
        if pix:  # [N, S, S, 3] uint8 (pinned, one copy) → NCHW view → normalised on the device
            host = torch.stack([items[i].pixels for i in pix])
            parts.append((pix, self.pre.normalize(self._to_device(host).permute(0, 3, 1, 2), channels_last=self.cuda)))
        ten = [i for i, p in enumerate(items) if p.tensor is not None]
        if ten:
            parts.append((ten, self._to_device(torch.stack([items[i].tensor for i in ten]))))
        jpg = [i for i, p in enumerate(items) if p.jpeg is not None]
        if jpg:
            decoded, errs = self.decode_on_device([items[i] for i in jpg])
            errors.update({jpg[j]: e for j, e in errs.items()})
            ok = [jpg[j] for j in range(len(jpg)) if j not in errs]
            if ok:
                parts.append((ok, self.pre.normalize(torch.stack([d for d in decoded if d is not None]),
                                                     channels_last=self.cuda)))
        order = sorted(i for idx, _ in parts for i in idx)
        if not order:
            return _Launch(out=np.zeros((0, 0), dtype=np.float32), errors=errors)
        if len(parts) == 1:
            x = parts[0][1]
        else:  # mixed kinds: put the rows back in input order
            pos = {i: k for k, i in enumerate(order)}
            x = torch.empty((len(order), *parts[0][1].shape[1:]), dtype=torch.float32, device=parts[0][1].device)
            for idx, t in parts:
                x[torch.tensor([pos[i] for i in idx], device=x.device)] = t.to(x.device)
        if not self.cuda:
            return _Launch(out=self.tagger.encode(x.contiguous()).numpy(), errors=errors, n=len(order))
        return self._launch_cuda(x, errors)

    def _launch_cuda(self, x: torch.Tensor, errors: dict[int, ImageError]) -> _Launch:
        n = x.shape[0]
        bs = self.pipe.batch_size
        if self.compiled and n < bs:  # one static shape: pad the last batch instead of recompiling
            x = torch.cat([x, x[-1:].expand(bs - n, *x.shape[1:])])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=self.dtype):
            try:
                feats = self.forward(x)
            except Exception as e:  # noqa: BLE001 - torch.compile fails lazily, at the first call
                if not self.compiled:
                    raise
                log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, e)
                self.forward, self.compiled = self.tagger.model.encode_image, False
                feats = self.forward(x)
        feats = torch.nn.functional.normalize(feats[:n].float(), dim=-1)
        out = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Launch(out=out, errors=errors, event=event, n=n)

    def collect(self, launched: _Launch) -> tuple[np.ndarray, dict[int, ImageError]]:
        if launched.event is not None:
            launched.event.synchronize()
            return launched.out.numpy(), launched.errors
        return launched.out, launched.errors

    def decode_on_device(self, items: list[_Prepared]) -> tuple[list[torch.Tensor | None], dict[int, ImageError]]:
        """JPEG bytes → resized, cropped [3, S, S] uint8 tensors on the model's device.

        nvjpeg decodes whole chunks (at most :data:`DEVICE_DECODE_PIXELS` pixels at once); a chunk
        that fails is retried image by image, and an image the device cannot decode (CMYK,
        unusual sampling) goes through Pillow, which also gives the exact error of a broken file.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(items)
        errors: dict[int, ImageError] = {}
        chunks: list[list[int]] = [[]]
        budget = 0.0
        for i, p in enumerate(items):
            if chunks[-1] and budget + p.megapixels > DEVICE_DECODE_PIXELS / 1e6:
                chunks.append([])
                budget = 0.0
            chunks[-1].append(i)
            budget += p.megapixels
        for chunk in chunks:
            raw = [torch.frombuffer(bytearray(items[i].jpeg), dtype=torch.uint8) for i in chunk]
            try:
                decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                decoded = []
                for r in raw:
                    try:
                        decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
            for i, img in zip(chunk, decoded, strict=True):
                p = items[i]
                if img is None:
                    try:
                        pil = images.decode(p.jpeg, max_pixels=self.pipe.max_pixels, max_bytes=self.pipe.max_bytes,
                                            draft=self.pipe.draft)
                        out[i] = self.pre.pixels(pil).permute(2, 0, 1).to(self.device)
                    except ImageError as e:
                        errors[i] = e
                    continue
                out[i] = self.pre.geometry(orient(img, p.orientation))
        return out, errors


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a [C, H, W] tensor, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def _jpeg_header(data: bytes, max_pixels: int) -> tuple[int, float] | None:
    """``(exif orientation, megapixels)`` of a JPEG the device can decode, else None (Pillow's job).

    Raises :class:`ImageError` for a JPEG over the pixel limit, before anything is decoded.
    """
    from PIL import Image

    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        mode = img.mode
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - Pillow will say what is wrong
        return None
    if img.format != "JPEG" or mode not in ("RGB", "L") or w <= 0 or h <= 0:
        return None
    if w * h > max_pixels:
        raise ImageError(images.TOO_MANY_PIXELS,
                         f"{w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:.1f} MP limit")
    return (orientation if 1 <= orientation <= 8 else 1), w * h / 1e6


def auto_batch_size(tagger, *, limit: int = 1024) -> int:
    """32 on CPU; on CUDA the smallest power of two within 5 % of the best throughput that fits."""
    if tagger.device.type != "cuda":
        return _CPU_BATCH
    size = _short_side(tagger.image_size)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    rates: dict[int, float] = {}
    bs = 32
    while bs <= limit:
        try:
            x = torch.randn(bs, 3, size, size, device=tagger.device).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                tagger.model.encode_image(x)  # warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(3):
                    tagger.model.encode_image(x)
                torch.cuda.synchronize()
            rates[bs] = 3 * bs / (time.perf_counter() - t0)
            del x
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        if len(rates) >= 2 and rates[bs] < 1.05 * max(r for b, r in rates.items() if b < bs):
            break
        bs *= 2
    if not rates:
        return 8
    best = max(rates.values())
    chosen = min(b for b, r in rates.items() if r >= 0.95 * best)
    log.info("batch size %d chosen on %s (%s)", chosen, tagger.device,
             ", ".join(f"{b}: {r:.0f} img/s" for b, r in sorted(rates.items())))
    return chosen


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` items (``itertools.batched`` of Python 3.12)."""
    it = iter(items)
    while part := list(islice(it, max(1, size))):
        yield part


def walk(paths: Iterable[str | Path], recursive: bool = True) -> Iterator[Job]:
    """Jobs for files and (walked, sorted) directories. Directories yield image-suffixed files only."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p) if recursive else [(p, [], os.listdir(p))]:
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                        fp = Path(root) / name
                        yield Job(str(fp), fp)
        else:
            yield Job(str(p), p)
