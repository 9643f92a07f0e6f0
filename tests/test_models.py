"""The model store: import of every checkpoint format, hashes, clear errors, and a real `pull`."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from conftest import COCO_DIR, TINY_CFG, make_random_checkpoint

from localtag.core.models import ModelError, ModelStore, build


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real process: the hub libraries read HF_ENDPOINT / HF_HOME when they are imported."""
    return subprocess.run([sys.executable, "-m", "localtag", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture()
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_import_safetensors_folder_writes_manifest_and_loads(store, tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "ckpt", seed=3)
    info = store.import_checkpoint(ckpt, name="t1", license="MIT", pretrained="random")
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256((info.path / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert manifest["preprocess"] == {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
                                      "std": [0.26862954, 0.26130258, 0.27577711],
                                      "interpolation": "bicubic", "resize_mode": "shortest"}
    assert manifest["license"] == "MIT" and manifest["model_cfg"]["embed_dim"] == 32
    assert (info.path / "open_clip_config.json").is_file()
    assert [m.name for m in store.list()] == ["t1"]
    store.verify(info)


def _save_formats(tmp_path: Path) -> tuple[dict, dict[str, Path]]:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = open_clip.CLIP(**TINY_CFG).eval()
    ref = _state(model)
    paths = {}
    paths["bin"] = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), paths["bin"])
    paths["pt-wrapped"] = tmp_path / "epoch_3.pt"  # open_clip training checkpoint: {"state_dict": {"module.…"}}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, paths["pt-wrapped"])
    paths["safetensors"] = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths["safetensors"])
    paths["openai-jit"] = tmp_path / "ViT-tiny.pt"  # OpenAI ships TorchScript archives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), paths["openai-jit"])
    return ref, paths


def test_import_every_format_loads_identical_weights(store, tmp_path):
    ref, paths = _save_formats(tmp_path)
    config = tmp_path / "cfg" / "open_clip_config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_cfg": TINY_CFG}))
    for fmt, path in paths.items():
        info = store.import_checkpoint(path, name=f"m-{fmt}", config=config, quick_gelu=False)
        model = build(info)
        for k, v in ref.items():
            assert torch.equal(model.state_dict()[k].float(), v.float()), (fmt, k)
        assert info.weights == path.name


def test_openai_archive_is_marked_quick_gelu(store, tmp_path):
    _, paths = _save_formats(tmp_path)
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": TINY_CFG}))
    info = store.import_checkpoint(paths["openai-jit"], name="oa", config=config)
    assert info.model_cfg["quick_gelu"] is True


def test_import_wrong_architecture_is_a_clear_error_and_leaves_nothing(store, tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ModelError, match="cannot load .* into architecture 'RN50'"):
        store.import_checkpoint(ckpt / "open_clip_model.safetensors", arch="RN50", name="bad")
    assert not store.root.exists() or not any(p.name.startswith("bad") or p.name.startswith(".bad")
                                              for p in store.root.iterdir())


def test_import_refuses_unknown_arch_and_format(store, tmp_path):
    junk = tmp_path / "w.onnx"
    junk.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported weights format"):
        store.import_checkpoint(junk, arch="ViT-B-32")
    w = tmp_path / "w.bin"
    w.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        store.import_checkpoint(w, arch="ViT-Nope")


def test_missing_and_corrupt_models_are_clear_errors(store, tmp_path):
    with pytest.raises(ModelError, match="localtag models pull ViT-B-32 --pretrained openai"):
        store.resolve("ViT-B-32.openai")
    info = store.import_checkpoint(make_random_checkpoint(tmp_path / "ckpt"), name="c")
    data = bytearray(info.weights_path.read_bytes())
    data[-10] ^= 0xFF
    info.weights_path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 .* corrupt"):
        store.verify(info)
    info.weights_path.write_bytes(bytes(data[:100]))
    with pytest.raises(ModelError, match="truncated"):
        store.verify(info)
    r = run_cli("models", "verify", "--models-dir", str(store.root))
    assert r.returncode == 1 and "FAILED  c" in r.stdout
    info.weights_path.unlink()
    r = run_cli("tag", str(tmp_path), "--models-dir", str(store.root), "--model", "c")
    assert r.returncode == 2 and "weights file" in r.stderr and "missing" in r.stderr


