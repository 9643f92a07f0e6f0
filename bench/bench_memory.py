"""Peak RSS does not grow with the number of images.

The same run at two sizes, each in a fresh process (peak RSS is per process): N jobs cycling through
the 128 COCO photos (every job is read, decoded and preprocessed again; no embedding cache), fed
lazily as ``localtag tag`` does, embedded, scored and picked, results dropped. The 10,000-job run also
samples the current RSS every 1,000 results. Model: a tiny random-init CLIP (32 px input): the
pipeline's buffers, not the model, are what could grow; a large model adds a constant.

    .venv/bin/python bench/bench_memory.py --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _common as C

TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_store():
    import open_clip
    import torch

    from localtag.core.models import ModelStore

    root = C.BENCH_DIR / "store"
    if not (root / "tiny-random" / "manifest.json").is_file():
        torch.manual_seed(0)
        ckpt = C.BENCH_DIR / "ckpt" / "tiny"
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.CLIP(**TINY_CFG).state_dict(), ckpt / "model.bin")
        (ckpt / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
        ModelStore(root).import_checkpoint(ckpt / "model.bin", name="tiny-random",
                                           config=ckpt / "open_clip_config.json", overwrite=True)
    return root


def child(n: int, bs: int) -> None:
    import numpy as np

    from localtag.core.pipeline import Job, Pipeline

    tagger, encoder = C.load_model(tiny_store(), "tiny-random", C.coco_vocab())
    files = C.coco_files()
    before = C.rss_mb()[0]

    def jobs():
        for i in range(n):
            f = files[i % len(files)]
            yield Job(f"{i}:{f.name}", f)

    samples = []
    buf = []
    with C.Timer() as t:
        for i, r in enumerate(Pipeline(encoder, batch_size=bs, workers=2).run(jobs()), 1):
            assert r.ok
            buf.append(r.embedding)
            if len(buf) == bs:
                for row in tagger.values(np.stack(buf)):
                    tagger.pick(row)
                buf = []
            if i % 1000 == 0:
                samples.append((i, C.rss_mb()[0]))
    print(json.dumps({"jobs": n, "rss_before_mb": before, "peak_rss_mb": C.rss_mb()[1], "samples": samples,
                      "img_per_s": round(n / t.s, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch_size)
        return
    print(json.dumps(C.machine()), flush=True)
    tiny_store()
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append({"jobs": n, "RSS after model load (MB)": r["rss_before_mb"], "peak RSS (MB)": r["peak_rss_mb"],
                     "RSS every 1,000 results (MB)": " ".join(f"{v:.0f}" for _, v in r["samples"]),
                     "img/s": r["img_per_s"]})
    print()
    print(C.md_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
