"""`localtag batch` on the local engine: planning, resume, sources, bad items, export, rescore.

Real JPEGs (the COCO photos), the trained CIFAR fixture model, a real HTTP server and a real
S3-compatible server (moto) on 127.0.0.1. The Ray engine is in test_batch_ray.py.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_helpers import assert_complete_once, batch, committed_rows, http_server, model_args, tags_by_id

from localtag import cli
from localtag.batch.store import RunStore

NEW_VOCAB = "cat\ndog\nship\ntruck\nhorse\nperson\n"


@pytest.fixture(scope="module")
def margs(fixture_model, cache_dir) -> list[str]:
    return model_args(fixture_model, cache_dir)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, margs, coco_images):
    """The 128 COCO photos from their folder, shards of 40 (4 shards, the last one short)."""
    out = tmp_path_factory.mktemp("folder") / "run"
    code = cli.main(["batch", "run", str(coco_images[0].parent), "--out", str(out), "--shard-size", "40", *margs])
    assert code == 0
    return out


def by_sha(run_dir: Path) -> dict[str, list]:
    store = RunStore(run_dir)
    out = {}
    for m in store.committed(store.read_run()["shards"]):
        for r in store.read_shard(m, ["sha256", "concepts"]).to_pylist():
            out[r["sha256"]] = [(c["id"], c["value"]) for c in r["concepts"] or ()]
    return out


def test_run_commits_every_shard_and_rows_carry_everything(folder_run, coco_images, fixture_tagger):
    assert_complete_once(folder_run)
    store = RunStore(folder_run)
    run = store.read_run()
    assert (run["items"], run["shards"]) == (128, 4)
    assert run["fingerprint"]["model_sha256"] == fixture_tagger.info.sha256
    t = pq.read_table(store.shards_dir / store.marker(3)["file"])
    etype = t.schema.field("embedding").type
    assert t.num_rows == 8 and etype.value_type == pa.float32()
    assert etype.list_size == fixture_tagger.info.model_cfg["embed_dim"]
    row = t.slice(0, 1).to_pylist()[0]
    import hashlib

    import numpy as np

    src = Path(row["uri"])
    assert src == coco_images[120] and row["id"] == str(src)
    assert row["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    emb = np.array(row["embedding"], dtype=np.float32)
    assert abs(float(np.linalg.norm(emb)) - 1) < 1e-5
    # the stored tags are the tagger's own for the stored embedding. Not bit for bit: the run scored a
    # whole batch, this one row alone, and a matrix product's sums are blocked differently for 1 row
    # and for many (and per CPU kind: 2e-7 on a Xeon with AMX). 1e-6 absolute is ~8 float32 ulps of 1.
    want = fixture_tagger.pick(fixture_tagger.values(emb[None])[0], max_concepts=20)
    assert [(c["id"], c["value"]) for c in row["concepts"]] == [(w.id, pytest.approx(w.value, rel=0, abs=1e-6))
                                                                  for w in want]


def test_batch_and_tag_name_a_symlinked_image_alike(tmp_path, margs, coco_images, capsys):
    """One rule (issue 15): symlinks are never resolved. A folder reached through a symlink, and a
    symlink to an image, keep the names they were found under, in `batch` (absolute) and in `tag`."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(coco_images[0].read_bytes())
    (tmp_path / "link").symlink_to(real)
    (real / "b.jpg").symlink_to(coco_images[1])
    code, _ = batch(capsys, "run", str(tmp_path / "link"), "--out", str(tmp_path / "run"), *margs)
    assert code == 0
    ids = sorted(r["id"] for r in committed_rows(tmp_path / "run"))
    want = [str(tmp_path / "link" / "a.jpg"), str(tmp_path / "link" / "b.jpg")]
    assert ids == want and sorted(r["uri"] for r in committed_rows(tmp_path / "run")) == want
    capsys.readouterr()
    assert cli.main(["tag", str(tmp_path / "link"), "--jsonl", "--no-cache", *margs]) == 0
    assert sorted(json.loads(ln)["input"]["id"] for ln in capsys.readouterr().out.splitlines()) == want


