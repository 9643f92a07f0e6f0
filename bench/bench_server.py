"""Server under concurrency: 32 concurrent single-image clients vs offline batch throughput.

Target: the server reaches ≥ 0.8× the offline throughput. One run, one model object, the same images:

- offline: ``Pipeline.run`` over the image files (``--batch-size``) + scoring + picking, as ``localtag tag``;
- server: ``localtag.serve.server.create_app(settings, loaded)`` under uvicorn on 127.0.0.1 (a thread of this
  process); ``--clients`` asyncio clients (httpx) each POST one image at a time (base64, Clarifai's
  ``/v2/models/general-image-recognition/outputs``), back to back, until every image is done. The
  clients run in the same process (their JSON and base64 work is small next to the model's).

Offline runs before and after the server run; the ratio uses their mean. Model: random-init ViT-B-32.

    .venv/bin/python bench/bench_server.py --arch ViT-B-32 --images 64 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json

import _common as C


def offline(loaded, files, bs: int) -> float:
    from bench_throughput import score

    from localtag.core.pipeline import Pipeline
    from localtag.core.sources import walk

    with C.Timer() as t:
        n = score(loaded.tagger, Pipeline(loaded.encoder, batch_size=bs, workers=2).run(walk(files)))
    assert n == len(files)
    return C.rates(n, t)


async def clients(url: str, payloads: list[bytes], n_clients: int) -> float:
    import httpx

    todo: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        todo.put_nowait(p)
    failures = []

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                body = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await http.post(url, content=body, headers={"content-type": "application/json"})
            doc = r.json()
            if r.status_code != 200 or doc["status"]["code"] != 10000 or not doc["outputs"][0]["data"]["concepts"]:
                failures.append((r.status_code, doc.get("status")))

    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        with C.Timer() as t:
            await asyncio.gather(*(client(http) for _ in range(n_clients)))
    assert not failures, failures[:3]
    return C.rates(len(payloads), t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    print(json.dumps(C.machine()), flush=True)

    root = C.random_store(args.arch)
    loaded = C.load_model(root, f"{args.arch}-random", C.coco_vocab())
    files = C.coco_files()[: args.images]
    payloads = C.predict_bodies(files)

    off1 = C.in_thread(offline, loaded, files, args.batch_size)
    with C.live_server(root, f"{args.arch}-random", loaded, "cache", batch_size=args.batch_size) as base:
        url = f"{base}/v2/models/general-image-recognition/outputs"
        asyncio.run(clients(url, payloads[:4], 4))  # warm-up
        srv = asyncio.run(clients(url, payloads, args.clients))
    off2 = C.in_thread(offline, loaded, files, args.batch_size)
    rows = []
    for key, what in (("est", "dedicated-machine estimate (cores / CPU-s per image)"), ("wall", "wall clock")):
        off = (off1[key] + off2[key]) / 2
        rows.append({"measure": what, "model (random init)": args.arch, "images": f"COCO ×{len(files)}",
                     "batch": args.batch_size, "offline img/s": f"{off:.2f} ({off1[key]:.2f}/{off2[key]:.2f})",
                     f"server, {args.clients} clients img/s": f"{srv[key]:.2f}",
                     "server ÷ offline": f"{srv[key] / off:.2f}"})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\npeak RSS {C.rss_mb()[1]:.0f} MB; the server's CPU seconds include the 32 clients' own work")
    print(C.md_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
