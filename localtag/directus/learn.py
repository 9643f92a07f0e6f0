"""``localtag directus learn``: learn concepts from what people did in a Directus library (docs/directus.md).

The examples come from each image's tags and its provenance record (``directus_files.localtag``):

- **positives** of a concept: the files where a *person* gave it (a tag that is not one of localtag's
  recorded machine tags, :func:`~localtag.directus.tag_merge.person_tags`), compared case-insensitively;
- **negatives**: the files where a person deleted localtag's machine tag (``rejected`` in the record), and
  the files that carry the concept neither as a person's tag nor as a machine tag (a machine tag a person
  kept is neither: nobody said yes or no to it).

The concepts learnt: every person's tag on at least ``min_count`` files (``--min-count``), or the ones
named (``--concepts``), plus concepts of the vocabulary people rejected on at least ``min_count`` files
(when they also gave them somewhere). A concept the vocabulary knows is a *correction*: it starts from
its zero-shot prior (:func:`localtag.core.learn.prior_of`); a new one starts from nothing. The images
are downloaded as ``directus sync`` downloads them (:func:`~localtag.directus.sync.embed_files`) and
embedded through the embedding cache. The result is a head (:mod:`localtag.core.learn`) that
``directus sync --model-head`` and the server's flow use alongside the vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core import learn as core_learn
from ..core.evaluate import average_precision
from ..core.vocab import normalize_name
from .client import DirectusClient
from .sync import embed_files
from .tag_merge import PROVENANCE_FIELD, machine_tags, person_tags

log = logging.getLogger(__name__)

DEFAULT_MIN_COUNT = 5
DEFAULT_HOLDOUT = 0.3
FIELDS = ["id", "tags", PROVENANCE_FIELD, "filename_download"]


@dataclass
class FileTags:
    """One image's tags, sorted by who gave them (names normalised)."""

    id: str
    person: set[str]
    rejected: set[str]
    machine: set[str]


@dataclass
class Chosen:
    """The concepts to learn (normalised name → the name people wrote most often) and why others were not."""

    names: dict[str, str]
    skipped: list[str] = field(default_factory=list)


def file_tags(row: dict) -> FileTags:
    prov = row.get(PROVENANCE_FIELD)
    machine, rejected = machine_tags(prov)
    return FileTags(row["id"], {n for t in person_tags(row.get("tags"), prov) if (n := normalize_name(t))},
                    {normalize_name(t) for t in rejected}, {normalize_name(t) for t in machine})


def choose(rows: list[dict], files: list[FileTags], vocab: Any, min_count: int,
           concepts: list[str] | None = None) -> Chosen:
    """Which concepts to learn (see the module docstring)."""
    spelled: dict[str, Counter] = {}
    for row in rows:
        for t in person_tags(row.get("tags"), row.get(PROVENANCE_FIELD)):
            if n := normalize_name(t):
                spelled.setdefault(n, Counter())[t] += 1
    given = Counter(n for f in files for n in f.person)
    rejected = Counter(n for f in files for n in f.rejected)
    chosen, skipped = {}, []
    if concepts:
        wanted = [normalize_name(c) for c in concepts]
    else:
        wanted = [n for n, k in given.most_common() if k >= min_count]
        wanted += [n for n, k in rejected.most_common() if k >= min_count and vocab.index(n) is not None
                   and n not in wanted]
    for n in wanted:
        if not given[n]:
            skipped.append(f"{n!r}: no person gave it to any file ({rejected[n]} rejections)")
            continue
        chosen[n] = spelled[n].most_common(1)[0][0]
    return Chosen(chosen, skipped)


def annotations(files: list[FileTags], chosen: Chosen) -> list[core_learn.Annotation]:
    out = []
    for f in files:
        for n, name in chosen.names.items():
            if n in f.person:
                out.append(core_learn.Annotation(f.id, name, True, "person"))
            if n in f.rejected:
                out.append(core_learn.Annotation(f.id, name, False, "rejected"))
            elif n not in f.person and n not in f.machine:
                out.append(core_learn.Annotation(f.id, name, False, "untagged"))
    return out


