"""Helpers shared by the batch tests: running the real CLI, reading a run dir, a local HTTP server."""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from localtag import cli
from localtag.batch.store import RunStore


def batch(capsys, *args: str) -> tuple[int, dict | str]:
    """``localtag batch ARGS`` in this process: (exit status, the JSON it printed, else the text)."""
    capsys.readouterr()
    code = cli.main(["batch", *args])
    out = capsys.readouterr().out
    try:
        return code, json.loads(out)
    except ValueError:
        return code, out


def model_args(fixture_model: Path, cache_dir: Path) -> list[str]:
    return ["--model", str(fixture_model), "--device", "cpu", "--cache-dir", str(cache_dir)]


def committed_rows(run_dir: Path) -> list[dict]:
    """Every row of every committed shard (read through the markers), without embeddings."""
    store = RunStore(run_dir)
    n = store.read_run()["shards"]
    out = []
    for m in store.committed(n):
        out += pq.read_table(store.shards_dir / m["file"], columns=["index", "id", "uri", "status", "error_kind",
                                                                    "concepts"]).to_pylist()
    return out


def assert_complete_once(run_dir: Path) -> None:
    """The set of committed item indices is the planned set, no duplicates; every shard committed once."""
    store = RunStore(run_dir)
    run = store.read_run()
    rows = committed_rows(run_dir)
    indices = [r["index"] for r in rows]
    assert len(indices) == len(set(indices)), "an item was committed twice"
    planned = set()
    for shard in range(run["shards"]):
        planned |= {it["index"] for it in store.read_plan_shard(shard)}
    assert set(indices) == planned and len(planned) == run["items"]
    commits = Counter(json.loads(line)["shard"] for line in store.manifest.read_text().splitlines())
    assert set(commits) == set(range(run["shards"])), "a shard has no commit"
    assert max(commits.values()) == 1, f"shards committed more than once: {[s for s, c in commits.items() if c > 1]}"
    markers = list(store.committed(run["shards"]))
    assert len(markers) == run["shards"]
    # nothing but the committed attempts is left as data
    data = sorted(p.name for p in store.shards_dir.glob("*.parquet"))
    store.clean()
    assert sorted(p.name for p in store.shards_dir.glob("*.parquet")) == sorted(m["file"] for m in markers)
    assert len(data) >= len(markers)


def tags_by_id(rows: list[dict]) -> dict[str, list]:
    return {r["id"]: [(c["id"], c["name"], c["value"]) for c in r["concepts"] or ()] for r in rows}


@contextmanager
def http_server(root: Path) -> Iterator[int]:
    """A static file server on 127.0.0.1 (a missing file is a real 404); yields its port."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
