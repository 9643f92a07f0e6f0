"""How far fast (JPEG draft) decoding moves results from exact, open_clip-identical preprocessing.

For every image: the exact path (full decode → open_clip's transform) and the fast path (libjpeg
DCT-domain downscaling to the smallest 1/2, 1/4, 1/8 scale whose short side is ≥ margin × the model
input → the same transform), at margin 2 (``pipeline.DRAFT_MARGIN``, what ``--fast`` does) and margin 1
(the most aggressive). Reported per model and image set:

- top-5 agreement: mean over images of |top-5 exact ∩ top-5 fast| / 5;
- identical top-5: share of images whose five concepts come in the same order;
- top-1 agreement; min / mean cosine between the two embeddings; max |Δ value| of any concept;
- drafted: share of images the fast path decoded at reduced scale (the others are exact anyway).

Models: ``models/cifar10-tiny`` (the trained fixture, 32 px input; its 10-class vocabulary, so top-5
of 10) and ViT-B-32 at random init (224 px) against the 80 COCO category names.

    .venv/bin/python bench/bench_draft.py --coco 128 --big 128
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import _common as C


def embed(encoder, files, draft, bs: int = 32):
    import numpy as np
    import torch

    from localtag.core import decode

    def prep(f):
        img = decode.decode(f, draft=draft)
        return encoder.pre.tensor(img), img.size

    out, sizes = [], []
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(files), bs):
            got = list(pool.map(prep, files[i : i + bs]))
            out.append(encoder.encode(torch.stack([t for t, _ in got])).numpy())
            sizes += [s for _, s in got]
    return np.concatenate(out), sizes


def compare(tagger, exact, fast, k: int = 5) -> dict:
    import numpy as np

    ve, vf = tagger.values(exact), tagger.values(fast)
    te = np.argsort(-ve, axis=1)[:, :k]
    tf = np.argsort(-vf, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(te, tf, strict=True)]
    cos = (exact * fast).sum(1)
    return {
        "top5_agreement": float(np.mean(overlap)),
        "identical_top5": float(np.mean([list(a) == list(b) for a, b in zip(te, tf, strict=True)])),
        "top1_agreement": float(np.mean(te[:, 0] == tf[:, 0])),
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "max_abs_dvalue": float(np.abs(ve - vf).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco", type=int, default=128)
    ap.add_argument("--big", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=["cifar10-tiny", "ViT-B-32"])
    args = ap.parse_args()
    print(json.dumps(C.machine()), flush=True)

    sets = {"COCO 640×480": C.coco_files()[: args.coco], "12 MP JPEG": C.big_jpegs(args.big)}
    rows = []
    for name in args.models:
        if name == "cifar10-tiny":
            tagger, encoder = C.load_model(C.REPO / "models", str(C.REPO / "models" / "cifar10-tiny"),
                                           C.REPO / "models" / "cifar10-tiny" / "vocab.txt")
        else:
            tagger, encoder = C.load_model(C.random_store(name), f"{name}-random", C.coco_vocab())
        size = encoder.image_size
        for set_name, files in sets.items():
            exact, exact_sizes = embed(encoder, files, None)
            for margin in (2, 1):
                fast, fast_sizes = embed(encoder, files, margin * size)
                r = {"model": name, "input px": size, "images": f"{set_name} ×{len(files)}", "margin": margin,
                     "drafted": sum(a != b for a, b in zip(exact_sizes, fast_sizes, strict=True)) / len(files),
                     **compare(tagger, exact, fast)}
                print(json.dumps(r), flush=True)
                rows.append(r)
    fmt = [{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    print()
    print(C.md_table(fmt, list(fmt[0])))


if __name__ == "__main__":
    main()