def heldout(keys: list[str], fraction: float) -> np.ndarray:
    """Deterministic: a file is held out when the hash of its id falls under ``fraction``."""
    h = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2**64 for k in keys])
    return h < fraction


def learn_library(client: DirectusClient, tagger: Any, encoder: Any, settings: Any, *, name: str,
                  filter: dict | None = None, min_count: int = DEFAULT_MIN_COUNT, concepts: list[str] | None = None,
                  holdout: float = DEFAULT_HOLDOUT, concurrency: int = 8, cache: Any = None,
                  progress: Any = None) -> tuple[core_learn.Head, dict[str, Any]]:
    """Read the library, choose the concepts, embed the images, learn; (the head, its report). Raises
    :class:`~localtag.core.learn.TooFewExamples` when nothing can be learnt."""
    rows = list(client.iter_files(filter, fields=FIELDS))
    files = {r["id"]: file_tags(r) for r in rows}
    chosen = choose(rows, list(files.values()), tagger.vocab, min_count, concepts)
    for s in chosen.skipped:
        log.warning("not learnt: %s", s)
    if not chosen.names:
        raise core_learn.TooFewExamples(f"no person's tag is on at least {min_count} of the {len(rows)} images "
                                        "(--min-count), and no --concepts were named")
    keys, embs, failed = [], [], []
    for r in embed_files(client, encoder, settings, rows, concurrency=concurrency, cache=cache):
        if progress is not None:
            progress.update(1)
        if r.ok:
            keys.append(r.job.key)
            embs.append(r.embedding)
        else:
            failed.append(r.job.key)
            log.warning("directus file %s (%s) left out: %s: %s", r.job.key, r.job.meta.get("filename_download"),
                        r.error.kind, r.error.message)
    if not embs:
        raise core_learn.TooFewExamples(f"none of the {len(rows)} images could be read")
    emb = np.stack(embs).astype(np.float32)
    t = core_learn.targets(keys, emb, annotations([files[k] for k in keys], chosen))
    priors = {c: p for c in t.concepts if (p := core_learn.prior_of(tagger.scorer, c)) is not None}
    kw: dict[str, Any] = {"model_sha256": tagger.info.sha256, "model": tagger.info.name, "priors": priors}
    rejected = np.array([[c in files[k].rejected for c in t.concepts] for k in keys], dtype=bool).reshape(len(keys), -1)
    unsure = {c: int(n) for c, n in zip(t.concepts, reliable_negatives(emb, t, rejected, priors), strict=True)}
    report = _heldout_report(tagger, emb, keys, t, kw, holdout)
    prov = {"directus": {"images": len(rows), "embedded": len(keys), "failed": len(failed), "filter": filter,
                         "min_count": min_count, "skipped": chosen.skipped}, "heldout": report}
    head = core_learn.train(emb, t, name=name, provenance=prov, **kw)
    for c in head.meta["concepts"]:
        j = t.concepts.index(c["concept"])
        c["rejected"] = int(((t.y[:, j] == 0) & rejected[:, j]).sum())
        c["unsure"] = unsure[c["concept"]]
    out = {"name": name, "model": tagger.info.name, "images": len(rows), "embedded": len(keys),
           "failed": len(failed), "concepts": head.meta["concepts"], "contradictions": head.meta["contradictions"],
           "skipped": chosen.skipped, "heldout": report}
    return head, out


