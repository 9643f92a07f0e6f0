"""Image-tower precision on this CPU: speed side by side, and how far each precision moves results.

Speed (``--arch``, random init, batch ``--batch``): every variant runs once per round, rounds
interleaved, in one thread of its own; the table gives the median seconds per batch and the ratio
fp32 time ÷ variant time (> 1: faster than fp32). Variants: ``fp32`` (open_clip's own tower),
``bf16`` (:func:`localtag.core.precision.prepare_image_tower`: a bf16-weight copy of the tower, what the
encoder runs), ``bf16-autocast`` (fp32 weights under CPU autocast, what localtag ran before issue 15), ``int8`` (:func:`localtag.core.precision.quantize_int8`, torch dynamic int8 on the
Linear layers), ``compile`` (``torch.compile`` of the fp32 tower, default mode), and ``ort-int8``
(ONNX Runtime dynamic int8, QUInt8 weights; only with onnxruntime importable, for the choice between
the two int8 paths).

Agreement against fp32 (``--agreement``):

- the random-init ``--arch`` over the 128 COCO photos against the 80 COCO names: cosine, cosine after
  subtracting the fp32 mean embedding (random ViTs share a common direction, which makes plain
  cosine lenient), top-5 agreement (mean |top-5 fp32 ∩ top-5 variant| / 5), max |Δ value|;
- the trained fixture ``models/cifar10-tiny`` (a ModifiedResNet): the share of its weights and MACs
  that int8 quantises, CIFAR-10 test top-1 of each variant, its drop in points against fp32 and the
  top-5 agreement with fp32 (``--cifar`` images), and the same agreement figures over the COCO photos
  with its 10 classes. These are the figures of ``localtag.core.precision.AGREEMENT`` and its ``BARS``.

    .venv/bin/python bench/bench_precision.py --rounds 7 --agreement --cifar 10000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
import time
from pathlib import Path

import _common as C

from localtag.core.models import preprocess_for
from localtag.core.preprocess import short_side


def _ort_int8(visual, size: int):
    """An ONNX Runtime int8 session for ``visual`` (None without onnxruntime)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    import warnings

    import torch

    out = C.BENCH_DIR / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    fp32, int8 = out / "visual.onnx", out / "visual-int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(visual, (torch.randn(2, 3, size, size),), str(fp32), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QUInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])

    def run(x):
        return torch.from_numpy(sess.run(["y"], {"x": x.numpy()})[0])

    return run


def _autocast(visual, x):
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return visual(x).float()


def towers(model, size: int, variants: list[str]) -> dict:
    import torch

    from localtag.core import precision as P

    cpu = torch.device("cpu")
    out = {}
    for v in variants:
        if v in ("fp32", "bf16", "fp16", "int8"):
            out[v] = P.prepare_image_tower(model, v, cpu)
        elif v == "bf16-autocast":
            out[v] = lambda x, m=model.visual: _autocast(m, x)
        elif v == "compile":
            out[v] = torch.compile(model.visual)
        elif v == "ort-int8":
            run = _ort_int8(model.visual, size)
            if run is None:
                print("ort-int8: onnxruntime is not importable; skipped")
                continue
            out[v] = run
    return out


def speed(model, size: int, variants: list[str], batch: int, rounds: int) -> list[dict]:
    import torch

    fns = towers(model, size, variants)
    x = torch.randn(batch, 3, size, size)
    times: dict[str, list[float]] = {v: [] for v in fns}

    def loop():
        with torch.inference_mode():
            for f in fns.values():  # warm-up (compiles)
                f(x)
            for _ in range(rounds):
                for v, f in fns.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[v].append(time.perf_counter() - t0)

    C.in_thread(loop)
    base = statistics.median(times["fp32"])
    return [{"variant": v, "s_per_batch": round(statistics.median(t), 3),
             "x_fp32": round(base / statistics.median(t), 2), "rounds": len(t)} for v, t in times.items()]


def embed_all(fn, batches):
    import numpy as np
    import torch

    with torch.inference_mode():
        return np.concatenate([torch.nn.functional.normalize(fn(b).float(), dim=-1).numpy() for b in batches])


def agreement(tagger, ref, other, k: int = 5) -> dict:
    import numpy as np

    vr, vo = tagger.values(ref), tagger.values(other)
    k = min(k, vr.shape[1])
    tr, to = np.argsort(-vr, axis=1)[:, :k], np.argsort(-vo, axis=1)[:, :k]
    cos = (ref * other).sum(1)
    mean = ref.mean(0)
    a, b = ref - mean, other - mean
    cos_c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "images": len(ref),
        "top5_agreement": round(float(np.mean([len(set(x) & set(y)) / k for x, y in zip(tr, to, strict=True)])), 4),
        "top1_agreement": round(float(np.mean(tr[:, 0] == to[:, 0])), 4),
        "cos_mean": round(float(cos.mean()), 6), "cos_min": round(float(cos.min()), 6),
        "centred_cos_mean": round(float(cos_c.mean()), 5), "centred_cos_min": round(float(cos_c.min()), 5),
        "max_abs_dvalue": round(float(np.abs(vr - vo).max()), 5),
    }


