"""GPU throughput of localtag (issue 11, part B), written as one JSON file of raw results.

For each random-init architecture (default ViT-B-32, ViT-B-32-256, ViT-L-14):

- **forward only**: ``model.encode_image`` under the CUDA precision ``auto`` picks (bf16, else fp16),
  channels_last, on preprocessed tensors already on the device, at each batch size of
  ``--batch-sizes`` (img/s and peak GPU memory per batch size); the best is reported;
- **end to end, GPU decode**: ``Pipeline`` with ``fast`` and device decoding (nvjpeg → orient → resize
  → crop → normalise on the GPU), ``--workers`` host threads, over ``--jobs`` in-memory COCO JPEGs,
  plus scoring and picking 20 tags against the 80 COCO names (``localtag tag`` minus printing);
- **end to end, CPU decode**: the same with exact Pillow decoding in ``--workers`` threads;
- **server**: ``create_app`` under uvicorn, ``--clients`` concurrent single-image clients.

Every throughput key ends in ``img_per_s``. On a machine without CUDA it runs as a dry run on the
CPU (small sizes, ``"dry_run": true``) so that the script itself is checked.

    python bench/bench_cuda.py --out bench/results/cuda-$(date +%F).json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path

import _common as C


def fp16_store(arch: str, seed: int = 0) -> Path:
    """A store with ``arch`` at random init, saved in fp16 safetensors (half the bytes to hash and load)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from localtag.core.models import ModelStore

    root = C.BENCH_DIR / "store16"
    name = f"{arch}-random"
    if not (root / name / "manifest.json").is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(arch)
        tmp = C.BENCH_DIR / "ckpt16" / arch
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, tmp / "open_clip_model.safetensors")
        del model
        ModelStore(root).import_checkpoint(tmp / "open_clip_model.safetensors", arch=arch, name=name,
                                           pretrained=f"random init, seed {seed}", overwrite=True)
        (tmp / "open_clip_model.safetensors").unlink()
    return root


