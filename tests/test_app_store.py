"""The app store (localtag.app.store): records, annotations, embeddings, restarts, concurrent processes."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from localtag.app.store import AppStore, NewInput, StoreError

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
