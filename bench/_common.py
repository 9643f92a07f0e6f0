"""Shared helpers of the benchmarks: machine facts, RSS, random-init model stores, test images.

Nothing here is committed output: models, large JPEGs and caches go to ``$LOCALTAG_BENCH_DIR``
(default ``/tmp/localtag-bench``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("LOCALTAG_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO_DIR = SHARED / "coco128" / "images"
COCO_ANN = SHARED / "coco128" / "instances_train2017.json"
CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"
BENCH_DIR = Path(os.environ.get("LOCALTAG_BENCH_DIR", "/tmp/localtag-bench"))
DEFAULT_ARCH = "ViT-B-32-256"  # the default model's architecture (ViT-B-32-256.datacomp_s34b_b86k)


def machine() -> dict:
    import numpy
    import open_clip
    import PIL
    import torch
    from PIL import features

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "open_clip": open_clip.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": numpy.__version__,
    }


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB."""
    vals = {}
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(("VmRSS:", "VmHWM:")):
                k, v = ln.split(":")
                vals[k] = int(v.split()[0]) / 1024
    return round(vals["VmRSS"], 1), round(vals["VmHWM"], 1)


def random_store(arch: str, seed: int = 0) -> Path:
    """A model store with ``arch`` at random init (no pretrained weights can be had here)."""
    import open_clip
    import torch

    from localtag.core.models import ModelStore

    root = BENCH_DIR / "store"
    name = f"{arch}-random"
    if not (root / name / "manifest.json").is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(arch)
        tmp = BENCH_DIR / "ckpt" / arch
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), tmp / "open_clip_pytorch_model.bin")
        del model
        ModelStore(root).import_checkpoint(tmp / "open_clip_pytorch_model.bin", arch=arch, name=name,
                                           pretrained=f"random init, seed {seed}", overwrite=True)
        (tmp / "open_clip_pytorch_model.bin").unlink()
    return root


def coco_vocab() -> Path:
    """The 80 COCO category names as a vocabulary file."""
    path = BENCH_DIR / "coco80.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cats = json.loads(COCO_ANN.read_text())["categories"]
        path.write_text("".join(c["name"] + "\n" for c in sorted(cats, key=lambda c: c["id"])))
    return path


def load_model(root: Path, name: str, vocab: Path, **settings):
    """The tagger and image encoder (:func:`localtag.core.loader.load`), the text side built before timing."""
    from localtag.core.config import Settings
    from localtag.core.loader import load

    loaded = load(Settings(models_dir=root, model=name, vocab=vocab, device="auto", cache_dir=BENCH_DIR / "cache",
                           **settings))
    loaded.tagger.text_embeddings  # noqa: B018 - build (or load) the text side before anything is timed
    return loaded


def coco_files() -> list[Path]:
    return sorted(COCO_DIR.glob("*.jpg"))


def predict_bodies(files: list[Path]) -> list[bytes]:
    """One Clarifai predict body (JSON, the image as base64) per file."""
    return [json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(f.read_bytes()).decode()}}}]})
            .encode() for f in files]


@contextlib.contextmanager
def live_server(root: Path, name: str, loaded, cache: str, **settings) -> Iterator[str]:
    """``localtag.serve.server.create_app`` over ``loaded`` (the model ``name`` of the store ``root``, the COCO
    vocabulary) under uvicorn on a free 127.0.0.1 port, in a thread of this process; yields its base URL
    and stops it on leaving. ``cache``: the cache folder's name in BENCH_DIR; ``settings``: more Settings."""
    import uvicorn

    from localtag.core.config import Settings
    from localtag.serve.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Settings(models_dir=root, model=name, vocab=coco_vocab(), device="cpu", cache_dir=BENCH_DIR / cache,
                      host="127.0.0.1", port=port, **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(config, loaded), host="127.0.0.1", port=port,
                                           log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the live server stopped while starting (its log is above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def big_jpegs(n: int = 128, megapixels: float = 12.0, quality: int = 90) -> list[Path]:
    """COCO photos upscaled (bicubic, aspect kept) to ~``megapixels`` MP JPEGs, made once."""
    from PIL import Image

    out = BENCH_DIR / f"{megapixels:g}mp"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for src in coco_files()[:n]:
        dst = out / src.name
        if not dst.is_file():
            img = Image.open(src).convert("RGB")
            scale = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
            big = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
            buf = io.BytesIO()
            big.save(buf, "JPEG", quality=quality)
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(dst)
        files.append(dst)
    return files


def in_thread(fn, *args):
    """Run ``fn(*args)`` in a fresh thread and return its result.

    The pipeline runs the model in its own thread; on this shared, oversubscribed CPU a forward pass
    in the main thread ran 2-3× slower than the same pass in another thread (OpenMP team effects),
    so every measured loop runs in a thread of its own, like the pipeline's model.
    """
    import threading

    out: list = []

    def target() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001
            out.append((False, e))

    t = threading.Thread(target=target)
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


class Timer:
    """Wall seconds (``s``) and this process's CPU seconds, all threads (``cpu``)."""

    def __enter__(self) -> Timer:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def rates(n: int, t: Timer, cuda: bool = False) -> dict:
    """Images/s by the wall clock, CPU seconds per image, and the dedicated-machine estimate.

    This CPU is shared with other jobs (load average 5-7 on 2 cores while these ran), so wall-clock
    rates mostly measure the scheduler's share: a run with more runnable threads gets more of the CPU.
    CPU seconds per image do not depend on that share; ``cores / cpu_per_img`` is the rate a dedicated
    machine with ``cores`` cores would reach if the work keeps every core busy (the pipeline's and the
    batched forward's case; for the one-image-at-a-time naive loop it is an upper bound).
    """
    cores = len(os.sched_getaffinity(0))
    est = n / t.s if cuda else cores * n / t.cpu  # on a GPU the device, not the CPU share, is the limit
    return {"wall": n / t.s, "cpu_per_img": t.cpu / n, "est": est}


def md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
