"""The extra cost of a 3-model workflow (general + color + nsfw) over the general model alone, and the
colour model's milliseconds per image. Side by side in one run, on a live server (REST, 4 clients).

    .venv/bin/python bench/bench_family.py --arch ViT-B-32 --images 32 --rounds 3

Rounds alternate general / workflow so that drifting load on a shared CPU hits both alike; the ratio
is of CPU seconds per image (this process: server and clients) and of wall time. Model: random-init
(speed does not depend on the weights). The colour figures are in-process: ``dominant_colors`` on
decoded COCO images, and decode + colours from the JPEG bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import _common as C
import httpx


async def post_all(url: str, bodies: list[bytes], n_clients: int) -> None:
    queue = list(bodies)
    failures = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            r = await http.post(url, content=queue.pop(), headers={"content-type": "application/json"})
            if r.status_code != 200:
                failures.append(r.text[:300])

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(n_clients)))
    assert not failures, failures[:2]


def colour_ms(files) -> dict:
    from localtag.core import decode
    from localtag.core.colors import dominant_colors

    images = [decode.decode(f.read_bytes()) for f in files]
    dominant_colors(images[0])
    t0 = time.perf_counter()
    c0 = time.process_time()
    for img in images:
        dominant_colors(img)
    colours = (time.perf_counter() - t0) / len(images) * 1000, (time.process_time() - c0) / len(images) * 1000
    blobs = [f.read_bytes() for f in files]
    t0, c0 = time.perf_counter(), time.process_time()
    for b in blobs:
        dominant_colors(decode.decode(b, draft=224))
    both = (time.perf_counter() - t0) / len(blobs) * 1000, (time.process_time() - c0) / len(blobs) * 1000
    sizes = sorted({f"{im.size[0]}x{im.size[1]}" for im in images})
    return {"colours ms/img (wall, cpu)": [round(x, 2) for x in colours],
            "decode(draft 224) + colours ms/img (wall, cpu)": [round(x, 2) for x in both],
            "images": len(images), "sizes e.g.": sizes[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(C.machine()), flush=True)

    files = C.coco_files()[: args.images]
    print(json.dumps(colour_ms(files)), flush=True)

    root = C.random_store(args.arch)
    loaded = C.load_model(root, f"{args.arch}-random", C.coco_vocab())
    bodies = C.predict_bodies(files)
    with C.live_server(root, f"{args.arch}-random", loaded, "cache-family") as base:
        wf = {"workflows": [{"id": "bench3", "nodes": [{"id": "g", "model": {"id": "general-image-recognition"}},
                                                       {"id": "c", "model": {"id": "color-recognition"}},
                                                       {"id": "n", "model": {"id": "nsfw-recognition"}}]}]}
        r = httpx.post(f"{base}/v2/workflows", json=wf, timeout=60)
        assert r.status_code in (200, 409), r.text
        urls = {"general": f"{base}/v2/models/general-image-recognition/outputs",
                "workflow (general + color + nsfw)": f"{base}/v2/workflows/bench3/results"}
        for url in urls.values():
            asyncio.run(post_all(url, bodies[:4], 2))  # warm-up
        totals = {k: [0.0, 0.0] for k in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                with C.Timer() as t:
                    asyncio.run(post_all(url, bodies, args.clients))
                totals[name][0] += t.cpu
                totals[name][1] += t.s
    n = args.images * args.rounds
    g, w = totals["general"], totals["workflow (general + color + nsfw)"]
    row = {"model (random init)": args.arch, "images": f"COCO ×{args.images} × {args.rounds} rounds",
           "general CPU ms/img": round(g[0] / n * 1000, 1), "workflow CPU ms/img": round(w[0] / n * 1000, 1),
           "workflow ÷ general (CPU)": round(w[0] / g[0], 3), "workflow ÷ general (wall)": round(w[1] / g[1], 3)}
    print(json.dumps(row), flush=True)
    print(C.md_table([row], list(row)))


if __name__ == "__main__":
    main()
