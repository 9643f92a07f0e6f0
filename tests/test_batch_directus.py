"""`localtag batch run directus://…` and `batch push` against the real Directus (tests/directus_fixtures.py).

The push uses `directus sync`'s own merge and record (plan_tags / write_plan / provenance_stamp): a
person's tags stay, in their order; localtag's are recorded; a tag a person removed is never written
again; and pushing twice changes nothing.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from batch_helpers import batch, committed_rows, model_args
from directus_harness import DirectusClient

from localtag.directus.tag_merge import PROVENANCE_FIELD

pytestmark = pytest.mark.directus

PERSON = ["holiday", "Grandma's house"]


def test_push_keeps_a_persons_tags_and_twice_is_once(directus, fixture_model, cache_dir, coco_images, tmp_path,
                                                    capsys, caplog, monkeypatch):
    client = DirectusClient(directus.url, directus.token)
    marker = f"batch-{uuid.uuid4().hex[:8]}"
    ids = [client.upload(p, title=marker)["id"] for p in coco_images[:10]]
    bad = client.upload(coco_images[10].read_bytes()[:500] + b"\0" * 40, "broken.jpg", title=marker)["id"]
    for i in ids[:4]:
        client.set_tags(i, PERSON)
    monkeypatch.setenv("LOCALTAG_DIRECTUS_TOKEN", directus.token)  # the token: never a flag, never in a log
    source = "directus://?filter=" + json.dumps({"title": {"_eq": marker}})
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        code, res = batch(capsys, "run", source, "--out", str(out), "--shard-size", "4", "--directus-url",
                          directus.url, "--max-concepts", "3", *model_args(fixture_model, cache_dir))
    assert code == 1 and res["items"] == {"planned": 11, "ok": 10, "failed": 1, "pending": 0}, res
    rows = {r["id"]: r for r in committed_rows(out)}
    assert set(rows) == {*ids, bad} and rows[bad]["error_kind"] == "corrupt"

    code, counts = batch(capsys, "push", str(out), "--directus-url", directus.url)
    assert code == 0 and counts["written"] == 10 and counts["failed_items"] == 1, counts
    after = client.files_by_id([*ids, bad], ["tags", PROVENANCE_FIELD])
    for i in ids:
        machine = [c["name"] for c in rows[i]["concepts"]]
        prov = after[i][PROVENANCE_FIELD]
        assert prov["tags"] == machine and len(machine) == 3
        assert after[i]["tags"] == (PERSON if i in ids[:4] else []) + machine
        assert prov["model_sha256"] and prov["run"] == res["run_id"]
    assert after[bad]["tags"] is None and after[bad][PROVENANCE_FIELD] is None

    code, counts = batch(capsys, "push", str(out), "--directus-url", directus.url)
    assert counts["written"] == 0 and counts["unchanged"] == 10
    assert client.files_by_id([*ids, bad], ["tags", PROVENANCE_FIELD]) == after  # tagged_at included

    # a person removes one machine tag: it is remembered and not written again
    gone = after[ids[5]][PROVENANCE_FIELD]["tags"][0]
    client.set_tags(ids[5], [t for t in after[ids[5]]["tags"] if t != gone])
    code, counts = batch(capsys, "push", str(out), "--directus-url", directus.url)
    assert counts["written"] == 1 and counts["unchanged"] == 9
    row = client.files_by_id([ids[5]], ["tags", PROVENANCE_FIELD])[ids[5]]
    assert gone not in row["tags"] and row[PROVENANCE_FIELD]["rejected"] == [gone]
    assert batch(capsys, "push", str(out), "--directus-url", directus.url)[1]["written"] == 0
    assert directus.token not in caplog.text and directus.token not in capsys.readouterr().err
    assert directus.token not in "".join(p.read_text() for p in out.glob("*.json*"))


def test_push_of_a_run_with_a_head_lists_the_learnt_tags(directus, fixture_model, fixture_loaded, cache_dir,
                                                         cifar_test, tmp_path, capsys, monkeypatch):
    """`batch run --model-head` then `batch push`: the record names the head and lists its tags as `learnt`,
    as `directus sync --model-head` does (docs/learn.md)."""
    from localtag.core import learn
    from localtag.core.decode import decode

    tagger, encoder = fixture_loaded
    train = [(c, p) for c, paths in cifar_test.items() for p in paths[:8]]
    keys = [str(p) for _, p in train]
    emb = encoder.embed([decode(p) for _, p in train])
    ann = [learn.Annotation(k, "vessel-x", c == "ship") for k, (c, _) in zip(keys, train, strict=True)]
    head = learn.train(emb, learn.targets(keys, emb, ann), model_sha256=tagger.info.sha256,
                       model=tagger.info.name, name="boats")
    path = learn.save(head, tmp_path / "heads" / "boats.npz")

    client = DirectusClient(directus.url, directus.token)
    marker = f"head-{uuid.uuid4().hex[:8]}"
    ships = [client.upload(p, title=marker)["id"] for p in cifar_test["ship"][8:12]]
    cats = [client.upload(p, title=marker)["id"] for p in cifar_test["cat"][8:12]]
    client.set_tags(ships[0], PERSON)
    monkeypatch.setenv("LOCALTAG_DIRECTUS_TOKEN", directus.token)
    out = tmp_path / "run"
    code, res = batch(capsys, "run", "directus://?filter=" + json.dumps({"title": {"_eq": marker}}), "--out",
                      str(out), "--directus-url", directus.url, "--max-concepts", "3", "--model-head", str(path),
                      *model_args(fixture_model, cache_dir))
    assert code == 0 and res["items"]["ok"] == 8, res
    code, counts = batch(capsys, "push", str(out), "--directus-url", directus.url)
    assert code == 0 and counts["written"] == 8, counts
    after = client.files_by_id([*ships, *cats], ["tags", PROVENANCE_FIELD])
    assert after[ships[0]]["tags"][:2] == PERSON  # a person's tags stay
    tagged = 0
    for row in after.values():
        prov = row[PROVENANCE_FIELD]
        assert prov["head"]["name"] == "boats" and prov["head"]["concepts"] == ["vessel-x"]
        assert len(prov["head"]["sha256"]) == 64
        assert prov.get("learnt", []) == (["vessel-x"] if "vessel-x" in prov["tags"] else [])
        tagged += "vessel-x" in prov["tags"]
    assert all("vessel-x" in after[i][PROVENANCE_FIELD]["tags"] for i in ships) and tagged >= 4
