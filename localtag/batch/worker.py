"""One batch worker: a shard number in, a committed shard out. Both engines run exactly this.

The local engine makes one :class:`ShardWorker` in the driver; the Ray engine makes one per actor.
A worker loads the tagger once, embeds a shard's items through the core pipeline
(:func:`localtag.batch.core.embed`), scores them, and commits the shard (:meth:`RunStore.commit`).
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

from . import core
from .sources import Opener
from .store import RunStore, result_schema


def concepts_of(tags: list[Any]) -> list[dict[str, Any]]:
    return [{"id": t.id, "name": t.name, "value": float(t.value)} for t in tags]


def build_table(items: list[dict], results: list[Any], tagger: Any, settings: Any, dim: int) -> pa.Table:
    """Result rows for a shard's items (``results`` in the same order)."""
    ok = [i for i, r in enumerate(results) if r.ok]
    vals = core.values(tagger, np.stack([results[i].embedding for i in ok])) if ok else None
    rows = []
    k = 0
    for item, r in zip(items, results, strict=True):
        row = {"index": item["index"], "id": item["id"], "uri": item["uri"], "sha256": r.digest,
               "status": "ok", "error_kind": None, "error": None, "concepts": None, "embedding": None}
        if r.ok:
            row["concepts"] = concepts_of(core.pick(tagger, vals[k], settings))
            row["embedding"] = np.asarray(r.embedding, dtype=np.float32)
            k += 1
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
            core.set_threads(threads)
        self.store = RunStore(run_dir)
        self.settings = settings
        self.tagger, encoder = core.load(settings)
        run = self.store.read_run()
        self.store.check(core.fingerprint(self.tagger, settings))  # a node with another model refuses
        self.run_id = run["run_id"]
        self.dim = core.embedding_dim(self.tagger)
        self.pipeline = core.make_pipeline(encoder, settings)
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
        jobs = [core.job(str(it["index"]), self.opener.source(it)) for it in items]
        results = list(core.embed(self.pipeline, jobs))
        table = build_table(items, results, self.tagger, self.settings, self.dim)
        stats = {**shard_stats(table, time.perf_counter() - t0), **self.who, "run_id": self.run_id}
        committed = self.store.commit(shard, table, stats)
        return {**(self.store.marker(shard) or stats), "committed": committed}
