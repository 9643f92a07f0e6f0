"""Vector search over an app's (or a run's, or a cache's) embedding matrix.

Below ``min_rows`` rows (20,000 by default, ``LOCALTAG_APP_ANN_MIN_ROWS``) the app searches exactly: one
matrix-vector product and a partial sort. Above it, :class:`VectorSearch` keeps a faiss 4-bit product
quantiser with SIMD fast scan (``IndexPQFastScan``, ``D/2`` sub-quantisers of 2 dimensions: 128 bytes a
row at 512 dimensions) as a candidate generator and re-ranks its best ``max(512, 16·k)`` candidates
exactly on the float32 matrix the app keeps anyway, so hits and scores are exact cosines and the
result has the shape of :func:`exact_top`. On random 512-d unit vectors, 2 AMD EPYC cores: recall@10
≥ 0.99 at 1M rows (bench/RESULTS.md; docs/app.md says why this and not a graph index).

The index is derived data: a snapshot of (input ids, codes) in ``<folder>/<hash of app and key>.npz``,
rebuilt when the app has drifted from it. Rows deleted since the snapshot are dropped from its
candidates (a deleted input never comes back), rows added since are searched exactly, and a row
whose vector changed (an id deleted and added again) counts as added.
Scores are cosine similarities mapped to [0, 1]: ``(1 + cos) / 2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_file

log = logging.getLogger(__name__)

#: below this many rows the app searches exactly (measured crossover: bench/RESULTS.md)
ANN_MIN_ROWS = 20_000
#: candidates the quantised scan hands to the exact re-rank, at least (and 16 per hit asked for)
CANDIDATES = 512
PER_HIT = 16
#: rebuild the snapshot when rows added since exceed this share of the app, or rows gone this share of it
REBUILD_ADDED = 0.10
REBUILD_GONE = 0.20
#: rows sampled to train the quantiser; fewer rows than SMALLEST are always searched exactly
TRAIN_ROWS = 20_000
SMALLEST = 256
#: leading components kept per row to notice a vector that changed under the same id
HEAD = 8
#: the codes are split into this many parts, scanned in parallel by faiss.IndexShards (one thread each):
#: one query's scan is one thread's work in faiss, so a 1M-row query took 22.2 ms on one of 2 idle EPYC cores
#: and 11.3 ms split in two (bench/RESULTS.md)
SHARDS = max(1, min(4, os.cpu_count() or 1))


def to_score(cos: np.ndarray) -> np.ndarray:
    """Cosine similarity [-1, 1] → hit score [0, 1]."""
    return np.clip((1.0 + cos) / 2.0, 0.0, 1.0)


def exact_top(matrix: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, cosine similarities) of the ``k`` best rows, best first; ``mask``: rows allowed."""
    if matrix.shape[0] == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    sims = matrix @ query.astype(np.float32, copy=False)
    if mask is not None:
        sims = np.where(mask, sims, -np.inf)
        k = min(k, int(mask.sum()))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = min(k, sims.shape[0])
    part = np.argpartition(-sims, k - 1)[:k] if k < sims.shape[0] else np.arange(sims.shape[0])
    order = part[np.argsort(-sims[part], kind="stable")]
    return order, sims[order]


def groups(matrix: np.ndarray, threshold: float, keep: Callable[[int, int], bool] | None = None
           ) -> list[list[int]]:
    """Near-duplicate groups: connected components of the rows whose cosine similarity is at least
    ``threshold`` (blockwise, so memory stays at ``block × N`` floats) and that ``keep(i, j)`` confirms.
    Groups of two or more, each sorted, largest first."""
    n = matrix.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = 1024
    for start in range(0, n, block):
        sims = matrix[start : start + block] @ matrix.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if c > r and (keep is None or keep(int(r), int(c))):
                a, b = find(int(r)), find(int(c))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    out = [sorted(g) for g in comps.values() if len(g) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0]))


