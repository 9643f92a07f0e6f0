"""The Ray Data batch engine. This is the only module that imports Ray.

The job is ``range(shards)`` → ``map_batches(_RayShardWorker)`` on an actor pool: each actor is a
:class:`~localtag.batch.worker.ShardWorker` (the tagger is loaded once per actor, and the shard goes
through the same core pipeline as the local engine), each call takes one shard number, commits the
shard in the run dir and returns its stats. Ray restarts a dead actor and retries its task; the
exclusive commit makes a retried shard count once. The driver only reads the small stats rows.

Resources: each actor asks for ``num_cpus`` (fractional by default, so the read tasks that feed the
pool always find a CPU: ray #44687) and ``num_gpus`` (one actor per GPU with ``--gpus-per-worker 1``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext

log = logging.getLogger(__name__)

RAY_RANGE = ">=2.60,<2.64"


class _RayShardWorker:
    def __init__(self, run_dir: str, settings: Any, threads: int | None):
        from .worker import ShardWorker, default_threads

        # Ray starts workers with OMP_NUM_THREADS=1; the local engine's default, unless told
        self.worker = ShardWorker(run_dir, settings, threads or default_threads())
        self.worker.announce(engine="ray", node_id=ray.get_runtime_context().get_node_id())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        stats = [self.worker.process(int(s)) for s in batch["id"]]
        return {"stats": [json.dumps(s) for s in stats]}


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` ("auto": the one ``ray start`` made here); None: a local one.
    A Ray already initialised in this process (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        return
    ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
             log_to_driver=True, configure_logging=False)


def run(run_dir: str | Path, settings: Any, n_shards: int, *, address: str | None = None, workers: int = 1,
        cpus_per_worker: float = 0.5, gpus_per_worker: float = 0.0, threads: int | None = None,
        progress: bool = False) -> Iterator[dict]:
    """Stats of every shard as it is done (any order); already committed shards are skipped by the actors."""
    connect(address)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = False
    if n_shards == 0:
        return
    ds = ray.data.range(n_shards, override_num_blocks=n_shards)
    ds = ds.map_batches(
        _RayShardWorker,
        fn_constructor_kwargs={"run_dir": str(Path(run_dir).resolve()), "settings": settings,
                              "threads": threads},
        batch_size=1,
        compute=ActorPoolStrategy(size=max(1, workers)),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
    )
    for row in ds.iter_rows():
        yield json.loads(row["stats"])
