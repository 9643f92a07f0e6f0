"""The local batch engine: the pending shards, one after another, in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .worker import ShardWorker


def run(run_dir: str | Path, settings: Any, n_shards: int, threads: int | None = None) -> Iterator[dict[str, Any]]:
    """Stats of every shard (already committed ones too, with ``committed`` False), in shard order."""
    worker: ShardWorker | None = None
    for shard in range(n_shards):
        if worker is None:
            from .store import RunStore

            done = RunStore(run_dir).marker(shard)
            if done is not None:  # resuming: no model is loaded until a shard needs it
                yield {**done, "committed": False}
                continue
            worker = ShardWorker(run_dir, settings, threads)
            worker.announce(engine="local")
        yield worker.process(shard)
