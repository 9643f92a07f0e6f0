"""Every call the batch feature makes into localtag's core, in one place.

The batch modules (``batch_*``, ``cli_batch``) never import the tagger, the pipeline, the Clarifai
shapes, the fetcher or the Directus rules directly: they go through these functions, so a change of
the core's names touches this file only. Both batch engines (local and Ray) embed through
:func:`embed`, which is the core's own :meth:`Pipeline.run` — the one path that runs the image model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


# -- the model ----------------------------------------------------------------------------------------
def load(settings: Any) -> Any:
    """The tagger and the image encoder of these settings (:func:`localtag.core.loader.load`)."""
    from ..core.loader import load as core_load

    return core_load(settings)


def load_tagger(settings: Any) -> Any:
    """The tagger (model, vocabulary, scoring, calibration) of these settings."""
    return load(settings).tagger


def fingerprint(tagger: Any, settings: Any) -> dict[str, Any]:
    """What decides a batch run's answers: a run dir holds results of exactly one fingerprint."""
    cal = tagger.calibration
    cal_id = None
    if cal is not None:
        path = cal.path
        cal_id = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else repr(cal)
    return {
        "model": tagger.info.name,
        "model_sha256": tagger.info.sha256,
        "vocab_sha256": tagger.vocab.sha256,
        "templates": list(tagger.templates),
        "scoring": tagger.scoring,
        "calibration_sha256": cal_id,
        "preprocess": tagger.info.preprocess,
        "max_pixels": settings.max_pixels,
        "max_bytes": settings.max_bytes,
        "fast_decode": settings.fast_decode,
        "precision": settings.precision,
        "max_concepts": settings.max_concepts,
        "min_value": settings.min_value,
    }


#: the part of a fingerprint the stored embeddings depend on (``rescore`` may change the rest)
IMAGE_KEYS = ("model_sha256", "preprocess", "max_pixels", "max_bytes", "fast_decode", "precision")


def set_threads(n: int) -> None:
    """Intra-op threads of this worker process's model. Float sums depend on how a batch is split over
    threads, so workers that should give bit-identical answers must use the same number."""
    import torch

    torch.set_num_threads(max(1, n))


def default_threads() -> int:
    """What torch picks in a plain process here (Ray's workers are started with OMP_NUM_THREADS=1)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def embedding_dim(tagger: Any) -> int:
    return int(tagger.info.model_cfg["embed_dim"])


def make_pipeline(encoder: Any, settings: Any) -> Any:
    """The core pipeline over this image encoder, hashing every input (the sha256 each row carries).
    No embedding cache: the run's own Parquet is the batch cache."""
    from ..core.pipeline import Pipeline

    return Pipeline.from_settings(encoder, settings, hash_inputs=True)


def job(key: str, source: Any, meta: dict | None = None) -> Any:
    from ..core.pipeline import Job

    return Job(key, source, meta or {})


def embed(pipeline: Any, jobs: Iterable[Any]) -> Iterator[Any]:
    """Results (``.job``, ``.embedding``, ``.digest``, ``.error``) in input order: the core pipeline."""
    return pipeline.run(jobs)


def values(tagger: Any, embeddings: np.ndarray) -> np.ndarray:
    """[N, dim] L2-normalised embeddings → [N, concepts] values."""
    return tagger.values(embeddings)


def pick(tagger: Any, row: np.ndarray, settings: Any) -> list[Any]:
    """One image's values → its reported tags (``.id``, ``.name``, ``.value``), best first."""
    return tagger.pick(row, max_concepts=settings.max_concepts, min_value=settings.min_value)


def walk(paths: Sequence[str | Path]) -> Iterator[Path]:
    """Image files of files and folders, in the core's own (sorted) order."""
    from ..core.sources import walk as core_walk

    for j in core_walk(paths):
        yield Path(j.key)  # an entry that cannot be read fails when it is read, with its reason


def image_error(kind: str, message: str) -> Exception:
    from ..core.errors import ImageError

    return ImageError(kind, message)


#: error kinds, as the core names them
def error_kinds() -> SimpleNamespace:
    from ..core import errors

    return SimpleNamespace(not_found=errors.NOT_FOUND, fetch_failed=errors.FETCH_FAILED,
                           url_refused=errors.URL_REFUSED, corrupt=errors.CORRUPT)


