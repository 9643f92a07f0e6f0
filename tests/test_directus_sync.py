"""`localtag directus sync` against the real Directus (tests/directus_fixtures.py); no mocks.

A library of the 128 COCO photos, a PNG with alpha, a text file and a corrupt JPEG; some files carry a
person's tags, one a tags value that is not a list. The sync must tag every image once, report the rest
with reasons, keep every person's tag through --retag, and lose or duplicate nothing when it is stopped
by Ctrl-C or by Directus dying mid-run.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import uuid
from pathlib import Path

import pytest
from directus_harness import DirectusClient
from PIL import Image

from localtag import cli
from localtag.core.config import Settings
from localtag.core.decode import decode
from localtag.core.loader import load
from localtag.directus.sync import FAILED_BEFORE, SyncOptions, run_sync
from localtag.directus.tag_merge import PROVENANCE_FIELD

pytestmark = pytest.mark.directus

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "models" / "cifar10-tiny"
SMALL_VOCAB = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\nperson\n"
MAX_CONCEPTS = 3


def model_settings(request: pytest.FixtureRequest, tmp: Path, **extra) -> Settings:
    """The trained CIFAR fixture model when it is there, else the random-init tiny model on a small vocabulary.

    The embedding cache is this module's own (``tmp``): no other test's embeddings can stand in for a
    sync that failed to download or decode."""
    base = {"cache_dir": tmp / "cache", "device": "cpu", "max_concepts": MAX_CONCEPTS, "batch_size": 16, "workers": 2,
            "directus_max_concepts": MAX_CONCEPTS, "directus_min_value": 0.0}  # these tests: every concept
    if (FIXTURE_MODEL / "manifest.json").is_file():
        return Settings(model=str(FIXTURE_MODEL), **base, **extra)
    (tmp / "vocab.txt").write_text(SMALL_VOCAB)
    store = request.getfixturevalue("random_store")
    return Settings(models_dir=store, model="tiny-random", vocab=tmp / "vocab.txt", **base, **extra)


def model_args(settings: Settings) -> list[str]:
    args = ["--model", settings.model, "--device", "cpu", "--cache-dir", str(settings.cache_dir),
            "--models-dir", str(settings.models_dir), "--batch-size", str(settings.batch_size)]
    return args + (["--vocab", str(settings.vocab)] if settings.vocab else [])


def alpha_png() -> bytes:
    img = Image.new("RGBA", (64, 48), (0, 200, 0, 0))
    img.paste((220, 20, 20, 255), (0, 0, 32, 48))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def corrupt_jpeg(coco: Path) -> bytes:
    data = coco.read_bytes()
    return data[:600] + b"\x00" * 64  # a real JPEG header, then nothing decodable


def state(client: DirectusClient, ids) -> dict[str, dict]:
    return client.files_by_id(ids, ["tags", PROVENANCE_FIELD, "filename_download"])


def assert_consistent(row: dict, person: list) -> None:
    """tags == the person's (intact, in order) + localtag's recorded tags, none twice."""
    prov = row[PROVENANCE_FIELD]
    assert prov["v"] == 1 and len(prov["model_sha256"]) == 64 and len(prov["vocab_sha256"]) == 64
    assert row["tags"] == person + prov["tags"], row
    assert len({t.casefold() for t in row["tags"]}) == len(row["tags"]), row
    assert set(prov["values"]) == set(prov["tags"]) and all(0 <= v <= 1 for v in prov["values"].values())


@pytest.fixture(scope="module")
def settings(request, tmp_path_factory) -> Settings:
    return model_settings(request, tmp_path_factory.mktemp("sync"))


@pytest.fixture(scope="module")
def client(directus):
    with DirectusClient(directus.url, directus.token) as c:
        yield c


@pytest.fixture(scope="module")
def library(client, coco_images) -> dict:
    """The uploaded library, titled with a marker of its own."""
    marker = f"sync-{uuid.uuid4().hex[:8]}"
    lib: dict = {"marker": marker, "filter": {"title": {"_eq": marker}}, "person": {}, "coco": []}
    for i, path in enumerate(coco_images):
        extra = {}
        if i % 20 == 0:  # a person tagged some photos before localtag came along
            lib["person"][i] = ["holiday", f"album {i}", "Dog"]
            extra["tags"] = lib["person"][i]
        lib["coco"].append(client.upload(path, title=marker, **extra)["id"])
    lib["odd"] = lib["coco"][7]  # tags that are not a list: someone's data, left alone
    client.update_file(lib["odd"], {"tags": {"note": "kept as is"}})
    lib["person"] = {lib["coco"][i]: tags for i, tags in lib["person"].items()}
    # Directus 12 fills `tags` at upload from keywords embedded in the photo: those are a person's tags too
    for file_id, row in client.files_by_id(lib["coco"], ["tags"]).items():
        if file_id != lib["odd"] and isinstance(row.get("tags"), list) and row["tags"]:
            lib["person"][file_id] = row["tags"]
    lib["png"] = client.upload(alpha_png(), "alpha.png", title=marker)["id"]
    lib["text"] = client.upload(b"minutes of the meeting\n", "notes.txt", title=marker)["id"]
    lib["corrupt"] = client.upload(corrupt_jpeg(coco_images[0]), "broken.jpg", title=marker)["id"]
    lib["images"] = [i for i in lib["coco"] if i != lib["odd"]] + [lib["png"]]
    return lib


def sync_cli(capsys, directus, settings, library, *extra: str) -> tuple[int, dict, str]:
    argv = ["directus", "sync", "--directus-url", directus.url, "--token", directus.token,
            "--filter", json.dumps(library["filter"]), "--max-concepts", str(MAX_CONCEPTS), "--min-value", "0",
            *model_args(settings), *extra]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


@pytest.fixture(scope="module")
def first_sync(directus, settings, library) -> tuple[int, dict, str]:
    """The first `localtag directus sync` of the library (every test that needs a synced library uses it)."""
    argv = ["directus", "sync", "--directus-url", directus.url, "--token", directus.token,
            "--filter", json.dumps(library["filter"]), "--max-concepts", str(MAX_CONCEPTS), "--min-value", "0",
            *model_args(settings)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, json.loads(out.getvalue()), err.getvalue()


def test_sync_tags_the_library_and_reports_the_rest(directus, client, settings, library, first_sync, coco_images):
    rc, summary, err = first_sync
    assert summary["total"] == 128 + 3
    assert summary["tagged"] == len(library["images"]) == 128
    assert summary["skipped_reasons"] == {"not an image": 1, "tags field is not a list": 1}
    assert summary["failed"] == 1 and summary["failures"][0]["id"] == library["corrupt"]
    assert summary["failures"][0]["reason"] in ("corrupt", "not_image")
    assert summary["complete"] and summary["not_reached"] == 0
    assert rc == 1  # a file failed
    assert "tagged 128, skipped 2" in err and "broken.jpg" in err and directus.token not in err

    rows = state(client, [*library["coco"], library["png"], library["text"], library["corrupt"]])
    for file_id in library["images"]:
        assert_consistent(rows[file_id], library["person"].get(file_id, []))
        assert rows[file_id][PROVENANCE_FIELD]["run"] == summary["run"]
        assert 1 <= len(rows[file_id][PROVENANCE_FIELD]["tags"]) <= MAX_CONCEPTS
    assert rows[library["odd"]]["tags"] == {"note": "kept as is"} and rows[library["odd"]][PROVENANCE_FIELD] is None
    for file_id in (library["text"], library["corrupt"]):
        assert rows[file_id]["tags"] is None and rows[file_id][PROVENANCE_FIELD] is None
    # a person's "Dog" is theirs: localtag never adds a second dog, whatever case
    for file_id, person in library["person"].items():
        assert rows[file_id]["tags"][: len(person)] == person
    # the tags are the model's own answer for each photo, computed here from the original bytes
    tagger, encoder = load(settings)
    plain = [(i, f) for i, f in enumerate(library["coco"]) if f != library["odd"] and f not in library["person"]]
    values = tagger.values(encoder.embed([decode(coco_images[i]) for i, _ in plain]))
    for (_, file_id), row in zip(plain, values, strict=True):
        expected = tagger.pick(row, max_concepts=MAX_CONCEPTS)
        prov = rows[file_id][PROVENANCE_FIELD]
        assert prov["tags"] == [t.name for t in expected]
        assert [prov["values"][t.name] for t in expected] == pytest.approx([t.value for t in expected], abs=2e-4)


def test_rerun_skips_done_files_and_retag_keeps_a_persons_tags(capsys, directus, client, settings, library,
                                                               first_sync):
    rc, again, _ = sync_cli(capsys, directus, settings, library)
    assert again["tagged"] == 0 and again["skipped_reasons"]["already tagged"] == 128 and again["failed"] == 0
    assert again["skipped_reasons"][FAILED_BEFORE] == 1 and rc == 0  # the corrupt JPEG, recorded and unchanged
    assert again["files_per_s"] is None  # nothing went through the model: no rate to report

    before = state(client, library["images"])
    a, b, c = [f for f in library["images"] if not library["person"].get(f)][:3]
    a_machine = before[a][PROVENANCE_FIELD]["tags"]
    b_machine = before[b][PROVENANCE_FIELD]["tags"]
    # a person edits: drops a machine tag and adds one of theirs; adds a tag equal to a machine tag
    client.update_file(a, {"tags": ["mine", *a_machine[1:]]})
    client.update_file(b, {"tags": [*b_machine, b_machine[0]]})

    rc, retag, _ = sync_cli(capsys, directus, settings, library, "--retag", "--max-concepts", "1")
    assert retag["tagged"] == 128 and retag["skipped_reasons"] == {"not an image": 1, "tags field is not a list": 1,
                                                                   FAILED_BEFORE: 1}
    after = state(client, library["images"])
    for file_id in library["images"]:
        row = after[file_id]
        person = library["person"].get(file_id, [])
        if file_id == a:
            person = ["mine"]
        elif file_id == b:
            person = [b_machine[0]]
        prov = row[PROVENANCE_FIELD]
        assert prov["run"] == retag["run"]
        assert row["tags"][: len(person)] == person
        assert row["tags"] == person + prov["tags"] and len(set(row["tags"])) == len(row["tags"])
        assert len(prov["tags"]) <= 1  # --retag replaced localtag's own tags, and only those
    assert after[c]["tags"] == before[c][PROVENANCE_FIELD]["tags"][:1] == after[c][PROVENANCE_FIELD]["tags"]
    # the machine tag the person removed is remembered and not written again
    assert after[a][PROVENANCE_FIELD]["rejected"] == [a_machine[0]] and a_machine[0] not in after[a]["tags"]
    # the person's copy of a machine tag is theirs: it stays, and localtag does not claim it
    assert after[b]["tags"][0] == b_machine[0] and b_machine[0] not in after[b][PROVENANCE_FIELD]["tags"]


def test_dry_run_writes_nothing(capsys, directus, client, settings, library, first_sync):
    before = state(client, [*library["images"], library["odd"]])
    rc, summary, err = sync_cli(capsys, directus, settings, library, "--retag", "--dry-run", "--max-concepts", "2")
    assert summary["dry_run"] and summary["tagged"] == 128 and "would tag 128" in err
    assert state(client, [*library["images"], library["odd"]]) == before


def test_wrong_token_stops_with_a_clear_message(capsys, directus, settings, library):
    token = "wrong-" + uuid.uuid4().hex
    rc = cli.main(["directus", "sync", "--directus-url", directus.url, "--token", token, *model_args(settings)])
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert rc == 2 and not summary["complete"] and "refused the token" in summary["stopped"]
    assert "Check the Directus token" in err and token not in out + err


def test_rendition_downloads(directus, client, settings, coco_images):
    """--rendition fetches Directus's resized JPEGs (made once, kept in its storage); a file Directus
    cannot resize falls back to the original, which then fails to decode with its own reason."""
    marker = f"rendition-{uuid.uuid4().hex[:8]}"
    ids = [client.upload(p, title=marker)["id"] for p in coco_images[:4]]
    bad = client.upload(corrupt_jpeg(coco_images[0]), "broken.jpg", title=marker)["id"]
    tagger, encoder = load(settings)
    summary = run_sync(client, tagger, encoder, settings, SyncOptions(filter={"title": {"_eq": marker}}, rendition=96))
    assert summary.tagged == 4 and summary.failed == 1 and summary.failures[0]["id"] == bad
    assert summary.failures[0]["reason"] in ("corrupt", "not_image")  # the original was fetched and decoded
    uploads = directus.workdir / "uploads"
    for file_id in ids:
        assert list(uploads.glob(f"{file_id}__*")), "no rendition was made"
    assert not list(uploads.glob(f"{bad}__*"))


def test_ctrl_c_and_a_killed_directus_lose_nothing_and_duplicate_nothing(directus, settings, coco_images):
    """Ctrl-C after 10 files; then Directus SIGKILLed (another thread) after 10 more; restart; re-run."""
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    filt = {"title": {"_eq": marker}}
    person: dict[str, list[str]] = {}
    with DirectusClient(directus.url, directus.token) as c:
        ids = []
        for i, path in enumerate(coco_images[:48]):
            tags = ["keep me", f"person {i}"] if i % 5 == 0 else None
            fid = c.upload(path, title=marker, **({"tags": tags} if tags else {}))["id"]
            ids.append(fid)
            person[fid] = c.get_file(fid)["tags"] or []  # Directus 12 adds the photo's embedded keywords
    tagger, encoder = load(settings)
    options = SyncOptions(filter=filt, concurrency=4, retry_window=0)  # a dead Directus stops this one

    def interrupt_after(n):
        seen = []

        def on_file(file_id, outcome):
            seen.append(outcome)
            if len(seen) == n:
                raise KeyboardInterrupt
        return on_file

    with DirectusClient(directus.url, directus.token) as c:
        first = run_sync(c, tagger, encoder, settings, options, on_file=interrupt_after(10))
    assert first.interrupted and not first.complete and first.tagged == 10

    killed = threading.Event()
    reached = threading.Event()

    def killer():
        reached.wait(60)
        directus.kill()
        killed.set()

    count = 0

    def on_file(file_id, outcome):
        nonlocal count
        count += 1
        if count == 10:
            reached.set()
            killed.wait(30)  # hold the run here (downloads still in flight) until Directus is really gone

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with DirectusClient(directus.url, directus.token, retries=2, backoff=0.05) as c:
            second = run_sync(c, tagger, encoder, settings, options, on_file=on_file)
    finally:
        thread.join(60)
        directus.restart()
    assert killed.is_set() and second.stopped and "unavailable" in second.stopped
    assert second.tagged >= 10 and second.tagged + first.tagged < 48

    with DirectusClient(directus.url, directus.token) as c:
        third = run_sync(c, tagger, encoder, settings, options)
        rows = state(c, ids)
    assert third.complete and third.failed == 0
    runs = [rows[f][PROVENANCE_FIELD]["run"] for f in ids]
    # every image tagged, by exactly one of the runs: the re-runs skipped whatever was done
    assert runs.count(first.run) + runs.count(second.run) + runs.count(third.run) == 48
    assert runs.count(third.run) == third.tagged
    assert third.skipped_reasons["already tagged"] == runs.count(first.run) + runs.count(second.run)
    assert runs.count(first.run) >= first.tagged and runs.count(second.run) >= second.tagged
    for f in ids:
        assert_consistent(rows[f], person[f])


def test_sync_language_writes_german_tags(capsys, directus, client, settings, cifar_test):
    """`directus sync --language de` (a German site): the cat is tagged "Katze", not "cat"."""
    if settings.vocab is not None:
        pytest.skip("needs the CIFAR fixture model (its vocabulary names the classes in German)")
    marker = f"lang-{uuid.uuid4().hex[:8]}"
    file_id = client.upload(cifar_test["cat"][0].read_bytes(), "katze.jpg", title=marker)["id"]
    argv = ["directus", "sync", "--directus-url", directus.url, f"--token={directus.token}",
            "--filter", json.dumps({"title": {"_eq": marker}}), "--max-concepts", "1", "--min-value", "0",
            "--language", "de", *model_args(settings)]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    row = client.files_by_id([file_id], ["tags", PROVENANCE_FIELD])[file_id]
    assert row["tags"] == ["Katze"], row
