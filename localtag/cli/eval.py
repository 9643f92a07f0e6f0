"""``localtag eval`` and ``localtag calibrate``: tag quality on labelled images (metrics: :mod:`localtag.core.evaluate`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import add_head_flags, add_model_flags, add_progress_flag, progress, settings_from

if TYPE_CHECKING:
    import numpy as np

    from ..core.evaluate import Labelled

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # the operating threshold of concepts without their own


def _setup(args: argparse.Namespace):
    from ..core.cache import open_embedding_cache
    from ..core.evaluate import embed_labelled
    from ..core.loader import load

    settings = settings_from(args)
    tagger, encoder = load(settings)
    cache = None if args.no_cache else open_embedding_cache(settings, tagger.model_sha256, encoder)
    labels_csv = args.labels or Path(args.dir) / "labels.csv"
    data = embed_labelled(tagger, encoder, settings, Path(args.dir), labels_csv, cache=cache,
                          progress=lambda it, n: progress(it, n, args.progress, "embedding"),
                          expand_parents=not args.no_parents)
    default = args.threshold if args.threshold is not None else (settings.min_value or DEFAULT_THRESHOLD)
    return settings, tagger, data, default


def _rank(tagger, data: Labelled, open_set: bool) -> np.ndarray:
    import numpy as np

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
    from ..core import evaluate as ev

    settings, tagger, data, default = _setup(args)
    calibration = None if args.no_calibration else tagger.calibration
    values = tagger.logits_to_values(tagger.logits(data.embeddings), calibration)
    thresholds = ev.thresholds_for(tagger.vocab, default)
    m = ev.evaluate(values, data.labels, data.concepts, thresholds, rank=_rank(tagger, data, args.open))
    rows = ev.per_concept_rows(m, tagger.vocab, data.concepts)
    out = {**_header(tagger, data),
           "calibration": str(calibration.path) if calibration is not None and calibration.path else None,
           "threshold": default, "ranking": "open" if args.open else "closed",
           **{k: m[k] for k in ("concepts", "top1", "top5", "map", "ece", "micro", "macro")},
           "per_concept": rows}
    if args.pr_curves:
        out["pr_curves"] = str(args.pr_curves) if ev.write_pr_curves(
            args.pr_curves, values, data.labels, rows, data.concepts, args.worst) else None
    if args.json:
        print(json.dumps(ev.jsonable(out), indent=1))
    else:
        cal = f"calibrated ({calibration.path})" if calibration is not None else "uncalibrated"
        print(f"{out['images']} images ({out['failed']} failed, {out['cached']} from the embedding cache), "
              f"{out['concepts']} concepts, {out['mode']}, model {tagger.info.name}, scoring {tagger.scoring}, {cal}")
        print("\n".join(ev.summary_lines(m, data.single)))
        print("\n".join(ev.concept_table(rows, args.rows)))
    return 1 if data.failed else 0


def holdout_mask(keys: list[str], fraction: float) -> np.ndarray:
    import numpy as np

    """A deterministic split: an image is held out when the hash of its path falls under ``fraction``."""
    h = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64 for k in keys])
    return h < fraction


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core import calibrate as cal_mod
    from ..core import evaluate as ev

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
    thresholds = ev.thresholds_for(tagger.vocab, default)
    rank = _rank(tagger, data, args.open)
    held = holdout_mask(data.keys, args.holdout) if args.holdout > 0 else np.zeros(len(data.keys), dtype=bool)
    report: dict[str, Any] = {}
    if held.any() and (~held).any():
        f = cal_mod.fit(z[~held][:, concepts], y[~held][:, concepts], min_labels=args.min_labels)
        cal = cal_mod.for_vocab(f, concepts, tagger.vocab, scoring=tagger.scoring)
        before = ev.evaluate(tagger.logits_to_values(z[held], None), y[held], concepts, thresholds, rank=rank)
        after = ev.evaluate(tagger.logits_to_values(z[held], cal), y[held], concepts, thresholds, rank=rank)
        keys = ("top1", "top5", "map", "ece", "micro", "macro")
        report = {"fit_images": int((~held).sum()), "heldout_images": int(held.sum()),
                  "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}
    elif args.holdout > 0:
        log.warning("too few images for a held-out split; fitting on all without a before/after report")
    f = cal_mod.fit(z[:, concepts], y[:, concepts], min_labels=args.min_labels)
    labels_csv = args.labels or Path(args.dir) / "labels.csv"
    doc = cal_mod.to_json(f, concepts, tagger.vocab, tagger.info, scoring=tagger.scoring, templates=tagger.templates,
                          extra={"labels": {"file": str(labels_csv), "images": len(data.keys)},
                                 "heldout": ev.jsonable(report) or None})
    if not args.dry_run:
        cal_mod.save(doc, target)
    out = {**_header(tagger, data), "calibration": None if args.dry_run else str(target),
           "concepts": int(len(concepts)), "own_fit": int(f.fitted.sum()),
           "global": {"a": f.global_a, "b": f.global_b}, "threshold": default, **report}
    if args.json:
        print(json.dumps(ev.jsonable(out), indent=1))
        return 0
    print(f"{out['images']} images ({out['failed']} failed, {out['cached']} from the embedding cache), "
          f"{out['concepts']} concepts ({out['own_fit']} with their own map, the others the global map "
          f"a={f.global_a:.3f} b={f.global_b:.3f}), model {tagger.info.name}, scoring {tagger.scoring}")
    if report:
        print(f"held-out: {report['heldout_images']} images (fitted on {report['fit_images']}; "
              f"the stored calibration is refitted on all {len(data.keys)})")
        print(f"  {'':<10}{'before':>8}{'after':>8}")
        for name, key in (("top-1", "top1"), ("top-5", "top5"), ("mAP", "map"), ("ECE", "ece")):
            print(f"  {name:<10}{ev.fmt(report['before'][key], 8)}{ev.fmt(report['after'][key], 8)}")
        print(f"  {'micro F1':<10}{ev.fmt(report['before']['micro']['f1'], 8)}{ev.fmt(report['after']['micro']['f1'], 8)}"
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
    add_progress_flag(p)
    add_model_flags(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="measure tag quality on labelled images (top-k, mAP, P/R/F1, ECE)",
                       description="Measure tag quality on labelled images: top-1/top-5, mAP, P/R/F1 at the "
                                   "operating thresholds and the calibration error (see localtag.core.evaluate).")
    _common(e)
    e.add_argument("--no-calibration", action="store_true", help="evaluate the uncalibrated values")
    add_head_flags(e)
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
