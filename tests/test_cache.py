"""The embedding cache (real SQLite files, real processes) and `localtag retag`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from localtag import cli
from localtag.core.cache import FILENAME, CacheError, EmbeddingCache
from localtag.core.encoder import ImageEncoder

MODEL_A = "a" * 64
MODEL_B = "b" * 64


def _digest(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def _unit(rng, n: int, dim: int = 64) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_round_trip_is_exact_in_float32_and_keyed_by_model(tmp_path):
    rng = np.random.default_rng(0)
    embs = _unit(rng, 50)
    a = EmbeddingCache(tmp_path, MODEL_A)
    a.put_many([(_digest(i), embs[i]) for i in range(50)])
    assert len(a) == 50 and a.path == tmp_path / FILENAME
    assert np.array_equal(a.get(_digest(7)), embs[7]) and a.get(_digest(7)).dtype == np.float32
    assert a.get(_digest(999)) is None
    assert EmbeddingCache(tmp_path, MODEL_B).get(_digest(7)) is None  # other weights, other embeddings
    got, found = a.get_many([_digest(3), _digest(999), _digest(0)])
    assert found.tolist() == [True, False, True]
    assert np.array_equal(got[[0, 2]], embs[[3, 0]]) and not got[1].any()
    assert sorted(a.digests()) == sorted(_digest(i) for i in range(50))
    a.put_many([(_digest(7), embs[8])])  # replacing keeps one row
    assert len(a) == 50 and np.array_equal(a.get(_digest(7)), embs[8])


def test_float16_halves_the_size_and_keeps_values_close(tmp_path):
    rng = np.random.default_rng(1)
    embs = _unit(rng, 10, 512)
    c = EmbeddingCache(tmp_path, MODEL_A, dtype="float16")
    c.put_many([(_digest(i), embs[i]) for i in range(10)])
    blob = sqlite3.connect(c.path).execute("SELECT vec FROM embeddings LIMIT 1").fetchone()[0]
    assert len(blob) == 512 * 2
    got, _ = EmbeddingCache(tmp_path, MODEL_A).get_many([_digest(i) for i in range(10)])  # dtype is per model
    assert np.abs(got - embs).max() < 1e-3 and not np.array_equal(got, embs)


def test_another_dimension_is_refused(tmp_path):
    c = EmbeddingCache(tmp_path, MODEL_A)
    c.put_many([(_digest(0), np.ones(8, dtype=np.float32))])
    with pytest.raises(CacheError, match="8-d"):
        c.put_many([(_digest(1), np.ones(16, dtype=np.float32))])


def test_a_corrupt_file_is_set_aside_and_a_new_cache_started(tmp_path):
    (tmp_path / FILENAME).write_bytes(b"not a database, just garbage bytes " * 100)
    c = EmbeddingCache(tmp_path, MODEL_A)
    c.put_many([(_digest(0), np.ones(4, dtype=np.float32))])
    assert len(c) == 1
    assert [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]


_WRITER = """
import sys, hashlib, numpy as np
from localtag.core.cache import EmbeddingCache
c = EmbeddingCache(sys.argv[1], "a" * 64)
start, batches, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
v = np.full(256, 0.5, dtype=np.float32)
for b in range(batches):
    c.put_many([(hashlib.sha256(f"image {start + b * size + i}".encode()).hexdigest(), v) for i in range(size)])
    print(b, flush=True)
