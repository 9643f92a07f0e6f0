"""The app store: Clarifai apps (inputs, concept annotations, metadata, CLIP embeddings) on disk.

Layout under ``root`` (``settings.app_dir``, default ``<cache_dir>/apps``):

- ``app.sqlite3``: one SQLite file in WAL mode for every app (keyed by ``user_id/app_id``); every
  write is one ``BEGIN IMMEDIATE`` transaction, so a crash or a kill loses at most the write in flight
  and writers in several processes take turns instead of corrupting it. Tables: ``apps`` (a
  generation counter bumped by every write, so readers know when to reload their matrix),
  ``inputs``, ``annotations`` (concept, value 1 or 0), ``concepts``, ``embeddings`` (one float32 blob
  per input and embedding key: model sha256 | preprocessing | precision | device, as the embedding
  cache keys them);
- ``blobs/ab/<sha256>``: the bytes of inputs sent as base64, content-addressed, written to a temporary
  file and renamed (atomic), at most ``max_blob_bytes`` each.

:meth:`AppStore.matrix` loads one app's embeddings into one float32 matrix ``[N, D]`` (one SELECT;
~0.3 s per 100k rows of 512 floats) and keeps it until the app's generation changes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_file

FILENAME = "app.sqlite3"
#: input status codes (clarifai/api/status/status_code.proto: INPUT_DOWNLOAD_SUCCESS, _PENDING, _FAILED,
#: _IN_PROGRESS). PostInputs stores an input pending; the app's worker takes it (in progress), fetches,
#: decodes and embeds it, and leaves it processed (with its embedding) or failed (with the reason).
STATUS_OK = 30000
STATUS_PENDING = 30001
STATUS_FAILED = 30002
STATUS_IN_PROGRESS = 30003
STATUS_DESCRIPTIONS = {STATUS_OK: "Download complete", STATUS_PENDING: "Download pending",
                       STATUS_FAILED: "Download failed; check URL", STATUS_IN_PROGRESS: "Download in progress"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (app TEXT PRIMARY KEY, generation INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inputs (
    app TEXT NOT NULL, id TEXT NOT NULL, url TEXT, blob TEXT, sha256 TEXT, metadata TEXT NOT NULL DEFAULT '{}',
    status INTEGER NOT NULL, details TEXT, created REAL NOT NULL, modified REAL NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (app, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inputs_seq ON inputs (app, seq);
CREATE INDEX IF NOT EXISTS inputs_status ON inputs (status, created);
CREATE TABLE IF NOT EXISTS annotations (
    app TEXT NOT NULL, input_id TEXT NOT NULL, concept TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (app, input_id, concept)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS annotations_concept ON annotations (app, concept, value);
CREATE TABLE IF NOT EXISTS concepts (
    app TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (app, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS embeddings (
    app TEXT NOT NULL, input_id TEXT NOT NULL, key TEXT NOT NULL, vec BLOB NOT NULL,
    PRIMARY KEY (app, key, input_id)) WITHOUT ROWID;
"""