def test_verify_cli_ok(random_store):
    r = run_cli("models", "verify", "--models-dir", str(random_store))
    assert r.returncode == 0 and r.stdout.startswith("ok      tiny-random")
    r = run_cli("models", "list", "--json", "--models-dir", str(random_store))
    assert json.loads(r.stdout)[0]["name"] == "tiny-random"


# -- pull, against a local HTTP server posing as the Hugging Face hub ---------------------------------
class _FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, Path]):
        self.files = files  # "org/repo/filename" -> path
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _HubHandler)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _serve(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        # /{org}/{repo}/resolve/{revision}/{filename}
        if len(parts) >= 5 and parts[2] == "resolve":
            key = "/".join(parts[:2] + parts[4:])
            path = self.server.files.get(key)
            if path is not None:
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("X-Repo-Commit", "a" * 40)
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", "a" * 40)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._serve(False)

    def do_GET(self):
        self._serve(True)


@pytest.fixture()
def fake_hub(tmp_path):
    servers = []

    def start(files: dict[str, Path]) -> _FakeHub:
        hub = _FakeHub(files)
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        servers.append(hub)
        return hub

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_pull_hf_hub_repo_through_local_hub(fake_hub, tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "repo", seed=11)
    hub = fake_hub({
        "acme/tiny-clip/open_clip_config.json": ckpt / "open_clip_config.json",
        "acme/tiny-clip/open_clip_model.safetensors": ckpt / "open_clip_model.safetensors",
    })
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_XET": "1"}
    r = _cli("models", "pull", "hf-hub:acme/tiny-clip", "--models-dir", str(tmp_path / "store"), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "acme--tiny-clip"
    from localtag.core.family import shipped_vocabularies

    # the shipped vocabularies (vocab.txt and the model family's), encoded at pull time
    assert len(out["text_embeddings"]) == len({"vocab.txt", *shipped_vocabularies()})
    expected = hashlib.sha256((ckpt / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert out["sha256"] == expected
    assert any("open_clip_model.safetensors" in q for q in hub.requests)
    # the pulled folder is self-contained: it tags with the hub gone and the network off
    hub.shutdown()
    img = COCO_DIR / "000000000009.jpg"
    voc = tmp_path / "v.txt"
    voc.write_text("cat\ndog\n")
    r = _cli("tag", str(img), "--models-dir", str(tmp_path / "store"), "--model", "acme--tiny-clip",
             "--vocab", str(voc), "--cache-dir", str(tmp_path / "c"), env={**env, "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_pull_published_tag_through_local_hub(fake_hub, tmp_path):
    """`models pull RN50 --pretrained openai` resolves open_clip's table to its hub repo and downloads."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("RN50", force_quick_gelu=True)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, weights)
    del model
    hub = fake_hub({"timm/resnet50_clip.openai/open_clip_model.safetensors": weights})
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_XET": "1"}
    r = _cli("models", "pull", "RN50", "--pretrained", "openai", "--models-dir", str(tmp_path / "store"), "--no-text",
             env=env)  # the shipped vocabulary through RN50's text tower takes minutes: tests/test_text_store.py
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "store" / "RN50.openai" / "manifest.json").read_text())
    assert m["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert m["model_cfg"]["quick_gelu"] is True
    assert m["license"].startswith("MIT") and m["source"] == "https://huggingface.co/timm/resnet50_clip.openai"
    assert m["preprocess"]["size"] == 224 and m["preprocess"]["interpolation"] == "bicubic"


def test_pull_unknown_tag_is_clear(tmp_path):
    r = _cli("models", "pull", "ViT-B-32", "--pretrained", "nope", "--models-dir", str(tmp_path))
    assert r.returncode == 2 and "no pretrained tag 'nope'" in r.stderr and "laion2b" in r.stderr
