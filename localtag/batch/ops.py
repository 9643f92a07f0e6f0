"""What is done with a run directory after (or while) it runs: status, export, rescore, push.

None of these loads an image model or fetches an image. ``rescore`` builds the scorer alone
(:func:`localtag.core.loader.load_scorer`: stored text embeddings, the text tower only for a new
vocabulary) and runs the stored embeddings through the run loop on CPU.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..core import errors
from ..core.clarifai import model_json
from ..core.errors import ImageError
from ..core.loader import IMAGE_KEYS, fingerprint, load_scorer
from ..core.pipeline import Job, Result
from ..core.run import Scored
from ..core.run import run as run_loop
from ..core.scorer import Picking
from ..core.tag import Tag
from ..core.writers import LineWriter
from ..directus.client import ensure_provenance_field, write_plan
from ..directus.tag_merge import PROVENANCE_FIELD, TagsFieldError, plan_tags, provenance_stamp
from .store import RunError, RunStore
from .worker import concepts_of, shard_stats

log = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 20


def status(store: RunStore) -> dict[str, Any]:
    run = store.read_run()
    n = run["shards"]
    committed = ok = failed = 0
    kinds: dict[str, int] = {}
    seconds = 0.0
    first = last = None
    examples: list[dict[str, Any]] = []
    for m in store.committed(n):
        committed += 1
        ok += m["ok"]
        failed += m["failed"]
        seconds += m["seconds"]
        for k, c in m["errors"].items():
            kinds[k] = kinds.get(k, 0) + c
        start = m["committed_at"] - m["seconds"]
        first = start if first is None else min(first, start)
        last = m["committed_at"] if last is None else max(last, m["committed_at"])
        if m["failed"] and len(examples) < MAX_LISTED_FAILURES:
            t = store.read_shard(m, ["id", "uri", "error_kind", "error"]).to_pylist()
            examples += [r for r in t if r["error_kind"]][: MAX_LISTED_FAILURES - len(examples)]
    items = ok + failed
    return {
        "run_dir": str(store.root), "run_id": run["run_id"], "model": run["fingerprint"]["model"],
        "shards": {"planned": n, "committed": committed, "pending": n - committed},
        "items": {"planned": run["items"], "ok": ok, "failed": failed, "pending": run["items"] - items},
        "errors": kinds, "failures": examples,
        "throughput": {
            "items_per_s": round(items / (last - first), 2) if items and last and last > first else None,
            "items_per_worker_s": round(items / seconds, 2) if seconds else None,
        },
        "complete": committed == n,
    }


def status_text(s: dict[str, Any]) -> str:
    sh, it, tp = s["shards"], s["items"], s["throughput"]
    lines = [f"{s['run_dir']}: model {s['model']}, run {s['run_id'][:12]}",
             f"shards  {sh['committed']} of {sh['planned']} committed, {sh['pending']} pending",
             f"items   {it['ok']} ok, {it['failed']} failed, {it['pending']} pending (of {it['planned']})"]
    if s["errors"]:
        lines.append("errors  " + ", ".join(f"{k} {n}" for k, n in sorted(s["errors"].items())))
        lines += [f"  {f['id']}: {f['error']}" for f in s["failures"]]
    if tp["items_per_s"]:
        lines.append(f"speed   {tp['items_per_s']} items/s overall, {tp['items_per_worker_s']} items/s per worker")
    lines.append("complete" if s["complete"] else "incomplete: run the same `localtag batch run` again to resume")
    return "\n".join(lines)


def rows(store: RunStore, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every committed row, in plan order; one shard in memory at a time."""
    for m in store.committed(store.read_run()["shards"]):
        yield from store.read_shard(m, columns).to_pylist()


def _url(uri: str) -> str:
    return uri if "://" in uri else Path(uri.split("#", 1)[0]).as_uri() + ("#" + uri.split("#", 1)[1]
                                                                           if "#" in uri else "")


def export(store: RunStore, fmt: str, out: IO[str] | None, path: Path | None = None) -> int:
    """Write the committed results; how many rows. ``jsonl``/``clarifai``: Clarifai outputs as
    ``localtag tag --jsonl`` / ``--json`` write them; ``parquet``: every row, embeddings included."""
    run = store.read_run()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if path is None:
            raise ValueError("--format parquet needs --output FILE")
        writer = None
        n = 0
        try:
            for m in store.committed(run["shards"]):
                t = store.read_shard(m)
                writer = writer or pq.ParquetWriter(path, t.schema)
                writer.write_table(t)
                n += t.num_rows
        finally:
            if writer is not None:
                writer.close()
        return n
    assert out is not None
    fp = run["fingerprint"]
    writer = LineWriter(model_json(fp["model"], fp["model_sha256"][:32], name=fp["model"], app_id="localtag",
                                   user_id="localtag"), "json" if fmt == "clarifai" else "jsonl", out)
    n = 0
    for r in rows(store, ["id", "uri", "status", "error_kind", "error", "concepts"]):
        job = Job(r["id"], None, {"url": _url(r["uri"])})
        if r["status"] == "ok":
            item = Scored(Result(job), [Tag(c["id"], c["name"], float(c["value"])) for c in r["concepts"] or ()])
        else:
            item = Scored(Result(job, error=ImageError(r["error_kind"] or errors.CORRUPT, r["error"] or "")))
        writer.write([item])
        n += 1
    writer.close()
    return n