class StoreError(Exception):
    """A write the store refuses (over a limit, an id taken); ``kind`` says which."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class NewInput:
    """One input to add: its id, where it came from (``url`` and/or ``data``), annotations, metadata, embedding."""

    id: str
    url: str | None = None
    data: bytes | None = None
    concepts: dict[str, int] = field(default_factory=dict)  # concept id → 1 or 0
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    status: int = STATUS_OK
    details: str | None = None
    blob: str | None = None  # the digest of bytes already kept (put_blob), for :meth:`AppStore.finish`


def app_key(user_id: str | None, app_id: str | None) -> str:
    """The key of an app: ``user/app`` (Clarifai's ``user_app_id``; ``me`` for a missing user)."""
    return f"{user_id or 'me'}/{app_id or 'main'}"


class AppStore:
    """All apps under one folder. Thread-safe (one connection per thread); process-safe (SQLite locks)."""

    def __init__(self, root: str | Path, *, max_inputs: int = 1_000_000, max_blob_bytes: int = 20_000_000,
                 timeout: float = 60.0):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.path = self.root / FILENAME
        self.max_inputs, self.max_blob_bytes, self.timeout = max_inputs, max_blob_bytes, timeout
        self._local = threading.local()
        self._matrices: dict[tuple[str, str], tuple[int, list[str], np.ndarray]] = {}
        self._lock = threading.Lock()
        self._db().executescript(_SCHEMA)  # each statement commits on its own (IF NOT EXISTS)

    # -- connections ------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, exc, tb) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> AppStore._Tx:
        return self._Tx(self._db())

    @staticmethod
    def _bump(db: sqlite3.Connection, app: str) -> None:
        db.execute("INSERT INTO apps (app, generation, created) VALUES (?, 1, ?) "
                   "ON CONFLICT(app) DO UPDATE SET generation = generation + 1", (app, time.time()))

    def generation(self, app: str) -> int:
        row = self._db().execute("SELECT generation FROM apps WHERE app = ?", (app,)).fetchone()
        return row[0] if row else 0

    # -- blobs ------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        """Keep ``data`` under its sha256 (once); returns the digest."""
        if len(data) > self.max_blob_bytes:
            raise StoreError("blob", f"{len(data)} bytes is over the {self.max_blob_bytes}-byte blob limit")
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                f.write(data)
        return digest

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest[:2] / digest

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    # -- writes -----------------------------------------------------------------------------------
    def add(self, app: str, inputs: Sequence[NewInput], key: str) -> None:
        """Add inputs (blobs first, then every record in one transaction). An id already in the app,
        or the app's input cap, refuses the whole call with :class:`StoreError`."""
        digests = [self.put_blob(i.data) if i.data is not None else None for i in inputs]
        now = time.time()
        with self._write() as db:
            count = db.execute("SELECT count(*) FROM inputs WHERE app = ?", (app,)).fetchone()[0]
            if count + len(inputs) > self.max_inputs:
                raise StoreError("limit", f"the app holds {count} inputs; {len(inputs)} more is over its limit "
                                          f"of {self.max_inputs}")
            seq = db.execute("SELECT coalesce(max(seq), 0) FROM inputs WHERE app = ?", (app,)).fetchone()[0]
            for n, (inp, digest) in enumerate(zip(inputs, digests, strict=True)):
                sha = digest or (hashlib.sha256(inp.url.encode()).hexdigest() if inp.url else None)
                try:
                    db.execute("INSERT INTO inputs (app, id, url, blob, sha256, metadata, status, details, created, "
                               "modified, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                               (app, inp.id, inp.url, digest, sha, json.dumps(inp.metadata), inp.status,
                                inp.details, now, now, seq + n + 1))
                except sqlite3.IntegrityError:
                    raise StoreError("exists", f"input {inp.id!r} already exists in the app") from None
                self._set_concepts(db, app, inp.id, inp.concepts, now)
                if inp.embedding is not None:
                    db.execute("INSERT INTO embeddings (app, input_id, key, vec) VALUES (?,?,?,?)",
                               (app, inp.id, key, np.ascontiguousarray(inp.embedding, "<f4").tobytes()))
            self._bump(db, app)

    def upsert(self, app: str, inputs: Sequence[NewInput], key: str) -> tuple[int, int]:
        """Add new inputs and update those the app holds, in one transaction: (added, updated). An update
        replaces the url, metadata and annotations; its embedding under ``key`` is replaced when given and
        kept when ``embedding`` is None (its blob, created time and place in the listing stay)."""
        if not inputs:
            return 0, 0
        digests = [self.put_blob(i.data) if i.data is not None else None for i in inputs]
        now = time.time()
        with self._write() as db:
            held = {r[0] for i in range(0, len(inputs), 500) for r in db.execute(
                f"SELECT id FROM inputs WHERE app = ? AND id IN ({','.join('?' * len(inputs[i:i + 500]))})",
                (app, *[x.id for x in inputs[i : i + 500]]))}
            fresh = [i for i in inputs if i.id not in held]
            count = db.execute("SELECT count(*) FROM inputs WHERE app = ?", (app,)).fetchone()[0]
            if count + len(fresh) > self.max_inputs:
                raise StoreError("limit", f"the app holds {count} inputs; {len(fresh)} more is over its limit "
                                          f"of {self.max_inputs}")
            seq = db.execute("SELECT coalesce(max(seq), 0) FROM inputs WHERE app = ?", (app,)).fetchone()[0]
            for inp, digest in zip(inputs, digests, strict=True):
                sha = digest or (hashlib.sha256(inp.url.encode()).hexdigest() if inp.url else None)
                if inp.id in held:
                    db.execute("UPDATE inputs SET url = ?, metadata = ?, status = ?, details = ?, modified = ?, "
                               "blob = coalesce(?, blob), sha256 = coalesce(?, sha256) WHERE app = ? AND id = ?",
                               (inp.url, json.dumps(inp.metadata), inp.status, inp.details, now, digest, sha, app,
                                inp.id))
                    db.execute("DELETE FROM annotations WHERE app = ? AND input_id = ?", (app, inp.id))
                else:
                    seq += 1
                    db.execute("INSERT INTO inputs (app, id, url, blob, sha256, metadata, status, details, created, "
                               "modified, seq) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                               (app, inp.id, inp.url, digest, sha, json.dumps(inp.metadata), inp.status,
                                inp.details, now, now, seq))
                    held.add(inp.id)
                self._set_concepts(db, app, inp.id, inp.concepts, now)
                if inp.embedding is not None:
                    db.execute("INSERT OR REPLACE INTO embeddings (app, input_id, key, vec) VALUES (?,?,?,?)",
                               (app, inp.id, key, np.ascontiguousarray(inp.embedding, "<f4").tobytes()))
            self._bump(db, app)
        return len(fresh), len(inputs) - len(fresh)

    @staticmethod
    def _set_concepts(db: sqlite3.Connection, app: str, input_id: str, concepts: dict[str, int], now: float) -> None:
        for cid, value in concepts.items():
            db.execute("INSERT INTO annotations (app, input_id, concept, value) VALUES (?,?,?,?) "
                       "ON CONFLICT DO UPDATE SET value = excluded.value", (app, input_id, cid, 1 if value else 0))
            db.execute("INSERT OR IGNORE INTO concepts (app, id, name, created) VALUES (?,?,?,?)", (app, cid, cid, now))

    def patch(self, app: str, input_id: str, *, concepts: dict[str, int] | None = None,
              metadata: dict[str, Any] | None = None, action: str = "merge") -> bool:
        """``merge`` (add/overwrite concepts, deep-merge metadata), ``remove`` (drop the named concepts and
        metadata keys) or ``overwrite`` (replace both). False when the input does not exist."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT metadata FROM inputs WHERE app = ? AND id = ?", (app, input_id)).fetchone()
            if row is None:
                return False
            meta = json.loads(row[0])
            if action == "remove":
                for cid in concepts or {}:
                    db.execute("DELETE FROM annotations WHERE app = ? AND input_id = ? AND concept = ?",
                               (app, input_id, cid))
                for k in metadata or {}:
                    meta.pop(k, None)
            else:
                if action == "overwrite":
                    db.execute("DELETE FROM annotations WHERE app = ? AND input_id = ?", (app, input_id))
                    meta = dict(metadata or {})
                else:
                    meta = _merge(meta, metadata or {})
                self._set_concepts(db, app, input_id, concepts or {}, now)
            db.execute("UPDATE inputs SET metadata = ?, modified = ? WHERE app = ? AND id = ?",
                       (json.dumps(meta), now, app, input_id))
            self._bump(db, app)
        return True

    def delete(self, app: str, ids: Iterable[str]) -> int:
        """Delete inputs (records, annotations, embeddings) in one transaction, then blobs no input
        uses any more. Returns how many existed."""
        ids = list(dict.fromkeys(ids))
        digests: set[str] = set()
        n = 0
        with self._write() as db:
            for i in ids:
                row = db.execute("SELECT blob FROM inputs WHERE app = ? AND id = ?", (app, i)).fetchone()
                if row is None:
                    continue
                n += 1
                if row[0]:
                    digests.add(row[0])
                for table, col in (("inputs", "id"), ("annotations", "input_id"), ("embeddings", "input_id")):
                    db.execute(f"DELETE FROM {table} WHERE app = ? AND {col} = ?", (app, i))
            self._bump(db, app)
            unused = [d for d in digests if db.execute("SELECT 1 FROM inputs WHERE blob = ? LIMIT 1", (d,)).fetchone()
                      is None]
        for d in unused:
            self.blob_path(d).unlink(missing_ok=True)
        return n

    # -- the worker's queue -------------------------------------------------------------------------
    def requeue(self) -> int:
        """Inputs left in progress (a crash or a stop mid-work) go back to pending; returns how many."""
        with self._write() as db:
            return db.execute("UPDATE inputs SET status = ? WHERE status = ?",
                              (STATUS_PENDING, STATUS_IN_PROGRESS)).rowcount

    def claim(self, limit: int) -> list[dict[str, Any]]:
        """Take up to ``limit`` pending inputs, oldest first, and mark them in progress (one transaction):
        ``[{app, id, url, blob}]``."""
        with self._write() as db:
            rows = db.execute("SELECT app, id, url, blob FROM inputs WHERE status = ? ORDER BY created LIMIT ?",
                              (STATUS_PENDING, limit)).fetchall()
            for app, iid, _, _ in rows:
                db.execute("UPDATE inputs SET status = ? WHERE app = ? AND id = ?", (STATUS_IN_PROGRESS, app, iid))
        return [{"app": a, "id": i, "url": u, "blob": b} for a, i, u, b in rows]

    def finish(self, app: str, done: Sequence[NewInput], key: str) -> None:
        """Record the worker's results (status, details, blob, embedding) in one transaction. An input
        deleted meanwhile stays deleted (a blob only it would have used is removed)."""
        now = time.time()
        orphans = []
        with self._write() as db:
            for inp in done:
                digest = inp.blob
                cur = db.execute("UPDATE inputs SET status = ?, details = ?, blob = coalesce(?, blob), "
                                 "sha256 = coalesce(?, sha256), modified = ? WHERE app = ? AND id = ? AND status = ?",
                                 (inp.status, inp.details, digest, digest, now, app, inp.id, STATUS_IN_PROGRESS))
                if cur.rowcount == 0:
                    if digest:
                        orphans.append(digest)
                    continue
                if inp.embedding is not None and inp.status == STATUS_OK:
                    db.execute("INSERT OR REPLACE INTO embeddings (app, input_id, key, vec) VALUES (?,?,?,?)",
                               (app, inp.id, key, np.ascontiguousarray(inp.embedding, "<f4").tobytes()))
            self._bump(db, app)
            unused = [d for d in orphans
                      if db.execute("SELECT 1 FROM inputs WHERE blob = ? LIMIT 1", (d,)).fetchone() is None]
        for d in unused:
            self.blob_path(d).unlink(missing_ok=True)

    def add_concepts(self, app: str, concepts: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        with self._write() as db:
            for cid, name in concepts:
                db.execute("INSERT INTO concepts (app, id, name, created) VALUES (?,?,?,?) "
                           "ON CONFLICT DO UPDATE SET name = excluded.name", (app, cid, name or cid, now))
            self._bump(db, app)

    # -- reads ------------------------------------------------------------------------------------
    def count(self, app: str) -> dict[int, int]:
        """Inputs per status code."""
        return dict(self._db().execute("SELECT status, count(*) FROM inputs WHERE app = ? GROUP BY status", (app,)))

    def get(self, app: str, input_id: str) -> dict[str, Any] | None:
        rows = self._records(app, "AND id = ?", (input_id,))
        return rows[0] if rows else None

    def list(self, app: str, page: int = 1, per_page: int = 128, ids: Sequence[str] | None = None) -> list[dict]:
        if ids:
            found = {r["id"]: r for r in self._records(app, f"AND id IN ({','.join('?' * len(ids))})", tuple(ids))}
            return [found[i] for i in ids if i in found]
        return self._records(app, "ORDER BY seq DESC LIMIT ? OFFSET ?", (per_page, (max(page, 1) - 1) * per_page))

    def records(self, app: str, ids: Sequence[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for i in range(0, len(ids), 500):
            chunk = tuple(ids[i : i + 500])
            out.update({r["id"]: r for r in self._records(app, f"AND id IN ({','.join('?' * len(chunk))})", chunk)})
        return out

    def _records(self, app: str, where: str, args: tuple) -> list[dict]:
        db = self._db()
        rows = db.execute("SELECT id, url, blob, sha256, metadata, status, details, created, modified FROM inputs "
                          f"WHERE app = ? {where}", (app, *args)).fetchall()
        out = []
        for r in rows:
            concepts = db.execute("SELECT concept, value FROM annotations WHERE app = ? AND input_id = ? "
                                  "ORDER BY concept", (app, r[0])).fetchall()
            out.append({"id": r[0], "url": r[1], "blob": r[2], "sha256": r[3], "metadata": json.loads(r[4]),
                        "status": r[5], "details": r[6], "created": r[7], "modified": r[8],
                        "concepts": dict(concepts)})
        return out

    def concepts(self, app: str) -> list[tuple[str, str]]:
        return self._db().execute("SELECT id, name FROM concepts WHERE app = ? ORDER BY id", (app,)).fetchall()

    def annotated(self, app: str, concept: str, value: int) -> set[str]:
        """Ids of inputs annotated with ``concept`` (by id or name) at ``value``."""
        rows = self._db().execute(
            "SELECT input_id FROM annotations WHERE app = ? AND value = ? AND (concept = ? OR concept IN "
            "(SELECT id FROM concepts WHERE app = ? AND name = ?))", (app, value, concept, app, concept))
        return {r[0] for r in rows}

    def all_ids(self, app: str, status: int | None = None) -> list[str]:
        """The app's input ids, oldest first; ``status``: only inputs in that status."""
        if status is None:
            return [r[0] for r in self._db().execute("SELECT id FROM inputs WHERE app = ? ORDER BY seq", (app,))]
        return [r[0] for r in self._db().execute("SELECT id FROM inputs WHERE app = ? AND status = ? ORDER BY seq",
                                                 (app, status))]

    def embedded_ids(self, app: str, key: str) -> set[str]:
        """Ids of the app's inputs that have an embedding under ``key`` (without loading the vectors)."""
        return {r[0] for r in self._db().execute("SELECT input_id FROM embeddings WHERE app = ? AND key = ?",
                                                  (app, key))}

    def embedding(self, app: str, input_id: str, key: str) -> np.ndarray | None:
        row = self._db().execute("SELECT vec FROM embeddings WHERE app = ? AND key = ? AND input_id = ?",
                                 (app, key, input_id)).fetchone()
        return np.frombuffer(row[0], "<f4").copy() if row else None

    def matrix(self, app: str, key: str) -> tuple[list[str], np.ndarray]:
        """(input ids, float32 matrix [N, D]) of the app's embeddings under ``key``; reloaded only when
        the app changed since the last call (its generation)."""
        gen = self.generation(app)
        with self._lock:
            hit = self._matrices.get((app, key))
            if hit is not None and hit[0] == gen:
                return hit[1], hit[2]
        db = self._db()
        db.execute("BEGIN")  # one snapshot: the generation and the rows agree
        try:
            gen = self.generation(app)
            rows = db.execute("SELECT input_id, vec FROM embeddings WHERE app = ? AND key = ?", (app, key)).fetchall()
        finally:
            db.execute("COMMIT")
        ids = [r[0] for r in rows]
        mat = (np.frombuffer(b"".join(r[1] for r in rows), "<f4").reshape(len(rows), -1) if rows
               else np.zeros((0, 0), np.float32))
        with self._lock:
            self._matrices[(app, key)] = (gen, ids, mat)
        return ids, mat

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
