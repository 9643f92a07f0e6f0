"""``localtag learn``: learn concepts from labelled images (a head over the model's embeddings; docs/learn.md)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .common import add_head_flags, add_model_flags, add_progress_flag, progress, settings_from

log = logging.getLogger(__name__)


def _embed(tagger, encoder, settings, rows, args):
    """Embeddings of the labelled files (through the embedding cache); failed files are logged and left out."""
    import numpy as np

    from ..core.cache import open_embedding_cache
    from ..core.pipeline import Job, Pipeline

    cache = None if args.no_cache else open_embedding_cache(settings, tagger.model_sha256, encoder)
    jobs = [Job(p.as_posix(), p, {"row": r}) for r, (p, _) in enumerate(rows)]
    keys, embs, failed = [], [], []
    for res in progress(Pipeline.from_settings(encoder, settings, cache=cache).run(jobs), len(jobs), args.progress,
                        "embedding"):
        if res.ok:
            keys.append(res.job.key)
            embs.append(res.embedding)
        else:
            failed.append(res.job.key)
            log.error("%s: %s", res.job.key, res.error.message)
    if not embs:
        raise ValueError(f"none of the {len(jobs)} labelled images could be read")
    return keys, np.stack(embs).astype(np.float32), failed


def annotations(rows, keys: list[str], names: list[str]):
    """A labels file's rows as annotations: each named concept is positive where listed, negative elsewhere."""
    from ..core.learn import Annotation
    from ..core.vocab import normalize_name

    labels = {p.as_posix(): {normalize_name(x) for x in labs} for p, labs in rows}
    return [Annotation(k, n, normalize_name(n) in labels[k], "labels") for k in keys for n in names]


