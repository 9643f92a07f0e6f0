"""``localtag app add``, ``search`` and ``duplicates`` as a user runs them, with the fixture model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from app_data import plant_copies, score_groups  # noqa: E402


def run(*args: str, env: dict) -> dict | str:
    out = subprocess.run([sys.executable, "-m", "localtag", *args], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout) if "--json" in args or args[:2] == ("app", "add") else out.stdout


@pytest.fixture
def env(fixture_model, tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "LOCALTAG_MODEL": str(fixture_model),
            "LOCALTAG_CACHE_DIR": str(tmp_path / "cache"), "LOCALTAG_DEVICE": "cpu", "LOCALTAG_PRECISION": "fp32"}


def test_duplicates_finds_planted_copies(coco_images, tmp_path, env):
    planted = plant_copies(coco_images, tmp_path / "photos")
    out = run("duplicates", str(tmp_path / "photos"), "--json", env=env)
    assert set(out) == {"threshold", "min_correlation", "count", "groups"} and out["count"] == 138
    assert all(set(g) == {"items", "min_similarity"} for g in out["groups"])
    score = score_groups([g["items"] for g in out["groups"]], planted)
    print(score)
    assert score["found"] >= 9 and score["false_groups"] <= 1


def test_app_add_and_search(cifar_test, tmp_path, env):
    ships, cats = cifar_test["ship"][:10], cifar_test["cat"][:10]
    out = run("app", "add", *map(str, ships), "--app", "pics", "--concepts", "boat", env=env)
    assert out["added"] == 10 and not out["errors"]
    assert run("app", "add", *map(str, cats), "--app", "pics", env=env)["added"] == 10
    assert run("app", "add", str(ships[0]), "--app", "pics", env=env)["already"] == 1
    hits = run("search", "ship", "--app", "pics", "--json", env=env)["hits"]
    assert len(hits) == 10 and sum(h["id"] in map(str, ships) for h in hits) >= 8
    assert all(0 <= h["score"] <= 1 for h in hits)
    folder = tmp_path / "f"
    folder.mkdir()
    for p in [*ships, *cats]:
        (folder / p.name).write_bytes(p.read_bytes())
    hits = run("search", "--image", str(cats[1]), str(folder), "--json", "--top", "5", env=env)["hits"]
    assert Path(hits[0]["id"]).name == cats[1].name
    text = run("search", "cat", str(folder), env=env)
    assert len(text.strip().splitlines()) == 10
