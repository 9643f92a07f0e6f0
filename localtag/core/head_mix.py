"""A learnt head *alongside* the vocabulary: the scorer of ``directus sync``, the flow and ``batch``.

``tag --model-head`` scores with the head alone (:meth:`~localtag.core.tagger.Tagger.use_head`); a library
wants both: the vocabulary's tags and the concepts people taught it. :class:`MixedScorer` is a
:class:`~localtag.core.scorer.Scorer` over the vocabulary plus the head's concepts:

- a head concept the vocabulary knows (by name, id or synonym: a *correction*, learnt from the zero-shot
  prior) replaces that concept's logit and calibration, keeping its id, translations, parents and thresholds;
- a new concept is appended (id and name: the concept's name) with priority 1, so a learnt concept that
  passes ``min_value`` takes a place before the vocabulary's when ``max_concepts`` is short;
- every other concept scores as before (its own calibration, or none).

Values are the head's calibrated values for its concepts, the vocabulary's for the rest, parents lifted
after the replacement. Pure numpy.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .calibrate import Calibration
from .scorer import Scorer
from .vocab import Concept, Vocab

LEARNT_PRIORITY = 1


class MixedScorer(Scorer):
    """``base``'s vocabulary with ``head``'s concepts replacing or added (see the module docstring)."""

    def __init__(self, base: Scorer, head: Any):
        if base.scoring == "softmax":
            raise ValueError("a learnt head cannot be mixed into scoring 'softmax' (values share 1.0 over the "
                             "vocabulary); use scoring 'binary'")
        self.base, self.head = base, head
        over_base, over_head, new = [], [], []
        for j, name in enumerate(head.names):
            i = base.vocab.index(name)
            if i is None:
                new.append(j)
            else:
                over_base.append(i)
                over_head.append(j)
        self._over_base, self._over_head, self._new = (np.array(x, dtype=int) for x in (over_base, over_head, new))
        added = [Concept(id=head.names[j], name=head.names[j], priority=LEARNT_PRIORITY) for j in new]
        vocab = Vocab([*base.vocab.concepts, *added], source=f"{base.vocab.source} + <head {head.meta.get('name', '')}>")
        #: ids of the concepts the head scores (for the provenance record's ``learnt``)
        self.learnt_ids = frozenset([base.vocab[i].id for i in over_base] + [c.id for c in added])
        n_base = len(base.vocab)
        a = np.ones(len(vocab), dtype=np.float32)
        b = np.zeros(len(vocab), dtype=np.float32)
        if base.calibration is not None:
            a[:n_base], b[:n_base] = base.calibration.a, base.calibration.b
        a[self._over_base], b[self._over_base] = head.a[self._over_head], head.c[self._over_head]
        a[n_base:], b[n_base:] = head.a[self._new], head.c[self._new]
        cal = Calibration(a=a, b=b, scoring=base.scoring, model_sha256=head.model_sha256, path=head.path,
                          own=len(head.names) + (base.calibration.own if base.calibration is not None else 0))

        def text() -> tuple[np.ndarray, np.ndarray]:
            w = head.weights[self._new].astype(np.float32)
            w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
            return np.vstack([base.concepts, w]), base.neutral

        super().__init__(vocab, text, scoring=base.scoring, logit_scale=base.logit_scale,
                         logit_bias=base.logit_bias, calibration=cal)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(self.base.logits(embeddings), dtype=np.float32)
        h = self.head.logits(embeddings)
        z = z.copy()
        z[:, self._over_base] = h[:, self._over_head]
        return np.hstack([z, h[:, self._new]]).astype(np.float32)


def head_record(tagger: Any) -> tuple[dict[str, Any] | None, frozenset[str]]:
    """(a provenance record's ``head`` entry, the ids of the concepts it scores) of a tagger with a learnt head
    alongside its vocabulary (:meth:`~localtag.core.tagger.Tagger.add_head`); (None, empty) without one."""
    head = getattr(tagger, "head", None)
    if head is None:
        return None, frozenset()
    ids = getattr(tagger.scorer, "learnt_ids", None)
    if ids is None:  # the head replaced the vocabulary: every concept is learnt
        ids = frozenset(c.id for c in tagger.vocab)
    digest = hashlib.sha256(head.path.read_bytes()).hexdigest() if head.path is not None else None
    return {"name": head.meta.get("name") or "", "sha256": digest, "concepts": list(head.names)}, ids


