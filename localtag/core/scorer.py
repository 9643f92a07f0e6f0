"""The scorer: image embeddings → per-concept values → reported tags. Pure numpy, no weights.

Scoring (``scoring=``):

- ``binary`` (default): each concept is scored on its own against a fixed neutral prompt
  ("a photo.", "an image.", …): ``value = sigmoid(s · (cos(image, concept) − cos(image, neutral)))``
  with ``s`` the model's own logit scale (100 for CLIP). It is a two-way softmax between "a photo of
  a cat" and "a photo", so a value does not depend on what else is in the vocabulary, like Clarifai's
  per-concept values, and 0.95 means the concept beats the neutral prompt by ln(19)/s in cosine.
- ``softmax``: a share of 1.0 over the whole vocabulary (CLIP's single-label recipe); it shrinks as the
  vocabulary grows, so it only suits small closed sets (Clarifai's single-label models: nsfw, moderation).
- ``sigmoid``: ``sigmoid(s · cos + b)`` with the model's learned bias; only for SigLIP-style models.

A calibration fitted by ``localtag calibrate`` (per-concept ``a · logit + b`` before the sigmoid,
see :mod:`localtag.core.calibrate`) replaces the default mapping. Structure (see
:mod:`localtag.core.vocab`): parents are never below their children, exclusive pairs keep the
stronger concept, per-concept thresholds and priorities apply, hidden concepts are never reported.

:meth:`Scorer.tags` is the scoring loop of every adapter: one matrix product for a batch, then
:meth:`Scorer.pick` per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .numeric import sigmoid
from .tag import Tag
from .vocab import Vocab

log = logging.getLogger(__name__)

SCORINGS = ("binary", "softmax", "sigmoid")
#: (concepts [C, D], neutral [D]) L2-normalised float32 text embeddings
TextEmbeddings = tuple[np.ndarray, np.ndarray]


class SelectError(ValueError):
    """``select_concepts`` matched no concept of the vocabulary."""


@dataclass(frozen=True)
class Picking:
    """How one image's values become its tags (Clarifai's ``output_config``)."""

    max_concepts: int = 20
    min_value: float = 0.0
    select: np.ndarray | None = None
    language: str | None = None


#: Clarifai's defaults: the 20 best concepts, whatever their values
DEFAULT_PICKING = Picking()


class Scorer:
    """Values and picking for one vocabulary; read-only after construction (safe across threads).

    ``text`` is the text embeddings, or a function that gives them on first use (the text index
    encodes a new vocabulary's prompts only when something is scored).
    """

    def __init__(
        self,
        vocab: Vocab,
        text: TextEmbeddings | Callable[[], TextEmbeddings],
        *,
        scoring: str = "binary",
        logit_scale: float = 100.0,
        logit_bias: float | None = None,
        calibration: Any | None = None,
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")
        if scoring == "sigmoid" and logit_bias is None:
            raise ValueError("this model has no learned logit_bias; use scoring 'binary' or 'softmax'")
        if calibration is not None and calibration.scoring != scoring:
            log.warning("calibration %s was fitted for scoring %r, not %r: not used",
                        calibration.path, calibration.scoring, scoring)
            calibration = None
        if calibration is not None and scoring == "softmax":
            log.warning("a calibration does not apply to scoring 'softmax': not used")
            calibration = None
        self.vocab = vocab
        self.scoring = scoring
        self.logit_scale = float(logit_scale)
        self.logit_bias = logit_bias
        self.calibration = calibration
        self._text = None if callable(text) else _as_text(text)
        self._text_source = text if callable(text) else None
        self._wide: tuple[np.ndarray, np.ndarray] | None = None
        self._edges = parent_edges(vocab)
        self._exclusive = exclusive_partners(vocab)
        self._hidden = np.array([c.hidden for c in vocab], dtype=bool)
        self._thresholds = np.array([c.threshold or 0.0 for c in vocab], dtype=np.float32)
        self._priority = np.array([c.priority for c in vocab], dtype=np.float32)
        self._one_priority = bool(len(vocab) == 0 or (self._priority == self._priority[0]).all())

    # -- the text side it scores against -----------------------------------------------------------------
    @property
    def text(self) -> TextEmbeddings:
        if self._text is None:
            self._text = _as_text(self._text_source())
        return self._text

    def _text64(self) -> tuple[np.ndarray, np.ndarray]:
        if self._wide is None:
            self._wide = tuple(np.ascontiguousarray(a, dtype=np.float64) for a in self.text)
        return self._wide

    @property
    def concepts(self) -> np.ndarray:
        """[concepts, dim] L2-normalised, prompt-ensembled text embeddings (float32)."""
        return self.text[0]

    @property
    def neutral(self) -> np.ndarray:
        return self.text[1]

    # -- values ----------------------------------------------------------------------------------------
    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw per-concept logits [N, concepts] before the value mapping.

        The cosines are summed in float64: a row's answer then does not depend on how many rows are
        scored with it (BLAS kernels split float32 sums by matrix shape), so ``tag``, the server, a
        batch shard and ``rescore`` give one image the same values to the last float32 bit.
        """
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim == 1:
            emb = emb[None]
        concepts, neutral = self._text64()
        cos = emb @ concepts.T
        if self.scoring == "binary":
            cos = cos - (emb @ neutral)[:, None]
            return (self.logit_scale * cos).astype(np.float32)
        if self.scoring == "sigmoid":
            return (self.logit_scale * cos + self.logit_bias).astype(np.float32)
        return (self.logit_scale * cos).astype(np.float32)

    def values(self, embeddings: np.ndarray) -> np.ndarray:
        """Image embeddings [N, dim] → per-concept values in [0, 1], [N, concepts], calibrated when a
        calibration is loaded, with parents lifted to their children's values."""
        return self.logits_to_values(self.logits(embeddings))

    def logits_to_values(self, logits: np.ndarray, calibration: Any | None = ...) -> np.ndarray:
        """Raw logits → values (``calibration``: the loaded one by default, ``None`` for none)."""
        calibration = self.calibration if calibration is ... else calibration
        z = np.asarray(logits, dtype=np.float32)
        if self.scoring == "softmax":
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            values = e / e.sum(axis=1, keepdims=True)
        else:
            if calibration is not None:
                z = calibration.apply(z)
            values = sigmoid(z)
        values = values.astype(np.float32)
        for child, parent in self._edges:
            np.maximum(values[:, parent], values[:, child], out=values[:, parent])
        return values

    # -- picking ---------------------------------------------------------------------------------------
    def select_indices(self, select: Sequence[str] | None) -> np.ndarray | None:
        """Indices of ``select_concepts`` (ids, names or synonyms, case-sensitive as Clarifai's)."""
        if not select:
            return None
        idx = []
        names = {n: i for i, c in reversed(list(enumerate(self.vocab))) for n in c.synonyms}
        names.update({c.name: i for i, c in enumerate(self.vocab)})
        for key in select:
            i = self.vocab.by_id.get(key, names.get(key))
            if i is not None:
                idx.append(i)
        if not idx:
            raise SelectError(f"none of select_concepts {list(select)[:5]} is in the vocabulary")
        return np.array(sorted(set(idx)))

    def pick(self, values: np.ndarray, picking: Picking = DEFAULT_PICKING) -> list[Tag]:
        """One image's values → its reported tags, sorted by value.

        A concept is reported when it is at least ``min_value`` and its own threshold, is not hidden and
        is not beaten by a stronger exclusive partner (exclusions are settled from the strongest concept
        down, among the concepts that pass their thresholds, hidden ones included). With ``select`` only
        those concepts are reported, with their values whatever their thresholds and exclusions.
        When more than ``max_concepts`` remain, higher priorities take the places first.
        """
        v = values.astype(np.float32, copy=True)
        passing = v >= picking.min_value
        if picking.select is not None:
            mask = np.zeros_like(passing)
            mask[picking.select] = True
            reportable = passing & mask & ~self._hidden
        else:
            passing &= v >= self._thresholds
            for loser in exclusion_losers(v, passing, self._exclusive):
                passing[loser] = False
            reportable = passing & ~self._hidden
        idx = np.flatnonzero(reportable)
        n = picking.max_concepts
        if n and len(idx) > n:
            # demoted (negative-priority) concepts only fill the places others leave free
            if self._one_priority:  # a partial sort is enough
                idx = idx[np.argpartition(-v[idx], n - 1)[:n]]
            else:
                order = np.lexsort((-v[idx], -self._priority[idx]))
                idx = idx[order[:n]]
        idx = idx[np.argsort(-v[idx], kind="stable")]
        return [Tag(self.vocab[i].id, self.vocab[i].display(picking.language), float(v[i])) for i in idx]

    def tags(self, embeddings: np.ndarray, picking: Picking = DEFAULT_PICKING) -> list[list[Tag]]:
        """The scoring loop: [N, dim] embeddings → N lists of tags (one matrix product for all)."""
        return self.tags_of_values(self.values(embeddings), picking) if len(embeddings) else []

    def tags_of_values(self, values: np.ndarray, picking: Picking = DEFAULT_PICKING) -> list[list[Tag]]:
        return [self.pick(row, picking) for row in values]


def _as_text(text: Any) -> TextEmbeddings:
    concepts, neutral = text
    return (np.ascontiguousarray(np.asarray(concepts, dtype=np.float32)),
            np.ascontiguousarray(np.asarray(neutral, dtype=np.float32)))


def parent_edges(vocab: Vocab) -> list[tuple[int, int]]:
    """(child, parent) pairs ordered so that a concept's own parents come after all its children."""
    order: list[int] = []
    seen: set[int] = set()

    def visit(i: int) -> None:  # post-order over "is parent of"
        if i in seen:
            return
        seen.add(i)
        for p in vocab.parent_indices(i):
            visit(p)
        order.append(i)

    for i in range(len(vocab)):
        visit(i)
    rank = {c: r for r, c in enumerate(reversed(order))}  # children before parents
    edges = [(i, p) for i in range(len(vocab)) for p in vocab.parent_indices(i)]
    return sorted(edges, key=lambda e: rank[e[0]])


def exclusive_partners(vocab: Vocab) -> dict[int, set[int]]:
    """Concept index → the indices it excludes (symmetric: ``a | exclusive=b`` also excludes a from b)."""
    partners: dict[int, set[int]] = {}
    for i, c in enumerate(vocab):
        for other in c.exclusive:
            j = vocab.index(other)
            if j is not None and j != i:
                partners.setdefault(i, set()).add(j)
                partners.setdefault(j, set()).add(i)
    return partners


def exclusion_losers(v: np.ndarray, passing: np.ndarray, partners: dict[int, set[int]]) -> list[int]:
    """Greedy from the strongest: a passing concept is kept unless a kept partner beats it (ties: the
    earlier line wins); a dropped concept excludes nothing."""
    contenders = [i for i in partners if passing[i]]
    contenders.sort(key=lambda i: (-float(v[i]), i))
    kept: set[int] = set()
    losers = []
    for i in contenders:
        if partners[i] & kept:
            losers.append(i)
        else:
            kept.add(i)
    return losers
