"""``localtag directus sync``: tag every image of a Directus library, resumably.

The walk: files matching the filter that are not images are counted as skipped; images already carrying
a provenance record (``directus_files.localtag``) are counted as done and skipped unless ``retag``; the
rest are read page by page (:meth:`DirectusClient.iter_files`), downloaded concurrently (the pipeline's
fetch threads; optionally Directus's own resized rendition), decoded and embedded in batches by
:class:`~localtag.core.pipeline.Pipeline` (its image encoder), scored, and written back batch by batch: the batch's current tags
and records are read again just before writing, merged by :func:`~localtag.directus.tag_merge.plan_tags` and
stored one PATCH per file (tags and record together, see the provenance notes in
:mod:`localtag.directus.tag_merge`).

Resuming needs no state of its own: a file is done exactly when Directus holds its record, so a run
stopped at any point (Ctrl-C, a crash, Directus going away) is continued by running it again. A
``--retag`` run is resumed by giving its run id again (``--run ID``): files whose record already carries
that run id are skipped without a download.

Directus going away (a restart takes 7–13 s) does not end the run: it waits, pinging with backoff, for up
to ``retry_window`` seconds (default 300, ``--retry-window`` / ``LOCALTAG_DIRECTUS_RETRY_WINDOW``), saying
so, then walks again and carries on. 401/403, and an outage longer than the window, stop the run with a
message that never holds the token.

A file whose content can't be tagged (corrupt, not an image, over a limit) is recorded in
``directus_files.localtag_failed`` with its sha256, size and upload time; later runs skip it without a
download ("failed before") until its content is replaced or ``retry_failed`` (``--retry-failed``).
A download that fails is not recorded: the next run tries it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..core.encoder import ImageEncoder
from ..core.errors import (
    CORRUPT,
    FETCH_FAILED,
    NOT_FOUND,
    NOT_IMAGE,
    TOO_MANY_BYTES,
    TOO_MANY_PIXELS,
    ImageError,
)
from ..core.head_mix import head_record
from ..core.pipeline import Job, Pipeline
from ..core.run import Scored, Tee, run
from ..core.scorer import Picking
from ..core.tag import Tag
from ..core.tagger import Tagger
from .client import (
    FAILED_FIELD,
    DirectusAuthError,
    DirectusClient,
    DirectusError,
    DirectusNotFoundError,
    ensure_failure_field,
    ensure_provenance_field,
    is_transient,
    write_plan,
)
from .tag_merge import PROVENANCE_FIELD, TagPlan, TagsFieldError, plan_tags, provenance_stamp

log = logging.getLogger(__name__)

MAX_LISTED_FAILURES = 100
WRITERS = 4  # PATCHes at once
PERMANENT = {CORRUPT, NOT_IMAGE, TOO_MANY_PIXELS, TOO_MANY_BYTES}  # the content itself: recorded, skipped later
FAILED_BEFORE = "failed before (unchanged since; --retry-failed tries again)"
RETAGGED_BEFORE = "retagged before in this run"
APP_ONLY = "_localtag_app_only"  # a Job's meta: walked for the app (tagged before), not for tags
NOT_IMAGES = {"_or": [{"type": {"_null": True}}, {"type": {"_nstarts_with": "image/"}}]}


@dataclass
class SyncOptions:
    filter: dict | None = None  # a Directus filter on directus_files, ANDed with "is an image"
    retag: bool = False  # also files localtag tagged before (replacing only localtag's own tags)
    dry_run: bool = False  # download and tag, write nothing (not even the provenance field)
    concurrency: int = 8  # downloads at once
    rendition: int | None = None  # download Directus's rendition whose short side is this many pixels
    max_concepts: int | None = None  # default: settings.max_concepts
    min_value: float | None = None  # default: settings.min_value
    page_size: int = 100
    retry_window: float = 300.0  # seconds to wait for an unreachable Directus before stopping
    retry_failed: bool = False  # also files whose earlier failure is recorded and unchanged
    run: str | None = None  # the run id (resume an interrupted --retag with its id); default: a new one


@dataclass
class Summary:
    run: str
    dry_run: bool = False
    retag: bool = False
    total: int = 0
    tagged: int = 0
    skipped: int = 0
    failed: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)
    failed_reasons: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)
    walked: int = 0  # files downloaded or looked at in this run (the rest were counted up front)
    stopped: str | None = None  # why the run ended early (auth, Directus unreachable)
    interrupted: bool = False
    elapsed_s: float = 0.0
    waited_s: float = 0.0  # time spent waiting for Directus to come back
    mine: set = field(default_factory=set)  # ids this process tagged (a walk after an outage skips them)

    def restart(self) -> None:
        """Before walking again after an outage: the counts start over, the files tagged so far stay."""
        self.total = self.skipped = self.failed = 0
        self.tagged = len(self.mine)
        self.skipped_reasons.clear()
        self.failed_reasons.clear()
        self.failures.clear()

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped += n
            self.skipped_reasons[reason] += n

    def fail(self, row: dict, kind: str, message: str) -> None:
        self.failed += 1
        self.failed_reasons[kind] += 1
        name = row.get("filename_download")
        log.warning("directus file %s (%s) failed: %s: %s", row["id"], name, kind, message)
        if len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append({"id": row["id"], "filename": name, "reason": kind, "message": message})

    @property
    def complete(self) -> bool:
        return not (self.stopped or self.interrupted)

    def to_json(self) -> dict[str, Any]:
        done = self.tagged + self.skipped + self.failed
        return {
            "run": self.run,
            "dry_run": self.dry_run,
            "retag": self.retag,
            "total": self.total,
            "tagged": self.tagged,
            "skipped": self.skipped,
            "failed": self.failed,
            "not_reached": max(0, self.total - done),
            "skipped_reasons": dict(self.skipped_reasons),
            "failed_reasons": dict(self.failed_reasons),
            "failures": self.failures,
            "complete": self.complete,
            "stopped": self.stopped,
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 2),
            "waited_s": round(self.waited_s, 2),
            # files through the model (tagged or failed) per second; None when nothing was to do
            "files_per_s": (round((self.tagged + self.failed) / self.elapsed_s, 2)
                            if self.elapsed_s > 0 and self.tagged + self.failed else None),
        }

    def text(self) -> str:
        def reasons(c: Counter) -> str:
            return f" ({', '.join(f'{k}: {n}' for k, n in c.most_common())})" if c else ""

        verb = "would tag" if self.dry_run else "tagged"
        lines = [f"{verb} {self.tagged}, skipped {self.skipped}{reasons(self.skipped_reasons)}, "
                 f"failed {self.failed}{reasons(self.failed_reasons)} of {self.total} files "
                 f"in {self.elapsed_s:.1f} s ({self.walked / max(self.elapsed_s, 1e-9):.1f} files/s)"]
        lines += [f"  failed: {f['id']} ({f['filename']}): {f['reason']}: {f['message']}" for f in self.failures[:20]]
        if self.stopped:
            lines.append(f"STOPPED: {self.stopped}")
        if self.interrupted:
            lines.append("INTERRUPTED")
        if not self.complete:
            again = f"the same command with --run {self.run}" if self.retag else "the same command"
            lines.append(f"Nothing was lost: run {again} again to continue.")
        return "\n".join(lines)


class _Stop(Exception):
    """Set by a fetch thread when the run cannot go on (auth refused, Directus unreachable)."""


@dataclass
class _Fetcher:
    """Downloads for the pipeline's fetch threads; sorts per-file failures from run-stopping ones."""

    client: DirectusClient
    rendition: int | None
    max_bytes: int
    stop: threading.Event = field(default_factory=threading.Event)
    stop_error: DirectusError | None = None
    gone: set[str] = field(default_factory=set)
    sha256: dict[str, str] = field(default_factory=dict)  # of each download, until its result is written

    def __call__(self, file_id: str) -> bytes:
        data = self._download(file_id)
        self.sha256[file_id] = hashlib.sha256(data).hexdigest()
        return data

    def _download(self, file_id: str) -> bytes:
        if self.stop.is_set():
            raise _Stop("the run is stopping")
        try:
            if self.rendition:
                try:
                    return self.client.download(file_id, width=self.rendition, height=self.rendition,
                                                fit="outside", max_bytes=self.max_bytes, retries=1)
                except DirectusAuthError:
                    raise
                except DirectusError as e:
                    # Directus could not make it: 400 for a file it cannot resize, 500 when sharp fails
                    # on a broken image. The original tells (and the pipeline says what is wrong with it).
                    log.debug("rendition of %s failed (%s); downloading the original", file_id, e)
            return self.client.download(file_id, max_bytes=self.max_bytes)
        except DirectusAuthError as e:
            # Directus also answers 403 for a file deleted since the walk began: a listing tells them apart
            try:
                exists = bool(self.client.files_by_id([file_id], ["id"]))
            except DirectusError as probe:
                self._halt(probe)
                raise
            if not exists:
                self.gone.add(file_id)
                raise ImageError(NOT_FOUND, "deleted during the run") from None
            raise ImageError(FETCH_FAILED, f"Directus refused the file's content: {e}") from None
        except DirectusError as e:
            if e.code == "TOO_LARGE":
                raise ImageError(TOO_MANY_BYTES, str(e)) from None
            if is_transient(e) and not self.client.ping():
                self._halt(e)
            raise

    def _halt(self, error: DirectusError) -> None:
        if self.stop_error is None:
            self.stop_error = error
        self.stop.set()


