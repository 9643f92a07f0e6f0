"""Search quality of the app with a model (default: the fixture model models/cifar10-tiny).

- CIFAR-10 test photos, ``--db + --queries`` per class. Text: the first ``--db`` per class are the app;
  one query per class (the class name), raw through the text tower vs through the prompt templates
  (``TextIndex.query``, what the app does), on the raw and on the centred matrix: P@10 and AP per class.
  Image: ``--splits`` random splits into an app of ``--db`` per class and ``--queries`` held-out query
  photos per class; rankings side by side (raw cosine, centring, average query expansion, CSLS): mean
  P@10, the worst class's P@10, the share of queries with >= 6/10 right, per-class P@10.
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


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _expand(mat: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Average query expansion (Chum et al. 2007): the query plus its k nearest rows, normalised."""
    top = np.argpartition(-(mat @ q), k - 1)[:k]
    return _unit(q + mat[top].sum(0))


def image_variants(mat: np.ndarray) -> dict:
    """Image-query rankings side by side: name → (query → scores over the app's rows).

    raw cosine; centred (the app's mean embedding subtracted from rows and query, renormalised);
    average query expansion with k = 3, 10, 20; both; CSLS (Conneau et al. 2018: 2·cos − the row's mean
    cosine to its k nearest rows, against hubs)."""
    mean = mat.mean(0)
    cmat = _unit(mat - mean)
    sims = mat @ mat.T
    np.fill_diagonal(sims, -np.inf)
    out = {"raw cosine": lambda q: mat @ q,
           "centred": lambda q: cmat @ _unit(q - mean)}
    for k in (3, 10, 20):
        out[f"query expansion k={k}"] = lambda q, k=k: mat @ _expand(mat, q, k)
    for k in (3, 10, 20):
        out[f"centred + expansion k={k}"] = lambda q, k=k: cmat @ _expand(cmat, _unit(q - mean), k)
    for k in (10, 20):
        rx = np.sort(sims, 1)[:, -k:].mean(1)
        out[f"CSLS k={k}"] = lambda q, rx=rx: 2 * (mat @ q) - rx
    return out


def p10_of(scores: np.ndarray, labels: np.ndarray, cls: str) -> float:
    return float((labels[np.argsort(-scores, kind="stable")[:10]] == cls).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(FIXTURE_MODEL))
    ap.add_argument("--db", type=int, default=40)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--splits", type=int, default=10, help="random app/query splits for the image queries")
    ap.add_argument("--no-dups", action="store_true", help="leave out the near-duplicate table")
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
    db = pos < args.db
    mat, mlab = got.matrix[db], lab[db]
    text = loaded.tagger.text
    cmat = _unit(mat - mat.mean(0))
    print(f"\nCIFAR-10 test photos: app of {db.sum()} ({args.db}/class); text query = class name")
    print("Text query per class, P@10 / AP: raw text vs the prompt templates (TextIndex.query), "
          "on the raw and on the centred app matrix")
    print("| class | raw P@10 | raw AP | templates P@10 | templates AP | templates, centred P@10 | AP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    tot = np.zeros(6)
    for c in CIFAR_CLASSES:
        raw = text.encode([c])[0].numpy()
        tq = text.query(c)
        row = (*ap_p10(mat, mlab, raw, c), *ap_p10(mat, mlab, tq, c), *ap_p10(cmat, mlab, tq, c))
        tot += row
        print(f"| {c} | " + " | ".join(f"{x:.2f}" if i % 2 == 0 else f"{x:.3f}" for i, x in enumerate(row)) + " |")
    m = tot / len(CIFAR_CLASSES)
    print("| **mean** | " + " | ".join(f"{x:.2f}" if i % 2 == 0 else f"{x:.3f}" for i, x in enumerate(m)) + " |")

    # image queries: random splits of the extracted photos into app and queries, per class
    rng = np.random.default_rng(0)
    agg: dict[str, list] = {}
    per_class: dict[str, np.ndarray] = {}
    for _ in range(args.splits):
        order = {c: rng.permutation(np.where(lab == c)[0]) for c in CIFAR_CLASSES}
        dbi = np.concatenate([order[c][: args.db] for c in CIFAR_CLASSES])
        qi = np.concatenate([order[c][args.db :] for c in CIFAR_CLASSES])
        m_, ml = got.matrix[dbi], lab[dbi]
        for name, score in image_variants(m_).items():
            r = np.array([p10_of(score(got.matrix[i]), ml, lab[i]) for i in qi])
            cls = np.array([r[lab[qi] == c].mean() for c in CIFAR_CLASSES])
            per_class[name] = per_class.get(name, 0) + cls / args.splits
            agg.setdefault(name, []).append((r.mean(), cls.min(), (r >= 0.6).mean(), np.percentile(r, 10)))
    print(f"\nImage queries: {args.splits} random splits of {per} photos per class into an app of {args.db}/class "
          f"and {args.queries} held-out query photos/class; means over the splits of: P@10 over all queries, "
          "the worst class's mean P@10, the share of queries with >= 6/10 right, the 10th-percentile query's P@10")
    print("| ranking | mean P@10 | worst class P@10 | queries >= 6/10 | 10th pct P@10 |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in agg.items():
        a = np.array(rows).mean(0)
        print(f"| {name} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {a[3]:.2f} |")
    print("\nImage queries, mean P@10 per class (over the splits)")
    names = list(agg)
    print("| class | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for j, c in enumerate(CIFAR_CLASSES):
        print(f"| {c} | " + " | ".join(f"{per_class[n][j]:.2f}" for n in names) + " |")
    if args.no_dups:
        return

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
