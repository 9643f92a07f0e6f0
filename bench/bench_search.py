"""Vector search at scale: exact numpy matrix search vs usearch HNSW on random unit vectors (dim 512).

Per size: build time, memory (matrix bytes; index bytes), p50/p99 latency of one query (top 10) on the
threads this process may use, and recall@10 of the ANN against exact. Usage:
``python bench/bench_search.py [--sizes 10000 100000 1000000] [--queries 200] [--budget-s 900]``.
Random unit vectors are the hard case for an ANN (no cluster structure); real CLIP embeddings recall better.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np

from localtag.app.search import AnnIndex, exact_top, recall_at


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


def lat(fn, queries: np.ndarray) -> tuple[float, float, list]:
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dtype", default="i8")
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 256, 1024], help="expansion_search values tried")
    ap.add_argument("--ann-max-rows", type=int, default=100_000, help="skip the ANN build above this (time bound)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu()}, {os.cpu_count()} cores visible; dim {args.dim}; top 10; {args.queries} queries")
    print("| rows | method | build s | memory MB | p50 ms | p99 ms | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        t = time.perf_counter()
        mat = unit(rng, n, args.dim)
        build_exact = time.perf_counter() - t
        queries = unit(rng, args.queries, args.dim)
        p50, p99, truth = lat(lambda q, m=mat: exact_top(m, q, 10)[0], queries)
        print(f"| {n:,} | exact numpy | {build_exact:.1f} (generate) | {mat.nbytes / 2**20:.0f} | {p50:.2f} | "
              f"{p99:.2f} | 1.000 |", flush=True)
        if n > args.ann_max_rows:
            print(f"| {n:,} | usearch HNSW | skipped: build over the time bound (--ann-max-rows) | | | | |")
            continue
        t = time.perf_counter()
        ann = AnnIndex(args.dim, dtype=args.dtype, expansion_search=args.ef[0])
        ann.add(mat, threads=2)
        build = time.perf_counter() - t
        mem = ann.index.memory_usage / 2**20
        for ef in args.ef:
            ann.index.expansion_search = ef
            p50, p99, found = lat(lambda q, a=ann: a.search(q, 10)[0], queries)
            print(f"| {n:,} | usearch HNSW {args.dtype} M=16 ef={ef} | {build:.1f} | {mem:.0f} | "
                  f"{p50:.2f} | {p99:.2f} | {recall_at(found, truth):.3f} |", flush=True)
        ann = mat = None


if __name__ == "__main__":
    main()