def forward_sweep(encoder, batch_sizes: list[int], seconds: float) -> dict:
    """The encoder's own forward pass (its precision, channels_last) on random batches of each size."""
    import torch

    dev = encoder.device
    choice = encoder.precision
    tower = encoder.forward
    size = encoder.image_size
    rows = {}
    for bs in batch_sizes:
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            x = torch.randn(bs, 3, size, size, device=dev)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                tower(x)
                _sync(dev)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds or n < 3:
                    tower(x)
                    n += 1
                _sync(dev)
                dt = time.perf_counter() - t0
            row = {"img_per_s": round(n * bs / dt, 1), "batches": n}
            if dev.type == "cuda":
                row["gpu_mem_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            rows[bs] = row
            print(f"  forward bs {bs}: {row}", flush=True)
            del x
        except torch.cuda.OutOfMemoryError:
            rows[bs] = {"oom": True}
            break
    best = max((b for b in rows if "img_per_s" in rows[b]), key=lambda b: rows[b]["img_per_s"])
    return {"precision": choice, "by_batch_size": rows, "best_batch_size": best,
            "forward_img_per_s": rows[best]["img_per_s"]}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(loaded, datas: list[bytes], bs: int, workers: int, device_decode: bool) -> dict:
    from bench_throughput import score

    from localtag.core.pipeline import Job, Pipeline

    tagger, encoder = loaded
    pipe = Pipeline(encoder, batch_size=bs, workers=workers, fast=device_decode, device_decode=device_decode)
    score(tagger, pipe.run([Job(str(i), d) for i, d in enumerate(datas[: 2 * bs])]))  # warm-up
    with C.Timer() as t:
        n = score(tagger, pipe.run([Job(str(i), d) for i, d in enumerate(datas)]))
    assert n == len(datas)
    return {"img_per_s": round(n / t.s, 1), "cpu_s_per_img": round(t.cpu / n, 5), "images": n,
            "device_decode": pipe.device_decode}


def server(loaded, root: Path, name: str, datas: list[bytes], n_clients: int, bs: int, workers: int) -> dict:
    import uvicorn
    from bench_server import clients

    from localtag.core.config import Settings
    from localtag.serve.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(models_dir=root, model=name, vocab=C.coco_vocab(), device=str(loaded.encoder.device),
                        cache_dir=C.BENCH_DIR / "cache", host="127.0.0.1", port=port, batch_size=bs, workers=workers)
    srv = uvicorn.Server(uvicorn.Config(create_app(settings, loaded), host="127.0.0.1", port=port,
                                        log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    payloads = [json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(d).decode()}}}]}).encode()
                for d in datas]
    url = f"http://127.0.0.1:{port}/v2/models/general-image-recognition/outputs"
    try:
        asyncio.run(clients(url, payloads[:n_clients], n_clients))  # warm-up
        r = asyncio.run(clients(url, payloads, n_clients))
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    return {"img_per_s": round(r["wall"], 1), "clients": n_clients, "images": len(payloads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-32-256", "ViT-L-14"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    ap.add_argument("--seconds", type=float, default=2.0, help="per forward measurement")
    ap.add_argument("--jobs", type=int, default=8192, help="COCO JPEGs (cycled) per end-to-end run")
    ap.add_argument("--server-images", type=int, default=2048)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: DRY RUN on the CPU with small sizes (no figure here is a GPU result)", flush=True)
        args.archs = args.archs[:1]
        args.batch_sizes = [b for b in args.batch_sizes if b <= 16] or [8, 16]
        args.seconds, args.jobs, args.server_images, args.clients = 0.5, 32, 16, 4
    report = {"date": datetime.date.today().isoformat(), "dry_run": not cuda,
              "device_name": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
              "machine": C.machine(), "workers": args.workers, "jobs": args.jobs, "models": {}}
    if cuda:
        report["gpu_mem_total_mib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    coco = [f.read_bytes() for f in C.coco_files()]
    datas = [coco[i % len(coco)] for i in range(args.jobs)]
    for arch in args.archs:
        print(f"{arch}:", flush=True)
        t0 = time.perf_counter()
        root = fp16_store(arch)
        loaded = C.load_model(root, f"{arch}-random", C.coco_vocab())
        row: dict = {"setup_s": round(time.perf_counter() - t0, 1)}
        row["forward"] = forward_sweep(loaded.encoder, args.batch_sizes, args.seconds)
        bs = row["forward"]["best_batch_size"]
        row["e2e_gpu_decode"] = end_to_end(loaded, datas, bs, args.workers, device_decode=cuda)
        print(f"  end to end, {'GPU' if cuda else 'CPU (dry run)'} decode: {row['e2e_gpu_decode']}", flush=True)
        row["e2e_cpu_decode"] = end_to_end(loaded, datas, bs, args.workers, device_decode=False)
        print(f"  end to end, CPU decode ({args.workers} threads): {row['e2e_cpu_decode']}", flush=True)
        row["server"] = server(loaded, root, f"{arch}-random", datas[: args.server_images], args.clients,
                               min(bs, 256), args.workers)
        print(f"  server, {args.clients} clients: {row['server']}", flush=True)
        fwd = row["forward"]["forward_img_per_s"]
        row["summary"] = {
            "forward_img_per_s": fwd,
            "e2e_gpu_decode_img_per_s": row["e2e_gpu_decode"]["img_per_s"],
            "e2e_cpu_decode_img_per_s": row["e2e_cpu_decode"]["img_per_s"],
            "server_img_per_s": row["server"]["img_per_s"],
            "e2e_gpu_decode_over_forward": round(row["e2e_gpu_decode"]["img_per_s"] / fwd, 3),
            "e2e_cpu_decode_over_forward": round(row["e2e_cpu_decode"]["img_per_s"] / fwd, 3),
        }
        report["models"][arch] = row
        del loaded
        if cuda:
            torch.cuda.empty_cache()
    goals = {}
    b32 = report["models"].get("ViT-B-32", {}).get("summary")
    if b32:
        best = max(b32["e2e_gpu_decode_img_per_s"], b32["e2e_cpu_decode_img_per_s"])
        goals["vit_b32_e2e_ge_10000_img_per_s"] = best >= 10000  # issue 15: one H100/H200
        goals["vit_b32_e2e_ge_0.8_forward"] = best >= 0.8 * b32["forward_img_per_s"]
    l14 = report["models"].get("ViT-L-14", {}).get("summary")
    if l14:
        best = max(l14["e2e_gpu_decode_img_per_s"], l14["e2e_cpu_decode_img_per_s"])
        goals["vit_l14_e2e_ge_0.9_forward"] = best >= 0.9 * l14["forward_img_per_s"]
    report["goals"] = goals
    print(json.dumps({"goals": goals, "summary": {a: r["summary"] for a, r in report["models"].items()}}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
