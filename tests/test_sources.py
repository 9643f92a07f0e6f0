"""`localtag tag DIR` with odd entries on disk (issue 10, item 4; item 19's names and messages).

Real filesystem objects: a self-looping symlink, a unix socket named ``x.jpg``, a FIFO named ``y.jpg``,
an unreadable subfolder. Each fails alone with one clear line, the good files are still tagged, and the
exit status is 1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from localtag import cli

REPO = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = REPO / "models" / "cifar10-tiny"


def model_args(tmp: Path) -> list[str]:
    return ["--model", str(FIXTURE_MODEL), "--device", "cpu", "--cache-dir", str(tmp / "cache")]


def run_cli(argv: list[str], timeout: float = 120) -> int:
    """cli.main in a thread, failing (not hanging) when it does not finish in `timeout` seconds."""
    box: dict = {}

    def target() -> None:
        try:
            box["rc"] = cli.main(argv)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"localtag {' '.join(argv)} still running after {timeout} s (a FIFO read blocks?)")
    if "error" in box:
        raise box["error"]
    return box["rc"]


@pytest.fixture
def odd_folder(tmp_path, coco_images) -> Path:
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    shutil.copy(coco_images[0], d / "a.jpg")
    shutil.copy(coco_images[1], d / "sub" / "b.jpg")
    os.symlink("loop.jpg", d / "loop.jpg")  # points at itself
    os.mkfifo(d / "y.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "x.jpg"))
    yield d
    sock.close()


def test_odd_entries_fail_alone(odd_folder, tmp_path, capsys, caplog):
    rc = run_cli(["tag", *model_args(tmp_path), str(odd_folder)])
    out, _ = capsys.readouterr()
    err = caplog.text
    lines = dict(line.split("\t", 1) for line in out.splitlines())
    d = str(odd_folder)
    assert set(lines) == {f"{d}/a.jpg", f"{d}/sub/b.jpg", f"{d}/loop.jpg", f"{d}/x.jpg", f"{d}/y.jpg"}, out
    assert not lines[f"{d}/a.jpg"].startswith("ERROR") and not lines[f"{d}/sub/b.jpg"].startswith("ERROR")
    assert lines[f"{d}/loop.jpg"].startswith("ERROR") and "symbolic links" in lines[f"{d}/loop.jpg"]
    assert lines[f"{d}/x.jpg"] == "ERROR not a regular file (a socket)"
    assert lines[f"{d}/y.jpg"] == "ERROR not a regular file (a FIFO)"
    assert rc == 1
    # each error names its file once (no "x.jpg: x.jpg: …")
    for name in ("loop.jpg", "x.jpg", "y.jpg"):
        [line] = [e for e in err.splitlines() if f"/{name}:" in e]
        assert line.count(name) == 1, line


def test_named_fifo_does_not_hang(odd_folder, tmp_path, capsys):
    rc = run_cli(["tag", *model_args(tmp_path), str(odd_folder / "y.jpg"), str(odd_folder / "a.jpg")])
    out, _ = capsys.readouterr()
    assert "y.jpg\tERROR not a regular file" in out and rc == 1


def test_unreadable_subfolder_is_reported(tmp_path, coco_images):
    """Root reads a chmod-000 folder anyway: as root the CLI runs without CAP_DAC_OVERRIDE/READ_SEARCH."""
    d = tmp_path / "photos"
    (d / "locked").mkdir(parents=True)
    shutil.copy(coco_images[0], d / "a.jpg")
    shutil.copy(coco_images[1], d / "locked" / "b.jpg")
    os.chmod(d / "locked", 0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: chmod 000 does not stop root's reads")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "localtag", "tag", *model_args(tmp_path), str(d)],
                              capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.chmod(d / "locked", 0o755)
    lines = dict(line.split("\t", 1) for line in proc.stdout.splitlines())
    assert not lines[f"{d}/a.jpg"].startswith("ERROR"), proc.stdout
    assert lines[f"{d}/locked"].startswith("ERROR folder not read: Permission denied"), proc.stdout
    assert proc.returncode == 1, proc.stderr


def test_text_output_escapes_names(tmp_path, coco_images, capsys):
    """A name with a newline and a tab can't forge a result line (issue 10, item 19)."""
    d = tmp_path / "photos"
    d.mkdir()
    evil = d / "evil\nforged.jpg\tcat 0.999, dog 0.998.jpg"
    shutil.copy(coco_images[0], evil)
    rc = run_cli(["tag", *model_args(tmp_path), str(d)])
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 1, out
    key, tags = lines[0].split("\t")
    assert key == f"{d}/evil\\nforged.jpg\\tcat 0.999, dog 0.998.jpg"
    assert not tags.startswith("ERROR")
