"""Does `directus sync --rendition` pay? Originals vs Directus's own resized JPEGs, side by side.

A real Directus on 127.0.0.1 (tests/directus_harness.py, SQLite) holds two sets: the 128 COCO photos
(640 px, ~160 kB) and COCO photos upscaled to ~12 MP JPEGs (like camera uploads). Each set is walked by
`run_sync` in dry-run mode (download + decode + embed + score; no writes, so every variant sees the same
library) with a tiny random-init model that takes 224 px input like the real ones (so decoding, draft
mode and the resize are the real work, and the model's share is small): the numbers are the transfer
and decode side, which renditions change:

- ``original``: the original bytes, exact decode;
- ``original --fast``: the original bytes, JPEG draft-mode decode (DCT scaling in libjpeg);
- ``rendition cold``: ``/assets/{id}?width=W&height=W&fit=outside&format=jpg``, first request, so
  Directus decodes and resizes with sharp (it then keeps the result in its storage);
- ``rendition warm``: the same again, served from Directus's storage.

Reported per variant: wall seconds, localtag's CPU seconds, Directus's CPU seconds (its process's
utime+stime from /proc; both share this machine's cores) and MB transferred.

    .venv/bin/python bench/bench_directus_rendition.py --big 32 --width 448
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common as C

sys.path.insert(0, str(C.REPO / "tests"))


def proc_cpu(pid: int) -> float:
    """utime + stime of a process and its reaped children, in seconds."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tiny_model():
    from conftest import TINY_CFG, make_random_checkpoint

    from localtag.core.config import Settings
    from localtag.core.loader import load
    from localtag.core.models import ModelStore

    root = C.BENCH_DIR / "tiny-store"
    if not (root / "tiny-224" / "manifest.json").is_file():
        cfg = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 224, "patch_size": 32}}
        ckpt = make_random_checkpoint(C.BENCH_DIR / "tiny-ckpt" / "tiny-224", cfg)
        ModelStore(root).import_checkpoint(ckpt, name="tiny-224", overwrite=True)
    settings = Settings(models_dir=root, model="tiny-224", vocab=C.coco_vocab(), device="cpu",
                        cache_dir=C.BENCH_DIR / "cache", embedding_cache=False, max_concepts=5)
    loaded = load(settings)
    loaded.tagger.text_embeddings  # noqa: B018 - built before anything is timed
    return loaded, settings


def counting(client) -> list[int]:
    """Make client.download add the bytes it returns to the returned one-element list."""
    moved = [0]
    original = type(client).download

    def download(*args, **kwargs):
        data = original(client, *args, **kwargs)
        moved[0] += len(data)
        return data

    client.download = download
    return moved


def main() -> None:
    from directus_harness import DirectusClient, DirectusServer

    from localtag.directus.sync import SyncOptions, run_sync

    ap = argparse.ArgumentParser()
    ap.add_argument("--coco", type=int, default=128)
    ap.add_argument("--big", type=int, default=32, help="how many ~12 MP JPEGs")
    ap.add_argument("--width", type=int, default=448, help="rendition short side")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    loaded, settings = tiny_model()
    sets = {"coco 640px": C.coco_files()[: args.coco], "12 MP": C.big_jpegs(args.big)}
    rows = []
    with DirectusServer() as directus, DirectusClient(directus.url, directus.token) as client:
        node = directus.proc.pid
        for label, files in sets.items():
            marker = f"bench-{label}"
            for f in files:
                client.upload(f, title=marker)
            mb = sum(f.stat().st_size for f in files) / 1e6
            variants = [("original", None, False), ("original --fast", None, True),
                        ("rendition cold", args.width, False), ("rendition warm", args.width, False)]
            for name, width, fast in variants:
                s = settings.model_copy(update={"fast_decode": fast})
                moved = counting(client)
                opts = SyncOptions(filter={"title": {"_eq": marker}}, dry_run=True, concurrency=args.concurrency,
                                   rendition=width)
                d0, t0, c0 = proc_cpu(node), time.perf_counter(), time.process_time()
                summary = C.in_thread(run_sync, client, *loaded, s, opts)
                wall, cpu, dcpu = time.perf_counter() - t0, time.process_time() - c0, proc_cpu(node) - d0
                assert summary.tagged == len(files), summary.to_json()
                rows.append({"set": label, "images": len(files), "variant": name, "wall_s": round(wall, 2),
                             "img_per_s": round(len(files) / wall, 1), "localtag_cpu_s": round(cpu, 2),
                             "directus_cpu_s": round(dcpu, 2), "total_cpu_s": round(cpu + dcpu, 2),
                             "MB_moved": round(moved[0] / 1e6, 1), "MB_stored": round(mb, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"machine": C.machine(), "width": args.width, "rows": rows}, indent=1))
    print(C.md_table(rows, ["set", "images", "variant", "wall_s", "img_per_s", "localtag_cpu_s", "directus_cpu_s",
                            "total_cpu_s", "MB_moved"]))


if __name__ == "__main__":
    main()