def cmd_learn(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core import labels as labels_file
    from ..core import learn
    from ..core.evaluate import average_precision
    from ..core.loader import load
    from .eval import holdout_mask

    settings = settings_from(args)
    target = learn.head_path(settings.heads_dir, learn.check_name(args.name))
    if (args.app is None) == (args.dir is None):
        raise ValueError("give a folder of labelled images (DIR) or --app NAME, one of the two")
    tagger, encoder = load(settings.model_copy(update={"model_head": None}))
    if args.app is not None:
        return _learn_app(args, settings, tagger, encoder, target)
    labels_csv = args.labels or Path(args.dir) / "labels.csv"
    rows = labels_file.read(labels_csv, args.dir)
    names = labels_file.names(labels_csv.read_text(encoding="utf-8-sig"), str(labels_csv))
    if args.concepts:
        names = [n for n in names if n in set(args.concepts)]
    if not names:
        raise ValueError(f"{labels_csv}: no concept to learn")
    keys, emb, failed = _embed(tagger, encoder, settings, rows, args)
    t = learn.targets(keys, emb, annotations(rows, keys, names))
    priors = {} if args.no_prior else {c: p for c in t.concepts if (p := learn.prior_of(tagger.scorer, c)) is not None}
    kw: dict[str, Any] = {"model_sha256": tagger.info.sha256, "model": tagger.info.name, "priors": priors,
                          "min_positives": args.min_positives}
    # held-out report: fit on the rest, AP of the zero-shot scorer (concepts it knows) and of the head
    report = []
    held = holdout_mask(keys, args.holdout) if args.holdout > 0 else np.zeros(len(keys), dtype=bool)
    if held.any() and (~held).any():
        fit_t = learn.Targets(t.concepts, np.where(held[:, None], -1, t.y), t.contradictions)
        try:
            part = learn.train(emb[~held], learn.Targets(t.concepts, fit_t.y[~held]), **kw)
        except learn.TooFewExamples as e:
            log.warning("no held-out report (%s)", e)
            part = None
        if part is not None:
            after = part.values(emb[held])
            before = tagger.values(emb[held])
            for j, c in enumerate(t.concepts):
                m = held & (t.y[:, j] >= 0)
                yj = t.y[m, j] == 1
                i = tagger.vocab.index(c)
                zs = average_precision(before[m[held]][:, i], yj) if i is not None else None
                report.append({"concept": c, "heldout": int(m.sum()), "heldout_positives": int(yj.sum()),
                               "ap_zero_shot": zs, "ap_learnt": average_precision(after[m[held]][:, j], yj)})
    prov = {"labels": {"file": str(labels_csv), "images": len(keys), "failed": len(failed)}, "heldout": report}
    head = learn.train(emb, t, name=args.name, provenance=prov, **kw)
    learn.save(head, target)
    out = {"head": str(target), "name": args.name, "model": tagger.info.name, "model_sha256": tagger.info.sha256,
           "images": len(keys), "failed": len(failed), "concepts": head.meta["concepts"],
           "contradictions": head.meta["contradictions"], "heldout": report}
    if args.json:
        from ..core.evaluate import jsonable

        print(json.dumps(jsonable(out), indent=1))
    else:
        _table(out)
    return 1 if failed else 0


def _learn_app(args: argparse.Namespace, settings, tagger, encoder, target: Path) -> int:
    """``learn --app NAME``: a head from an app's annotations (value 1: positive, 0: negative), as the
    server's ``PostModelVersions`` trains one (:func:`localtag.app.models.train_head`)."""
    from ..app.api import ApiError
    from ..app.local import embedding_key, store_of
    from ..app.models import train_head
    from ..app.store import app_key
    from ..core import learn
    from ..core.loader import Loaded

    user, _, name = args.app.rpartition("/")
    app = app_key(user or None, name)
    store = store_of(settings)
    concepts = list(args.concepts or [c for c, _ in store.concepts(app)])
    if not concepts:
        raise ValueError(f"app {app!r} has no concept: annotate its inputs first (`localtag app add --concepts ... --not-concepts ...`)")

    def prior(concept: str):
        return None if args.no_prior else learn.prior_of(tagger.scorer, concept)

    key = embedding_key(Loaded(tagger, encoder), settings)
    try:
        head, meta, n = train_head(store, app, {"id": args.name, "concepts": concepts}, key, tagger.info.sha256,
                                   tagger.info.name, prior)
    except ApiError as e:
        raise ValueError(f"app {app!r}: {e.details} (status {e.code})") from None
    head.meta["source"] = {"app": app, "inputs": n}
    learn.save(head, target)
    out = {"head": str(target), "name": args.name, "app": app, "model": tagger.info.name,
           "model_sha256": tagger.info.sha256, "images": n, "failed": 0, "concepts": meta["concepts"],
           "contradictions": meta["contradictions"], "heldout": []}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        _table(out)
    return 0


def _table(out: dict[str, Any]) -> None:
    from ..core.evaluate import fmt

    print(f"learnt {len(out['concepts'])} concepts from {out['images']} images ({out['failed']} failed) "
          f"on {out['model']}: {out['head']}")
    ap = {r["concept"]: r for r in out["heldout"]}
    width = max(len("concept"), *(len(c["concept"]) for c in out["concepts"]))
    print(f"  {'concept':<{width}} {'pos':>5} {'neg':>5} {'prior':>9}   held-out AP: zero-shot → learnt")
    for c in out["concepts"]:
        r = ap.get(c["concept"], {})
        print(f"  {c['concept']:<{width}} {c['positives']:>5} {c['negatives']:>5} {c['prior'] or '—':>9}   "
              f"{fmt(r.get('ap_zero_shot'))} → {fmt(r.get('ap_learnt'))}")
    for x in out["contradictions"]:
        print(f"  contradiction, left out: {x}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="learn concepts from labelled images (a head over the model's embeddings)",
                       description="Learn concepts from labelled images (the labels format of `localtag eval`): "
                                   "a calibrated linear probe per concept over the CLIP image embeddings, with the "
                                   "zero-shot text embedding as the prior for concepts the vocabulary knows. "
                                   "Stored as NAME.npz in --heads-dir; tag with `localtag tag --model-head NAME`.")
    p.add_argument("dir", type=Path, nargs="?", help="folder the labels' relative paths are resolved against")
    p.add_argument("--app", help="learn from an app's annotations instead (app name, or USER/APP; `localtag app "
                                 "add --concepts/--not-concepts`, or PostInputs with concepts on the server): value 1 is a positive, "
                                 "0 a negative")
    p.add_argument("--labels", type=Path, help="labels CSV: path,labels (labels ';'-separated); default DIR/labels.csv")
    p.add_argument("--name", required=True, help="the head's name (letters, digits, '.', '_', '-')")
    p.add_argument("--concepts", nargs="+", help="learn only these label names (default: every label of the file)")
    p.add_argument("--min-positives", type=int, default=None,
                   help="positive examples a concept needs (default 2, or 1 with a zero-shot prior)")
    p.add_argument("--no-prior", action="store_true", help="do not start from the zero-shot text embeddings")
    p.add_argument("--holdout", type=float, default=0.3, help="share of images held out for the AP report (0: none)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    add_progress_flag(p)
    add_model_flags(p)
    add_head_flags(p)
    p.set_defaults(func=cmd_learn)
