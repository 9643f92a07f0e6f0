"""The app store (localtag.app.store): records, annotations, embeddings, restarts, concurrent processes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from localtag.app.api import AppApi
from localtag.app.search import VectorSearch, recall_at
from localtag.app.store import (
    STATUS_FAILED,
    STATUS_IN_PROGRESS,
    STATUS_OK,
    STATUS_PENDING,
    AppStore,
    NewInput,
    StoreError,
)

KEY = "sha|exact|fp32|cpu"


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_add_get_patch_delete_and_restart(tmp_path):
    s = AppStore(tmp_path)
    s.add("me/a", [NewInput("x", data=b"jpeg-bytes", concepts={"dog": 1, "cat": 0}, metadata={"k": {"a": 1}},
                            embedding=_vec(1)),
                   NewInput("y", url="http://h/y.jpg", embedding=_vec(2))], KEY)
    s.add("me/b", [NewInput("x", embedding=_vec(3))], KEY)  # another app: same id is fine
    with pytest.raises(StoreError):
        s.add("me/a", [NewInput("x", embedding=_vec(4))], KEY)
    rec = s.get("me/a", "x")
    assert rec["concepts"] == {"cat": 0, "dog": 1} and rec["metadata"] == {"k": {"a": 1}}
    assert s.read_blob(rec["blob"]) == b"jpeg-bytes"
    assert s.patch("me/a", "x", concepts={"bird": 1}, metadata={"k": {"b": 2}})
    assert s.get("me/a", "x")["metadata"] == {"k": {"a": 1, "b": 2}}
    assert s.patch("me/a", "x", concepts={"dog": 1}, metadata={"k": None}, action="remove")
    assert s.get("me/a", "x")["concepts"] == {"bird": 1, "cat": 0} and s.get("me/a", "x")["metadata"] == {}
    assert s.annotated("me/a", "bird", 1) == {"x"} and s.annotated("me/a", "cat", 0) == {"x"}
    ids, mat = s.matrix("me/a", KEY)
    assert ids == ["x", "y"] and mat.shape == (2, 8)
    blob = s.blob_path(rec["blob"])
    assert s.delete("me/a", ["x", "nope"]) == 1
    assert not blob.exists() and s.get("me/a", "x") is None
    ids, mat = s.matrix("me/a", KEY)  # reloaded: the generation moved
    assert ids == ["y"]
    s.close()
    again = AppStore(tmp_path)  # a restart loses nothing else
    assert again.all_ids("me/a") == ["y"] and again.all_ids("me/b") == ["x"]
    np.testing.assert_array_equal(again.embedding("me/a", "y", KEY), _vec(2))


def test_upsert_updates_in_place_and_never_duplicates(tmp_path):
    """What `directus sync --app` relies on: a rerun replaces annotations and metadata, keeps an embedding
    it is not given, adds only new ids, and counts the cap on new ids only."""
    s = AppStore(tmp_path, max_inputs=3)
    assert s.upsert("me/a", [NewInput("f1", url="http://d/assets/f1", concepts={"mine": 1}, metadata={"title": "a"},
                                      embedding=_vec(1)),
                             NewInput("f2", concepts={"sea": 0}, embedding=_vec(2))], KEY) == (2, 0)
    created = s.get("me/a", "f1")["created"]
    assert s.upsert("me/a", [NewInput("f1", url="http://d/assets/f1", concepts={"boat": 0, "trip": 1},
                                      metadata={"title": "b"}),
                             NewInput("f3", embedding=_vec(3))], KEY) == (1, 1)
    rec = s.get("me/a", "f1")
    assert rec["concepts"] == {"boat": 0, "trip": 1} and rec["metadata"] == {"title": "b"}
    assert rec["created"] == created and rec["modified"] >= created
    ids, mat = s.matrix("me/a", KEY)
    assert ids == ["f1", "f2", "f3"] and s.all_ids("me/a") == ["f1", "f2", "f3"]
    assert s.embedded_ids("me/a", KEY) == {"f1", "f2", "f3"} and s.embedded_ids("me/a", "other") == set()
    np.testing.assert_array_equal(mat[0], _vec(1))  # kept: no embedding was given
    assert s.upsert("me/a", [NewInput("f2", embedding=_vec(9))], KEY) == (0, 1)  # full app: updates still go
    np.testing.assert_array_equal(s.embedding("me/a", "f2", KEY), _vec(9))
    assert s.get("me/a", "f2")["concepts"] == {}
    with pytest.raises(StoreError):
        s.upsert("me/a", [NewInput("f4", embedding=_vec(4))], KEY)
    assert s.count("me/a") == {30000: 3}


def test_limits(tmp_path):
    s = AppStore(tmp_path, max_inputs=2, max_blob_bytes=4)
    with pytest.raises(StoreError, match="blob"):
        s.add("me/a", [NewInput("x", data=b"12345")], KEY)
    s.add("me/a", [NewInput("x"), NewInput("y")], KEY)
    with pytest.raises(StoreError, match="limit"):
        s.add("me/a", [NewInput("z")], KEY)
    assert s.all_ids("me/a") == ["x", "y"]


def _writer(root: str, n: int, start) -> None:
    start.wait()
    s = AppStore(root)
    for i in range(50):
        s.add("me/a", [NewInput(f"p{n}-{i}", data=f"{n}-{i}".encode(), concepts={"c": i % 2},
                                embedding=_vec(n * 100 + i))], KEY)
        if i % 10 == 9:
            s.patch("me/a", f"p{n}-{i}", metadata={"w": n})
            s.delete("me/a", [f"p{n}-{i - 1}"])


def test_concurrent_processes_never_corrupt(tmp_path):
    AppStore(tmp_path).close()
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), n, start)) for n in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    s = AppStore(tmp_path)
    assert sqlite3.connect(tmp_path / "app.sqlite3").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids, mat = s.matrix("me/a", KEY)
    assert len(s.all_ids("me/a")) == 4 * 45 == len(ids) == mat.shape[0]
    assert s.get("me/a", "p2-19")["metadata"] == {"w": 2} and s.get("me/a", "p2-18") is None


# -- the vector index past the exact-search threshold (localtag.app.search.VectorSearch) -----------------------

def _rows(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _fill(store: AppStore, app: str, mat: np.ndarray, start: int = 0) -> None:
    store.add(app, [NewInput(f"i{start + n}", embedding=v, concepts={"even": 1} if (start + n) % 2 == 0 else {})
                    for n, v in enumerate(mat)], KEY)


def _api(store: AppStore, vectors: VectorSearch) -> AppApi:
    def no_encoder(*args):
        raise AssertionError("these searches rank by input id: no encoder")

    return AppApi(store, KEY, no_encoder, no_encoder, no_encoder, vectors=vectors)


def _search(api: AppApi, app: str, input_id: str, k: int = 10, filters: list | None = None) -> list[tuple[str, float]]:
    query: dict = {"ranks": [{"annotation": {"input_id": input_id}}]}
    if filters:
        query["filters"] = filters
    code, body = asyncio.run(api.search(app, {"query": query, "pagination": {"page": 1, "per_page": k}}))
    assert code == 200, body
    return [(h["input"]["id"], h["score"]) for h in body["hits"]]


def _recall(found: list[list[tuple[str, float]]], truth: list[list[tuple[str, float]]]) -> float:
    return recall_at([[i for i, _ in f] for f in found], [[i for i, _ in t] for t in truth])


def test_index_search_recall_and_shape(tmp_path):
    """Past ``min_rows`` the app searches the PQ index: recall@10 against exact search ≥ 0.95, with and
    without a concept filter, and hits in the shape and with the scores of exact search."""
    store = AppStore(tmp_path)
    _fill(store, "me/a", _rows(3000))
    vectors = VectorSearch(tmp_path / "index", min_rows=1000)
    ann, exact = _api(store, vectors), _api(store, VectorSearch(None, min_rows=10**9))
    queries = [f"i{n}" for n in range(0, 3000, 75)]
    found = [_search(ann, "me/a", q) for q in queries]
    truth = [_search(exact, "me/a", q) for q in queries]
    assert list((tmp_path / "index").glob("*.npz")), "the index path did not run"
    assert _recall(found, truth) >= 0.95
    for q, f, t in zip(queries, found, truth, strict=True):
        assert len(f) == 10 and f[0] == (q, pytest.approx(1.0))
        scores = dict(t)
        assert all(s == pytest.approx(scores[i], abs=1e-6) for i, s in f if i in scores)
        assert [s for _, s in f] == sorted((s for _, s in f), reverse=True)
    even = [{"annotation": {"data": {"concepts": [{"id": "even", "value": 1}]}}}]
    found = [_search(ann, "me/a", q, filters=even) for q in queries]
    truth = [_search(exact, "me/a", q, filters=even) for q in queries]
    assert all(int(i[1:]) % 2 == 0 for f in found for i, _ in f)
    assert _recall(found, truth) >= 0.95


def test_index_never_returns_deleted_inputs_and_follows_changes(tmp_path):
    """A deleted input never comes back, an id added again with another vector is found by its new vector,
    the index file survives a restart, and a large drift rebuilds it."""
    store = AppStore(tmp_path)
    _fill(store, "me/a", _rows(3000))
    vectors = VectorSearch(tmp_path / "index", min_rows=1000)
    api = _api(store, vectors)
    queries = [f"i{n}" for n in range(0, 3000, 150)]
    before = [_search(api, "me/a", q) for q in queries]
    (index_file,) = (tmp_path / "index").glob("*.npz")
    built = index_file.stat().st_mtime_ns
    deleted = {i for hits in before for i, _ in hits[1:4]}  # each query's next three neighbours
    assert store.delete("me/a", deleted) == len(deleted)

    exact = _api(store, VectorSearch(None, min_rows=10**9))
    after = [_search(api, "me/a", q) for q in queries]
    assert not deleted & {i for hits in after for i, _ in hits}
    assert _recall(after, [_search(exact, "me/a", q) for q in queries]) >= 0.95
    assert index_file.stat().st_mtime_ns == built  # 2 % gone: the snapshot still serves

    # an id deleted and added again with the vector of i0 is found next to i0 (its old code is stale)
    again = sorted(deleted)[0]
    store.add("me/a", [NewInput(again, embedding=store.embedding("me/a", "i0", KEY))], KEY)
    assert {i for i, _ in _search(api, "me/a", "i0")[:2]} == {"i0", again}

    store.close()
    store = AppStore(tmp_path)  # a restart: the index file is read back, not rebuilt
    api = _api(store, VectorSearch(tmp_path / "index", min_rows=1000))
    after = [_search(api, "me/a", q) for q in queries]
    assert not (deleted - {again}) & {i for hits in after for i, _ in hits}
    assert index_file.stat().st_mtime_ns == built

    _fill(store, "me/a", _rows(400, seed=1), start=3000)  # 13 % new rows: rebuilt, and they are found
    assert _search(api, "me/a", "i3001")[0] == ("i3001", pytest.approx(1.0))
    assert index_file.stat().st_mtime_ns != built


def test_worker_queue_claim_finish_requeue_and_a_deletion_meanwhile(tmp_path):
    s = AppStore(tmp_path)
    s.add("me/a", [NewInput("p1", data=b"one", status=STATUS_PENDING),
                   NewInput("p2", url="http://h/2.jpg", status=STATUS_PENDING),
                   NewInput("done", data=b"zero", embedding=_vec(9))], KEY)
    assert s.count("me/a") == {STATUS_PENDING: 2, STATUS_OK: 1}
    taken = s.claim(10)
    assert [t["id"] for t in taken] == ["p1", "p2"] and s.count("me/a")[STATUS_IN_PROGRESS] == 2
    assert s.claim(10) == []  # nothing is taken twice
    s.close()
    again = AppStore(tmp_path)  # a crash mid-work: the restart puts them back
    assert again.requeue() == 2 and again.count("me/a")[STATUS_PENDING] == 2
    taken = again.claim(10)
    digest = again.put_blob(b"fetched bytes of 2")
    again.delete("me/a", ["p2"])  # deleted while in progress
    again.finish("me/a", [NewInput("p1", status=STATUS_OK, embedding=_vec(1), blob=taken[0]["blob"]),
                          NewInput("p2", status=STATUS_OK, embedding=_vec(2), blob=digest)], KEY)
    assert again.get("me/a", "p2") is None and not again.blob_path(digest).exists()
    assert again.get("me/a", "p1")["status"] == STATUS_OK
    ids, _ = again.matrix("me/a", KEY)
    assert sorted(ids) == ["done", "p1"]


def test_post_inputs_answers_pending_and_the_worker_processes_them(tmp_path):
    """AppApi over a real store; the encoder is a fixed function of the bytes (the live-server tests use the
    real one): PostInputs answers at once, searches see only what the worker has processed."""
    import asyncio
    import base64

    from localtag.app.api import AppApi
    from localtag.core.errors import ImageError

    def embed_images(datas):
        return [ImageError("not_image", "not an image") if d == b"bad" else _vec(len(d)) for d in datas]

    async def fetch(url):
        raise ImageError("not_found", f"{url}: HTTP 404")

    api = AppApi(AppStore(tmp_path), KEY, embed_images, lambda t: _vec(0), fetch)
    b64 = [base64.b64encode(x).decode() for x in (b"img-1", b"img-22", b"bad")]
    body = {"inputs": [{"id": f"i{n}", "data": {"image": {"base64": b}}} for n, b in enumerate(b64)]
            + [{"id": "u", "data": {"image": {"url": "http://example.com/x.jpg"}}}]}

    async def scenario():
        status, out = await api.post_inputs("me/a", body)
        assert status == 200 and out["status"]["code"] == 10000
        assert [i["status"]["code"] for i in out["inputs"]] == [STATUS_PENDING] * 4
        assert api.count("me/a")[1]["counts"] == {"processed": 0, "to_process": 4, "errors": 0, "processing": 0}
        everything = {"query": {"filters": [{"annotation": {"data": {"metadata": {}}}}]}}
        assert (await api.search("me/a", everything))[1]["hits"] == []
        ranked = {"query": {"ranks": [{"annotation": {"data": {"text": {"raw": "x"}}}}]}}
        assert (await api.search("me/a", ranked))[1]["hits"] == []
        assert await api.worker.round() == 4
        assert api.count("me/a")[1]["counts"] == {"processed": 2, "to_process": 0, "errors": 2, "processing": 0}
        assert {h["input"]["id"] for h in (await api.search("me/a", ranked))[1]["hits"]} == {"i0", "i1"}
        failed = {i: api.get_input("me/a", i)[1]["input"]["status"] for i in ("i2", "u")}
        assert failed["i2"]["code"] == STATUS_FAILED and "not an image" in failed["i2"]["details"]
        assert failed["u"]["code"] == STATUS_FAILED and "404" in failed["u"]["details"]

    asyncio.run(scenario())
