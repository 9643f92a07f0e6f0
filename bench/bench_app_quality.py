"""Search quality of the app with a model (default: the fixture model models/cifar10-tiny).

- CIFAR-10 test photos: the first ``--db`` per class are the app, the next ``--queries`` per class are
  image queries; one text query per class (the class name, raw, through the text tower). Per class:
  precision@10 and average precision over the whole app, text and image side by side.
- Near-duplicates: the 128 COCO photos plus 10 planted copies (resized ½, JPEG q60, cropped 10 %):
  found copies, false groups (no planted pair in them), pair precision (planted pairs / pairs the groups
  link) and recall of the planted pairs, embeddings alone vs with the
  thumbnail check, at several thresholds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from app_data import plant_copies, score_groups  # noqa: E402
from bench_search import cpu  # noqa: E402
from conftest import CIFAR_CLASSES, COCO_DIR, FIXTURE_MODEL, extract_cifar  # noqa: E402

from localtag.app import local  # noqa: E402
from localtag.app.search import exact_top  # noqa: E402
from localtag.core.config import Settings  # noqa: E402
from localtag.core.loader import load  # noqa: E402


def ap_p10(matrix: np.ndarray, labels: np.ndarray, q: np.ndarray, cls: str) -> tuple[float, float]:
    order, _ = exact_top(matrix, q, len(labels))
    rel = labels[order] == cls
    hits = np.cumsum(rel)
    ap = float((hits / np.arange(1, len(rel) + 1))[rel].sum() / max(1, rel.sum()))
    return float(rel[:10].mean()), ap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(FIXTURE_MODEL))
    ap.add_argument("--db", type=int, default=40)
    ap.add_argument("--queries", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    s = Settings(model=args.model, device="cpu", precision="fp32", cache_dir=tmp / "cache")
    loaded = load(s)
    print(f"CPU: {cpu()}; model {Path(args.model).name}")
    per = args.db + args.queries
    files = extract_cifar(tmp / "cifar", per_class=per)
    got = local.embed(loaded, s, [str(p) for c in CIFAR_CLASSES for p in files[c]])
    lab = np.array([c for c in CIFAR_CLASSES for _ in range(per)])
    pos = np.array([i for _ in CIFAR_CLASSES for i in range(per)])
    db, qs = pos < args.db, pos >= args.db
    mat, mlab = got.matrix[db], lab[db]
    print(f"\nCIFAR-10 test photos: app of {db.sum()} ({args.db}/class); text query = class name; "
          f"{args.queries} image queries/class held out")
    print("| class | text P@10 | text AP | image P@10 (mean) | image mAP |")
    print("|---|---:|---:|---:|---:|")
    tot = np.zeros(4)
    for c in CIFAR_CLASSES:
        t = loaded.tagger.text.encode([c])[0].numpy()
        tp, tap = ap_p10(mat, mlab, t, c)
        im = [ap_p10(mat, mlab, got.matrix[i], c) for i in np.where(qs & (lab == c))[0]]
        ip, iap = float(np.mean([x[0] for x in im])), float(np.mean([x[1] for x in im]))
        tot += (tp, tap, ip, iap)
        print(f"| {c} | {tp:.2f} | {tap:.3f} | {ip:.2f} | {iap:.3f} |")
    m = tot / len(CIFAR_CLASSES)
    print(f"| **mean** | {m[0]:.2f} | {m[1]:.3f} | {m[2]:.2f} | {m[3]:.3f} |")

    planted = plant_copies(sorted(COCO_DIR.glob("*.jpg")), tmp / "coco")
    got = local.embed(loaded, s, [tmp / "coco"])
    print(f"\nNear-duplicates: {len(got.keys)} photos (128 COCO + {len(planted)} planted copies)")
    print("| threshold | check | groups | found/planted | false groups | pair precision | recall |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for th in (0.8, 0.9, 0.95, 0.98):
        for corr in (None, 0.9):
            out = local.duplicates(got.keys, got.matrix, th, min_corr=corr)
            sc = score_groups([g["items"] for g in out["groups"]], planted)
            prec = sc["pair_precision"]
            print(f"| {th} | {'thumbnails ≥ 0.9' if corr else 'embeddings only'} | {sc['groups']} | "
                  f"{sc['found']}/{sc['planted']} | {sc['false_groups']} | {prec:.2f} | "
                  f"{sc['found'] / sc['planted']:.2f} |")


if __name__ == "__main__":
    main()