def read_file(path: str | Path, max_bytes: int) -> bytes:
    from ..core.decode import read_source

    return read_source(Path(path), max_bytes)


# -- fetching -----------------------------------------------------------------------------------------
def url_fetcher(settings: Any) -> Callable[[str], bytes]:
    """``url → bytes`` through the server's guarded fetcher (public addresses only, caps, timeouts)."""
    import asyncio

    from ..core.fetch import FetchPolicy, fetch

    policy = FetchPolicy.from_settings(settings)
    return lambda url: asyncio.run(fetch(url, policy))  # in a pipeline fetch thread: its own event loop


def redact(url: str) -> str:
    from ..core.fetch import redact as core_redact

    return core_redact(url)


# -- Clarifai output ------------------------------------------------------------------------------------
def clarifai_model(model: str, model_sha256: str) -> dict[str, Any]:
    """The ``model`` object of ``localtag tag --json``."""
    from ..core import clarifai

    return clarifai.model_json(model, model_sha256[:32], name=model, app_id="localtag", user_id="localtag")


def clarifai_output(input_id: str, url: str, model: dict[str, Any], tags: Sequence[Any] | None,
                    error: tuple[str, str] | None) -> dict[str, Any]:
    """One Clarifai output, as ``localtag tag --jsonl`` writes it; ``error`` is ``(kind, message)``."""
    from ..core import clarifai

    status = clarifai.image_error_status(image_error(*error)) if error else None
    return clarifai.output_json(input_id, {"image": {"url": url}}, model, tags, status)


def clarifai_status(total: int, failed: int) -> dict[str, Any]:
    from ..core import clarifai

    code = clarifai.SUCCESS if not failed else (clarifai.FAILURE if failed == total else clarifai.MIXED_STATUS)
    return clarifai.status(code, req_id=clarifai.new_id())


# -- Directus -------------------------------------------------------------------------------------------
def directus_client(url: str, token: str) -> Any:
    from ..directus.client import DirectusClient

    return DirectusClient(url, token)


def directus_files(client: Any, filter: dict | None) -> Iterator[str]:
    """Ids of the library's images (sorted), as ``directus sync`` walks them."""
    for row in client.iter_files(filter, 100, ["id"]):
        yield row["id"]


def directus_download(client: Any, file_id: str, max_bytes: int) -> bytes:
    return client.download(file_id, max_bytes=max_bytes)


def provenance_field() -> str:
    from ..directus.tag_merge import PROVENANCE_FIELD

    return PROVENANCE_FIELD


def ensure_provenance_field(client: Any) -> None:
    from ..directus.client import ensure_provenance_field as core_ensure

    core_ensure(client, create=True)


def provenance_stamp(model: str, model_sha256: str, vocab_sha256: str, run: str) -> dict[str, Any]:
    """``directus sync``'s own stamp, for a run whose tagger is described by its fingerprint."""
    from ..directus.tag_merge import provenance_stamp as core_stamp

    tagger = SimpleNamespace(info=SimpleNamespace(name=model, sha256=model_sha256),
                             vocab=SimpleNamespace(sha256=vocab_sha256))
    return core_stamp(tagger, run)


def tag(concept: dict[str, Any]) -> Any:
    """A stored concept row (``id``, ``name``, ``value``) as the core's :class:`~localtag.core.tag.Tag`."""
    from ..core.tag import Tag

    return Tag(concept["id"], concept["name"], float(concept["value"]))


def plan_tags(current: Any, provenance: Any, new: Sequence[Any], stamp: dict[str, Any]) -> Any:
    """``directus sync``'s merge: a person's tags stay, localtag's own are replaced (see tag_merge.py)."""
    from ..directus.tag_merge import plan_tags as core_plan

    return core_plan(current, provenance, new, stamp)


def tags_field_error() -> type[Exception]:
    from ..directus.tag_merge import TagsFieldError

    return TagsFieldError


def write_plan(client: Any, file_id: str, plan: Any) -> None:
    from ..directus.client import write_plan as core_write

    core_write(client, file_id, plan)