"""


def test_concurrent_readers_and_writers_in_threads_and_processes(tmp_path):
    c = EmbeddingCache(tmp_path, MODEL_A)
    c.put_many([(_digest(i), np.full(256, 0.5, dtype=np.float32)) for i in range(100)])
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(1000 * (k + 1)), "20", "50"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(2)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                got, found = c.get_many([_digest(i) for i in range(100)])
                assert found.all() and np.all(got == 0.5)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def writer() -> None:
        try:
            for b in range(20):
                c.put_many([(_digest(5000 + b * 50 + i), np.full(256, 0.5, dtype=np.float32)) for i in range(50)])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    threads[-1].join(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(c) == 100 + 2 * 1000 + 1000


def test_a_killed_writer_leaves_whole_batches_and_a_sound_file(tmp_path):
    EmbeddingCache(tmp_path, MODEL_A)
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), "0", "100000", "100"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(5):  # let a few batches commit, then kill it in the middle of its loop
        assert p.stdout.readline(), p.stderr.read()
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    c = EmbeddingCache(tmp_path, MODEL_A)
    n = len(c)
    assert n >= 500 and n % 100 == 0  # every batch is all or nothing
    assert sqlite3.connect(c.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- retag -----------------------------------------------------------------------------------------
@pytest.fixture()
def library(coco_images, tmp_path):
    folder = tmp_path / "library"
    folder.mkdir()
    for f in coco_images[:10]:
        (folder / f.name).write_bytes(f.read_bytes())
    old = tmp_path / "old.txt"
    old.write_text("cat\ndog\nperson\n")
    new = tmp_path / "new.txt"
    new.write_text("person | threshold=0.2\nbus\ntrain\npizza\nbroccoli | syn=vegetable\nzebra\nkite\n")
    return folder, old, new


def spy_on_image_tower(monkeypatch) -> list[int]:
    """Record the batch size of every run of the image tower (ImageEncoder.forward: CPU and CUDA alike)."""
    calls: list[int] = []
    real = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, x: calls.append(len(x)) or real(self, x))
    return calls


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_retag_gives_the_tags_of_a_fresh_run_without_the_image_model(library, random_store, tmp_path, capsys,
                                                                     monkeypatch):
    folder, old, new = library
    common = ["--models-dir", str(random_store), "--model", "tiny-random", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--max-concepts", "4"]
    code, _ = _cli(capsys, "tag", str(folder), "--vocab", str(old), "--jsonl", *common)
    assert code == 0
    code, fresh = _cli(capsys, "tag", str(folder), "--vocab", str(new), "--jsonl", "--no-cache", *common)
    assert code == 0

    calls = spy_on_image_tower(monkeypatch)
    code, retagged = _cli(capsys, "retag", str(folder), "--vocab", str(new), "--jsonl", *common)
    assert code == 0 and calls == []

    def concepts(out: str) -> list:
        rows = [json.loads(line) for line in out.splitlines()]
        return [(o["input"]["id"], [(c["id"], c["name"], round(c["value"], 6)) for c in o["data"]["concepts"]])
                for o in rows]

    assert concepts(retagged) == concepts(fresh)
    assert len(concepts(fresh)) == 10 and all(c for _, c in concepts(fresh))
    assert {n for _, cs in concepts(fresh) for _, n, _ in cs} <= {"person", "bus", "train", "pizza", "broccoli",
                                                                  "zebra", "kite"}

    code, whole = _cli(capsys, "retag", str(folder), "--vocab", str(new), "--json", *common)
    doc = json.loads(whole)
    assert code == 0 and len(doc["outputs"]) == 10 and doc["status"]["code"] == 10000


def test_retag_reports_uncached_content_and_can_embed_it(library, random_store, tmp_path, capsys):
    folder, old, new = library
    common = ["--models-dir", str(random_store), "--model", "tiny-random", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"), "--vocab", str(new)]
    files = sorted(folder.iterdir())
    assert _cli(capsys, "tag", *map(str, files[:6]), *common)[0] == 0
    files[1].write_bytes(files[7].read_bytes() + b"\0")  # same name, new content: not cached

    code, out = _cli(capsys, "retag", str(folder), *common)
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    assert code == 1
    errors = sorted(k for k, v in lines.items() if v.startswith("ERROR"))
    assert errors == sorted(str(f) for f in [files[1], *files[6:]])
    assert "not in the embedding cache" in lines[str(files[1])]

    code, out = _cli(capsys, "retag", str(folder), "--embed-missing", *common)
    assert code == 0 and "ERROR" not in out and len(out.splitlines()) == 10
    code, again = _cli(capsys, "retag", str(folder), *common)  # now everything is cached
    assert code == 0 and again == out


def test_variants_never_share_entries(tmp_path):
    """Preprocessing, precision actually used and device kind each have their own entries; so do the
    bare-sha256 entries of older localtags, which are never served."""
    import numpy as np

    from localtag.core.cache import cache_key

    sha = "ab" * 32
    keys = [cache_key(sha), cache_key(sha, preprocess="draft"), cache_key(sha, preprocess="device", device="cuda"),
            cache_key(sha, precision="bf16"), cache_key(sha, device="cuda"), cache_key(sha, precision="int8")]
    assert len(set(keys)) == len(keys)
    old = EmbeddingCache(tmp_path, sha)  # localtag before issue 15: one entry for every precision
    old.put_many([("d" * 64, np.ones(4, np.float32))])
    assert all(EmbeddingCache(tmp_path, k).get("d" * 64) is None for k in keys)


def test_retag_fast_reads_and_fills_the_fast_entries(library, random_store, tmp_path, capsys, monkeypatch):
    """`tag --fast` then `retag --fast` gives the same tags from the cache; `retag --fast --embed-missing`
    stores draft-decoded embeddings under the fast key, never the exact one."""
    from localtag.core.cache import EmbeddingCache, cache_key
    from localtag.core.models import ModelStore

    folder, old, new = library
    files = sorted(folder.iterdir())
    cache = tmp_path / "cache"
    common = ["--models-dir", str(random_store), "--model", "tiny-random", "--device", "cpu", "--fast",
              "--precision", "fp32", "--cache-dir", str(cache), "--vocab", str(new), "--jsonl"]
    code, tagged = _cli(capsys, "tag", *map(str, files[:6]), *common)
    assert code == 0
    calls = spy_on_image_tower(monkeypatch)
    code, retagged = _cli(capsys, "retag", *map(str, files[:6]), *common)
    assert code == 0 and calls == []  # everything came from the --fast entries
    strip = [{k: v for k, v in json.loads(line).items() if k not in ("id", "created_at")}
             for line in tagged.splitlines()]
    assert [{k: v for k, v in json.loads(line).items() if k not in ("id", "created_at")}
            for line in retagged.splitlines()] == strip

    code, _ = _cli(capsys, "retag", str(folder), "--embed-missing", *common)
    assert code == 0 and sum(calls) == 4  # the 4 files `tag` never saw
    sha = ModelStore(random_store).resolve("tiny-random").sha256
    assert len(EmbeddingCache(cache, cache_key(sha, preprocess="draft"))) == 10
    assert len(EmbeddingCache(cache, cache_key(sha))) == 0
