"""`localtag directus learn` then `directus sync --retag --model-head` on the real Directus (issue 20's loop).

A library of 200 real CIFAR-10 test JPEGs (60 ships, 140 others) is tagged by `directus sync`; a person
then tags 20 of the ships "our-boat" (their own tag, next to the machine's), deletes a machine tag on
a few files and keeps a tag of their own on others. `directus learn` must learn the new concept from
those 20 files, and the next `sync --retag` must tag the other ships "our-boat" (marked learnt in the
provenance record) without changing any person's tag.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from directus_harness import DirectusClient

from localtag import cli
from localtag.core import learn as core_learn
from localtag.directus.tag_merge import PROVENANCE_FIELD, person_tags
from tests.conftest import CIFAR_CLASSES, extract_cifar
from tests.directus_fixtures import wait_for

pytestmark = pytest.mark.directus

SHIPS, OTHERS, TAUGHT = 60, 140, 20
CONCEPT = "our-boat"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def directus_loop(url: str, token: str, model: Path, tmp: Path, offset: int = 0, table: bool = True) -> dict:
    """Upload, sync, the person's edits (ships ``offset … offset+20`` tagged), `directus learn`, `sync --retag`
    with the head; what each step gave and took (``bench/bench_directus_learn.py`` runs it too)."""
    per = extract_cifar(tmp / "cifar", per_class=SHIPS)
    others = [p for i in range(SHIPS) for c in CIFAR_CLASSES if c != "ship" for p in per[c][i:i + 1]][:OTHERS]
    marker = f"learn-{uuid.uuid4().hex[:8]}"
    common = ["--directus-url", url, "--token", token, "--model", str(model),
              "--device", "cpu", "--cache-dir", str(tmp / "cache"), "--heads-dir", str(tmp / "heads")]
    filt = json.dumps({"title": {"_eq": marker}})
    lib: dict = {"tmp": tmp, "seconds": {}}
    with DirectusClient(url, token) as client:
        ships = [client.upload(p, f"ship-{i}.jpg", title=marker)["id"] for i, p in enumerate(per["ship"])]
        rest = [client.upload(p, f"other-{i}.jpg", title=marker)["id"] for i, p in enumerate(others)]
        t0 = time.perf_counter()
        rc, out, err = run_cli("directus", "sync", *common, "--filter", filt, "--max-concepts", "3")
        lib["seconds"]["sync"] = time.perf_counter() - t0
        assert rc == 0 and json.loads(out)["tagged"] == SHIPS + OTHERS, err
        rows = client.files_by_id(ships + rest, ["tags", PROVENANCE_FIELD])
        # the person: "our-boat" on 20 ships; a machine tag deleted on 10 other files; a tag of theirs on 8 more
        person: dict[str, list[str]] = {f: [] for f in ships + rest}
        taught = ships[offset:offset + TAUGHT]
        for f in taught:
            client.set_tags(f, [*rows[f]["tags"], CONCEPT])
            person[f] = [CONCEPT]
        rejecting = [f for f in rest if rows[f][PROVENANCE_FIELD]["tags"]][:10]
        for f in rejecting:
            client.set_tags(f, rows[f]["tags"][1:])
        for f in [f for f in rest if f not in rejecting][:8]:
            client.set_tags(f, ["holiday", *rows[f]["tags"]])
            person[f] = ["holiday"]
        lib["rejected"] = {f: rows[f][PROVENANCE_FIELD]["tags"][0] for f in rejecting}
        t0 = time.perf_counter()
        rc, out, err = run_cli("directus", "learn", *common, "--filter", filt, "--name", "boats", "--min-count", "10",
                               "--json")
        lib["seconds"]["learn"] = time.perf_counter() - t0
        assert rc == 0, err
        lib["learn"] = json.loads(out)
        if table:
            rc, text, _ = run_cli("directus", "learn", *common, "--filter", filt, "--name", "boats-table",
                                  "--min-count", "10")
            lib["table"] = text
        t0 = time.perf_counter()
        rc, out, err = run_cli("directus", "sync", *common, "--filter", filt, "--retag", "--model-head", "boats",
                               "--max-concepts", "3")
        lib["seconds"]["retag"] = time.perf_counter() - t0
        assert rc == 0, err
        lib["retag"] = json.loads(out)
        lib["after"] = client.files_by_id(ships + rest, ["tags", PROVENANCE_FIELD])
    lib.update(ships=ships, rest=rest, person=person, taught=taught)
    remaining = [f for f in ships + rest if f not in set(taught)]
    truth = np.array([f in set(ships) for f in remaining])
    said = np.array([CONCEPT in lib["after"][f][PROVENANCE_FIELD]["tags"] for f in remaining])
    tp = int((said & truth).sum())
    lib["measure"] = {"remaining": len(remaining), "ships": int(truth.sum()), "tagged": int(said.sum()), "tp": tp,
                      "precision": tp / max(1, int(said.sum())), "recall": tp / int(truth.sum())}
    # side by side: the vocabulary's own "ship" tag (zero-shot) on the same files, same run
    zs = np.array(["ship" in lib["after"][f][PROVENANCE_FIELD]["tags"] for f in remaining])
    lib["measure"]["zero_shot_ship"] = {"tagged": int(zs.sum()), "precision": int((zs & truth).sum()) / max(1, int(zs.sum())),
                                        "recall": int((zs & truth).sum()) / int(truth.sum())}
    return lib


@pytest.fixture(scope="module")
def loop(directus, fixture_model, tmp_path_factory) -> dict:
    return directus_loop(directus.url, directus.token, fixture_model, tmp_path_factory.mktemp("dlearn"))


def test_learn_reports_the_new_concept(loop):
    out = loop["learn"]
    assert out["images"] == out["embedded"] == SHIPS + OTHERS and out["failed"] == 0
    (c,) = out["concepts"]  # "holiday" (8 files) is under --min-count 10
    assert c["concept"] == CONCEPT and c["positives"] == TAUGHT and c["prior"] is None
    # negatives: the files without the tag, less those that look like the positives (the other ships, mostly)
    assert c["unsure"] > 0 and c["negatives"] == SHIPS + OTHERS - TAUGHT - c["unsure"] and c["rejected"] == 0
    (r,) = out["heldout"]
    assert r["ap_zero_shot"] is None and r["heldout_positives"] >= 1 and r["ap_learnt"] > 0.5
    head = core_learn.load(Path(out["head"]))
    assert head.names == [CONCEPT] and head.meta["directus"]["embedded"] == SHIPS + OTHERS
    assert "our-boat" in loop["table"] and "held-out AP: before → after" in loop["table"]
    print(loop["table"])


def test_retag_finds_the_other_boats(loop):
    m = loop["measure"]
    print(f"our-boat on the {m['remaining']} remaining files: precision {m['precision']:.3f} recall {m['recall']:.3f} "
          f"({m['tp']} of {m['ships']} ships, {m['tagged']} tagged)")
    assert m["precision"] >= 0.8 and m["recall"] >= 0.6
    assert loop["retag"]["tagged"] == SHIPS + OTHERS


def test_no_persons_tag_changed_and_learnt_tags_are_marked(loop):
    after = loop["after"]
    for f, person in loop["person"].items():
        row = after[f]
        prov = row[PROVENANCE_FIELD]
        assert person_tags(row["tags"], prov) == person
        assert row["tags"] == person + prov["tags"]  # the person's first, in their order; the machine's after
        assert prov["head"]["name"] == "boats" and prov["head"]["concepts"] == [CONCEPT]
        assert len(prov["head"]["sha256"]) == 64
        if f in loop["rejected"]:  # a deleted machine tag stays deleted
            assert loop["rejected"][f] in prov["rejected"] and loop["rejected"][f] not in row["tags"]
        machine_boat = CONCEPT in prov["tags"]
        assert prov.get("learnt", []) == ([CONCEPT] if machine_boat else [])
        if CONCEPT in person:  # the person's own "our-boat" is theirs: localtag does not claim it
            assert not machine_boat and row["tags"].count(CONCEPT) == 1


def test_the_flow_tags_uploads_with_the_servers_head(directus, fixture_model, cifar_test, tmp_path):
    """`localtag serve` with LOCALTAG_MODEL_HEAD: the flow's tags hold the learnt concept, marked learnt."""
    from live_server import LiveServer

    from localtag.core.config import Settings
    from localtag.core.decode import decode
    from localtag.core.head_mix import MixedScorer
    from localtag.core.loader import load

    path = tmp_path / "heads" / "vessels.npz"
    settings = Settings(model=str(fixture_model), device="cpu", cache_dir=tmp_path / "cache", batch_size=16,
                        directus_max_concepts=3, directus_min_value=0.0, model_head=str(path),
                        directus_url=directus.url, directus_token=directus.token, flow_secret=directus.flow_secret,
                        allow_hosts=[f"127.0.0.1:{directus.port}"])
    tagger, encoder = load(settings.model_copy(update={"model_head": None}))
    train = [(c, p) for c, paths in cifar_test.items() for p in paths[:16 if c == "ship" else 4]]
    emb = encoder.embed([decode(p) for _, p in train])
    keys = [str(p) for _, p in train]
    t = core_learn.targets(keys, emb, [core_learn.Annotation(k, "vessel-x", c == "ship")
                                       for k, (c, _) in zip(keys, train, strict=True)])
    core_learn.save(core_learn.train(emb, t, model_sha256=tagger.info.sha256, name="vessels"), path)
    name = f"localtag learnt {uuid.uuid4().hex[:8]}"
    photo = cifar_test["ship"][19]
    with LiveServer(settings) as live, DirectusClient(directus.url, directus.token) as client:
        try:
            assert cli.main(["directus", "install-flow", "--directus-url", directus.url, "--token", directus.token,
                             "--localtag-url", live.base, "--name", name]) == 0
            image = client.upload(photo, "boat.jpg", title=name, tags=["harbour"])
            row = wait_for(lambda: (r := client.get_file(image["id"])).get(PROVENANCE_FIELD) and r)
        finally:
            cli.main(["directus", "uninstall-flow", "--directus-url", directus.url, "--token", directus.token,
                      "--name", name])
    prov = row[PROVENANCE_FIELD]
    assert row["tags"] == ["harbour", *prov["tags"]] and prov["run"] == "flow"
    assert "vessel-x" in prov["tags"] and prov["learnt"] == ["vessel-x"]  # priority 1: a place before the vocabulary's
    assert prov["head"]["name"] == "vessels" and prov["head"]["concepts"] == ["vessel-x"]
    mixed = MixedScorer(tagger.scorer, core_learn.load(path))
    want = mixed.values(encoder.embed([decode(photo)]))[0]
    assert prov["values"]["vessel-x"] == pytest.approx(float(want[mixed.vocab.index("vessel-x")]), abs=2e-3)
