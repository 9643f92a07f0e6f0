"""The run loop: results → scorer → writer. Every adapter's run is this loop with its own ends.

    source (files | lists | URLs | Directus | s3 | tar shards) → fetch → decode → batch → image encoder
      (:meth:`localtag.core.pipeline.Pipeline.run`) → scorer (:meth:`Scorer.tags`) → writer

A writer takes scored batches (:class:`Scored` items, in input order) and decides what to do with them:
text lines, Clarifai JSON (:mod:`localtag.core.writers`), embeddings, Parquet shards
(:mod:`localtag.batch.worker`) or Directus tags (:mod:`localtag.directus.sync`). A new output is a new
writer, never a new copy of this loop. Without a scorer the loop hands over embeddings only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .pipeline import Result, chunks
from .scorer import DEFAULT_PICKING, Picking, Scorer
from .tag import Tag


@dataclass
class Scored:
    """One input's outcome: its pipeline result and, when it was scored and did not fail, its tags."""

    result: Result
    tags: list[Tag] | None = None

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def key(self) -> str:
        return self.result.job.key


@dataclass
class Tally:
    total: int = 0
    failed: int = 0


class Writer(Protocol):
    def write(self, batch: Sequence[Scored]) -> None: ...


class Tee:
    """One run, several outputs: each batch goes to every writer, in the order given."""

    def __init__(self, *writers: Writer):
        self.writers = writers

    def write(self, batch: Sequence[Scored]) -> None:
        for w in self.writers:
            w.write(batch)


def run(results: Iterable[Result], writer: Writer, *, scorer: Scorer | None = None,
        picking: Picking = DEFAULT_PICKING, chunk: int = 512) -> Tally:
    """Score ``results`` ``chunk`` at a time (one matrix product each) and hand each batch to ``writer``."""
    tally = Tally()
    for buf in chunks(results, chunk):
        ok = [r.embedding for r in buf if r.ok]
        tags = iter(scorer.tags(np.stack(ok), picking) if scorer is not None and ok else ())
        batch = [Scored(r, next(tags) if r.ok and scorer is not None else None) for r in buf]
        tally.total += len(batch)
        tally.failed += sum(not s.ok for s in batch)
        writer.write(batch)
    return tally
