"""A batch run directory: the plan, the committed shards, and nothing half-written that counts.

Layout of RUN_DIR::

    run.json                  fingerprint (model, vocabulary, scoring, preprocessing), sources, shard
                              size, the plan's item and shard counts; written once, then checked
    plan/000042.parquet       the items of shard 42 (index, id, uri, offset, length)
    shards/000042.<attempt>.parquet   results of one attempt at shard 42
    shards/000042.json        the commit marker: names the one attempt that counts, with its stats
    manifest.jsonl            one line per commit, appended in commit order

Commit (img2dataset's pattern, made exclusive): an attempt writes its Parquet under its own name,
then links its marker into place with ``os.link``, which fails if a marker is already there. So a
shard is committed exactly once, whatever Ray retries or a resumed run re-does; the loser removes
its file. Readers only read files named by markers; everything else is debris of killed attempts
(removed by :meth:`RunStore.clean`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core.files import atomic_file

FORMAT = 1

PLAN_SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("id", pa.string()),
    ("uri", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
])
CONCEPT = pa.struct([("id", pa.string()), ("name", pa.string()), ("value", pa.float32())])


def result_schema(dim: int) -> pa.Schema:
    """A committed shard's rows. ``embedding``: L2-normalised float32 (null for an error row)."""
    return pa.schema([
        ("index", pa.int64()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("concepts", pa.list_(CONCEPT)),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


class RunError(ValueError):
    """A run directory that cannot be used as asked (another fingerprint, another plan, not a run)."""


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.plan_dir = self.root / "plan"
        self.shards_dir = self.root / "shards"
        self.run_file = self.root / "run.json"
        self.manifest = self.root / "manifest.jsonl"

    # -- run.json ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_file.is_file()

    def read_run(self) -> dict[str, Any]:
        if not self.exists():
            raise RunError(f"{self.root} is not a batch run (no run.json)")
        return json.loads(self.run_file.read_text())

    def write_run(self, run: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.run_file, json.dumps(run, indent=1, sort_keys=True).encode())

    def check(self, fingerprint: dict[str, Any], plan_key: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's record, if it was planned with this fingerprint (and these sources), else RunError."""
        run = self.read_run()
        diff = sorted(k for k in set(run["fingerprint"]) | set(fingerprint)
                      if run["fingerprint"].get(k) != fingerprint.get(k))
        if diff:
            raise RunError(f"{self.root} holds a run with another fingerprint (differs in {', '.join(diff)}); "
                           "use another --out, or the same model, vocabulary and options to resume it")
        if plan_key is not None:
            diff = sorted(k for k in plan_key if run["plan_key"].get(k) != plan_key[k])
            if diff:
                raise RunError(f"{self.root} was planned with other {', '.join(diff)}; resume with the same "
                               "sources and --shard-size, or use another --out")
        return run

    # -- plan ----------------------------------------------------------------------------------------
    def plan_path(self, shard: int) -> Path:
        return self.plan_dir / f"{shard:06d}.parquet"

    def write_plan_shard(self, shard: int, items: list[dict]) -> None:
        self.plan_dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(items, schema=PLAN_SCHEMA)
        tmp = self.plan_dir / f".{shard:06d}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.plan_path(shard))

    def read_plan_shard(self, shard: int) -> list[dict]:
        return pq.read_table(self.plan_path(shard)).to_pylist()

    # -- commits -------------------------------------------------------------------------------------
    def marker_path(self, shard: int) -> Path:
        return self.shards_dir / f"{shard:06d}.json"

    def is_committed(self, shard: int) -> bool:
        return self.marker_path(shard).is_file()

    def marker(self, shard: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.marker_path(shard).read_text())
        except FileNotFoundError:
            return None

    def commit(self, shard: int, table: pa.Table, stats: dict[str, Any]) -> bool:
        """Commit one attempt at a shard; False (and nothing kept) when another attempt committed first."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        attempt = uuid.uuid4().hex[:12]
        data = self.shards_dir / f"{shard:06d}.{attempt}.parquet"
        tmp = self.shards_dir / f".{data.name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, data)
        stats = {**stats, "shard": shard, "file": data.name, "attempt": attempt, "committed_at": time.time()}
        mtmp = self.shards_dir / f".{shard:06d}.{attempt}.json.tmp"
        _atomic_write(mtmp, json.dumps(stats, sort_keys=True).encode())
        try:
            os.link(mtmp, self.marker_path(shard))  # the commit point: exclusive
        except FileExistsError:
            data.unlink(missing_ok=True)
            return False
        finally:
            mtmp.unlink(missing_ok=True)
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(stats, sort_keys=True) + "\n")
        return True

    def committed(self, n_shards: int) -> Iterator[dict[str, Any]]:
        """Markers of the committed shards, in shard order (one at a time: memory stays flat)."""
        for shard in range(n_shards):
            m = self.marker(shard)
            if m is not None:
                yield m

    def read_shard(self, marker: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.shards_dir / marker["file"], columns=columns)

    def clean(self) -> int:
        """Remove what killed attempts left (temporary files, Parquet no marker names); how many."""
        if not self.shards_dir.is_dir():
            return 0
        removed = 0
        for entry in os.scandir(self.shards_dir):
            name = entry.name
            stale = name.startswith(".") and name.endswith(".tmp")
            if not stale and name.endswith(".parquet"):
                shard = int(name.split(".", 1)[0])
                m = self.marker(shard)
                stale = m is not None and m["file"] != name
            if stale:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed
