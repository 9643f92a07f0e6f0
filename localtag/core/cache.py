"""The embedding cache: image embeddings on disk, keyed by content sha256 + model sha256 + variant
(preprocessing, precision actually used, device kind: :func:`cache_key`).

A change of vocabulary, thresholds or scoring re-tags a library from its cached embeddings without
running the image tower again (``localtag retag``, ``directus sync --retag``).

Storage is one SQLite file, ``<cache_dir>/embeddings.sqlite3``, in WAL mode: any number of readers
(threads and processes) alongside one writer at a time, and every write is one transaction, so a
crash or a kill loses at most the batch being written and never damages what is there. A file that
is not a database any more is moved aside (``.corrupt-<time>``) and a new one started: a cache can
always be rebuilt. Tables:

- ``models(id, sha256, dim, dtype)``: one row per model weights file;
- ``embeddings(model, digest, vec)``: the L2-normalised embedding of the image whose bytes hash to
  ``digest`` (32 raw bytes), as little-endian float32 (default: a cached embedding gives exactly the
  tags of a fresh one) or float16 (half the size; values move by ~1e-3);
- ``files(path, size, mtime_ns, digest)``: the content a local file had when it was last read, so a
  ``retag`` of an unchanged folder neither reads nor hashes the files again.

The pipeline uses :meth:`EmbeddingCache.get` and :meth:`EmbeddingCache.put_many` (its cache
protocol); ``retag`` (:mod:`localtag.cli.tag`) uses the bulk :meth:`EmbeddingCache.get_many` through :func:`cached_results`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import NOT_FOUND, ImageError

log = logging.getLogger(__name__)

FILENAME = "embeddings.sqlite3"
DTYPES = ("float32", "float16")
_SCHEMA_VERSION = "1"
_CHUNK = 500  # digests per SELECT … IN (…)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, dim INTEGER, dtype TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    model INTEGER NOT NULL, digest BLOB NOT NULL, vec BLOB NOT NULL,
    PRIMARY KEY (model, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, digest BLOB NOT NULL) WITHOUT ROWID;
"""


class CacheError(RuntimeError):
    """The cache cannot be used (unreadable, wrong model dimension)."""


class EmbeddingCache:
    """The embeddings of one model in a cache file. Thread-safe (one connection per thread)."""

    def __init__(self, path: str | Path, model_sha256: str, *, dtype: str = "float32", timeout: float = 60.0):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        path = Path(path)
        self.path = path / FILENAME if path.is_dir() or not path.suffix else path
        self.model_sha256 = model_sha256
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._init(dtype)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise CacheError(f"{self.path}: {e}") from None
            self._set_aside(e)
            self._init(dtype)

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA mmap_size = 268435456")
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None or self._local.pid != os.getpid():
            c = self._local.conn = self._connect()
            self._local.pid = os.getpid()
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def _init(self, dtype: str) -> None:
        c = self._conn
        if c.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            c.execute("PRAGMA journal_mode = WAL")
        with _write(c):
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            c.execute("INSERT OR IGNORE INTO models (sha256, dim, dtype) VALUES (?, NULL, ?)",
                      (self.model_sha256, dtype))
        row = c.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row[0] != _SCHEMA_VERSION:
            raise CacheError(f"{self.path}: cache schema {row[0]}, this localtag reads {_SCHEMA_VERSION}")
        self._model_id, dim, self.dtype = c.execute(
            "SELECT id, dim, dtype FROM models WHERE sha256 = ?", (self.model_sha256,)).fetchone()
        self.dim: int | None = dim
        self._np = np.dtype(self.dtype).newbyteorder("<")

    def _set_aside(self, err: Exception) -> None:
        self.close()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.warning("embedding cache %s is unreadable (%s); moved to %s and starting a new one", self.path, err, aside)
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, Path(str(aside) + suffix))

    # -- the pipeline's cache protocol ---------------------------------------------------------------
    def get(self, digest: str) -> np.ndarray | None:
        """The cached float32 embedding of the content with this sha256 (hex), or None."""
        row = self._conn.execute("SELECT vec FROM embeddings WHERE model = ? AND digest = ?",
                                 (self._model_id, bytes.fromhex(digest))).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=self._np).astype(np.float32)

    def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store embeddings (one transaction); an existing entry is replaced."""
        if not items:
            return
        rows = []
        for digest, emb in items:
            v = np.asarray(emb, dtype=np.float32).reshape(-1)
            self._check_dim(len(v))
            rows.append((self._model_id, bytes.fromhex(digest), v.astype(self._np).tobytes()))
        c = self._conn
        with _write(c):
            c.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)", rows)

    def _check_dim(self, dim: int) -> None:
        if self.dim == dim:
            return
        with self._lock:
            c = self._conn
            with _write(c):
                c.execute("UPDATE models SET dim = ? WHERE id = ? AND dim IS NULL", (dim, self._model_id))
                self.dim = c.execute("SELECT dim FROM models WHERE id = ?", (self._model_id,)).fetchone()[0]
        if self.dim != dim:
            raise CacheError(f"{self.path}: model {self.model_sha256[:12]} has {self.dim}-d embeddings, not {dim}")

    # -- bulk access --------------------------------------------------------------------------------
    def get_many(self, digests: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [n, dim] float32, found [n] bool)``; rows not found are zero."""
        keys = [bytes.fromhex(d) for d in digests]
        found: dict[bytes, bytes] = {}
        c = self._conn
        for i in range(0, len(keys), _CHUNK):
            part = keys[i : i + _CHUNK]
            q = f"SELECT digest, vec FROM embeddings WHERE model = ? AND digest IN ({','.join('?' * len(part))})"
            found.update(c.execute(q, (self._model_id, *part)).fetchall())
        dim = self.dim or 0
        out = np.zeros((len(keys), dim), dtype=np.float32)
        mask = np.array([k in found for k in keys], dtype=bool)
        if mask.any():
            blob = b"".join(found[k] for k in keys if k in found)
            out[mask] = np.frombuffer(blob, dtype=self._np).reshape(-1, dim)
        return out, mask

    def digests(self) -> Iterator[str]:
        """Every digest cached for this model."""
        for (d,) in self._conn.execute("SELECT digest FROM embeddings WHERE model = ?", (self._model_id,)):
            yield d.hex()

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM embeddings WHERE model = ?", (self._model_id,)).fetchone()[0]

    # -- local files --------------------------------------------------------------------------------
    def file_digest(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The digest a file had when last read, if its size and mtime have not changed since."""
        row = self._conn.execute("SELECT digest FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                                 (path, size, mtime_ns)).fetchone()
        return None if row is None else row[0].hex()

    def file_digests(self, paths: Sequence[str]) -> dict[str, tuple[int, int, str]]:
        """``{path: (size, mtime_ns, digest)}`` for the paths known to the cache."""
        out: dict[str, tuple[int, int, str]] = {}
        c = self._conn
        for i in range(0, len(paths), _CHUNK):
            part = list(paths[i : i + _CHUNK])
            q = f"SELECT path, size, mtime_ns, digest FROM files WHERE path IN ({','.join('?' * len(part))})"
            for p, size, mtime, d in c.execute(q, part):
                out[p] = (size, mtime, d.hex())
        return out

    def remember_files(self, items: Iterable[tuple[str, int, int, str]]) -> None:
        """Record ``(path, size, mtime_ns, digest)`` of files just read."""
        rows = [(p, s, m, bytes.fromhex(d)) for p, s, m, d in items]
        if rows:
            c = self._conn
            with _write(c):
                c.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", rows)


class _write:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): one atomic write."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def cache_key(model_sha256: str, *, preprocess: str = "exact", precision: str = "fp32", device: str = "cpu") -> str:
    """The cache's model key: everything that changes an embedding. Draft-decoded (``--fast``) or
    device-decoded embeddings differ slightly from exact ones, bf16/fp16/int8 ones from fp32 ones
    (1e-3), and CUDA's from the CPU's, so none of them share an entry. Entries of older localtags,
    keyed by the sha256 alone (or ``sha256:fast``), are never served."""
    return f"{model_sha256}|{preprocess}|{precision}|{device}"


def open_embedding_cache(settings, model_sha256: str, encoder, *, required: bool = False) -> EmbeddingCache | None:
    """The cache of this model and of this encoder's variant (:meth:`ImageEncoder.variant`: decoding
    mode ``settings.fast_decode``, the precision actually used, the device kind) in ``settings.cache_dir``.

    Unusable: None with a warning, or the error when ``required`` (``retag`` reads nothing else).
    """
    try:
        key = cache_key(model_sha256, **encoder.variant(settings.fast_decode))
        return EmbeddingCache(Path(settings.cache_dir), key)
    except (OSError, sqlite3.Error, CacheError) as e:
        if required:
            raise CacheError(f"embedding cache in {settings.cache_dir} unusable: {e}") from None
        log.warning("embedding cache in %s unusable (%s); running without it", settings.cache_dir, e)
        return None


# -- retag -----------------------------------------------------------------------------------------
def cached_results(cache: EmbeddingCache, jobs: Iterable, *, workers: int = 2, max_bytes: int = 20_000_000,
                   chunk: int = 4096) -> Iterator:
    """Results for local-file jobs from the cache alone, in input order, ``chunk`` jobs at a time.

    A file whose path, size and mtime are known is not read; any other file is read and hashed (and
    remembered). A file whose content is not cached gets a ``not_found`` error.
    """
    from .decode import read_source
    from .pipeline import Result, chunks

    def known_digest(path: str, known: dict) -> tuple[str | None, ImageError | None, tuple | None]:
        try:
            st = os.stat(path)
        except OSError as e:
            return None, ImageError(NOT_FOUND, f"cannot read: {e.strerror or e}"), None
        k = known.get(path)
        if k is not None and k[0] == st.st_size and k[1] == st.st_mtime_ns:
            return k[2], None, None
        return None, None, (path, st.st_size, st.st_mtime_ns)

    def hash_file(seen: tuple) -> tuple[str | None, ImageError | None, tuple | None]:
        try:
            d = hashlib.sha256(read_source(seen[0], max_bytes)).hexdigest()
        except ImageError as e:
            return None, e, None
        return d, None, (*seen, d)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for part in chunks(jobs, chunk):
            paths = ["" if isinstance(j.source, ImageError) else os.path.abspath(j.source) for j in part]
            known = cache.file_digests([p for p in paths if p])
            looked = [(None, j.source, None) if isinstance(j.source, ImageError) else known_digest(p, known)
                      for j, p in zip(part, paths, strict=True)]  # a stat each: no pool needed
            todo = [i for i, (d, err, seen) in enumerate(looked) if d is None and err is None]
            for i, got in zip(todo, pool.map(hash_file, [looked[i][2] for i in todo]), strict=True):
                looked[i] = got  # new or changed files: read and hash (threads: hashlib frees the GIL)
            cache.remember_files([looked[i][2] for i in todo if looked[i][2] is not None])
            embs, found = cache.get_many([d or "00" * 32 for d, _, _ in looked])
            for k, (job, (d, err, _)) in enumerate(zip(part, looked, strict=True)):
                if err is not None:
                    yield Result(job, error=err)
                elif not found[k]:
                    yield Result(job, error=ImageError(
                        NOT_FOUND, f"not in the embedding cache of model {cache.model_sha256[:12]}; "
                        "tag it first (`localtag tag`), or pass --embed-missing"), digest=d)
                else:
                    yield Result(job, embedding=embs[k], digest=d, cached=True)


def embed_missing(results: Iterable, pipe, chunk: int = 1024) -> Iterator:
    """Run the image tower on the results that had no cached embedding, keeping input order."""
    from .pipeline import chunks

    for buf in chunks(results, chunk):
        missing = [r.job for r in buf if r.error is not None and r.error.kind == NOT_FOUND and r.digest]
        fresh = {id(r.job): r for r in pipe.run(missing)} if missing else {}
        for r in buf:
            yield fresh.get(id(r.job), r)
