"""Vector search at scale, side by side: exact numpy search vs the app's index (faiss 4-bit PQ fast scan +
exact re-rank, :class:`localtag.app.search.VectorSearch`) on random unit vectors (dim 512), top 10.

Per size: build time (wall and CPU seconds), memory (the float32 matrix both keep; the index's codes on
top), p50/p99 latency of one query by the wall clock and in CPU ms (the machine is shared: CPU time is
what a dedicated core would take), and recall@10 of the index against exact. ``--hnsw-max-rows`` adds
usearch HNSW rows (f32, the graph alternative) for the sizes up to it. Usage:
``python bench/bench_search.py [--sizes 10000 100000 1000000] [--queries 100]``.
Random unit vectors are the hard case for an ANN (no cluster structure); real CLIP embeddings recall better.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import time

import numpy as np

from localtag.app.search import VectorSearch, exact_top, recall_at


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - i), dim), dtype=np.float32)
        out[i : i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def lat(fn, queries: np.ndarray) -> tuple[dict, list]:
    """Wall and CPU ms per query (p50, p99), and the results."""
    wall, cpu_ms, results = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        results.append(fn(q))
        wall.append((time.perf_counter() - t) * 1000)
        cpu_ms.append((time.process_time() - c) * 1000)
    pct = {f"{name} p{p}": float(np.percentile(v, p)) for name, v in (("wall", wall), ("cpu", cpu_ms)) for p in (50, 99)}
    return pct, results


def hnsw_rows(mat: np.ndarray, queries: np.ndarray, truth: list, n: int) -> list[str]:
    from usearch.index import Index

    out = []
    for conn in (32,):
        t, c = time.perf_counter(), time.process_time()
        index = Index(ndim=mat.shape[1], metric="ip", dtype="f32", connectivity=conn, expansion_add=256)
        index.add(np.arange(n, dtype=np.uint64), mat, threads=2)
        build, build_cpu = time.perf_counter() - t, time.process_time() - c
        for ef in (256, 1024):
            index.expansion_search = ef
            pct, found = lat(lambda q, i=index: i.search(q, 10).keys.astype(np.int64), queries)
            out.append(f"| {n:,} | usearch HNSW f32 M={conn} ef={ef} | {build:.1f} ({build_cpu:.1f} CPU) | "
                       f"{index.memory_usage / 2**20:.0f} | {pct['wall p50']:.2f} | {pct['wall p99']:.2f} | "
                       f"{pct['cpu p50']:.2f} | {recall_at(found, truth):.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--hnsw-max-rows", type=int, default=0, help="also build usearch HNSW up to this many rows")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu()}, {os.cpu_count()} cores visible; load average {os.getloadavg()}; dim {args.dim}; "
          f"top 10; {args.queries} queries; numpy matvec via BLAS, the index on one thread")
    head = ("| rows | exact p50 ms | exact p99 ms | exact CPU p50 ms | index build s (CPU s) | matrix MB | "
            "index MB | index p50 ms | index p99 ms | index CPU p50 ms | recall@10 | p50 speed-up |")
    table, extra = [head, "|" + "---:|" * 12], []
    for n in args.sizes:
        mat = unit(rng, n, args.dim)
        ids = [str(i) for i in range(n)]
        queries = unit(rng, args.queries, args.dim)
        ex, truth = lat(lambda q, m=mat: exact_top(m, q, 10)[0], queries)
        vs = VectorSearch(None, min_rows=0)
        t, c = time.perf_counter(), time.process_time()
        plan = vs.plan("bench", ids, mat)
        build, build_cpu = time.perf_counter() - t, time.process_time() - c
        ann, found = lat(lambda q, m=mat, v=vs, i=ids: v.top("bench", i, m, q, 10)[0], queries)
        row = (f"| {n:,} | {ex['wall p50']:.2f} | {ex['wall p99']:.2f} | {ex['cpu p50']:.2f} | "
               f"{build:.1f} ({build_cpu:.1f}) | {mat.nbytes / 2**20:.0f} | {plan.snap.nbytes() / 2**20:.0f} | "
               f"{ann['wall p50']:.2f} | {ann['wall p99']:.2f} | {ann['cpu p50']:.2f} | "
               f"{recall_at(found, truth):.3f} | {ex['wall p50'] / ann['wall p50']:.1f}× |")
        table.append(row)
        print(row, f"load {os.getloadavg()[0]:.1f}", flush=True)
        if n <= args.hnsw_max_rows:
            extra += hnsw_rows(mat, queries, truth, n)
            print(extra[-1], flush=True)
        vs = plan = mat = None
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"load average after {os.getloadavg()}\n")
    print("\n".join(table))
    if extra:
        print("\n| rows | graph index | build s | memory MB | p50 ms | p99 ms | CPU p50 ms | recall@10 |\n"
              "|---:|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(extra))


if __name__ == "__main__":
    main()