def embed_files(client: DirectusClient, encoder: ImageEncoder, settings: Any, rows: Iterable[dict], *,
                concurrency: int = 8, rendition: int | None = None, cache: Any = None) -> Iterator[Any]:
    """The pipeline's results (embeddings or errors, in order; ``job.meta`` is the row) of Directus files
    ``rows`` (``id`` each), downloaded as the sync downloads them (``directus learn``)."""
    fetch = _Fetcher(client, rendition, settings.max_bytes)
    pipe = Pipeline.from_settings(encoder, settings, cache=cache, fetchers=max(1, concurrency))
    results = pipe.run(Job(r["id"], lambda file_id=r["id"]: fetch(file_id), meta=r) for r in rows)
    with contextlib.closing(results):
        for r in results:
            fetch.sha256.pop(r.job.key, None)
            if fetch.stop_error is not None:
                raise fetch.stop_error
            yield r


def run_sync(
    client: DirectusClient,
    tagger: Tagger,
    encoder: ImageEncoder,
    settings: Any,
    options: SyncOptions | None = None,
    *,
    progress: Any = None,
    on_file: Callable[[str, str], None] | None = None,
    cache: Any = None,
    app: Any = None,
) -> Summary:
    """Tag the library; never raises for Directus or per-file trouble: the summary says what happened.

    ``progress``: a tqdm-like bar (``total`` and ``update``). ``on_file(file_id, outcome)`` is called
    after each file with "tagged", "skipped" or "failed" (tests use it to pull the plug mid-run).
    ``app``: a second writer filling an app (:class:`~localtag.directus.app_fill.AppFill`); with it the walk
    also takes the files tagged before that the app lacks (downloaded and embedded, not tagged again).
    """
    options = options or SyncOptions()
    summary = Summary(run=options.run or uuid.uuid4().hex[:12], dry_run=options.dry_run, retag=options.retag)
    start = time.monotonic()
    try:
        while True:
            try:
                _Sync(client, tagger, encoder, settings, options, summary, progress, on_file, cache, app).run()
                break
            except DirectusAuthError:
                raise
            except DirectusError as e:
                if not is_transient(e) or not _wait_for_directus(client, e, options.retry_window, summary):
                    raise
                summary.restart()
    except KeyboardInterrupt:
        summary.interrupted = True
    except DirectusAuthError as e:
        summary.stopped = f"Directus refused the token: {e}"
    except DirectusError as e:
        summary.stopped = f"Directus is unavailable: {e}"
    finally:
        summary.elapsed_s = time.monotonic() - start
    if summary.stopped:
        log.error("%s", summary.stopped)
    return summary