def test_export_is_what_tag_jsonl_says(folder_run, margs, coco_images, capsys):
    code, text = batch(capsys, "export", str(folder_run), "--format", "jsonl")
    assert code == 0
    exported = [json.loads(line) for line in text.splitlines()]
    assert [o["input"]["id"] for o in exported] == [str(p) for p in coco_images]
    capsys.readouterr()
    assert cli.main(["tag", *map(str, coco_images), "--jsonl", "--no-cache", *margs]) == 0
    tagged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(exported, tagged, strict=True):
        assert a["input"] == b["input"] and a["model"] == b["model"] and a["status"] == b["status"]
        assert a["data"] == b["data"]

    code, text = batch(capsys, "export", str(folder_run), "--format", "clarifai")
    assert text["status"]["code"] == 10000 and len(text["outputs"]) == 128
    out = folder_run.parent / "all.parquet"
    assert batch(capsys, "export", str(folder_run), "--format", "parquet", "-o", str(out))[0] == 0
    assert pq.read_table(out).num_rows == 128


def test_rerun_resumes_only_what_is_missing_and_refuses_another_fingerprint(folder_run, margs, capsys, caplog,
                                                                            tmp_path):
    src = str(Path(RunStore(folder_run).read_run()["plan_key"]["sources"][0]))
    code, out = batch(capsys, "run", src, "--out", str(folder_run), "--shard-size", "40", *margs)
    assert code == 0 and out["this_run"]["shards_committed"] == 0 and out["complete"]
    # shard 2 as if its worker had died before the commit: no marker, only debris
    store = RunStore(folder_run)
    m = store.marker(2)
    (store.shards_dir / m["file"]).rename(store.shards_dir / "000002.deadbeef0000.parquet")
    store.marker_path(2).unlink()
    code, out = batch(capsys, "status", str(folder_run))
    assert code == 2 and "3 of 4 committed" in out
    code, out = batch(capsys, "run", src, "--out", str(folder_run), "--shard-size", "40", *margs)
    assert code == 0 and out["this_run"]["shards_committed"] == 1 and out["this_run"]["items"] == 40
    lines = store.manifest.read_text().splitlines()
    assert [json.loads(line)["shard"] for line in lines].count(2) == 2  # committed again after the loss
    store.manifest.write_text("".join(line + "\n" for line in lines if json.loads(line)["attempt"] != m["attempt"]))
    assert_complete_once(folder_run)

    vocab = tmp_path / "other.txt"
    vocab.write_text(NEW_VOCAB)
    with caplog.at_level(logging.ERROR):
        code, _ = batch(capsys, "run", src, "--out", str(folder_run), "--shard-size", "40", *margs,
                        "--vocab", str(vocab))
    assert code == 2 and "another fingerprint" in caplog.text and "vocab_sha256" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code, _ = batch(capsys, "run", src, "--out", str(folder_run), "--shard-size", "30", *margs)
    assert code == 2 and "shard_size" in caplog.text


def corrupt_copy(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[:700] + b"\x00" * 50)
    return dest


def test_bad_items_are_error_rows_and_the_run_finishes(tmp_path, margs, coco_images, capsys, monkeypatch):
    web = tmp_path / "web"
    web.mkdir()
    (web / "ok.jpg").write_bytes(coco_images[5].read_bytes())
    bad = corrupt_copy(coco_images[6], tmp_path / "corrupt.jpg")
    with http_server(web) as port:
        monkeypatch.setenv("LOCALTAG_ALLOW_HOSTS", json.dumps([f"127.0.0.1:{port}"]))
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
        closed.close()
        entries = {
            str(coco_images[0]): ("ok", None),
            str(bad): ("error", "corrupt"),
            str(tmp_path / "missing.jpg"): ("error", "not_found"),
            f"http://127.0.0.1:{port}/ok.jpg": ("ok", None),
            f"http://127.0.0.1:{port}/nothing-here.jpg": ("error", "not_found"),
            f"http://127.0.0.1:{refused_port}/private.jpg": ("error", "url_refused"),  # not allowed: loopback
            "http://10.1.2.3/private.jpg": ("error", "url_refused"),
            str(coco_images[1]): ("ok", None),
        }
        lst = tmp_path / "list.txt"
        lst.write_text("# a list\n" + "\n".join(entries) + "\n")
        code, out = batch(capsys, "run", str(lst), "--out", str(tmp_path / "run"), "--shard-size", "3", *margs)
    assert code == 1 and out["complete"]  # 1: some items failed, every shard is committed
    assert out["items"] == {"planned": 8, "ok": 3, "failed": 5, "pending": 0}
    assert out["errors"] == {"corrupt": 1, "not_found": 2, "url_refused": 2}
    rows = {r["id"]: r for r in committed_rows(tmp_path / "run")}
    assert {k: (r["status"], r["error_kind"]) for k, r in rows.items()} == entries
    assert rows[f"http://127.0.0.1:{port}/ok.jpg"]["concepts"]
    code, text = batch(capsys, "status", str(tmp_path / "run"))
    assert "not_found 2" in text and "nothing-here.jpg" in text and "url_refused 2" in text
    code, text = batch(capsys, "export", str(tmp_path / "run"), "--format", "clarifai")
    assert text["status"]["code"] == 10010  # mixed
    assert sum(o["status"]["code"] != 10000 for o in text["outputs"]) == 5