def reliable_negatives(emb: np.ndarray, t: core_learn.Targets, rejected: np.ndarray,
                       priors: dict[str, tuple[np.ndarray, float]]) -> list[int]:
    """Leave out of each concept's negatives the untagged files that look like its positives; the number
    left out per concept (``t.y`` is changed in place).

    People tag some of their boats, not all: an untagged file is only *probably* not an example. Each
    untagged file is scored by a probe fitted without it (3 folds of the untagged files and of the
    positives, by position: deterministic), and one scoring at least as high as the least typical positive
    (the lowest out-of-fold positive score: the "spy" rule of PU learning) is left out: neither positive nor
    negative. Deleted machine tags (``rejected``) are a person's "no" and always stay negatives. On the
    Directus loop of ``tests/test_directus_learn.py`` (20 of 60 ships tagged) the learnt concept reaches
    recall 0.75 at precision 0.91 on the other 180 files; with every untagged file a negative, the same
    200 images give recall 0 at ``min_value`` 0.5 (no file passes) and a held-out AP of 0.46."""
    left_out = []
    for j, c in enumerate(t.concepts):
        y = t.y[:, j]
        pos = np.flatnonzero(y == 1)
        untagged = np.flatnonzero((y == 0) & ~rejected[:, j])
        k = min(core_learn.FOLDS, len(pos), len(untagged))
        if k < 2:
            left_out.append(0)
            continue
        w0, b0 = priors.get(c, (None, 0.0))
        z = np.full(len(y), np.nan)
        for f in range(k):
            out = np.zeros(len(y), dtype=bool)
            out[pos[f::k]] = out[untagged[f::k]] = True
            fit = (y >= 0) & ~out
            w, b = core_learn.fit_probe(emb[fit], (y[fit] == 1).astype(np.float64), w0=w0, b0=b0)
            z[out] = emb[out].astype(np.float64) @ w + b
        unsure = untagged[z[untagged] >= z[pos].min()]
        if (y == 0).sum() - len(unsure) < core_learn.MIN_NEGATIVES:
            unsure = unsure[:0]
        y[unsure] = -1
        left_out.append(len(unsure))
        if len(unsure):
            log.info("%r: %d untagged files look like its positives: neither positive nor negative", c, len(unsure))
    return left_out


def _heldout_report(tagger: Any, emb: np.ndarray, keys: list[str], t: core_learn.Targets, kw: dict[str, Any],
                    fraction: float) -> list[dict[str, Any]]:
    """Fit on the files not held out; held-out AP of the zero-shot scorer (concepts it knows) and of the head."""
    held = heldout(keys, fraction) if fraction > 0 else np.zeros(len(keys), dtype=bool)
    if not held.any() or held.all():
        return []
    try:
        part = core_learn.train(emb[~held], core_learn.Targets(t.concepts, t.y[~held]), **kw)
    except core_learn.TooFewExamples as e:
        log.warning("no held-out report (%s)", e)
        return []
    after, before = part.values(emb[held]), tagger.values(emb[held])
    report = []
    for j, c in enumerate(t.concepts):
        m = t.y[held, j] >= 0
        y = t.y[held, j][m] == 1
        i = tagger.vocab.index(c)
        report.append({"concept": c, "heldout": int(m.sum()), "heldout_positives": int(y.sum()),
                       "ap_zero_shot": average_precision(before[m, i], y) if i is not None else None,
                       "ap_learnt": average_precision(after[m, j], y)})
    return report


def report_text(out: dict[str, Any]) -> str:
    """The table ``directus learn`` prints: concept, examples, held-out AP before → after."""
    def fmt(x: Any) -> str:
        return "    —" if x is None or x != x else f"{x:.3f}"

    lines = [f"learnt {len(out['concepts'])} concepts from {out['embedded']} of {out['images']} Directus images "
             f"({out['failed']} failed) on {out['model']}: {out.get('head', '')}"]
    ap = {r["concept"]: r for r in out["heldout"]}
    width = max(len("concept"), *(len(c["concept"]) for c in out["concepts"]))
    lines.append(f"  {'concept':<{width}} {'pos':>5} {'neg':>5} {'rej':>5} {'unsure':>6} {'prior':>9}   "
                 "held-out AP: before → after")
    for c in out["concepts"]:
        r = ap.get(c["concept"], {})
        lines.append(f"  {c['concept']:<{width}} {c['positives']:>5} {c['negatives']:>5} {c.get('rejected', 0):>5} "
                     f"{c.get('unsure', 0):>6} "
                     f"{c['prior'] or 'new':>9}   {fmt(r.get('ap_zero_shot'))} → {fmt(r.get('ap_learnt'))}")
    lines += [f"  contradiction, left out: {x}" for x in out["contradictions"]]
    lines += [f"  not learnt: {x}" for x in out["skipped"]]
    return "\n".join(lines)
