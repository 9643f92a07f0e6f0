"""Measuring tag quality on labelled images: ``localtag eval`` and ``localtag calibrate``.

Labels file (CSV, UTF-8; ``DIR/labels.csv`` when ``--labels`` is not given)::

    path,labels
    test/cat/0001.jpg,cat
    photos/beach.jpg,person;dog;surfboard
    photos/empty-room.jpg,

- ``path`` is a file path, relative to ``DIR`` unless absolute; ``labels`` holds concept names, ids
  or synonyms of the vocabulary separated by ``;`` (case-insensitive). An empty ``labels`` cell
  means none of the evaluated concepts is in the image. The header row is optional; rows whose
  path starts with ``#`` are skipped; a path listed twice gets the union of its labels.
- Labels that are not in the vocabulary are reported and ignored. Labels are expanded to their
  ancestors (a ``cat`` image is an ``animal`` image when the vocabulary says ``cat | parents=animal``).
- The evaluated concepts are those named in the labels file: AP, P/R/F1 and the calibration error
  are computed for them; top-k ranks them against each other (closed set, the usual CIFAR/COCO
  protocol) or, with ``--open``, against every reportable concept of the vocabulary.
- Every row with exactly one label makes a single-label set: top-1/top-5 lead the report;
  otherwise mAP does. Both are always computed.

Metrics: top-k = share of labelled images with a true label among the k best concepts; AP =
non-interpolated average precision (ties counted as one threshold); mAP = mean AP over concepts with
a positive image; P/R/F1 at the operating thresholds (the concept's ``threshold=`` else
``--threshold``, default ``min_value`` if set else 0.5), micro (pooled) and macro (mean over
concepts with positives); ECE = expected calibration error of the values as probabilities that the
concept is present, over all (image, evaluated concept) pairs in 15 equal-width bins.

Embeddings go through the embedding cache (``--cache-dir``), so a second run with another vocabulary,
thresholds or calibration does not run the image tower again.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cli

log = logging.getLogger(__name__)

ECE_BINS = 15
DEFAULT_THRESHOLD = 0.5


# -- metrics ---------------------------------------------------------------------------------------
def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at each distinct score, from the highest score down."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.array([], dtype=int)
    tp, fp = tp[last], fp[last]
    n_pos = max(int(y.sum()), 1)
    return tp / np.maximum(tp + fp, 1), tp / n_pos, s[last]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP: Σ (Rₙ − Rₙ₋₁)·Pₙ over distinct thresholds; NaN without positives."""
    if not np.asarray(labels, dtype=bool).any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(scores, labels)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precisions(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every column of ``scores`` [N, K] against ``labels`` [N, K]."""
    return np.array([average_precision(scores[:, k], labels[:, k]) for k in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean AP over the columns that have a positive (NaN when none has)."""
    ap = average_precisions(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows with any label whose ``k`` highest columns include a label (ties: first column)."""
    labels = np.asarray(labels, dtype=bool)
    has = labels.any(axis=1)
    if not has.any():
        return float("nan")
    top = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]
    hit = np.take_along_axis(labels, top, axis=1).any(axis=1)
    return float(hit[has].mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b/N)·|mean(label) − mean(prob)| over ``bins`` equal-width bins [i/bins, (i+1)/bins)
    (the last bin includes 1.0), every element of ``probs`` taken as one prediction."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    b = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(b, minlength=bins)
    gap = np.abs(np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=p, minlength=bins))
    return float(gap.sum() / n.sum())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, count, mean value and share of positives."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    b = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for i in range(bins):
        m = b == i
        if m.any():
            out.append({"lo": i / bins, "hi": (i + 1) / bins, "n": int(m.sum()),
                        "value": float(p[m].mean()), "positive": float(y[m].mean())})
    return out


def prf_at(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 of ``scores ≥ thresholds`` (one per column): per column, micro, macro."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores) >= np.asarray(thresholds)[None, :]
    tp = (pred & y).sum(0).astype(float)
    fp = (pred & ~y).sum(0).astype(float)
    fn = (~pred & y).sum(0).astype(float)

    def ratios(tp, fp, fn):
        p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        r = np.divide(tp, tp + fn, out=np.full_like(tp, np.nan), where=(tp + fn) > 0)
        f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
        return p, r, np.where(np.isnan(r), np.nan, f)

    p, r, f = ratios(tp, fp, fn)
    mp, mr, mf = ratios(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    has = (tp + fn) > 0
    return {
        "precision": p, "recall": r, "f1": f,
        "micro": {"precision": float(mp[0]), "recall": float(mr[0]), "f1": float(mf[0])},
        "macro": {"precision": float(p[has].mean()) if has.any() else float("nan"),
                  "recall": float(r[has].mean()) if has.any() else float("nan"),
                  "f1": float(f[has].mean()) if has.any() else float("nan")},
    }


# -- labels ----------------------------------------------------------------------------------------
def read_labels(path: str | Path, root: str | Path) -> list[tuple[Path, list[str]]]:
    """``(image path, labels)`` rows of a labels CSV, paths resolved against ``root``."""
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: labels file not found") from None
    rows: dict[Path, list[str]] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] in (["path", "labels"], ["path", "label"], ["path"]):
            continue
        if len(row) > 2:
            raise ValueError(f"{path}:{lineno}: expected 'path,labels' (labels separated by ';'), got {len(row)} "
                             "columns; quote paths that contain commas")
        p = Path(row[0].strip())
        p = p if p.is_absolute() else root / p
        labels = [" ".join(x.split()) for x in (row[1] if len(row) > 1 else "").split(";") if x.strip()]
        rows.setdefault(p, [])
        rows[p].extend(x for x in labels if x not in rows[p])
    if not rows:
        raise ValueError(f"{path}: no rows")
    return list(rows.items())


def label_matrix(rows: list[tuple[Path, list[str]]], vocab, *, expand_parents: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Labels [N, concepts] (bool, ancestors added), the indices of the concepts the file names, and the
    count of each label that is not in the vocabulary."""
    y = np.zeros((len(rows), len(vocab)), dtype=bool)
    named: set[int] = set()
    unknown: Counter = Counter()
    ancestors: dict[int, list[int]] = {}
    for r, (_, labels) in enumerate(rows):
        for lab in labels:
            i = vocab.index(lab)
            if i is None:
                unknown[lab] += 1
                continue
            named.add(i)
            y[r, i] = True
            if expand_parents:
                if i not in ancestors:
                    ancestors[i] = vocab.ancestors(i)
                y[r, ancestors[i]] = True
    return y, np.array(sorted(named), dtype=int), unknown


# -- embeddings (through the cache) ---------------------------------------------------------------
def open_cache(settings, tagger):
    """The embedding cache of this model (:func:`localtag.cache.open_for`); None without one."""
    try:
        from .cache import open_for
    except ImportError:  # pragma: no cover - the cache module ships with localtag
        log.warning("localtag.cache is not available: every evaluation encodes its images again")
        return None
    return open_for(settings, tagger)


@dataclass
class Labelled:
    """A labelled image set, embedded."""

    keys: list[str]
    embeddings: np.ndarray
    labels: np.ndarray  # [N, concepts] bool, ancestors included
    concepts: np.ndarray  # indices of the concepts the labels file names
    single: bool
    unknown: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)
    cached: int = 0


def embed_labelled(tagger, settings, folder: Path, labels_csv: Path, *, cache=None,
                   show_progress: bool | None = None, expand_parents: bool = True) -> Labelled:
    from .pipeline import Job, Pipeline

    rows = read_labels(labels_csv, folder)
    y_all, concepts, unknown = label_matrix(rows, tagger.vocab, expand_parents=expand_parents)
    if unknown:
        top = ", ".join(f"{k!r} ({n})" for k, n in unknown.most_common(8))
        log.warning("%d labels are not in the vocabulary %s and are ignored: %s", sum(unknown.values()),
                    tagger.vocab.source, top)
    if not len(concepts):
        raise ValueError(f"{labels_csv}: none of its labels is a concept of {tagger.vocab.source}")
    jobs = [Job(str(p), p, {"row": r}) for r, (p, _) in enumerate(rows)]
    pipe = Pipeline.from_settings(tagger, settings, cache=cache)
    embs, keep, failed, cached = [], [], [], 0
    for res in cli.progress(pipe.run(jobs), len(jobs), show_progress, "embedding"):
        if res.ok:
            embs.append(res.embedding)
            keep.append(res.job.meta["row"])
            cached += res.cached
        else:
            failed.append((res.job.key, res.error.message))
            log.error("%s: %s", res.job.key, res.error.message)
    if not keep:
        raise ValueError(f"none of the {len(jobs)} images of {labels_csv} could be read")
    single = all(len(labs) == 1 for _, labs in rows)
    return Labelled(keys=[rows[r][0].as_posix() for r in keep], embeddings=np.stack(embs).astype(np.float32),
                    labels=y_all[keep], concepts=concepts, single=single, unknown=unknown, failed=failed,
                    cached=cached)


# -- evaluation ------------------------------------------------------------------------------------
def thresholds_for(vocab, default: float) -> np.ndarray:
    return np.array([c.threshold if c.threshold is not None else default for c in vocab], dtype=np.float32)


def evaluate(values: np.ndarray, labels: np.ndarray, concepts: np.ndarray, thresholds: np.ndarray, *,
             rank: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of ``values`` [N, C] against ``labels`` [N, C] for the evaluated ``concepts``.
    Top-k ranks the ``rank`` concepts (default: the evaluated ones)."""
    rank = concepts if rank is None else rank
    v, y = values[:, concepts], labels[:, concepts]
    ap = average_precisions(v, y)
    prf = prf_at(v, y, thresholds[concepts])
    return {
        "images": int(values.shape[0]),
        "concepts": int(len(concepts)),
        "top1": topk_accuracy(values[:, rank], labels[:, rank], 1),
        "top5": topk_accuracy(values[:, rank], labels[:, rank], 5),
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "ece": expected_calibration_error(v, y),
        "micro": prf["micro"],
        "macro": prf["macro"],
        "per_concept": {
            "ap": ap, "precision": prf["precision"], "recall": prf["recall"], "f1": prf["f1"],
            "positives": y.sum(0), "threshold": thresholds[concepts],
        },
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return None if not np.isfinite(x) else round(x, 6)
    return x


def per_concept_rows(m: dict[str, Any], vocab, concepts: np.ndarray) -> list[dict[str, Any]]:
    pc = m["per_concept"]
    return [{"id": vocab[int(i)].id, "name": vocab[int(i)].name, "ap": pc["ap"][k],
             "precision": pc["precision"][k], "recall": pc["recall"][k], "f1": pc["f1"][k],
             "positives": int(pc["positives"][k]), "threshold": float(pc["threshold"][k])}
            for k, i in enumerate(concepts)]


def _fmt(x: float | None, width: int = 6) -> str:
    return f"{'—':>{width}}" if x is None or not np.isfinite(x) else f"{x:{width}.3f}"


def summary_lines(m: dict[str, Any], single: bool) -> list[str]:
    lead = [("top-1", m["top1"]), ("top-5", m["top5"]), ("mAP", m["map"])]
    if not single:
        lead = [lead[2], lead[0], lead[1]]
    out = [f"  {name:<7}{_fmt(val)}" for name, val in lead]
    out.append(f"  {'ECE':<7}{_fmt(m['ece'])}   ({ECE_BINS} bins over image×concept pairs)")
    mi, ma = m["micro"], m["macro"]
    out.append(f"  at the operating thresholds: micro P {_fmt(mi['precision'], 5)} R {_fmt(mi['recall'], 5)} "
               f"F1 {_fmt(mi['f1'], 5)} · macro P {_fmt(ma['precision'], 5)} R {_fmt(ma['recall'], 5)} "
               f"F1 {_fmt(ma['f1'], 5)}")
    return out


def concept_table(rows: list[dict[str, Any]], limit: int) -> list[str]:
    rows = sorted(rows, key=lambda r: (np.inf if not np.isfinite(r["ap"]) else r["ap"], r["name"]))
    shown = rows if not limit or len(rows) <= limit else rows[:limit]
    width = max([len("concept"), *(len(r["name"]) for r in shown)])
    out = [f"  {'concept':<{width}}  {'AP':>6} {'P':>6} {'R':>6} {'F1':>6} {'pos':>6} {'thr':>5}"]
    for r in shown:
        out.append(f"  {r['name']:<{width}}  {_fmt(r['ap'])} {_fmt(r['precision'])} {_fmt(r['recall'])} "
                   f"{_fmt(r['f1'])} {r['positives']:>6d} {r['threshold']:5.2f}")
    if len(shown) < len(rows):
        out.append(f"  … {len(rows) - len(shown)} better concepts not shown (--rows 0 shows all)")
    return out


def write_pr_curves(path: Path, values: np.ndarray, labels: np.ndarray, rows: list[dict[str, Any]],
                    concepts: np.ndarray, worst: int) -> bool:
    """A PNG of the precision-recall curves of the ``worst`` concepts by AP (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("--pr-curves needs matplotlib (pip install matplotlib); no PNG written")
        return False
    order = sorted((k for k, r in enumerate(rows) if np.isfinite(r["ap"])), key=lambda k: rows[k]["ap"])[:worst]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for k in order:
        i = concepts[k]
        precision, recall, _ = precision_recall_curve(values[:, i], labels[:, i])
        ax.step(np.r_[0.0, recall], np.r_[precision[0] if len(precision) else 1.0, precision], where="post",
                label=f"{rows[k]['name']} (AP {rows[k]['ap']:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall, the {len(order)} worst concepts")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- commands --------------------------------------------------------------------------------------
def _setup(args: argparse.Namespace):
    from .tagger import Tagger

    settings = cli.settings_from(args)
    tagger = Tagger.load(settings)
    cache = None if args.no_cache else open_cache(settings, tagger)
    labels_csv = args.labels or Path(args.dir) / "labels.csv"
    data = embed_labelled(tagger, settings, Path(args.dir), labels_csv, cache=cache,
                          show_progress=args.progress, expand_parents=not args.no_parents)
    default = args.threshold if args.threshold is not None else (settings.min_value or DEFAULT_THRESHOLD)
    return settings, tagger, data, default


def _rank(tagger, data: Labelled, open_set: bool) -> np.ndarray:
    if not open_set:
        return data.concepts
    return np.array([i for i, c in enumerate(tagger.vocab) if not c.hidden], dtype=int)


def _header(tagger, data: Labelled) -> dict[str, Any]:
    return {
        "model": tagger.info.name, "model_sha256": tagger.info.sha256, "vocab": tagger.vocab.source,
        "scoring": tagger.scoring, "mode": "single-label" if data.single else "multi-label",
        "images": len(data.keys), "failed": len(data.failed), "cached": data.cached,
        "encoded": len(data.keys) - data.cached, "unknown_labels": dict(data.unknown.most_common()),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    settings, tagger, data, default = _setup(args)
    calibration = None if args.no_calibration else tagger.calibration
    values = tagger.values(tagger.logits(data.embeddings), calibration)
    thresholds = thresholds_for(tagger.vocab, default)
    m = evaluate(values, data.labels, data.concepts, thresholds, rank=_rank(tagger, data, args.open))
    rows = per_concept_rows(m, tagger.vocab, data.concepts)
    out = {**_header(tagger, data),
           "calibration": str(calibration.path) if calibration is not None and calibration.path else None,
           "threshold": default, "ranking": "open" if args.open else "closed",
           **{k: m[k] for k in ("concepts", "top1", "top5", "map", "ece", "micro", "macro")},
           "per_concept": rows}
    if args.pr_curves:
        out["pr_curves"] = str(args.pr_curves) if write_pr_curves(
            args.pr_curves, values, data.labels, rows, data.concepts, args.worst) else None
    if args.json:
        print(json.dumps(_jsonable(out), indent=1))
    else:
        cal = f"calibrated ({calibration.path})" if calibration is not None else "uncalibrated"
        print(f"{out['images']} images ({out['failed']} failed, {out['cached']} from the embedding cache), "
              f"{out['concepts']} concepts, {out['mode']}, model {tagger.info.name}, scoring {tagger.scoring}, {cal}")
        print("\n".join(summary_lines(m, data.single)))
        print("\n".join(concept_table(rows, args.rows)))
    return 1 if data.failed else 0


def holdout_mask(keys: list[str], fraction: float) -> np.ndarray:
    """A deterministic split: an image is held out when the hash of its path falls under ``fraction``."""
    h = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64 for k in keys])
    return h < fraction


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibrate as cal_mod

    settings, tagger, data, default = _setup(args)
    if tagger.scoring == "softmax":
        raise ValueError("calibration maps per-concept logits; use --scoring binary (or sigmoid), not softmax")
    vocab_path = tagger.vocab.path
    if vocab_path is None:
        raise ValueError(f"{tagger.vocab.source}: the vocabulary is not a file; cannot store a calibration beside it")
    target = cal_mod.path_for(vocab_path, tagger.info.sha256)
    if not args.dry_run and not os.access(target.parent, os.W_OK):
        raise ValueError(f"{target.parent} is not writable: copy the vocabulary somewhere writable and pass --vocab")
    z = tagger.logits(data.embeddings)
    concepts, y = data.concepts, data.labels
    thresholds = thresholds_for(tagger.vocab, default)
    rank = _rank(tagger, data, args.open)
    held = holdout_mask(data.keys, args.holdout) if args.holdout > 0 else np.zeros(len(data.keys), dtype=bool)
    report: dict[str, Any] = {}
    if held.any() and (~held).any():
        f = cal_mod.fit(z[~held][:, concepts], y[~held][:, concepts], min_labels=args.min_labels)
        cal = cal_mod.for_vocab(f, concepts, tagger.vocab, scoring=tagger.scoring)
        before = evaluate(tagger.values(z[held], None), y[held], concepts, thresholds, rank=rank)
        after = evaluate(tagger.values(z[held], cal), y[held], concepts, thresholds, rank=rank)
        keys = ("top1", "top5", "map", "ece", "micro", "macro")
        report = {"fit_images": int((~held).sum()), "heldout_images": int(held.sum()),
                  "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}
    elif args.holdout > 0:
        log.warning("too few images for a held-out split; fitting on all without a before/after report")
    f = cal_mod.fit(z[:, concepts], y[:, concepts], min_labels=args.min_labels)
    labels_csv = args.labels or Path(args.dir) / "labels.csv"
    doc = cal_mod.to_json(f, concepts, tagger.vocab, tagger.info, scoring=tagger.scoring, templates=tagger.templates,
                          extra={"labels": {"file": str(labels_csv), "images": len(data.keys)},
                                 "heldout": _jsonable(report) or None})
    if not args.dry_run:
        cal_mod.save(doc, target)
    out = {**_header(tagger, data), "calibration": None if args.dry_run else str(target),
           "concepts": int(len(concepts)), "own_fit": int(f.fitted.sum()),
           "global": {"a": f.global_a, "b": f.global_b}, "threshold": default, **report}
    if args.json:
        print(json.dumps(_jsonable(out), indent=1))
        return 0
    print(f"{out['images']} images ({out['failed']} failed, {out['cached']} from the embedding cache), "
          f"{out['concepts']} concepts ({out['own_fit']} with their own map, the others the global map "
          f"a={f.global_a:.3f} b={f.global_b:.3f}), model {tagger.info.name}, scoring {tagger.scoring}")
    if report:
        print(f"held-out: {report['heldout_images']} images (fitted on {report['fit_images']}; "
              f"the stored calibration is refitted on all {len(data.keys)})")
        print(f"  {'':<10}{'before':>8}{'after':>8}")
        for name, key in (("top-1", "top1"), ("top-5", "top5"), ("mAP", "map"), ("ECE", "ece")):
            print(f"  {name:<10}{_fmt(report['before'][key], 8)}{_fmt(report['after'][key], 8)}")
        print(f"  {'micro F1':<10}{_fmt(report['before']['micro']['f1'], 8)}{_fmt(report['after']['micro']['f1'], 8)}"
              f"   (at threshold {default:g})")
    print(f"{'would write' if args.dry_run else 'wrote'} {target}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder the labels' relative paths are resolved against")
    p.add_argument("--labels", type=Path, help="labels CSV: path,labels (labels ';'-separated); default DIR/labels.csv")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    p.add_argument("--threshold", type=float, help=f"operating threshold of concepts without their own "
                   f"(default: min_value if set, else {DEFAULT_THRESHOLD})")
    p.add_argument("--open", action="store_true",
                   help="rank every concept of the vocabulary for top-k (default: only the labelled ones)")
    p.add_argument("--no-parents", action="store_true", help="do not add ancestors to the labels")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    cli.add_model_flags(p)


@cli.extension
def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="measure tag quality on labelled images (top-k, mAP, P/R/F1, ECE)",
                       description=__doc__.split("\n\n")[0])
    _common(e)
    e.add_argument("--no-calibration", action="store_true", help="evaluate the uncalibrated values")
    e.add_argument("--rows", type=int, default=20, help="concepts shown in the table, worst first (0: all)")
    e.add_argument("--pr-curves", type=Path, metavar="PNG",
                   help="write precision-recall curves of the worst concepts (needs matplotlib)")
    e.add_argument("--worst", type=int, default=6, help="concepts in the --pr-curves plot")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="fit per-concept value maps on labelled images",
                       description="Fit per-concept Platt scaling on labelled images; report the calibration "
                                   "error before and after on held-out images; store the result beside the "
                                   "vocabulary, keyed by the model's sha256.")
    _common(c)
    c.add_argument("--holdout", type=float, default=0.3, help="share of images held out for the report (0: none)")
    c.add_argument("--min-labels", type=int, default=5,
                   help="positives and negatives a concept needs for its own map (else the global map)")
    c.add_argument("--dry-run", action="store_true", help="report, but do not write the calibration file")
    c.set_defaults(func=cmd_calibrate)
