"""`localtag directus sync --app` and `localtag directus search` against the real Directus; no mocks.

A library of real CIFAR-10 test JPEGs (12 ships among 24 cats, trucks and frogs); some carry a person's
tags. The sync fills an app of the app store with the embeddings it computed (equal to the embedding
cache's), person tags as positive annotations and the machine tags a person deleted as negative ones;
a rerun updates and never duplicates; a text search for "ship" answers ship file ids and titles first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import uuid

import httpx
import numpy as np
import pytest
from directus_harness import DirectusClient
from test_directus_sync import model_args

from localtag import cli
from localtag.app.store import AppStore, app_key
from localtag.core.cache import cache_key, open_embedding_cache
from localtag.core.config import Settings
from localtag.core.loader import load
from localtag.directus.app_fill import annotations
from localtag.directus.tag_merge import PROVENANCE_FIELD

pytestmark = pytest.mark.directus

CLASSES = {"ship": 12, "cat": 8, "truck": 8, "frog": 8}
APP = "library"


@pytest.fixture(scope="module")
def settings(fixture_model, tmp_path_factory) -> Settings:
    tmp = tmp_path_factory.mktemp("dapp")
    return Settings(model=str(fixture_model), cache_dir=tmp / "cache", device="cpu", batch_size=16, workers=2)


@pytest.fixture(scope="module")
def client(directus):
    with DirectusClient(directus.url, directus.token) as c:
        yield c


@pytest.fixture(scope="module")
def library(client, cifar_test) -> dict:
    marker = f"dapp-{uuid.uuid4().hex[:8]}"
    lib: dict = {"filter": {"title": {"_starts_with": marker}}, "class": {}, "path": {}, "person": {}, "title": {}}
    for cls, n in CLASSES.items():
        for i, path in enumerate(cifar_test[cls][:n]):
            extra = {"tags": ["harbour trip", "2019"]} if (cls, i) == ("ship", 0) else \
                {"tags": ["Whiskers"]} if (cls, i) == ("cat", 0) else {}
            row = client.upload(path, f"{cls}-{path.name}", title=f"{marker} {cls} {i}", **extra)
            lib["class"][row["id"]] = cls
            lib["path"][row["id"]] = path
            lib["title"][row["id"]] = f"{marker} {cls} {i}"
            if extra:
                lib["person"][row["id"]] = extra["tags"]
    return lib


def sync(directus, settings, library, *extra: str) -> tuple[int, dict]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["directus", "sync", "--directus-url", directus.url, "--token", directus.token, "--filter",
            json.dumps(library["filter"]), "--min-value", "0", "--max-concepts", "3", "--cache",
            *model_args(settings), *extra]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    assert directus.token not in err.getvalue()
    return rc, json.loads(out.getvalue())


def search(settings, *args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["directus", "search", *args, "--json", *model_args(settings)]) == 0
    return json.loads(out.getvalue())


def app_state(settings) -> tuple[AppStore, str, str]:
    store = AppStore(settings.resolved_app_dir())
    tagger, encoder = load(settings)
    return store, app_key(None, APP), cache_key(tagger.info.sha256, **encoder.variant(False))


def test_annotations_rule():
    prov = {"tags": ["sea", "boat", "sky"], "rejected": ["cat"]}
    # "boat" gone from the file: a person deleted it; "sea" held twice: the person's copy stays theirs
    assert annotations(["sea", "mine", "sky", "sea"], prov) == {"cat": 0, "boat": 0, "sea": 1, "mine": 1}
    assert annotations({"not": "a list"}, prov) == {"cat": 0}
    assert annotations(["x"], None) == {"x": 1}


def test_sync_fills_the_app_and_search_answers_ships(directus, client, settings, library, cifar_test):
    ids = list(library["class"])
    # the library was tagged before any app: `sync --app` embeds those files for the app, tags nothing again
    rc, first = sync(directus, settings, library)
    assert rc == 0 and first["tagged"] == len(ids) and "app" not in first
    before = client.files_by_id(ids, ["tags", PROVENANCE_FIELD])
    rc, filled = sync(directus, settings, library, "--app", APP)
    assert rc == 0 and filled["tagged"] == 0 and filled["skipped_reasons"] == {"already tagged": len(ids)}
    assert filled["app"]["added"] == len(ids) and filled["app"]["updated"] == 0 and filled["app"]["errors"] == 0
    assert client.files_by_id(ids, ["tags", PROVENANCE_FIELD]) == before  # nothing written to Directus

    store, app, key = app_state(settings)
    assert store.count(app) == {30000: len(ids)}
    held, matrix = store.matrix(app, key)
    assert sorted(held) == sorted(ids)
    tagger, encoder = load(settings)
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder)
    for file_id, vec in zip(held, matrix, strict=True):  # the embeddings the sync computed: the cache's
        cached = cache.get(hashlib.sha256(library["path"][file_id].read_bytes()).hexdigest())
        assert cached is not None and np.array_equal(vec, cached)
    records = store.records(app, ids)
    for file_id in ids:
        rec = records[file_id]
        assert rec["concepts"] == {t: 1 for t in library["person"].get(file_id, [])}
        assert rec["metadata"]["title"] == library["title"][file_id]
        assert rec["metadata"]["filename"] == f"{library['class'][file_id]}-{library['path'][file_id].name}"
        assert rec["url"] == f"{directus.url}/assets/{file_id}"

    # a person edits: drops a machine tag of one ship and adds a tag of theirs; uploads one more ship
    ship = next(i for i in ids if library["class"][i] == "ship" and i not in library["person"])
    machine = before[ship][PROVENANCE_FIELD]["tags"]
    client.update_file(ship, {"tags": ["boat trip", *machine[1:]]})
    new = client.upload(cifar_test["ship"][15], "ship-new.jpg", title=library["filter"]["title"]["_starts_with"]
                        + " ship new")["id"]
    rc, again = sync(directus, settings, library, "--app", APP)
    assert rc == 0 and again["tagged"] == 1 and again["app"]["added"] == 1 and again["app"]["updated"] == len(ids)
    assert store.count(app) == {30000: len(ids) + 1}  # updated in place, never duplicated
    assert store.get(app, ship)["concepts"] == {"boat trip": 1, machine[0]: 0}
    held2, matrix2 = store.matrix(app, key)
    assert np.array_equal(matrix2[[held2.index(i) for i in held]], matrix)  # kept, not downloaded again

    # --retag records the deletion as `rejected`; the app keeps it as a negative annotation
    rc, retag = sync(directus, settings, library, "--app", APP, "--retag")
    after = client.files_by_id([*ids, new], ["tags", PROVENANCE_FIELD])
    assert rc == 0 and retag["tagged"] == len(ids) + 1 and retag["app"]["updated"] == len(ids) + 1
    assert machine[0] in after[ship][PROVENANCE_FIELD]["rejected"]
    assert store.get(app, ship)["concepts"] == {"boat trip": 1, machine[0]: 0}
    assert store.count(app) == {30000: len(ids) + 1}
    for file_id, person in {**library["person"], ship: ["boat trip"]}.items():  # a person's tags unchanged
        assert after[file_id]["tags"][: len(person)] == person
        assert store.get(app, file_id)["concepts"] == {t: 1 for t in person} | \
            {t: 0 for t in after[file_id][PROVENANCE_FIELD].get("rejected", [])}

    # `directus search`: Directus file ids and titles, ships first
    ships = {i for i, c in library["class"].items() if c == "ship"} | {new}
    hits = search(settings, "ship", "--app", APP)["hits"]
    print("ship:", sum(h["id"] in ships for h in hits), [h["title"] for h in hits])
    assert len(hits) == 10 and sum(h["id"] in ships for h in hits) >= 7
    assert all(set(h) == {"id", "score", "title", "filename"} and 0 <= h["score"] <= 1 for h in hits)
    assert hits[0]["title"].startswith(library["filter"]["title"]["_starts_with"])
    image = search(settings, "--image", str(cifar_test["ship"][16]), "--app", APP, "--limit", "5")["hits"]
    print("image:", sum(h["id"] in ships for h in image))
    assert len(image) == 5 and sum(h["id"] in ships for h in image) >= 4

    # `localtag serve` answers the same search (PostInputsSearches), and narrows it by a person's tag
    from live_server import LiveServer

    url = "/v2/users/me/apps/" + APP + "/inputs/searches"
    text = {"annotation": {"data": {"text": {"raw": "ship"}}}}
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.base, timeout=60) as http:
        served = http.post(url, json={"query": {"ranks": [text]}, "pagination": {"per_page": 10}}).json()
        assert served["status"]["code"] == 10000
        assert [h["input"]["id"] for h in served["hits"]] == [h["id"] for h in hits]
        assert served["hits"][0]["input"]["data"]["metadata"]["title"] == hits[0]["title"]
        mine = {"annotation": {"data": {"concepts": [{"name": "harbour trip", "value": 1}]}}}
        narrowed = http.post(url, json={"query": {"ranks": [text], "filters": [mine]}}).json()
        assert [h["input"]["id"] for h in narrowed["hits"]] == [i for i, t in library["person"].items()
                                                                  if "harbour trip" in t]
