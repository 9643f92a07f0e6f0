"""The batch pipeline: jobs → fetch + decode + preprocess (worker threads) → batches → model → results.

One pipeline serves ``localtag tag``, ``embed``, ``directus sync`` and the server. Work in flight is
bounded (``batch_size × 2 + workers`` jobs), so memory stays flat however long the input is. Results
come back in input order; a job that fails carries its :class:`~localtag.images.ImageError` and
never stops the batch.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from . import images
from .images import ImageError

Source = str | Path | bytes | Callable[[], bytes]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif", ".heic", ".avif"}


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
    tensor: torch.Tensor | None = None
    embedding: np.ndarray | None = None
    error: ImageError | None = None


class Pipeline:
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
    ):
        self.tagger = tagger
        self.batch_size = max(1, batch_size)
        self.workers = max(1, workers)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.fast = fast
        self.cache = cache

    @classmethod
    def from_settings(cls, tagger, settings, cache: EmbeddingCache | None = None) -> Pipeline:
        return cls(tagger, batch_size=settings.batch_size, workers=settings.workers,
                   max_pixels=settings.max_pixels, max_bytes=settings.max_bytes,
                   fast=settings.fast_decode, cache=cache)

    def prepare(self, job: Job) -> _Prepared:
        """Fetch, hash, (cache lookup), decode and preprocess one job. Runs in a worker thread."""
        try:
            src = job.source
            data = src() if callable(src) else images.read_source(src, self.max_bytes)
            digest = hashlib.sha256(data).hexdigest() if self.cache is not None else None
            if digest is not None:
                hit = self.cache.get(digest)
                if hit is not None:
                    return _Prepared(digest=digest, embedding=hit)
            img = images.decode(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                draft=self.tagger.image_size if self.fast else None)
            return _Prepared(digest=digest, tensor=self.tagger.preprocess(img))
        except ImageError as e:
            return _Prepared(error=e)
        except Exception as e:  # noqa: BLE001 - a fetcher's own failure fails this job alone
            return _Prepared(error=ImageError(images.FETCH_FAILED, f"{type(e).__name__}: {e}"))

    def run(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Embed every job; yields one :class:`Result` per job, in input order."""
        it = iter(jobs)
        window: deque[tuple[Job, Future]] = deque()
        max_inflight = self.batch_size * 2 + self.workers
        pending: list[tuple[Job, _Prepared]] = []
        n_tensors = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="localtag-decode") as pool:
            exhausted = False
            while True:
                while not exhausted and len(window) < max_inflight:
                    try:
                        job = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    window.append((job, pool.submit(self.prepare, job)))
                if not window:
                    break
                job, fut = window.popleft()
                prepared = fut.result()
                pending.append((job, prepared))
                n_tensors += prepared.tensor is not None
                if n_tensors >= self.batch_size:
                    yield from self._flush(pending)
                    pending, n_tensors = [], 0
            if pending:
                yield from self._flush(pending)

    def _flush(self, pending: list[tuple[Job, _Prepared]]) -> Iterator[Result]:
        tensors = [p.tensor for _, p in pending if p.tensor is not None]
        if tensors:
            batch = torch.stack(tensors)
            if self.tagger.device.type == "cuda":
                batch = batch.pin_memory()
            embs = iter(self.tagger.encode(batch).numpy())
        fresh: list[tuple[str, np.ndarray]] = []
        for job, p in pending:
            if p.error is not None:
                yield Result(job, error=p.error)
            elif p.embedding is not None:
                yield Result(job, embedding=p.embedding, digest=p.digest, cached=True)
            else:
                emb = next(embs)
                if p.digest is not None:
                    fresh.append((p.digest, emb))
                yield Result(job, embedding=emb, digest=p.digest)
        if fresh and self.cache is not None:
            self.cache.put_many(fresh)


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
