"""The app's command-line side: embed files (through the pipeline and the embedding cache), add them to an
app, search an app / a batch run dir (its Parquet embeddings) / a folder, and group near-duplicates."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.cache import cache_key, open_embedding_cache
from ..core.config import Settings
from ..core.pipeline import Pipeline
from ..core.sources import inputs
from . import pixels
from .search import exact_top, groups, to_score
from .store import AppStore, NewInput

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    keys: list[str]
    matrix: np.ndarray
    errors: dict[str, str]


def embed(loaded: Any, settings: Settings, sources: Iterable[str | Path]) -> Embedded:
    """Files, folders and URLs → their embeddings (the embedding cache skips what it already holds)."""
    cache = open_embedding_cache(settings, loaded.tagger.info.sha256, loaded.encoder) if settings.embedding_cache \
        else None
    pipe = Pipeline.from_settings(loaded.encoder, settings, cache=cache)
    keys, rows, errors = [], [], {}
    for r in pipe.run(inputs(sources, settings)):
        if r.ok:
            keys.append(r.job.key)
            rows.append(r.embedding)
        else:
            errors[r.job.key] = str(r.error)
    dim = rows[0].shape[0] if rows else 0
    return Embedded(keys, np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32), errors)


def store_of(settings: Settings) -> AppStore:
    return AppStore(settings.resolved_app_dir(), max_inputs=settings.app_max_inputs,
                    max_blob_bytes=settings.app_max_blob_bytes)


def embedding_key(loaded: Any, settings: Settings) -> str:
    return cache_key(loaded.tagger.info.sha256, **loaded.encoder.variant(settings.fast_decode))


def add(loaded: Any, settings: Settings, app: str, sources: Sequence[str], concepts: dict[str, int],
        metadata: dict | None = None) -> dict[str, Any]:
    """Add files (kept as blobs) and URLs (kept as URLs) to ``app``; ids are the sources' paths/URLs."""
    store = store_of(settings)
    got = embed(loaded, settings, sources)
    news = []
    for key, vec in zip(got.keys, got.matrix, strict=True):
        is_url = key.startswith(("http://", "https://"))
        data = None if is_url else Path(key).read_bytes()
        news.append(NewInput(key, url=key if is_url else None, data=data, concepts=dict(concepts),
                             metadata=dict(metadata or {}, source=key), embedding=vec))
    existing = store.records(app, [n.id for n in news])
    fresh = [n for n in news if n.id not in existing]
    for i in range(0, len(fresh), 500):
        store.add(app, fresh[i : i + 500], embedding_key(loaded, settings))
    return {"app": app, "added": len(fresh), "already": len(existing), "errors": got.errors}


class RunDirError(ValueError):
    """Not a batch run directory, or one made with another model than the one searching it."""


def run_matrix(run_dir: Path, model_sha256: str | None = None) -> tuple[list[str], np.ndarray]:
    """The ok rows of a batch run's committed shards: (ids or URIs, embeddings), column by column (no
    Python float per value: a million 512-d rows stay one float32 matrix). ``model_sha256``: the model
    that will embed the query; a run of another model raises :class:`RunDirError`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise RunDirError(f"{run_dir} is not a batch run directory (no run.json)")
    run = json.loads(run_file.read_text())
    fp = run.get("fingerprint") or {}
    if model_sha256 and fp.get("model_sha256") and fp["model_sha256"] != model_sha256:
        raise RunDirError(f"{run_dir} was embedded by model {fp.get('model')!r} ({fp['model_sha256'][:12]}); "
                          f"search it with that model (--model {fp.get('model')})")
    keys: list[str] = []
    blocks = []
    for shard in range(int(run.get("shards", 0))):
        marker_path = run_dir / "shards" / f"{shard:06d}.json"
        if not marker_path.is_file():  # not committed yet
            continue
        marker = json.loads(marker_path.read_text())
        table = pq.read_table(run_dir / "shards" / marker["file"], columns=["id", "uri", "status", "embedding"])
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["embedding"])))
        if not table.num_rows:
            continue
        ids, uris = table["id"].to_pylist(), table["uri"].to_pylist()
        keys += [i or u for i, u in zip(ids, uris, strict=True)]
        emb = table["embedding"].combine_chunks()
        blocks.append(emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                      .reshape(len(emb), -1))
    return keys, (np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32))


def query_vector(loaded: Any, settings: Settings, text: str | None, image: str | None) -> np.ndarray:
    if image:
        got = embed(loaded, settings, [image])
        if not got.keys:
            raise ValueError(f"{image}: {next(iter(got.errors.values()), 'unreadable')}")
        return got.matrix[0]
    return loaded.tagger.text.query(text or "")  # the prompt templates, as a concept is embedded


def search(keys: Sequence[str], matrix: np.ndarray, query: np.ndarray, k: int) -> list[dict[str, Any]]:
    rows, sims = exact_top(matrix, query, k)
    return [{"id": keys[r], "score": round(float(s), 6)} for r, s in zip(rows, to_score(sims), strict=True)]


def read_file(key: str) -> bytes | None:
    try:
        return Path(key).read_bytes() if not key.startswith(("http://", "https://")) else None
    except OSError:
        return None


def duplicates(keys: Sequence[str], matrix: np.ndarray, threshold: float, *, read=read_file,
               min_corr: float | None = 0.9) -> dict[str, Any]:
    """``{"threshold", "min_correlation", "count", "groups": [{"items": [...], "min_similarity"}]}``,
    sorted (largest group first). Pairs over ``threshold`` (cosine) are confirmed by the pixel check
    (:mod:`localtag.app.pixels`) when ``read(key)`` gives their bytes and ``min_corr`` is set."""
    keep = pixels.checker(lambda i: read(keys[i]), min_corr) if min_corr is not None else None
    out = []
    for g in groups(matrix, threshold, keep):
        sub = matrix[g] @ matrix[g].T
        out.append({"items": [keys[i] for i in g], "min_similarity": round(float(sub.min()), 6)})
    return {"threshold": threshold, "min_correlation": min_corr, "count": len(keys), "groups": out}
