"""Throughput: (a) model forward only, (b) a naive open_clip loop, (c) localtag end to end.

Same run, same batch size, real photos (COCO, ~640×480) and the same photos upscaled to 12 MP JPEGs.
Models are random-init (no pretrained weights can be had here; speed does not depend on the weights):
the default model's architecture ViT-B-32-256 and ViT-B-32.

- (a) ``ImageEncoder.encode`` on tensors preprocessed beforehand, ``--batch-size`` at a time: the compute
  limit of the model on this machine;
- (b) what a user writes with open_clip: ``Image.open`` → open_clip's preprocess → ``encode_image``
  on one image at a time;
- (c) ``Pipeline.run`` over the files (read, decode, preprocess in worker threads, batches, model) and
  scoring + tag picking against the 80 COCO category names, like ``localtag tag`` minus the printing;
  ``exact`` (open_clip parity) and ``fast`` (JPEG draft decoding, ``--fast``).

    .venv/bin/python bench/bench_throughput.py --arch ViT-B-32-256 ViT-B-32 --coco 128 --big 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

import _common as C


def score(tagger, results) -> int:
    import numpy as np

    n = 0
    buf = []
    for r in results:
        n += 1
        if r.ok:
            buf.append(r.embedding)
        if len(buf) >= 64:
            for row in tagger.values(np.stack(buf)):
                tagger.pick(row, max_concepts=20)
            buf = []
    if buf:
        for row in tagger.values(np.stack(buf)):
            tagger.pick(row, max_concepts=20)
    return n


def forward_only(encoder, tensors, bs: int) -> dict:
    import torch

    batches = [torch.stack(tensors[i : i + bs]).to(encoder.device) for i in range(0, len(tensors), bs)]
    with C.Timer() as t:
        for b in batches:
            encoder.encode(b)  # returns on the CPU: synchronises on CUDA
    return C.rates(len(tensors), t, encoder.cuda)


def naive(encoder, files) -> dict:
    """open_clip's own loop, one image at a time (the reference, outside localtag's encoder)."""
    import torch
    from PIL import Image

    model, preprocess = encoder.model, encoder.pre.transform  # open_clip's model and its eval transform
    prep_cpu = 0.0
    with C.Timer() as t, torch.inference_mode():
        for f in files:
            c0 = time.process_time()
            x = preprocess(Image.open(f)).unsqueeze(0).to(encoder.device)
            prep_cpu += time.process_time() - c0
            feats = model.encode_image(x)
            torch.nn.functional.normalize(feats, dim=-1).cpu()
    r = C.rates(len(files), t, encoder.cuda)
    if not encoder.cuda:
        # one image at a time: its decode and preprocessing run on one core while the other waits;
        # only the forward pass can use every core (counted as if perfectly parallel: favours naive)
        cores = len(os.sched_getaffinity(0))
        r["est"] = len(files) / (prep_cpu + (t.cpu - prep_cpu) / cores)
    return r


def end_to_end(loaded, files, bs: int, workers: int, fast: bool) -> dict:
    from localtag.core.pipeline import Pipeline
    from localtag.core.sources import walk

    tagger, encoder = loaded
    pipe = Pipeline(encoder, batch_size=bs, workers=workers, fast=fast)
    with C.Timer() as t:
        n = score(tagger, pipe.run(walk(files)))
    assert n == len(files)
    return C.rates(len(files), t, encoder.cuda)


def run_arch(arch: str, sets: dict, bs: int, workers: int) -> list[dict]:
    from localtag.core import decode

    root = C.random_store(arch)
    loaded = C.load_model(root, f"{arch}-random", C.coco_vocab(), batch_size=bs)
    encoder = loaded.encoder
    bs = encoder.batch_size  # a setting <= 0 is measured on CUDA
    rows = []
    for set_name, files in sets.items():
        tensors = [encoder.pre.tensor(decode.decode(f)) for f in files]
        C.in_thread(forward_only, encoder, tensors[:bs], bs)  # warm-up
        r = {"arch": arch, "images": f"{set_name} ×{len(files)}", "batch": bs,
             "a1": C.in_thread(forward_only, encoder, tensors, bs)}
        del tensors
        r["c_exact"] = C.in_thread(end_to_end, loaded, files, bs, workers, False)
        r["c_fast"] = C.in_thread(end_to_end, loaded, files, bs, workers, True)
        r["b"] = C.in_thread(naive, encoder, files)
        tensors = [encoder.pre.tensor(decode.decode(f)) for f in files]
        r["a2"] = C.in_thread(forward_only, encoder, tensors, bs)
        del tensors
        r["a"] = {k: (r["a1"][k] + r["a2"][k]) / 2 for k in r["a1"]}
        r["rss_mb"] = C.rss_mb()[0]
        r["load"] = round(os.getloadavg()[0], 2)
        print(json.dumps(r, default=lambda v: round(v, 4)), flush=True)
        rows.append(r)
    return rows


def fmt_rows(rows: list[dict], key: str) -> list[dict]:
    out = []
    for r in rows:
        a, b, ce, cf = (r[k][key] for k in ("a", "b", "c_exact", "c_fast"))
        out.append({"model (random init)": r["arch"], "images": r["images"], "batch": r["batch"],
                    "(a) forward": f"{a:.2f}", "(b) naive": f"{b:.2f}",
                    "(c) exact": f"{ce:.2f}", "exact ÷ a": f"{ce / a:.2f}", "exact ÷ b": f"{ce / b:.2f}",
                    "(c) fast": f"{cf:.2f}", "fast ÷ a": f"{cf / a:.2f}", "fast ÷ b": f"{cf / b:.2f}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=[C.DEFAULT_ARCH, "ViT-B-32"])
    ap.add_argument("--coco", type=int, default=128, help="COCO photos (0: skip)")
    ap.add_argument("--big", type=int, default=32, help="12 MP JPEGs (0: skip)")
    ap.add_argument("--batch-size", type=int, default=16, help="0: chosen as the pipeline would (auto)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    info = C.machine()
    print(json.dumps(info), flush=True)
    sets = {}
    if args.coco:
        sets["COCO 640×480"] = C.coco_files()[: args.coco]
    if args.big:
        sets["12 MP JPEG"] = C.big_jpegs(args.big)
    t0 = time.time()
    rows = [r for arch in args.arch for r in run_arch(arch, sets, args.batch_size, args.workers)]
    cores = len(os.sched_getaffinity(0))
    print(f"\nimages/s on a dedicated {cores}-core machine, estimated from CPU seconds per image: "
          f"{cores} / CPU-s per image for (a) and (c); for (b), 1 / (CPU-s of open + preprocess "
          f"+ CPU-s of the forward / {cores}):\n")
    print(C.md_table(fmt_rows(rows, "est"), list(fmt_rows(rows, "est")[0])))
    print("\nimages/s by the wall clock on this shared machine (load average "
          f"{', '.join(str(r['load']) for r in rows)} after each set):\n")
    print(C.md_table(fmt_rows(rows, "wall"), list(fmt_rows(rows, "wall")[0])))
    print(f"\npeak RSS {C.rss_mb()[1]:.0f} MB (whole run, the models loaded in turn); {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
