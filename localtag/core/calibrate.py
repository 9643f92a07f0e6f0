"""Calibration: per-concept Platt scaling of the Tagger's raw logits, fitted on labelled images.

``localtag calibrate DIR --labels CSV`` (see :mod:`localtag.cli.eval`) fits, for every concept of the
labels file with at least ``min_labels`` positive and negative images, ``value = sigmoid(a · z + b)``
on the raw logit ``z`` of :meth:`localtag.core.tagger.Tagger.logits` (Platt 1999, with Platt's smoothed
targets and a weak prior pulling ``a, b`` towards the global fit, so that few labels cannot give
wild values). One global ``a, b``, fitted on every (image, concept) pair of the labels file, serves
every other concept of the vocabulary. Each map is increasing in ``z``, so a concept's own ranking
(its AP) is unchanged; values, thresholds and the order between concepts change.

The result is stored beside the vocabulary as ``<vocab>.calibration.<model sha256[:16]>.json``.
:func:`find_for` (called by :func:`localtag.core.loader.load`, hence by tagging, the Clarifai endpoint and Directus)
uses it only when the model sha256, the templates and the scoring match; concepts are matched by id
and by a fingerprint of their name, synonyms and prompts, so an edited concept falls back to the
global map and an unrelated vocabulary gets no calibration at all.

Without a calibration file the values are the Tagger's uncalibrated ``binary`` scores (0.5: the
concept's prompts match the image as well as a neutral "a photo."), the request's ``min_value``
(default 0) and the vocabulary's per-concept ``threshold=`` apply, and ``max_concepts`` (default 20)
keeps the strongest concepts: a ranking that is sensible, with values that are not probabilities.
After calibration a value of 0.7 means that about 70 % of such images carry the concept (on data
like the labelled set), so one ``min_value`` such as 0.5 works across concepts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .numeric import sigmoid
from .prompts import NEUTRAL_PROMPTS, TEMPLATES
from .vocab import Concept, Vocab

log = logging.getLogger(__name__)

FORMAT = "localtag-calibration/1"
MIN_LABELS = 5
PRIOR_STRENGTH = 2.0
MIN_SLOPE = 1e-3  # a map must be increasing: a concept's values keep the order of its scores


def concept_fingerprint(c: Concept) -> str:
    """What a concept's text embedding depends on besides the model: name, synonyms, prompts."""
    text = "\x1f".join([c.name, "\x1e".join(c.synonyms), "\x1e".join(c.prompts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def text_key(templates: list[str] | tuple[str, ...] | None) -> str:
    """The prompt templates and neutral prompts behind the logits (a change invalidates a calibration)."""
    parts = ["\n".join(templates or TEMPLATES), "\n".join(NEUTRAL_PROMPTS)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def path_for(vocab_path: str | Path, model_sha256: str) -> Path:
    """``<vocab>.calibration.<model sha256[:16]>.json`` beside the vocabulary file."""
    vocab_path = Path(vocab_path)
    return vocab_path.with_name(f"{vocab_path.name}.calibration.{model_sha256[:16]}.json")


# -- fitting ---------------------------------------------------------------------------------------
def _loss(z, t, a, b, a0, b0, lam) -> np.ndarray:
    x = a * z + b
    # cross-entropy with soft targets, stable: log(1 + e^x) - t·x
    ce = (np.logaddexp(0.0, x) - t * x).sum(axis=0)
    return ce + 0.5 * lam * ((a - a0) ** 2 + (b - b0) ** 2)


def platt(z: np.ndarray, y: np.ndarray, *, a0: np.ndarray | float = 1.0, b0: np.ndarray | float = 0.0,
          lam: float = 0.0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Platt scaling of every column of ``z`` [N, K] against labels ``y`` [N, K]: returns ``a, b`` [K].

    Minimises the cross-entropy of ``sigmoid(a·z + b)`` against Platt's smoothed targets
    ((n₊+1)/(n₊+2) for positives, 1/(n₋+2) for negatives) plus ``lam/2 · ((a−a0)² + (b−b0)²)``,
    by damped Newton steps, all columns at once (float64).
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    n_pos = y.sum(axis=0)
    n_neg = y.shape[0] - n_pos
    t = np.where(y, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    k = z.shape[1]
    a0 = np.broadcast_to(np.asarray(a0, dtype=np.float64), (k,)).copy()
    b0 = np.broadcast_to(np.asarray(b0, dtype=np.float64), (k,)).copy()
    a, b = a0.copy(), b0.copy()
    loss = _loss(z, t, a, b, a0, b0, lam)
    for _ in range(iters):
        p = sigmoid(a * z + b)
        r = p - t
        w = np.maximum(p * (1 - p), 1e-12)
        ga = (r * z).sum(0) + lam * (a - a0)
        gb = r.sum(0) + lam * (b - b0)
        haa = (w * z * z).sum(0) + lam + 1e-9
        hab = (w * z).sum(0)
        hbb = w.sum(0) + lam + 1e-9
        det = haa * hbb - hab * hab
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        step = np.ones(k)
        for _ in range(30):  # backtrack where the full step does not lower the loss
            na, nb = a - step * da, b - step * db
            new = _loss(z, t, na, nb, a0, b0, lam)
            worse = new > loss + 1e-12
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        moved = ~worse
        a = np.where(moved, na, a)
        b = np.where(moved, nb, b)
        improvement = np.where(moved, loss - new, 0.0)
        loss = np.where(moved, new, loss)
        if float(np.max(np.abs(improvement))) < 1e-10:
            break
    return a, b


@dataclass
class Fit:
    """Per label-concept parameters (``fitted`` False: the global ``a, b`` is used) and counts."""

    a: np.ndarray
    b: np.ndarray
    fitted: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    global_a: float
    global_b: float


def fit(logits: np.ndarray, labels: np.ndarray, *, min_labels: int = MIN_LABELS,
        prior_strength: float = PRIOR_STRENGTH) -> Fit:
    """Fit the global map on every pair, then each column with ``min_labels`` positives and negatives."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if z.shape != y.shape or z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"logits {z.shape} and labels {y.shape} must be the same non-empty [images, concepts]")
    if not y.any() or y.all():
        raise ValueError("the labels need both positive and negative (image, concept) pairs to calibrate")
    ga, gb = platt(z.reshape(-1, 1), y.reshape(-1, 1))
    ga0, gb0 = float(ga[0]), float(gb[0])
    if ga0 < MIN_SLOPE:
        # no signal: keep the order of the scores (a reversed ranking would be worse than none) and
        # refit the intercept alone, so that values are about the share of positives
        log.warning("the global fit has slope %.3g: the model's scores carry no signal on these labels", ga0)
        ga0 = MIN_SLOPE
        rate = (y.sum() + 1.0) / (y.size + 2.0)
        gb0 = float(np.log(rate / (1 - rate)) - ga0 * z.mean())
    pos = y.sum(0)
    neg = y.shape[0] - pos
    ok = (pos >= min_labels) & (neg >= min_labels)
    a = np.full(z.shape[1], ga0)
    b = np.full(z.shape[1], gb0)
    if ok.any():
        fa, fb = platt(z[:, ok], y[:, ok], a0=ga0, b0=gb0, lam=prior_strength)
        a[ok], b[ok] = fa, fb
    fitted = ok & (a >= MIN_SLOPE)
    a = np.where(fitted, a, ga0)
    b = np.where(fitted, b, gb0)
    return Fit(a=a, b=b, fitted=fitted, positives=pos, negatives=neg, global_a=ga0, global_b=gb0)


# -- the applied map ------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Per-vocabulary-concept ``a, b``: :meth:`apply` maps raw logits [N, C] to calibrated logits."""

    a: np.ndarray
    b: np.ndarray
    scoring: str = "binary"
    model_sha256: str = ""
    path: Path | None = None
    own: int = 0  # concepts with their own fit; the others use the global map
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float32)
        if z.shape[-1] != self.a.shape[0]:
            raise ValueError(f"calibration for {self.a.shape[0]} concepts applied to {z.shape[-1]}")
        return z * self.a + self.b


def for_vocab(f: Fit, concept_indices: np.ndarray, vocab: Vocab, *, scoring: str = "binary",
              model_sha256: str = "") -> Calibration:
    """The :class:`Calibration` of a fit over ``concept_indices`` of ``vocab`` (others: global map)."""
    a = np.full(len(vocab), f.global_a, dtype=np.float32)
    b = np.full(len(vocab), f.global_b, dtype=np.float32)
    idx = np.asarray(concept_indices)
    a[idx], b[idx] = f.a, f.b
    return Calibration(a=a, b=b, scoring=scoring, model_sha256=model_sha256, own=int(f.fitted.sum()))


def to_json(f: Fit, concept_indices: np.ndarray, vocab: Vocab, info, *, scoring: str,
            templates: list[str] | tuple[str, ...] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    concepts = []
    for k, i in enumerate(np.asarray(concept_indices)):
        c = vocab[int(i)]
        entry = {"id": c.id, "name": c.name, "fp": concept_fingerprint(c),
                 "positives": int(f.positives[k]), "negatives": int(f.negatives[k])}
        if f.fitted[k]:
            entry.update(a=round(float(f.a[k]), 6), b=round(float(f.b[k]), 6))
        concepts.append(entry)
    return {
        "format": FORMAT,
        "model": info.name,
        "model_sha256": info.sha256,
        "scoring": scoring,
        "text": text_key(templates),
        "vocab_sha256": vocab.sha256,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "global": {"a": round(f.global_a, 6), "b": round(f.global_b, 6)},
        "concepts": concepts,
        **(extra or {}),
    }


def save(doc: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def from_json(doc: dict[str, Any], vocab: Vocab, info, *, path: Path | None = None) -> Calibration:
    """Check ``doc`` against the model and vocabulary; raises ``ValueError`` saying why it does not fit."""
    if doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format {doc.get('format')!r})")
    if doc.get("model_sha256") != info.sha256:
        raise ValueError(f"fitted for model sha256 {str(doc.get('model_sha256'))[:16]}…, "
                         f"not {info.name} ({info.sha256[:16]}…)")
    if doc.get("text") != text_key(info.templates):
        raise ValueError("fitted with other prompt templates than the model's")
    try:
        ga, gb = float(doc["global"]["a"]), float(doc["global"]["b"])
        entries = list(doc["concepts"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed calibration ({e!r})") from None
    a = np.full(len(vocab), ga, dtype=np.float32)
    b = np.full(len(vocab), gb, dtype=np.float32)
    matched = own = stale = 0
    for e in entries:
        i = vocab.by_id.get(e.get("id"))
        if i is None:
            continue
        matched += 1
        if e.get("fp") != concept_fingerprint(vocab[i]):
            stale += 1
            continue
        if "a" in e and "b" in e:
            a[i], b[i] = float(e["a"]), float(e["b"])
            own += 1
    if entries and not matched:
        raise ValueError("none of its concept ids is in this vocabulary")
    if stale:
        log.warning("%s: %d concepts changed their name, synonyms or prompts since calibration; they use "
                    "the global map (re-run `localtag calibrate`)", path, stale)
    return Calibration(a=a, b=b, scoring=str(doc.get("scoring", "binary")), model_sha256=info.sha256, path=path,
                       own=own, meta={k: doc[k] for k in ("created", "model", "labels", "heldout") if k in doc})


def find_for(vocab: Vocab, model_info) -> Calibration | None:
    """The calibration beside ``vocab``'s file for this model, if there is one and it fits."""
    vocab_path = vocab.path
    if vocab_path is None or not model_info.sha256:
        return None
    path = path_for(vocab_path, model_info.sha256)
    if not path.is_file():
        log.debug("no calibration %s; values are uncalibrated", path)
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        cal = from_json(doc, vocab, model_info, path=path)
    except (OSError, ValueError) as e:
        log.warning("calibration %s not used: %s", path, e)
        return None
    log.info("using calibration %s (%d concepts with their own map, the others the global map)", path, cal.own)
    return cal