class _Concepts:
    """The run loop's writer for ``rescore``: each stored row's new concepts, in order."""

    def __init__(self) -> None:
        self.concepts: list[Any] = []

    def write(self, batch: list[Scored]) -> None:
        self.concepts.extend(concepts_of(s.tags) for s in batch)


def rescore(store: RunStore, settings: Any, out: RunStore) -> dict[str, Any]:
    """Tags from the stored embeddings with the vocabulary / scoring / thresholds of ``settings``, into
    run dir ``out`` (resumable like a run). The image side of the fingerprint must be the same."""
    run = store.read_run()
    fp = fingerprint(settings)
    diff = [k for k in IMAGE_KEYS if fp.get(k) != run["fingerprint"].get(k)]
    if diff:
        raise RunError(f"rescore needs the run's own image model and preprocessing (differs in {', '.join(diff)})")
    if out.root.resolve() == store.root.resolve():
        raise RunError("rescore writes a new run dir: give --out another folder")
    if out.exists():
        new = out.check(fp)
    else:
        if out.root.exists() and any(out.root.iterdir()):
            raise RunError(f"{out.root} exists and is not a batch run")
        out.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(store.plan_dir, out.plan_dir, dirs_exist_ok=True)
        new = {**run, "fingerprint": fp, "run_id": core_run_id(), "planned_at": time.time(),
               "rescored_from": {"run_dir": str(store.root.resolve()), "run_id": run["run_id"]}}
        out.write_run(new)
    _, scorer = load_scorer(settings)
    picking = Picking(settings.max_concepts, settings.min_value)
    done = 0
    for m in store.committed(run["shards"]):
        if out.is_committed(m["shard"]):
            continue
        t0 = time.perf_counter()
        table = store.read_shard(m)
        ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
        concepts: list[Any] = [None] * table.num_rows
        if ok.any():
            emb = table.filter(ok).column("embedding").combine_chunks()
            matrix = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), -1)
            found = _Concepts()
            run_loop([Result(Job(str(i), None), embedding=e) for i, e in zip(np.flatnonzero(ok), matrix, strict=True)],
                found, scorer=scorer, picking=picking)
            for i, c in zip(np.flatnonzero(ok), found.concepts, strict=True):
                concepts[i] = c
        idx = table.schema.get_field_index("concepts")
        import pyarrow as pa

        table = table.set_column(idx, table.schema.field("concepts"), pa.array(concepts, table.schema.field("concepts").type))
        stats = {**shard_stats(table, time.perf_counter() - t0), "run_id": new["run_id"], "rescored": True}
        done += out.commit(m["shard"], table, stats)
    return {"run_dir": str(out.root), "shards_rescored": done}


def core_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


def push(store: RunStore, client: Any, *, dry_run: bool = False) -> dict[str, Any]:
    """Write the run's tags to the Directus files it came from, by ``directus sync``'s rules (a person's
    tags stay; localtag's own are replaced and recorded). A file whose tags and record already say what
    this run would write is left alone, so pushing twice changes nothing."""
    from .sources import DIRECTUS_PREFIX

    run = store.read_run()
    fp = run["fingerprint"]
    head = fp.get("model_head")  # a run made with --model-head: its learnt tags are listed as `learnt`
    stamp = provenance_stamp(fp["model"], fp["model_sha256"], fp["vocab_sha256"], run["run_id"], head=head)
    head_concepts = frozenset(head["concepts"]) if head else frozenset()
    field = PROVENANCE_FIELD
    if not dry_run:
        ensure_provenance_field(client, create=True)
    counts = {"written": 0, "unchanged": 0, "failed_items": 0, "not_directus": 0, "missing": 0, "tags_not_a_list": 0}
    page: list[dict] = []

    def flush() -> None:
        current = client.files_by_id([r["id"] for r in page], ["tags", field])
        for r in page:
            row = current.get(r["id"])
            if row is None:
                counts["missing"] += 1
                continue
            new = [Tag(c["id"], c["name"], float(c["value"])) for c in r["concepts"] or ()]
            try:
                learnt = {c["id"] for c in r["concepts"] or () if {c["id"], c["name"]} & head_concepts}
                plan = plan_tags(row.get("tags"), row.get(field), new, stamp, learnt)
            except TagsFieldError as e:
                log.warning("directus file %s skipped: %s", r["id"], e)
                counts["tags_not_a_list"] += 1
                continue
            old = row.get(field) or {}
            same = (plan.tags == row.get("tags")
                    and {k: v for k, v in plan.provenance.items() if k != "tagged_at"}
                    == {k: v for k, v in old.items() if k != "tagged_at"})
            if same:
                counts["unchanged"] += 1
                continue
            if not dry_run:
                write_plan(client, r["id"], plan)
            counts["written"] += 1
        page.clear()

    for r in rows(store, ["id", "uri", "status", "concepts"]):
        if not r["uri"].startswith(DIRECTUS_PREFIX):
            counts["not_directus"] += 1
        elif r["status"] != "ok":
            counts["failed_items"] += 1
        else:
            page.append(r)
            if len(page) >= 100:
                flush()
    if page:
        flush()
    return counts