def recall_at(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Mean recall of ``found`` top-k lists against exact ``truth`` lists."""
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / max(1, sum(len(t) for t in truth))


def _faiss() -> Any:
    """faiss, on one OpenMP thread: every call here is one query (the scan of one query is one thread's work
    in faiss) or a build whose k-means run on 2-d subspaces, where OpenMP's barriers cost more than they
    share; on the shared 2-core machine, training with 2 threads took 151 s against 12 s with one."""
    import faiss

    faiss.omp_set_num_threads(1)
    return faiss


@dataclass
class Snapshot:
    """A quantised index of ``ids`` (row ``i`` of the index is ``ids[i]``), with each row's first components."""

    ids: list[str]
    head: np.ndarray
    parts: list[Any]  # faiss.IndexPQFastScan over consecutive row ranges, one quantiser trained for all

    def __post_init__(self) -> None:
        self.dim = int(self.parts[0].d)
        self.index = self.parts[0]
        if len(self.parts) > 1:  # searched in parallel, one thread per part; labels offset to snapshot rows
            self.index = _faiss().IndexShards(self.dim, True, True)
            for part in self.parts:
                self.index.add_shard(part)

    @classmethod
    def build(cls, ids: list[str], matrix: np.ndarray, *, train_rows: int = TRAIN_ROWS, seed: int = 0,
              shards: int = SHARDS) -> Snapshot:
        faiss = _faiss()
        n, dim = matrix.shape
        trained = faiss.IndexPQFastScan(dim, dim // 2, 4, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, min(n, train_rows), replace=False) if n > train_rows \
            else np.arange(n)
        trained.train(np.ascontiguousarray(matrix[np.sort(sample)], np.float32))
        bounds = np.linspace(0, n, max(1, min(shards, n // SMALLEST)) + 1).astype(int)
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = faiss.clone_index(trained)
            for start in range(lo, hi, 100_000):
                part.add(np.ascontiguousarray(matrix[start : min(hi, start + 100_000)], np.float32))
            parts.append(part)
        return cls(ids, np.array(matrix[:, :HEAD], np.float32), parts)

    def candidates(self, query: np.ndarray, count: int) -> np.ndarray:
        """Snapshot rows of the ``count`` best codes for ``query`` (unordered)."""
        _, labels = self.index.search(np.ascontiguousarray(query[None], np.float32), min(count, len(self.ids)))
        return labels[0][labels[0] >= 0]

    def nbytes(self) -> int:
        return int(sum(p.ntotal * p.code_size for p in self.parts) + self.head.nbytes)

    def save(self, path: Path) -> None:
        """One file, written to a temporary name and renamed (atomic)."""
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.frombuffer(json.dumps(self.ids).encode(), np.uint8)
        with atomic_file(path) as f:
            parts = {f"index{i}": faiss.serialize_index(p) for i, p in enumerate(self.parts)}
            np.savez(f, ids=ids, head=self.head, **parts)

    @classmethod
    def load(cls, path: Path) -> Snapshot | None:
        faiss = _faiss()
        try:
            with np.load(path, allow_pickle=False) as z:
                ids = json.loads(z["ids"].tobytes())
                parts = sorted((k for k in z.files if k.startswith("index")), key=lambda k: int(k[5:] or 0))
                return cls(ids, z["head"], [faiss.deserialize_index(z[k]) for k in parts])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("vector index %s unreadable (%s); rebuilding", path.name, exc)
            return None


@dataclass
class _Plan:
    ids: list[str]  # the matrix's ids this plan maps to (held: compared by identity)
    snap: Snapshot
    rows: np.ndarray  # snapshot row → matrix row, -1 where the input is gone or its vector changed
    added: np.ndarray  # matrix rows the snapshot does not cover

    @property
    def stale(self) -> bool:
        gone = int((self.rows < 0).sum())
        return len(self.added) > REBUILD_ADDED * len(self.ids) or gone > REBUILD_GONE * len(self.snap.ids)


def _plan(snap: Snapshot, ids: list[str], matrix: np.ndarray) -> _Plan:
    if snap.ids is ids or snap.ids == ids:
        rows = np.arange(len(ids), dtype=np.int64)
    else:
        pos = {i: r for r, i in enumerate(ids)}
        rows = np.fromiter((pos.get(i, -1) for i in snap.ids), np.int64, len(snap.ids))
    ok = np.flatnonzero(rows >= 0)
    if matrix.shape[1] >= HEAD and snap.head.shape[1] == HEAD:
        changed = ~np.all(matrix[rows[ok], :HEAD] == snap.head[ok], axis=1)
        rows[ok[changed]] = -1
    covered = np.zeros(len(ids), bool)
    covered[rows[rows >= 0]] = True
    return _Plan(ids, snap, rows, np.flatnonzero(~covered))


class VectorSearch:
    """Top-k search over an app's matrix: exact below ``min_rows``, else quantised candidates + exact re-rank.

    ``folder``: where snapshots persist (None: in memory only). ``background``: build and rebuild in a
    thread and search exactly (or with the stale snapshot) until it is ready, so no request waits
    minutes for a 1M-row build; tests build inline."""

    def __init__(self, folder: str | Path | None = None, *, min_rows: int = ANN_MIN_ROWS,
                 candidates: int = CANDIDATES, background: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.min_rows, self.candidates, self.background = min_rows, candidates, background
        self._snaps: dict[str, Snapshot] = {}
        self._plans: dict[str, _Plan] = {}
        self._building: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    @staticmethod
    def name(app: str, key: str) -> str:
        return hashlib.sha256(f"{app}\n{key}".encode()).hexdigest()[:32]

    def path(self, name: str) -> Path | None:
        return self.folder / f"{name}.npz" if self.folder is not None else None

    def top(self, name: str, ids: list[str], matrix: np.ndarray, query: np.ndarray, k: int,
            mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, cosine similarities) of the ``k`` best rows, best first, as :func:`exact_top`."""
        n = len(ids)
        if n < max(self.min_rows, SMALLEST) or k <= 0 or matrix.shape[1] % 2:
            return exact_top(matrix, query, k, mask)
        allowed = n if mask is None else int(mask.sum())
        if allowed < self.min_rows:  # a narrow filter: exact over the rows it allows
            rows = np.flatnonzero(mask)
            found, sims = exact_top(matrix[rows], query, k)
            return rows[found], sims
        plan = self.plan(name, ids, matrix)
        if plan is None:  # the first build is under way
            return exact_top(matrix, query, k, mask)
        want = max(self.candidates, PER_HIT * k) * n // allowed
        cand = plan.rows[plan.snap.candidates(query, want)]
        cand = np.concatenate([cand[cand >= 0], plan.added])
        if mask is not None:
            cand = cand[mask[cand]]
        if len(cand) < min(k, allowed):
            return exact_top(matrix, query, k, mask)
        found, sims = exact_top(matrix[cand], query, k)
        return cand[found], sims

    def plan(self, name: str, ids: list[str], matrix: np.ndarray) -> _Plan | None:
        """The snapshot of ``name`` mapped onto ``ids``; builds (or starts building) when there is none
        or it has drifted too far."""
        with self._lock:
            plan = self._plans.get(name)
            if plan is not None and plan.ids is ids:
                return plan
            snap = self._snaps.get(name)
        if snap is None and (path := self.path(name)) is not None and path.exists():
            snap = Snapshot.load(path)
            if snap is not None and snap.dim != matrix.shape[1]:
                snap = None
        if snap is not None:
            plan = _plan(snap, ids, matrix)
            with self._lock:
                self._snaps[name] = snap
                self._plans[name] = plan
            if not plan.stale:
                return plan
        self._build(name, ids, matrix)
        with self._lock:
            if (snap := self._snaps.get(name)) is None:
                return None
        plan = _plan(snap, ids, matrix)
        with self._lock:
            self._plans[name] = plan
        return plan

    def _build(self, name: str, ids: list[str], matrix: np.ndarray) -> None:
        def work() -> None:
            try:
                snap = Snapshot.build(ids, matrix)
                if (path := self.path(name)) is not None:
                    snap.save(path)
                with self._lock:
                    self._snaps[name] = snap
                    self._plans.pop(name, None)
            finally:
                with self._lock:
                    self._building.pop(name, None)

        if not self.background:
            work()
            return
        with self._lock:
            if name in self._building:
                return
            thread = self._building[name] = threading.Thread(target=work, name=f"vector-index-{name[:8]}",
                                                             daemon=True)
        thread.start()

    def wait(self) -> None:
        """Wait for the builds under way (tests, benches)."""
        while True:
            with self._lock:
                threads = list(self._building.values())
            if not threads:
                return
            for t in threads:
                t.join()
