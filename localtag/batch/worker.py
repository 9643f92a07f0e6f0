"""One batch worker: a shard number in, a committed shard out. Both engines run exactly this.

The local engine makes one :class:`ShardWorker` in the driver; the Ray engine makes one per actor.
A worker loads the model once and runs each shard through the core's run loop
(:func:`localtag.core.run.run`: pipeline → scorer → :class:`ShardTable`, its writer), then commits the
shard (:meth:`RunStore.commit`).
A bad item (missing, corrupt, refused URL, 404) is an error row; only a broken run dir raises.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.loader import fingerprint, load
from ..core.pipeline import Job, Pipeline
from ..core.run import Scored, run
from ..core.scorer import Picking
from .sources import Opener
from .store import RunStore, result_schema


def concepts_of(tags: list[Any]) -> list[dict[str, Any]]:
    return [{"id": t.id, "name": t.name, "value": float(t.value)} for t in tags]


class ShardTable:
    """The run loop's writer for one shard: its scored items as result rows."""

    def __init__(self) -> None:
        self.scored: list[Scored] = []

    def write(self, batch: list[Scored]) -> None:
        self.scored.extend(batch)


def build_table(items: list[dict], scored: list[Scored], dim: int) -> pa.Table:
    """Result rows for a shard's items (``scored`` in the same order)."""
    rows = []
    for item, s in zip(items, scored, strict=True):
        r = s.result
        row = {"index": item["index"], "id": item["id"], "uri": item["uri"], "sha256": r.digest,
               "status": "ok", "error_kind": None, "error": None, "concepts": None, "embedding": None}
        if r.ok:
            row["concepts"] = concepts_of(s.tags)
            row["embedding"] = np.asarray(r.embedding, dtype=np.float32)
        else:
            row.update(status="error", error_kind=r.error.kind, error=r.error.message)
        rows.append(row)
    schema = result_schema(dim)
    emb = [row.pop("embedding") for row in rows]
    matrix = np.zeros((len(rows), dim), dtype=np.float32)  # error rows: null (their zeros are never read)
    for i, e in enumerate(emb):
        if e is not None:
            matrix[i] = e
    mask = np.array([e is None for e in emb], dtype=bool)
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim,
                                                   mask=pa.array(mask) if mask.any() else None)
    table = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("embedding")))
    return table.append_column(schema.field("embedding"), embeddings)


def set_threads(n: int) -> None:
    """Intra-op threads of this worker process's model. Float sums depend on how a batch is split over
    threads, so workers that should give bit-identical answers must use the same number."""
    import torch

    torch.set_num_threads(max(1, n))


def default_threads() -> int:
    """What torch picks in a plain process here (Ray's workers are started with OMP_NUM_THREADS=1)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shard_stats(table: pa.Table, seconds: float) -> dict[str, Any]:
    status = table.column("status").to_pylist()
    kinds: dict[str, int] = {}
    for k in table.column("error_kind").to_pylist():
        if k is not None:
            kinds[k] = kinds.get(k, 0) + 1
    ok = sum(s == "ok" for s in status)
    return {"items": len(status), "ok": ok, "failed": len(status) - ok, "errors": kinds, "seconds": round(seconds, 4)}


class ShardWorker:
    def __init__(self, run_dir: str | Path, settings: Any, threads: int | None = None):
        if threads:
            set_threads(threads)
        self.store = RunStore(run_dir)
        self.settings = settings
        run = self.store.read_run()
        self.store.check(fingerprint(settings))  # a node with another model refuses, before loading it
        self.tagger, encoder = load(settings, head="add")  # a learnt head (--model-head) joins the vocabulary
        self.run_id = run["run_id"]
        self.dim = int(self.tagger.info.model_cfg["embed_dim"])
        # every input hashed (the sha256 each row carries); no embedding cache: the run's Parquet is one
        self.pipeline = Pipeline.from_settings(encoder, settings, hash_inputs=True)
        self.picking = Picking(settings.max_concepts, settings.min_value)
        self.opener = Opener(settings)
        self.who = {"pid": os.getpid(), "host": socket.gethostname()}

    def announce(self, **extra: Any) -> None:
        """Say who is working (``workers/<pid>.json``: pid, host, Ray node), for ``status`` and for tests."""
        d = self.store.root / "workers"
        d.mkdir(exist_ok=True)
        (d / f"{os.getpid()}.json").write_text(json.dumps({**self.who, **extra, "started_at": time.time()}))

    def process(self, shard: int) -> dict[str, Any]:
        """Embed, score and commit one shard; its stats (``committed`` False when it was already done)."""
        done = self.store.marker(shard)
        if done is not None:
            return {**done, "committed": False}
        t0 = time.perf_counter()
        items = self.store.read_plan_shard(shard)
        jobs = [Job(str(it["index"]), self.opener.source(it)) for it in items]
        rows = ShardTable()
        run(self.pipeline.run(jobs), rows, scorer=self.tagger.scorer, picking=self.picking)
        table = build_table(items, rows.scored, self.dim)
        stats = {**shard_stats(table, time.perf_counter() - t0), **self.who, "run_id": self.run_id}
        committed = self.store.commit(shard, table, stats)
        return {**(self.store.marker(shard) or stats), "committed": committed}
