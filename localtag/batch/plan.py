"""Planning a batch run: sources → deterministic shards of items, and the run's fingerprint.

The items of all sources, in order, are cut into shards of ``shard_size``; shard k holds items
``k·size … (k+1)·size − 1`` (``index`` is the item's position in the plan). The same sources and shard
size always give the same shards, so a shard is a unit of work that can be retried and committed once.
The plan is written shard by shard as the sources stream: the driver never holds the item list.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from . import sources as batch_sources
from .store import FORMAT, RunError, RunStore

DEFAULT_SHARD_SIZE = 1000


def plan_key(sources: list[str], shard_size: int) -> dict[str, Any]:
    return {"sources": [batch_sources.normalize(s) for s in sources], "shard_size": shard_size}


def plan(store: RunStore, sources: list[str], settings: Any, fingerprint: dict[str, Any],
         shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """The run's record: planned now, or (same fingerprint and plan) the one already in the run dir."""
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    key = plan_key(sources, shard_size)
    if store.exists():
        return store.check(fingerprint, key)
    if store.root.exists() and any(e.name != "plan" for e in store.root.iterdir()):  # "plan": cut short
        raise RunError(f"{store.root} exists and is not a batch run; give an empty or new --out")
    n_items = n_shards = 0
    buf: list[dict] = []
    for item in batch_sources.iter_items(sources, settings):
        buf.append({"index": n_items, **item})
        n_items += 1
        if len(buf) == shard_size:
            store.write_plan_shard(n_shards, buf)
            n_shards += 1
            buf = []
    if buf:
        store.write_plan_shard(n_shards, buf)
        n_shards += 1
    run = {"format": FORMAT, "run_id": uuid.uuid4().hex, "planned_at": time.time(), "fingerprint": fingerprint,
           "plan_key": key, "items": n_items, "shards": n_shards}
    store.write_run(run)  # last: a run.json means the plan is complete
    return run
