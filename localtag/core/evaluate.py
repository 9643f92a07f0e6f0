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

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import labels as labels_file

log = logging.getLogger(__name__)

ECE_BINS = 15


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


def embed_labelled(tagger, encoder, settings, folder: Path, labels_csv: Path, *, cache=None,
                   progress: Callable[[Iterable, int], Iterable] | None = None,
                   expand_parents: bool = True) -> Labelled:
    """Embed the images of a labels file (through the embedding cache, when given) with their labels."""
    from .pipeline import Job, Pipeline

    rows = labels_file.read(labels_csv, folder)
    y_all, concepts, unknown = label_matrix(rows, tagger.vocab, expand_parents=expand_parents)
    if unknown:
        top = ", ".join(f"{k!r} ({n})" for k, n in unknown.most_common(8))
        log.warning("%d labels are not in the vocabulary %s and are ignored: %s", sum(unknown.values()),
                    tagger.vocab.source, top)
    if not len(concepts):
        raise ValueError(f"{labels_csv}: none of its labels is a concept of {tagger.vocab.source}")
    jobs = [Job(str(p), p, {"row": r}) for r, (p, _) in enumerate(rows)]
    pipe = Pipeline.from_settings(encoder, settings, cache=cache)
    embs, keep, failed, cached = [], [], [], 0
    results = pipe.run(jobs)
    for res in progress(results, len(jobs)) if progress else results:
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


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
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


def fmt(x: float | None, width: int = 6) -> str:
    return f"{'—':>{width}}" if x is None or not np.isfinite(x) else f"{x:{width}.3f}"


def summary_lines(m: dict[str, Any], single: bool) -> list[str]:
    lead = [("top-1", m["top1"]), ("top-5", m["top5"]), ("mAP", m["map"])]
    if not single:
        lead = [lead[2], lead[0], lead[1]]
    out = [f"  {name:<7}{fmt(val)}" for name, val in lead]
    out.append(f"  {'ECE':<7}{fmt(m['ece'])}   ({ECE_BINS} bins over image×concept pairs)")
    mi, ma = m["micro"], m["macro"]
    out.append(f"  at the operating thresholds: micro P {fmt(mi['precision'], 5)} R {fmt(mi['recall'], 5)} "
               f"F1 {fmt(mi['f1'], 5)} · macro P {fmt(ma['precision'], 5)} R {fmt(ma['recall'], 5)} "
               f"F1 {fmt(ma['f1'], 5)}")
    return out


def concept_table(rows: list[dict[str, Any]], limit: int) -> list[str]:
    rows = sorted(rows, key=lambda r: (np.inf if not np.isfinite(r["ap"]) else r["ap"], r["name"]))
    shown = rows if not limit or len(rows) <= limit else rows[:limit]
    width = max([len("concept"), *(len(r["name"]) for r in shown)])
    out = [f"  {'concept':<{width}}  {'AP':>6} {'P':>6} {'R':>6} {'F1':>6} {'pos':>6} {'thr':>5}"]
    for r in shown:
        out.append(f"  {r['name']:<{width}}  {fmt(r['ap'])} {fmt(r['precision'])} {fmt(r['recall'])} "
                   f"{fmt(r['f1'])} {r['positives']:>6d} {r['threshold']:5.2f}")
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
