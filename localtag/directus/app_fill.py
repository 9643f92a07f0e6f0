"""``directus sync --app NAME``: the sync's second run-loop writer, filling an app of the app store.

Each batch the sync writes is handed here next (:class:`~localtag.core.run.Tee`): the embeddings the
sync computed anyway, and the files' tags and provenance records as they are once the sync wrote them
(one listing per batch). Person tags become positive annotations (value 1), machine tags a person deleted
(``rejected`` in the record) negative ones (value 0); localtag's own tags are no annotation. Input ids are
the Directus file ids, metadata ``{"title", "filename"}``. Files the app already holds (with an embedding
of this model) are not downloaded again: :meth:`note` refreshes their annotations and metadata from the
walk's row. Re-running updates the inputs in place, never duplicates them.

The store is the caller's (this wing does not import the app's): ``put(entries)`` adds or updates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.run import Scored
from .client import DirectusClient, DirectusError
from .tag_merge import PROVENANCE_FIELD, machine_tags

log = logging.getLogger(__name__)

FIELDS = ["id", "tags", "title", "filename_download", PROVENANCE_FIELD]
NOTE_BATCH = 500  # refreshed rows written at once


@dataclass
class Entry:
    """One Directus file as an app input."""

    id: str
    url: str
    concepts: dict[str, int]
    metadata: dict[str, Any]
    embedding: np.ndarray | None = None  # None: keep the one the app holds


def annotations(tags: Any, provenance: Any) -> dict[str, int]:
    """A file's person tags → 1; the machine tags a person deleted → 0: those its record lists as
    ``rejected`` and those it lists as localtag's that are gone from the file (the ones the next
    ``--retag`` records as rejected, :func:`~localtag.directus.tag_merge.plan_tags`'s rule). A person's
    tag wins over a rejection of the same name. Tags that are not a list give the rejections only."""
    machine, rejected = machine_tags(provenance)
    if not isinstance(tags, list):
        return {t: 0 for t in rejected if t}
    person, deleted = list(tags), []
    for tag in machine:  # localtag's own: its last occurrence (a person may hold the same tag too)
        idx = next((i for i in range(len(person) - 1, -1, -1) if person[i] == tag), None)
        if idx is None:
            deleted.append(tag)
        else:
            del person[idx]
    out = {t: 0 for t in [*rejected, *deleted] if t}
    out.update({t: 1 for t in person if isinstance(t, str) and t})
    return out


@dataclass
class AppFill:
    """The second writer of a sync run (see the module doc). ``held``: ids of files the app holds with an
    embedding of this model; ``stats``: what it did, for the sync's summary."""

    client: DirectusClient
    put: Callable[[list[Entry]], tuple[int, int]]
    held: set[str] = field(default_factory=set)
    stats: dict[str, int] = field(default_factory=lambda: {"added": 0, "updated": 0, "positive": 0, "negative": 0,
                                                           "errors": 0})
    _pending: list[Entry] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fields(self) -> list[str]:
        """What the walk's rows need for :meth:`note`."""
        return FIELDS

    def holds(self, file_id: str) -> bool:
        return file_id in self.held

    def entry(self, row: dict, embedding: np.ndarray | None = None) -> Entry:
        return Entry(row["id"], f"{self.client.url}/assets/{row['id']}",
                     annotations(row.get("tags"), row.get(PROVENANCE_FIELD)),
                     {"title": row.get("title"), "filename": row.get("filename_download")}, embedding)

    def note(self, row: dict) -> None:
        """A file the app holds, not downloaded this run: refresh its annotations and metadata (the walk
        may call this from another thread)."""
        with self._lock:
            self._pending.append(self.entry(row))
            if len(self._pending) >= NOTE_BATCH:
                self._flush()

    def write(self, batch: Sequence[Scored]) -> None:
        """The run loop's second writer: the batch's embedded files, read again after the sync wrote them."""
        ok = {s.key: s.result.embedding for s in batch if s.ok}
        if not ok:
            return
        try:
            rows = self.client.files_by_id(list(ok), FIELDS)
        except DirectusError as e:  # the sync's own writer stops the run for this; the app waits for a rerun
            log.warning("app: could not read %d files' tags (%s); a rerun fills them", len(ok), e)
            self.stats["errors"] += len(ok)
            return
        entries = [self.entry(rows[i], np.asarray(v, np.float32)) for i, v in ok.items() if i in rows]
        with self._lock:
            self._store(entries)
        self.held.update(e.id for e in entries)

    def close(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._store(pending)

    def _store(self, entries: Iterable[Entry]) -> None:
        entries = list(entries)
        if not entries:
            return
        added, updated = self.put(entries)
        self.stats["added"] += added
        self.stats["updated"] += updated
        for e in entries:
            self.stats["positive"] += sum(v == 1 for v in e.concepts.values())
            self.stats["negative"] += sum(v == 0 for v in e.concepts.values())