def coco_batches(tagger, bs: int = 16):
    import torch

    from localtag.core import decode as images

    files = C.coco_files()
    xs = [preprocess_for(tagger.info)(images.decode(f)) for f in files]
    return [torch.stack(xs[i : i + bs]) for i in range(0, len(xs), bs)]


def cifar_top1(tagger, fns: dict, n: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    root = C.BENCH_DIR / "cifar10"
    if not (root / "test").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(C.CIFAR_TAR) as tar:
            tar.extractall(root, members=[m for m in tar.getmembers() if m.name.startswith("test/")],
                           filter="data")
    files = sorted((root / "test").glob("*/*.jpg"))
    if n and n < len(files):
        files = files[:: len(files) // n][:n]  # every class, evenly
    names = [c.name for c in tagger.vocab]
    labels = np.array([names.index(f.parent.name) for f in files])
    xs = torch.stack([preprocess_for(tagger.info)(Image.open(f).convert("RGB")) for f in files])
    out = {"images": len(files)}
    logits = {}
    for v, fn in fns.items():
        logits[v] = tagger.logits(embed_all(fn, xs.split(256)))
        out[f"top1_{v}"] = round(float((logits[v].argmax(1) == labels).mean()), 4)
    k = min(5, logits["fp32"].shape[1])
    ref5 = np.argsort(-logits["fp32"], axis=1)[:, :k]
    for v in fns:
        if v != "fp32":
            out[f"same_prediction_{v}"] = round(float((logits[v].argmax(1) == logits["fp32"].argmax(1)).mean()), 4)
            top5 = np.argsort(-logits[v], axis=1)[:, :k]
            out[f"top5_agreement_{v}"] = round(float(np.mean([len(set(a) & set(b)) / k
                                                              for a, b in zip(ref5, top5, strict=True)])), 4)
            out[f"top1_drop_points_{v}"] = round(100 * (out["top1_fp32"] - out[f"top1_{v}"]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=C.DEFAULT_ARCH)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16", "int8", "compile", "ort-int8"])
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--agreement-variants", nargs="+", default=["fp32", "bf16", "int8", "ort-int8"])
    ap.add_argument("--cifar", type=int, default=10000, help="CIFAR-10 test images for the fixture (0: all)")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()

    import torch

    from localtag.core import precision as P

    report: dict = {"machine": C.machine(), "cpu_flags_bf16": P.native_bf16()}
    print(json.dumps(report["machine"]))
    root = C.random_store(args.arch)
    tagger = C.load_model(root, f"{args.arch}-random", C.coco_vocab()).tagger
    size = short_side(tagger.info.preprocess['size'])
    report["quantised_fraction"] = {args.arch: P.quantised_fraction(tagger.model.visual)}
    if not args.no_speed:
        rows = speed(tagger.model, size, args.variants, args.batch, args.rounds)
        report["speed"] = {"arch": args.arch, "batch": args.batch, "rows": rows}
        print(f"\n{args.arch} (random init) image tower, batch {args.batch}, median of {args.rounds} interleaved rounds "
              f"(load average {C.machine()['load_avg_1m']})")
        print(C.md_table(rows, ["variant", "s_per_batch", "x_fp32", "rounds"]))
    if args.agreement:
        batches = coco_batches(tagger)
        fns = towers(tagger.model, size, args.agreement_variants)
        embs = {v: C.in_thread(embed_all, fn, batches) for v, fn in fns.items()}
        rows = [{"model": f"{args.arch} (random)", "variant": v, **agreement(tagger, embs["fp32"], e)}
                for v, e in embs.items() if v != "fp32"]
        print(json.dumps(rows), flush=True)  # the slow part (bf16 where it is emulated): never lose it
        fix = C.load_model(C.REPO / "models", "cifar10-tiny", C.REPO / "models" / "cifar10-tiny" / "vocab.txt").tagger
        report["quantised_fraction"]["cifar10-tiny"] = P.quantised_fraction(fix.model.visual)
        ffns = towers(fix.model, short_side(fix.info.preprocess["size"]), [v for v in args.agreement_variants if v != "ort-int8"])
        fb = coco_batches(fix)
        fembs = {v: C.in_thread(embed_all, fn, fb) for v, fn in ffns.items()}
        rows += [{"model": "cifar10-tiny (trained)", "variant": v, **agreement(fix, fembs["fp32"], e)}
                 for v, e in fembs.items() if v != "fp32"]
        report["agreement"] = rows
        cols = ["model", "variant", "images", "top5_agreement", "top1_agreement", "cos_mean", "cos_min",
                "centred_cos_mean", "centred_cos_min", "max_abs_dvalue"]
        print("\nagreement with fp32 over the COCO photos")
        print(C.md_table(rows, cols))
        if args.cifar >= 0:
            report["cifar10"] = C.in_thread(cifar_top1, fix, ffns, args.cifar)
            print("\ncifar10-tiny on the CIFAR-10 test set:", json.dumps(report["cifar10"]))
    print("\nshare quantised by int8:", json.dumps(report["quantised_fraction"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    del torch


if __name__ == "__main__":
    main()