def _wait_for_directus(client: DirectusClient, error: DirectusError, window: float, summary: Summary) -> bool:
    """Ping with backoff until Directus answers (True) or `window` seconds have passed (False)."""
    if window <= 0:
        return False
    t0 = time.monotonic()
    deadline = t0 + window
    log.warning("Directus is not answering (%s); waiting up to %.0f s for it to come back (--retry-window)",
                error, window)
    delay, said = 0.5, t0
    try:
        while time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 10.0)
            try:
                _, body = client._request("GET", "/server/ping", retries=0)
                if body.strip() == b"pong":
                    log.warning("Directus is back after %.1f s; carrying on", time.monotonic() - t0)
                    return True
            except DirectusError:
                pass
            if time.monotonic() - said >= 30:
                said = time.monotonic()
                log.warning("still waiting for Directus (%.0f s left)", max(0.0, deadline - said))
        return False
    finally:
        summary.waited_s += time.monotonic() - t0


class _Sync:
    def __init__(self, client, tagger, encoder, settings, options: SyncOptions, summary: Summary, bar, on_file, cache,
                 app=None):
        self.client = client
        self.app = None if options.dry_run else app
        self.tagger = tagger
        self.encoder = encoder
        self.settings = settings
        self.options = options
        self.summary = summary
        self.bar = bar
        self.on_file = on_file
        self.cache = cache
        self.max_concepts = (settings.directus_max_concepts if options.max_concepts is None
                             else options.max_concepts)
        self.min_value = settings.directus_min_value if options.min_value is None else options.min_value
        self.fetch = _Fetcher(client, options.rendition, settings.max_bytes)
        head, self.learnt = head_record(tagger)  # a learnt head alongside the vocabulary: its tags are marked
        self.stamp = provenance_stamp(tagger.info.name, tagger.info.sha256, tagger.vocab.sha256, summary.run, head)
        self.has_field = False
        self.has_failed = False
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="localtag-directus-write")

    def _outcome(self, file_id: str, outcome: str) -> None:
        self.summary.walked += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.on_file is not None:
            self.on_file(file_id, outcome)

    def run(self) -> None:
        opts, s = self.options, self.summary
        self.has_field = ensure_provenance_field(self.client, create=not opts.dry_run)
        self.has_failed = ensure_failure_field(self.client, create=not opts.dry_run)
        base = [opts.filter] if opts.filter else []
        others = self.client.count_files({"_and": [*base, NOT_IMAGES]}, images_only=False)
        s.skip("not an image", others)
        walk = list(base)
        carried = 0  # files this process tagged before an outage, left out of the walk below
        if self.has_field and not opts.retag:
            carried = len(s.mine)
            done = self.client.count_files({"_and": [*base, {PROVENANCE_FIELD: {"_nnull": True}}]})
            s.skip("already tagged", done - len(s.mine))  # those this process tagged count as tagged
            walk.append({PROVENANCE_FIELD: {"_null": True}})
        todo = self.client.count_files({"_and": walk} if walk else None)
        if self.app is not None and self.has_field and not opts.retag:
            walk.pop()  # the app also wants the files tagged before: _jobs sorts them out
        s.total = s.skipped + todo + carried
        if self.bar is not None:
            self.bar.total = todo
            self.bar.refresh()
        pipe = Pipeline.from_settings(self.encoder, self.settings, cache=self.cache, fetchers=max(1, opts.concurrency))
        results = pipe.run(self._jobs({"_and": walk} if walk else None))
        going = itertools.takewhile(lambda _: not self.fetch.stop.is_set(), results)
        with contextlib.closing(results), self.writers:
            writer = self if self.app is None else Tee(self, self.app)  # the sync's writes first, then the app's
            run(going, writer, scorer=self.tagger.scorer, picking=Picking(self.max_concepts, self.min_value,
                                                                     language=self.settings.directus_language),
                chunk=max(1, pipe.batch_size))
        if self.fetch.stop_error is not None:
            raise self.fetch.stop_error

    def _jobs(self, walk: dict | None) -> Iterator[Job]:
        fields = ["id", "tags", "filename_download", "filesize", "uploaded_on"]
        fields += [FAILED_FIELD] if self.has_failed else []
        fields += [PROVENANCE_FIELD] if (self.options.retag or self.app is not None) and self.has_field else []
        fields += [f for f in self.app.fields if f not in fields] if self.app is not None else []
        s = self.summary
        for row in self.client.iter_files(walk, self.options.page_size, fields):
            if self.fetch.stop.is_set():
                return
            prov = row.get(PROVENANCE_FIELD)
            if self.app is not None and not self.options.retag and prov is not None:
                # tagged before (counted up front): only the app's; downloaded when it lacks the embedding
                if row["id"] in s.mine:
                    continue
                if self.app.holds(row["id"]):
                    self.app.note(row)
                else:
                    yield Job(row["id"], lambda file_id=row["id"]: self.fetch(file_id), meta={**row, APP_ONLY: True})
                continue
            if self.options.retag and isinstance(prov, dict) and prov.get("run") == s.run:
                if row["id"] not in s.mine:  # a resumed --retag: done by this run id before
                    s.skip(RETAGGED_BEFORE)
                    self._outcome(row["id"], "skipped")
                continue
            failed = row.get(FAILED_FIELD)
            if _unchanged(failed, row):
                if failed.get("run") == s.run:  # failed earlier in this run (before an outage)
                    s.fail(row, str(failed.get("kind")), str(failed.get("message")))
                    self._outcome(row["id"], "failed")
                    continue
                if not self.options.retry_failed:
                    s.skip(FAILED_BEFORE)
                    log.info("directus file %s (%s) skipped: it failed before (%s: %s) and has not changed",
                             row["id"], row.get("filename_download"), failed.get("kind"), failed.get("message"))
                    self._outcome(row["id"], "skipped")
                    continue
            tags = row.get("tags")
            if tags is not None and not isinstance(tags, list):
                self.summary.skip("tags field is not a list")
                log.warning("directus file %s (%s) skipped: its tags field holds a JSON %s, not a list; left "
                            "as it is", row["id"], row.get("filename_download"), type(tags).__name__)
                self._outcome(row["id"], "skipped")
                continue
            yield Job(row["id"], lambda file_id=row["id"]: self.fetch(file_id), meta=row)

    def write(self, scored: Sequence[Scored]) -> None:
        """The run loop's writer: re-read a scored batch's files' tags and records, and write each (or
        say what it would do). Nothing is written once a run-stopping error was seen."""
        if self.fetch.stop.is_set():
            return
        s = self.summary
        for x in scored:  # files only the app wanted: the sync neither counts nor writes them
            if x.result.job.meta.get(APP_ONLY):
                self.fetch.sha256.pop(x.key, None)
            if x.result.job.meta.get(APP_ONLY) and not x.ok:
                log.warning("app: directus file %s not added: %s", x.key, x.result.error)
        scored = [x for x in scored if not x.result.job.meta.get(APP_ONLY)]
        batch = [x.result for x in scored]
        tags_of = {id(x.result): x.tags for x in scored}
        ok = [r for r in batch if r.ok]
        for r in batch:
            digest = self.fetch.sha256.pop(r.job.key, None)
            if r.ok:
                continue
            if r.job.key in self.fetch.gone:
                s.skip("deleted during the run")
                self._outcome(r.job.key, "skipped")
            else:
                s.fail(r.job.meta, r.error.kind, r.error.message)
                if r.error.kind in PERMANENT and self.has_failed and not self.options.dry_run:
                    self._record_failure(r, digest)
                self._outcome(r.job.key, "failed")
        if not ok:
            return
        fields = ["tags", PROVENANCE_FIELD] if self.has_field else ["tags"]
        current = self.client.files_by_id([r.job.key for r in ok], fields)
        plans = [(r.job, self._plan(r.job, current.get(r.job.key), tags_of[id(r)])) for r in ok]
        plans = [(job, plan) for job, plan in plans if plan is not None]
        if self.options.dry_run:
            for job, plan in plans:
                log.info("would tag %s (%s): +%s -%s", job.key, job.meta.get("filename_download"),
                         ",".join(plan.added) or "nothing", ",".join(plan.removed) or "nothing")
                s.tagged += 1
                self._outcome(job.key, "tagged")
            return
        # one PATCH per file, a few at once; a run-stopping error is raised once the others are settled
        futures = [(job, self.writers.submit(write_plan, self.client, job.key, plan)) for job, plan in plans]
        fatal = None
        for job, fut in futures:
            try:
                fut.result()
            except DirectusNotFoundError:
                s.skip("deleted during the run")
                self._outcome(job.key, "skipped")
                continue
            except DirectusError as e:
                if isinstance(e, DirectusAuthError) or is_transient(e) or e.code == "NO_PROVENANCE_FIELD":
                    fatal = fatal or e
                else:
                    s.fail(job.meta, "write_refused", str(e))
                    self._outcome(job.key, "failed")
                continue
            if job.meta.get(FAILED_FIELD) is not None:  # it failed before and is fine now
                try:
                    self.client.update_file(job.key, {FAILED_FIELD: None})
                except DirectusError as e:
                    log.warning("directus file %s: could not clear its failure record: %s", job.key, e)
            s.tagged += 1
            s.mine.add(job.key)
            self._outcome(job.key, "tagged")
        if fatal is not None:
            raise fatal

    def _record_failure(self, r: Any, digest: str | None) -> None:
        """Remember a failure of the file's content, so later runs skip it until the file changes."""
        row = r.job.meta
        record = {"v": 1, "kind": r.error.kind, "message": r.error.message[:500], "sha256": digest,
                  "filesize": row.get("filesize"), "uploaded_on": row.get("uploaded_on"), "run": self.summary.run,
                  "model": self.tagger.info.name,
                  "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.client.update_file(r.job.key, {FAILED_FIELD: record})
        except DirectusError as e:
            log.warning("directus file %s: could not record its failure: %s", r.job.key, e)

    def _plan(self, job: Job, row: dict | None, tags: list[Tag]) -> TagPlan | None:
        """What to write for one file, or None (skipped: deleted, tagged meanwhile, tags not a list)."""
        s, file_id = self.summary, job.key
        reason = None
        if row is None:
            reason = "deleted during the run"
        elif row.get(PROVENANCE_FIELD) is not None and not self.options.retag:
            reason = "already tagged"  # by the flow, or another sync, while this one ran
        else:
            try:
                return plan_tags(row.get("tags"), row.get(PROVENANCE_FIELD), tags, self.stamp, self.learnt)
            except TagsFieldError as e:
                reason = "tags field is not a list"
                log.warning("directus file %s skipped: %s", file_id, e)
        s.skip(reason)
        self._outcome(file_id, "skipped")
        return None


def _unchanged(record: Any, row: dict) -> bool:
    """Whether a failure record is about the file's present content (same size and upload time)."""
    return (isinstance(record, dict) and record.get("filesize") == row.get("filesize")
            and record.get("uploaded_on") == row.get("uploaded_on"))
