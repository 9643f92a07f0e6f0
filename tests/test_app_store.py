"""The app store (localtag.app.store): records, annotations, embeddings, restarts, concurrent processes."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

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
