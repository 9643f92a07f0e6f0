"""An installed wheel works outside the repository: it ships its vocabularies as package data.

A real CLIP model has no vocabulary of its own, so an air-gapped site that installs the wheel tags
with the shipped ``vocab.txt``. Built with pip, installed into a fresh venv in a temporary folder
(with this venv's dependencies visible through a ``.pth`` file: no second 5 GB torch), and run
from that folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_wheel_tags_with_its_shipped_vocabulary(tmp_path, random_store):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the wheel, not a checkout on the path
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("localtag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "localtag/data/vocab.txt" in names
    assert "localtag/core/scorer.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not localtag
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]

    photo = tmp_path / "photo.jpg"
    photo.write_bytes((REPO / "samples" / "000000000309.jpg").read_bytes())
    r = subprocess.run([str(py), "-m", "localtag", "tag", str(photo), "--models-dir", str(random_store),
                        "--model", "tiny-random", "--no-cache", "--device", "cpu", "--jsonl", "--max-concepts", "3",
                        "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert len(out["data"]["concepts"]) == 3
    where = subprocess.run([str(py), "-c", "import localtag; print(localtag.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True, env=env).stdout
    assert str(site) in where and str(REPO) not in where  # the wheel ran, not the checkout
