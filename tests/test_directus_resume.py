"""Sync against a real Directus that restarts, a file that stays corrupt, an interrupted --retag, and the
default tag threshold (issue 10, items 11–14). No mocks: the Directus of tests/directus_fixtures.py."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from directus_harness import DirectusClient

from localtag.core.config import Settings
from localtag.core.loader import load
from localtag.directus.client import FAILED_FIELD
from localtag.directus.sync import FAILED_BEFORE, RETAGGED_BEFORE, SyncOptions, run_sync
from localtag.directus.tag_merge import PROVENANCE_FIELD
from tests.test_directus_sync import corrupt_jpeg, model_settings, state

pytestmark = pytest.mark.directus


class CountingClient(DirectusClient):
    """The real client, counting the downloads of each file."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.downloads: Counter = Counter()

    def download(self, file_id, **kw):
        self.downloads[file_id] += 1
        return super().download(file_id, **kw)


@pytest.fixture(scope="module")
def settings(request, tmp_path_factory) -> Settings:
    return model_settings(request, tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def loaded(settings):
    return load(settings)


def upload(directus, paths, marker, extra=()) -> list[str]:
    with DirectusClient(directus.url, directus.token) as c:
        ids = [c.upload(p, title=marker)["id"] for p in paths]
        return ids + [c.upload(data, name, title=marker)["id"] for name, data in extra]


def test_sync_waits_for_a_restarting_directus(directus, settings, loaded, coco_images):
    """Directus SIGKILLed after 5 files and started again ~9 s later: the same sync completes."""
    marker = f"restart-{uuid.uuid4().hex[:8]}"
    ids = upload(directus, coco_images[:32], marker)
    tagger, encoder = loaded
    count = 0
    restarted = threading.Event()

    def bounce():
        directus.kill()
        time.sleep(9)
        directus.start()
        restarted.set()

    def on_file(file_id, outcome):
        nonlocal count
        count += 1
        if count == 5:
            threading.Thread(target=bounce, daemon=True).start()
            time.sleep(1)  # Directus is gone before the run goes on

    options = SyncOptions(filter={"title": {"_eq": marker}}, concurrency=4, retry_window=120)
    with DirectusClient(directus.url, directus.token, retries=2, backoff=0.05) as c:
        summary = run_sync(c, tagger, encoder, settings, options, on_file=on_file)
        assert restarted.wait(60)
        rows = state(c, ids)
    assert summary.complete and summary.stopped is None, summary.text()
    # a PATCH Directus applied just before it died counts as "already tagged" on the walk after the restart
    assert summary.tagged + summary.skipped_reasons["already tagged"] == 32 and summary.skipped == 32 - summary.tagged
    assert summary.failed == 0 and summary.total == 32 and summary.tagged >= 28, summary.to_json()
    assert summary.waited_s > 3
    assert all(rows[f][PROVENANCE_FIELD]["run"] == summary.run for f in ids)


def test_a_permanent_failure_is_recorded_and_skipped(directus, settings, loaded, coco_images):
    marker = f"failed-{uuid.uuid4().hex[:8]}"
    ids = upload(directus, coco_images[:2], marker, [("broken.jpg", corrupt_jpeg(coco_images[0]))])
    bad = ids[-1]
    tagger, encoder = loaded
    options = SyncOptions(filter={"title": {"_eq": marker}}, concurrency=2)
    with CountingClient(directus.url, directus.token) as c:
        first = run_sync(c, tagger, encoder, settings, options)
        assert first.failed == 1 and first.tagged == 2 and c.downloads[bad] == 1
        record = state(c, [bad])[bad]
        failed = c.get_file(bad, ["filesize", "uploaded_on", FAILED_FIELD])[FAILED_FIELD]
        assert record[PROVENANCE_FIELD] is None and failed["kind"] in ("corrupt", "not_image")
        assert len(failed["sha256"]) == 64 and failed["run"] == first.run

        second = run_sync(c, tagger, encoder, settings, options)
        assert c.downloads[bad] == 1, "downloaded again"
        assert second.failed == 0 and second.skipped_reasons[FAILED_BEFORE] == 1, second.to_json()
        assert "failed before" in second.text()

        third = run_sync(c, tagger, encoder, settings, SyncOptions(**{**options.__dict__, "retry_failed": True}))
        assert c.downloads[bad] == 2 and third.failed == 1

        # a person replaces the file's content with a good photo: it is tried (and tagged) again
        c._request("PATCH", f"/files/{bad}", files={"file": ("broken.jpg", coco_images[5].read_bytes(),
                                                             "image/jpeg")})
        fourth = run_sync(c, tagger, encoder, settings, options)
        assert c.downloads[bad] == 3 and fourth.tagged == 1 and fourth.failed == 0, fourth.to_json()
        assert c.get_file(bad, [FAILED_FIELD])[FAILED_FIELD] is None


def test_an_interrupted_retag_resumes_by_run_id(directus, settings, loaded, coco_images):
    marker = f"retag-{uuid.uuid4().hex[:8]}"
    ids = upload(directus, coco_images[:24], marker)
    tagger, encoder = loaded
    filt = {"title": {"_eq": marker}}
    with DirectusClient(directus.url, directus.token) as c:
        assert run_sync(c, tagger, encoder, settings, SyncOptions(filter=filt)).tagged == 24
    seen = []

    def interrupt_after_8(file_id, outcome):
        seen.append(outcome)
        if len(seen) == 8:
            raise KeyboardInterrupt

    with CountingClient(directus.url, directus.token) as c:
        first = run_sync(c, tagger, encoder, settings, SyncOptions(filter=filt, retag=True, concurrency=2),
                         on_file=interrupt_after_8)
        assert first.interrupted and first.tagged == 8
        assert f"--run {first.run}" in first.text()
        done_first = [f for f, row in state(c, ids).items() if row[PROVENANCE_FIELD]["run"] == first.run]
        c.downloads.clear()
        second = run_sync(c, tagger, encoder, settings, SyncOptions(filter=filt, retag=True, run=first.run))
        rows = state(c, ids)
    assert second.complete and second.run == first.run
    assert second.skipped_reasons[RETAGGED_BEFORE] == len(done_first) >= 8
    assert second.tagged == 24 - len(done_first)
    assert not set(c.downloads) & set(done_first)  # resumed files were not downloaded again
    assert sum(c.downloads.values()) == 24 - len(done_first)
    assert all(rows[f][PROVENANCE_FIELD]["run"] == first.run for f in ids)


def test_default_threshold_for_sync_and_flow(directus, tmp_path, loaded, coco_images):
    """The default a Directus user gets: tags valued 0.5 or more (at most 10), not every concept."""
    assert Settings.model_fields["directus_min_value"].default == 0.5
    marker = f"default-{uuid.uuid4().hex[:8]}"
    ids = upload(directus, coco_images[:16], marker)
    tagger, encoder = loaded
    settings = Settings(model=loaded.tagger.info.path.as_posix(), device="cpu", cache_dir=tmp_path, batch_size=16)
    with DirectusClient(directus.url, directus.token) as c:
        summary = run_sync(c, tagger, encoder, settings, SyncOptions(filter={"title": {"_eq": marker}}))
        rows = state(c, ids)
    assert summary.tagged == 16
    counts = [len(rows[f][PROVENANCE_FIELD]["tags"]) for f in ids]
    assert all(v >= 0.5 for f in ids for v in rows[f][PROVENANCE_FIELD]["values"].values())
    assert max(counts) < len(tagger.vocab) and sum(counts) < 16 * len(tagger.vocab)