@pytest.fixture()
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    try:
        yield port
    finally:
        server.stop()


def test_every_kind_of_source_gives_the_folder_answers(folder_run, tmp_path, margs, coco_images, capsys, s3_server):
    import boto3

    photos = coco_images[:24]
    want = by_sha(folder_run)
    # csv with a header, relative paths
    (tmp_path / "imgs").mkdir()
    for p in photos[:6]:
        (tmp_path / "imgs" / p.name).write_bytes(p.read_bytes())
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "path"])
        w.writerows([["a photo", f"imgs/{p.name}"] for p in photos[:6]])
    # parquet list of absolute paths
    pq.write_table(pa.table({"uri": [str(p) for p in photos[6:12]]}), tmp_path / "list.parquet")
    # a WebDataset shard: key.jpg + key.json members
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for i, p in enumerate(photos[12:18]):
            tar.add(p, arcname=f"{i:06d}.jpg")
            meta = json.dumps({"source": p.name}).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    # an S3 bucket on the moto server
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="photos")
    for p in photos[18:24]:
        s3.put_object(Bucket="photos", Key=f"coco/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="photos", Key="coco/readme.txt", Body=b"not an image")
    out = tmp_path / "run"
    code, res = batch(capsys, "run", str(tmp_path / "list.csv"), str(tmp_path / "list.parquet"),
                      str(tmp_path / "shard-000000.tar"), "s3://photos/coco", "--out", str(out),
                      "--shard-size", "5", *margs)
    assert code == 0 and res["items"]["ok"] == 24, res
    rows = committed_rows(out)
    assert [r["uri"].split("#")[0].rsplit("/", 1)[-1] for r in rows[18:]] == [p.name for p in photos[18:24]]
    assert rows[12]["uri"].endswith("shard-000000.tar#000000.jpg")
    got = by_sha(out)
    assert len(got) == 24
    for k in got:  # the same bytes give the same tags (batches of 5 here, of 32 there: float rounding only)
        assert [i for i, _ in got[k]] == [i for i, _ in want[k]]
        assert [v for _, v in got[k]] == pytest.approx([v for _, v in want[k]], abs=1e-5)


def test_rescore_equals_a_fresh_run_with_the_new_vocabulary(folder_run, tmp_path, margs, coco_images, capsys):
    vocab = tmp_path / "new.txt"
    vocab.write_text(NEW_VOCAB)
    code, res = batch(capsys, "rescore", str(folder_run), "--out", str(tmp_path / "rescored"), "--vocab", str(vocab),
                      "--cache-dir", margs[margs.index("--cache-dir") + 1], "--device", "cpu", "--max-concepts", "3")
    assert code == 0 and res["shards_rescored"] == 4 and res["ok"] == 128
    code, _ = batch(capsys, "run", str(coco_images[0].parent), "--out", str(tmp_path / "fresh"), "--shard-size", "40",
                    *margs, "--vocab", str(vocab), "--max-concepts", "3")
    assert code == 0
    rescored = tags_by_id(committed_rows(tmp_path / "rescored"))
    fresh = tags_by_id(committed_rows(tmp_path / "fresh"))
    old = tags_by_id(committed_rows(folder_run))
    assert rescored == fresh and len(fresh) == 128
    assert rescored != old and {n for t in fresh.values() for _, n, _ in t} <= set(NEW_VOCAB.split())
    assert_complete_once(tmp_path / "rescored")
    # the rescored run is a run like any other, bound to its own fingerprint
    assert RunStore(tmp_path / "rescored").read_run()["fingerprint"] == RunStore(tmp_path / "fresh").read_run()["fingerprint"]
