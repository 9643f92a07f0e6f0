"""Vector search over an app's (or a run's, or a cache's) embedding matrix.

The app searches exactly: one matrix-vector product and a partial sort (512 dimensions, 2 EPYC cores:
p50 1.75 ms at 10k rows, 48 ms at 100k; bench/RESULTS.md). :class:`AnnIndex` (usearch's HNSW, extra
``app``) is what bench/bench_search.py measures against it; it is not wired into the app, because on
2 cores its build was slow and its recall@10 on random unit vectors low (docs/app.md).
Scores are cosine similarities mapped to [0, 1]: ``(1 + cos) / 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


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


class AnnIndex:
    """usearch HNSW over L2-normalised rows (cosine): the ANN side of bench/bench_search.py."""

    def __init__(self, dim: int, *, dtype: str = "f16", connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 64):
        from usearch.index import Index

        self.index = Index(ndim=dim, metric="cos", dtype=dtype, connectivity=connectivity,
                           expansion_add=expansion_add, expansion_search=expansion_search)

    def add(self, matrix: np.ndarray, threads: int = 0) -> None:
        keys = np.arange(len(self.index), len(self.index) + matrix.shape[0], dtype=np.uint64)
        self.index.add(keys, matrix, threads=threads)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, cosine similarities), best first."""
        m = self.index.search(query, k)
        return m.keys.astype(np.int64), 1.0 - m.distances.astype(np.float32)


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
