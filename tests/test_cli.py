"""`localtag tag` end to end on real photos with the trained fixture model (in-process, see cli_run.py;
one test runs the real entry point as a process)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import run_cli
from conftest import CIFAR_CLASSES, COCO_DIR

from localtag.core import vocab as vocab_mod


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real entry point, as a separate process."""
    return subprocess.run([sys.executable, "-m", "localtag", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_tag_coco_json_all_128(fixture_model, cache_dir):
    r = run("tag", str(COCO_DIR), "--json", "--model", str(fixture_model), "--cache-dir", str(cache_dir),
            "--max-concepts", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["status"]["code"] == 10000 and doc["status"]["description"] == "Ok"
    outs = doc["outputs"]
    assert len(outs) == 128
    names = {c.name for c in vocab_mod.load(fixture_model / "vocab.txt")}
    for o in outs:
        assert o["status"]["code"] == 10000
        assert re.fullmatch(r"[0-9a-f]{32}", o["id"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", o["created_at"])
        assert o["input"]["data"]["image"]["url"].startswith("file:///")
        concepts = o["data"]["concepts"]
        assert len(concepts) == 5
        values = [c["value"] for c in concepts]
        assert values == sorted(values, reverse=True) and all(0 <= v <= 1 for v in values)
        assert all(c["name"] in names and re.fullmatch(r"ai_\w{8}", c["id"]) and c["app_id"] for c in concepts)
    # the photos are not all tagged alike: the model sees them
    assert len({o["data"]["concepts"][0]["name"] for o in outs}) >= 3


def test_cifar_top1_through_localtag_tag(fixture_model, cifar_test, cache_dir):
    """Real semantic signal: top-1 on 200 CIFAR-10 test images (20 per class) through the CLI."""
    root = next(iter(cifar_test.values()))[0].parent.parent
    r = run_cli("tag", str(root), "--jsonl", "--model", str(fixture_model), "--cache-dir", str(cache_dir),
            "--max-concepts", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 200
    hits = sum(Path(o["input"]["id"]).parent.name == o["data"]["concepts"][0]["name"] for o in rows)
    per_class = {c: 0 for c in CIFAR_CLASSES}
    for o in rows:
        per_class[o["data"]["concepts"][0]["name"]] += 1
    assert hits / len(rows) >= 0.6, (hits, per_class)
    assert max(per_class.values()) < 60  # not a constant answer


def test_bad_inputs_fail_alone_and_exit_nonzero(fixture_model, coco_images, tmp_path, cache_dir):
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(coco_images[0], d / "a_good.jpg")
    (d / "b_text.jpg").write_text("not an image")
    data = coco_images[1].read_bytes()
    (d / "c_truncated.jpg").write_bytes(data[: len(data) // 3])
    shutil.copy(coco_images[2], d / "d_good.jpg")
    r = run_cli("tag", str(d), "--json", "--model", str(fixture_model), "--cache-dir", str(cache_dir))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["status"]["code"] == 10010
    codes = [o["status"]["code"] for o in doc["outputs"]]
    assert codes == [10000, 30101, 30104, 10000]
    assert doc["outputs"][1]["data"] == {} and "not a recognised image" in doc["outputs"][1]["status"]["details"]
    assert "b_text.jpg" in r.stderr and "2 of 4 inputs failed" in r.stderr

    # readable table by default; progress bar only when asked
    r = run_cli("tag", str(d / "a_good.jpg"), str(d / "b_text.jpg"), "--model", str(fixture_model),
            "--cache-dir", str(cache_dir), "--max-concepts", "3", "--progress")
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(d / "a_good.jpg") + "\t") and len(lines[0].split(", ")) == 3
    assert "ERROR not a recognised image format" in lines[1]
    assert "tagging" in r.stderr and "2/2" in r.stderr


def test_min_value_and_select(fixture_model, cifar_test, cache_dir):
    cat = cifar_test["cat"][0]
    r = run_cli("tag", str(cat), "--json", "--model", str(fixture_model), "--cache-dir", str(cache_dir),
            "--select", "cat", "dog")
    concepts = json.loads(r.stdout)["outputs"][0]["data"]["concepts"]
    assert {c["name"] for c in concepts} == {"cat", "dog"}
    r = run_cli("tag", str(cat), "--json", "--model", str(fixture_model), "--cache-dir", str(cache_dir),
            "--min-value", "1.01")
    assert json.loads(r.stdout)["outputs"][0]["data"]["concepts"] == []
    r = run_cli("tag", str(cat), "--model", str(fixture_model), "--select", "unicorn")
    assert r.returncode == 2 and "select_concepts" in r.stderr


def test_env_config_and_flag_precedence(fixture_model, cifar_test, cache_dir):
    cat = str(cifar_test["cat"][0])
    env = {"LOCALTAG_MODEL": str(fixture_model), "LOCALTAG_MAX_CONCEPTS": "2", "LOCALTAG_CACHE_DIR": str(cache_dir)}
    r = run_cli("tag", cat, "--json", env=env)
    assert len(json.loads(r.stdout)["outputs"][0]["data"]["concepts"]) == 2
    r = run_cli("tag", cat, "--json", "--max-concepts", "4", env=env)
    assert len(json.loads(r.stdout)["outputs"][0]["data"]["concepts"]) == 4
    r = run_cli("tag", cat, "--model", "no-such-model", env=env)
    assert r.returncode == 2 and "not found" in r.stderr and "models pull" in r.stderr


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_selection(fixture_model, cifar_test, tmp_path, device, monkeypatch):
    """The device asked for is the one the image tower runs on, and the answer does not depend on it."""
    import torch

    from localtag.core.encoder import ImageEncoder

    seen = []
    real = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, x: seen.append((self.device, x.device)) or real(self, x))
    r = run_cli("tag", str(cifar_test["dog"][0]), "--json", "--model", str(fixture_model), "--device", device,
                "--no-cache", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    want = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
    assert seen and all(d.type == want.type and x.type == want.type for d, x in seen)
    concepts = json.loads(r.stdout)["outputs"][0]["data"]["concepts"]
    ref = run_cli("tag", str(cifar_test["dog"][0]), "--json", "--model", str(fixture_model), "--device", "cpu",
                  "--no-cache", "--cache-dir", str(tmp_path))
    expected = json.loads(ref.stdout)["outputs"][0]["data"]["concepts"]
    assert [c["name"] for c in concepts[:3]] == [c["name"] for c in expected[:3]]
    assert [c["value"] for c in concepts] == pytest.approx([c["value"] for c in expected], abs=2e-2)


def test_cuda_requested_without_cuda_is_clear(fixture_model, cifar_test):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_cli("tag", str(cifar_test["dog"][0]), "--model", str(fixture_model), "--device", "cuda")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr


def test_tag_takes_urls_through_the_guarded_fetcher(fixture_model, cache_dir, tmp_path):
    """`tag URL` fetches it (a loopback server here, allowed by name) and tags it like the file; a URL
    to a local address that is not allowed is refused, and the run goes on with the others."""
    import functools
    import http.server
    import threading

    photo = sorted(COCO_DIR.glob("*.jpg"))[0]
    (tmp_path / "p.jpg").write_bytes(photo.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/p.jpg"
        flags = ["--model", str(fixture_model), "--cache-dir", str(cache_dir), "--jsonl", "--precision", "fp32"]
        ok = run_cli("tag", url, str(photo), *flags, env={"LOCALTAG_ALLOW_HOSTS": json.dumps([f"127.0.0.1:{port}"])})
        assert ok.returncode == 0, ok.stderr
        by_url, by_file = (json.loads(line) for line in ok.stdout.splitlines())
        assert by_url["input"]["id"] == url and by_url["status"]["code"] == 10000
        assert by_url["data"]["concepts"] == by_file["data"]["concepts"]
        refused = run_cli("tag", url, str(photo), *flags)
        assert refused.returncode == 1
        bad, good = (json.loads(line) for line in refused.stdout.splitlines())
        assert bad["status"]["code"] != 10000 and good["status"]["code"] == 10000
    finally:
        server.shutdown()
        server.server_close()


def test_version():
    r = run("--version")
    assert r.returncode == 0 and re.fullmatch(r"localtag \S+\n", r.stdout), (r.stdout, r.stderr)
