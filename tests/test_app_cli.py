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


def test_search_over_a_batch_run_ranks_the_class_first(cifar_test, fixture_model, random_store, tmp_path, env):
    """`localtag search --run RUN_DIR`: a batch run's Parquet embeddings, searched without re-encoding; a
    failed item is left out, a run of another model or a folder that is no run is a clear error."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for cls in ("ship", "cat", "truck", "frog"):
        for p in cifar_test[cls][:10]:
            (photos / f"{cls}-{p.name}").write_bytes(p.read_bytes())
    (photos / "broken.jpg").write_bytes(cifar_test["ship"][0].read_bytes()[:300])
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "localtag", "batch", "run", str(photos), "--out", str(run_dir),
                          "--shard-size", "16"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    summary = json.loads(out.stdout)
    assert summary["items"] == {"planned": 41, "ok": 40, "failed": 1, "pending": 0}, out.stderr[-2000:]
    assert summary["shards"]["committed"] == 3
    for cls in ("ship", "truck", "frog"):
        hits = run("search", cls, "--run", str(run_dir), "--json", env=env)["hits"]
        names = [Path(h["id"]).name for h in hits]
        print(cls, names)
        assert len(hits) == 10 and names[0].startswith(f"{cls}-") and "broken.jpg" not in names
        assert sum(n.startswith(f"{cls}-") for n in names) >= 7
    image = run("search", "--image", str(cifar_test["cat"][3]), "--run", str(run_dir), "--json", env=env)["hits"]
    assert Path(image[0]["id"]).name == f"cat-{cifar_test['cat'][3].name}" and image[0]["score"] > 0.999

    def refused(*args: str, **extra: str) -> str:
        got = subprocess.run([sys.executable, "-m", "localtag", "search", "ship", *args], capture_output=True,
                             text=True, env={**env, **extra}, cwd=REPO, timeout=600)
        assert got.returncode != 0 and "Traceback" not in got.stderr
        return got.stderr
    assert "not a batch run" in refused("--run", str(photos))
    err = refused("--run", str(run_dir), LOCALTAG_MODELS_DIR=str(random_store), LOCALTAG_MODEL="tiny-random")
    assert "cifar10-tiny" in err and "--model" in err
