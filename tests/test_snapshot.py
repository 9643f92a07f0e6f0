"""Snapshot: ``localtag tag samples --json`` with the fixture model, field by field, against the
committed answer (tests/snapshots/). Volatile fields (ids, times, the absolute path) are normalised;
values must agree to 1e-4. ``LOCALTAG_UPDATE_SNAPSHOTS=1`` rewrites the snapshot after a deliberate
change (review the diff)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from cli_run import run_cli
from conftest import REPO

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "tag-samples-cifar10-tiny.json"
SAMPLES = REPO / "samples"


def normalised(doc: dict) -> dict:
    assert re.fullmatch(r"[0-9a-f]{32}", doc["status"].pop("req_id"))
    for o in doc["outputs"]:
        assert re.fullmatch(r"[0-9a-f]{32}", o.pop("id"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", o.pop("created_at"))
        o["input"]["id"] = Path(o["input"]["id"]).relative_to(REPO).as_posix()
        url = o["input"]["data"]["image"]["url"]
        assert url == (REPO / o["input"]["id"]).as_uri()
        o["input"]["data"]["image"]["url"] = "file:///<repo>/" + o["input"]["id"]
    return doc


def test_tag_json_of_the_samples_matches_the_snapshot(fixture_model, tmp_path):
    r = run_cli("tag", str(SAMPLES), "--json", "--model", "cifar10-tiny", "--max-concepts", "5",
                "--no-cache", "--cache-dir", str(tmp_path), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = normalised(json.loads(r.stdout))
    if os.environ.get("LOCALTAG_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"snapshot written to {SNAPSHOT}")
    want = json.loads(SNAPSHOT.read_text())
    assert len(got["outputs"]) == len(want["outputs"]) == 6
    for g, w in zip(got["outputs"], want["outputs"], strict=True):
        gv = [c.pop("value") for c in g["data"]["concepts"]]
        wv = [c.pop("value") for c in w["data"]["concepts"]]
        assert gv == pytest.approx(wv, abs=1e-4), g["input"]["id"]
    assert got == want
