"""Every CPU at its own limit (issue 15): three figures side by side in one run, with the CPU's model
and flags, on a random-init ``--arch`` (default ViT-B-32; no trained weights can be had offline).

1. **Precision table.** The image tower at batch ``--batch``, every variant once per round, rounds
   interleaved (median): ``fp32``; ``bf16`` (a bf16-weight copy, what localtag runs); ``bf16-autocast``
   (fp32 weights under CPU autocast, what localtag ran before issue 15); ``int8`` (torch dynamic int8).
   Each as × fp32. Then what ``--precision auto`` picks on this CPU (:func:`localtag.core.precision.choose`,
   with an empty folder: measured once and kept there) and why.
2. **End to end ÷ the 2-core limit.** ``localtag embed``'s pipeline (exact preprocessing, no embedding
   cache, ``--workers`` decode threads) over ``--images`` COCO JPEGs (the 128 photos cycled, in
   memory), at fp32 and at auto's choice, side by side. The limit of a precision on this machine is
   ``cores / (forward CPU-s per image + minimal decode CPU-s per image)``: the forward pass timed in
   CPU seconds of this process at batch ``--batch``, and the decode as Pillow's full decode plus the
   exact resize and crop to uint8 pixels (``Preprocess.pixels``), one image at a time.
   ``e2e_over_limit`` compares wall-clock rates, so on a shared machine it also measures the
   scheduler's share; ``cpu_s_limit_over_e2e`` (minimal CPU-s per image ÷ the run's CPU-s per image)
   does not: it says how much work beyond forward and decode the pipeline adds.
3. **First tag.** Wall time of ``localtag tag PHOTO --no-cache`` in a fresh process, first with an
   empty cache folder (``auto`` decides, and on a CPU with native bf16 measures), then again with the
   same folder (the kept choice is read back). The vocabulary's text embeddings are stored at import,
   as ``models import`` does, so neither run encodes prompts.

    .venv/bin/python bench/bench_cpu.py [--rounds 3] [--images 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def precision_table(model, size: int, batch: int, rounds: int, variants: list[str]) -> list[dict]:
    from bench_precision import speed

    return speed(model, size, variants, batch, rounds)


def forward_cpu_s_per_image(encoder, size: int, batch: int, rounds: int = 3) -> float:
    import torch

    x = torch.randn(batch, 3, size, size)

    def loop() -> float:
        with torch.inference_mode():
            encoder.forward(x[:2])
            cpu = []
            for _ in range(rounds):
                c0 = time.process_time()
                encoder.forward(x)
                cpu.append(time.process_time() - c0)
        return statistics.median(cpu) / batch

    return C.in_thread(loop)


def decode_cpu_s_per_image(encoder, datas: list[bytes]) -> float:
    from localtag.core import decode

    def loop() -> float:
        c0 = time.process_time()
        for d in datas:
            encoder.pre.pixels(decode.decode(d))
        return (time.process_time() - c0) / len(datas)

    return C.in_thread(loop)


def end_to_end(encoder, datas: list[bytes], workers: int) -> dict:
    from localtag.core.pipeline import Job, Pipeline

    pipe = Pipeline(encoder, workers=workers)
    list(pipe.run([Job(str(i), d) for i, d in enumerate(datas[:32])]))  # warm-up
    with C.Timer() as t:
        n = sum(r.ok for r in pipe.run([Job(str(i), d) for i, d in enumerate(datas)]))
    assert n == len(datas)
    return {"img_per_s": round(n / t.s, 2), "cpu_s_per_img": round(t.cpu / n, 4)}


def first_tag(root: Path, name: str, photo: Path) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, "-m", "localtag", "tag", str(photo), "--models-dir", str(root), "--model", name,
               "--vocab", str(C.coco_vocab()), "--cache-dir", cache, "--no-cache", "--device", "cpu",
               "--precision", "auto", "--jsonl"]
        env = {**os.environ, "PYTHONPATH": str(C.REPO)}
        env.pop("LOCALTAG_PRECISION", None)
        for label in ("empty_cache_folder_s", "kept_choice_s"):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            out[label] = round(time.perf_counter() - t0, 2)
            if r.returncode != 0:
                raise SystemExit(f"localtag tag failed: {r.stderr[-2000:]}")
        out["kept_choice_files"] = len(list((Path(cache) / "precision").glob("*.json")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16", "bf16-autocast", "int8"])
    ap.add_argument("--images", type=int, default=512, help="COCO JPEGs per end-to-end run (the 128 cycled)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from localtag.core import precision as P
    from localtag.core.preprocess import short_side

    flags = P.cpu_flags()
    report: dict = {"machine": C.machine(), "cpu_flags": {f: f in flags for f in FLAGS_OF_INTEREST}}
    print(json.dumps(report["machine"]))
    print("flags:", " ".join(f"{f}={'yes' if v else 'no'}" for f, v in report["cpu_flags"].items()))

    root = C.random_store(args.arch)
    name = f"{args.arch}-random"
    fp32 = C.load_model(root, name, C.coco_vocab(), precision="fp32")
    info, model = fp32.tagger.info, fp32.tagger.model
    size = short_side(info.preprocess["size"])

    rows = precision_table(model, size, args.batch, args.rounds, args.variants)
    report["precision_table"] = rows
    with tempfile.TemporaryDirectory() as d:
        choice = P.choose("auto", torch.device("cpu"), info.sha256, d, model=model, image_size=size)
    report["auto"] = choice.to_json()
    print(f"\n1. {args.arch} (random init) image tower, batch {args.batch}, median of {args.rounds} interleaved rounds")
    print(C.md_table(rows, ["variant", "s_per_batch", "x_fp32", "rounds"]))
    print(f"auto on this CPU: {choice.precision} ({choice.reason})"
          + (f"; measured × fp32: {choice.speed_vs_fp32}" if choice.speed_vs_fp32 else ""))

    coco = [f.read_bytes() for f in C.coco_files()]
    datas = [coco[i % len(coco)] for i in range(args.images)]
    decode_s = decode_cpu_s_per_image(fp32.encoder, coco)
    encoders = {"fp32": fp32.encoder}
    if choice.precision != "fp32":
        encoders["auto"] = C.load_model(root, name, C.coco_vocab(), precision=choice.precision).encoder
    cores = len(os.sched_getaffinity(0))
    e2e = []
    for label, enc in encoders.items():
        fwd = forward_cpu_s_per_image(enc, size, args.batch)
        limit = cores / (fwd + decode_s)
        got = C.in_thread(end_to_end, enc, datas, args.workers)
        e2e.append({"run": f"{label} ({enc.precision})", "forward_cpu_s_per_img": round(fwd, 4),
                    "decode_cpu_s_per_img": round(decode_s, 4), f"limit_{cores}_cores_img_per_s": round(limit, 2),
                    "e2e_img_per_s": got["img_per_s"], "e2e_cpu_s_per_img": got["cpu_s_per_img"],
                    "e2e_over_limit": round(got["img_per_s"] / limit, 3),
                    "cpu_s_limit_over_e2e": round((fwd + decode_s) / got["cpu_s_per_img"], 3)})
    if len(e2e) == 1:
        e2e.append({**e2e[0], "run": "auto (fp32: the same run)"})
    e2e[1]["auto_over_fp32_e2e"] = round(e2e[1]["e2e_img_per_s"] / e2e[0]["e2e_img_per_s"], 3)
    report["end_to_end"] = e2e
    print(f"\n2. end to end ({args.images} COCO JPEGs, exact preprocessing, {args.workers} workers) ÷ the "
          f"{cores}-core limit (load average {os.getloadavg()[0]:.2f})")
    print(C.md_table(e2e, list(dict.fromkeys(k for r in e2e for k in r))))

    from localtag.core.loader import precompute_text

    precompute_text(info, [C.coco_vocab()])  # what `models import --vocab` does: no prompts at the first tag
    report["first_tag"] = first_tag(root, name, C.coco_files()[0])
    print("\n3. first tag, `localtag tag PHOTO` in a fresh process (wall s):", json.dumps(report["first_tag"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
