"""12 MP photos on this CPU: the physical limit, and where end-to-end time goes (issue 11).

All in CPU seconds per image (this process, all threads), so the shared machine's load does not
matter; the dedicated-machine rate is ``cores / CPU-s per image``.

- **forward**: the image tower on preprocessed batches of ``--batch`` (fp32, and int8 with
  ``--int8``): the model's share;
- **stages**, each alone, single thread, over the ``--big`` 12 MP JPEGs: read the file, sha256 (the
  embedding cache's key), the minimal entropy decode (libjpeg-turbo at 1/8 scale: the whole Huffman
  decode, DC-only inverse DCT; no decoder of the file does less), the ``--fast`` decode (the scale
  ``pipeline.DRAFT_MARGIN`` allows), EXIF transpose + RGB, open_clip's resize + crop, normalisation;
- **end to end**: ``Pipeline.run`` with ``fast=True`` (cache on and off) + scoring and picking 20 tags
  against the 80 COCO names, as ``localtag tag --fast``.

The limit is ``cores / (forward + minimal entropy decode)``; the table says how much of it the
pipeline reaches and which stages make up the difference.

    .venv/bin/python bench/bench_12mp.py --big 32 --batch 16
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tempfile
import time

import _common as C


def per_image(fn, items) -> float:
    t0 = time.process_time()
    for it in items:
        fn(it)
    return (time.process_time() - t0) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=C.DEFAULT_ARCH)
    ap.add_argument("--big", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--int8", action="store_true", help="also the int8 tower and an int8 end to end")
    args = ap.parse_args()
    print(json.dumps(C.machine()), flush=True)

    import torch
    from bench_throughput import score
    from PIL import Image, ImageOps

    from localtag.core import decode as images
    from localtag.core import precision as P
    from localtag.core.cache import EmbeddingCache
    from localtag.core.encoder import ImageEncoder
    from localtag.core.models import preprocess_for
    from localtag.core.pipeline import DRAFT_MARGIN, Job, Pipeline
    from localtag.core.preprocess import short_side

    cores = len(os.sched_getaffinity(0))
    root = C.random_store(args.arch)
    loaded = C.load_model(root, f"{args.arch}-random", C.coco_vocab())
    tagger, encoder = loaded
    files = C.big_jpegs(args.big)
    size = short_side(tagger.info.preprocess['size'])
    draft = DRAFT_MARGIN * size
    datas = [f.read_bytes() for f in files]
    pre = encoder.pre

    def entropy_min(d):
        im = Image.open(io.BytesIO(d))
        im.draft("RGB", (im.width // 8, im.height // 8))
        im.load()

    def fast_decode(d):
        im = Image.open(io.BytesIO(d))
        scale = min(im.size) / draft
        im.draft("RGB", (max(1, int(im.width / scale)), max(1, int(im.height / scale))))
        im.load()
        return im

    drafted = [fast_decode(d) for d in datas]
    upright = [images.to_rgb(ImageOps.exif_transpose(im)) for im in drafted]
    pixels = [pre.pixels(im) for im in upright]
    stages = {
        "read file": per_image(lambda f: f.read_bytes(), files),
        "sha256 (cache key)": per_image(lambda d: hashlib.sha256(d).hexdigest(), datas),
        "minimal entropy decode (1/8 scale)": per_image(entropy_min, datas),
        f"--fast decode (scale for ≥ {draft} px)": per_image(fast_decode, datas),
        "exif transpose + RGB": per_image(lambda im: images.to_rgb(ImageOps.exif_transpose(im)), drafted),
        "open_clip resize + crop": per_image(pre.pixels, upright),
        "normalise": per_image(lambda p: pre.normalize(p.permute(2, 0, 1)[None]), pixels),
    }
    stages["images.decode(draft) total"] = per_image(lambda d: images.decode(d, draft=draft), datas)
    print(f"drafted size {drafted[0].size} from {Image.open(files[0]).size}", flush=True)

    x = torch.stack([preprocess_for(tagger.info)(images.decode(d, draft=draft)) for d in datas[: args.batch]])
    variants = ["fp32"] + (["int8"] if args.int8 else [])
    towers = {v: P.prepare_image_tower(tagger.model, v, torch.device("cpu")) for v in variants}

    def fwd(tower):
        with torch.inference_mode():
            tower(x)  # warm-up
            t0 = time.process_time()
            for _ in range(3):
                tower(x)
            return (time.process_time() - t0) / (3 * len(x))

    forward = {v: C.in_thread(fwd, t) for v, t in towers.items()}

    def e2e(cache, enc=encoder):
        pipe = Pipeline(enc, batch_size=args.batch, workers=2, fast=True, cache=cache)
        t0 = time.process_time()
        n = score(tagger, pipe.run([Job(str(f), f) for f in files]))
        return (time.process_time() - t0) / n

    with tempfile.TemporaryDirectory() as d:
        end = {"cache on": C.in_thread(e2e, EmbeddingCache(d, tagger.model_sha256)), "cache off": C.in_thread(e2e, None)}
    if args.int8:
        int8 = ImageEncoder(tagger.model, preprocess_for(tagger.info), image_size=size, precision="int8")
        end["int8, cache off"] = C.in_thread(e2e, None, int8)

    ms = {k: round(v * 1000, 2) for k, v in stages.items()}
    print("\nsingle-thread CPU ms per 12 MP image:")
    print(C.md_table([{"stage": k, "cpu_ms": v} for k, v in ms.items()], ["stage", "cpu_ms"]))
    rows = []
    for v, f in forward.items():
        limit = cores / (f + stages["minimal entropy decode (1/8 scale)"])
        for k, e in end.items():
            if ("int8" in k) != (v == "int8"):
                continue
            rows.append({"tower": v, "end to end": k, "forward cpu_ms": round(f * 1000, 1),
                         "forward-only img/s": round(cores / f, 2),
                         "limit img/s": round(limit, 2), "limit ÷ forward": round(limit / (cores / f), 3),
                         "e2e cpu_ms": round(e * 1000, 1), "e2e img/s": round(cores / e, 2),
                         "e2e ÷ forward": round(f / e, 3), "e2e ÷ limit": round((cores / e) / limit, 3),
                         "rest cpu_ms": round((e - f - stages["minimal entropy decode (1/8 scale)"]) * 1000, 1)})
    print(f"\n{args.arch} (random init), {len(files)} 12 MP JPEGs, batch {args.batch}, dedicated {cores}-core estimates:")
    print(C.md_table(rows, list(rows[0])))
    print(json.dumps({"stages_cpu_ms": ms, "rows": rows}))


if __name__ == "__main__":
    main()
