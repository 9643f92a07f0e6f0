"""Learnt concepts: a per-concept linear probe on the L2-normalised image embeddings, pure numpy (CPU).

Per concept, L2-regularised logistic regression on ``(embedding, positive?)`` pairs::

    minimise  Σᵢ log(1 + e^{zᵢ}) − yᵢ·zᵢ  +  λ/2 · |w − w₀|²  +  λ_b/2 · (b − b₀)²,   zᵢ = w·xᵢ + b

by damped Newton steps (float64; each step solved by conjugate gradients on Hessian-vector products;
a few to a few dozen steps). ``w₀, b₀`` is the prior: for a concept the model's vocabulary knows by name, its zero-shot
``binary`` scorer (``w₀ = s·(t − n)``: the logit scale times the concept's text embedding minus the
neutral prompt's), so with no examples the head *is* the zero-shot scorer, 1–4 examples move it a
little, and many examples dominate (the data term grows with the examples, the prior does not).
A concept no prompt knows has ``w₀ = 0, b₀ = 0`` and a *shaped* pull ``λ/2·wᵀ M w``: ``M = α·I + (1 − α)·Σ_w``
(``Σ_w`` the examples' within-class covariance scaled to mean eigenvalue 1, ``α = D / (n + D)``;
:func:`fit_probe` ``shaped=True``), so weight along the directions in which images of one class differ
costs more (ridge for a few examples, towards shrinkage LDA for many). docs/learn.md gives the figures.

Calibration: the logits of each concept are refitted with Platt scaling
(:func:`localtag.core.calibrate.platt`, pulled towards the identity) on out-of-fold logits
(``FOLDS``-fold, folds assigned by position, so deterministic), so values behave like probabilities
on data like the examples. Everything is deterministic given the data: no random numbers anywhere.

A :class:`Head` is stored as one ``.npz`` file (weights, bias, calibration, concept names, the CLIP
model's sha256 and provenance as JSON) and refuses to score embeddings of another CLIP model
(:meth:`Head.check`). :meth:`Head.scorer` gives a :class:`~localtag.core.scorer.Scorer` over the
learnt concepts, so the run loop, the writers and ``eval`` use it like a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import PRIOR_STRENGTH, Calibration, platt
from .numeric import sigmoid
from .scorer import Scorer
from .vocab import Concept, Vocab, normalize_name

log = logging.getLogger(__name__)

FORMAT = "localtag-head/1"
#: examples a concept needs: positives without / with a zero-shot prior, and negatives
MIN_POSITIVES = 2
MIN_POSITIVES_PRIOR = 1
MIN_NEGATIVES = 2
#: the pull of w towards its prior (a concept without a prior: towards 0) and of b towards b₀
LAMBDA = 0.3  # bench/bench_learn.py: the best of 0.03-3 on CIFAR-10 for both with and without a prior
LAMBDA_BIAS = 1e-2
NEWTON_STEPS = 100
CG_STEPS = 200  # conjugate-gradient steps per Newton step (at most)
FOLDS = 3
#: the shaped pull for a concept with a zero-shot prior: off (bench/bench_learn.py --prior-shaped, 5 seeds:
#: it lowers held-out mAP at every k, by 0.001-0.015; without a prior it raises it by 0.001-0.020)
SHAPED_WITH_PRIOR = False
_PULLS = {True: "within-class shaped", False: "L2"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class TooFewExamples(ValueError):
    """A concept has fewer positive or negative examples than it needs."""


class HeadMismatch(ValueError):
    """A head trained on one CLIP model asked to score another's embeddings."""


@dataclass(frozen=True)
class Annotation:
    """``key`` (an image) is (``positive``) or is not an example of ``concept``."""

    key: str
    concept: str
    positive: bool
    source: str = ""


@dataclass
class Contradiction:
    """The same image annotated both ways for one concept (under one key, or two keys of identical images)."""

    concept: str
    positive: list[str]
    negative: list[str]

    def __str__(self) -> str:
        return (f"{self.concept!r}: positive in {', '.join(self.positive[:3])}; "
                f"negative in {', '.join(self.negative[:3])}")


@dataclass
class Targets:
    """Per concept: +1 positive, 0 negative, −1 not an example ([N, C] int8), and what was dropped."""

    concepts: list[str]
    y: np.ndarray
    contradictions: list[Contradiction] = field(default_factory=list)


def targets(keys: Sequence[str], embeddings: np.ndarray, annotations: Iterable[Annotation]) -> Targets:
    """The training targets of ``annotations`` over the rows ``keys`` of ``embeddings``.

    Rows with byte-identical embeddings are one image (the same photo under two names): it counts
    once. An image that is a positive and a negative of one concept is a :class:`Contradiction`:
    reported, and left out of that concept's examples.
    """
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    row = {k: i for i, k in enumerate(keys)}
    group: dict[bytes, int] = {}
    first = np.array([group.setdefault(hashlib.sha256(emb[i].tobytes()).digest(), i) for i in range(len(keys))])
    seen: dict[tuple[str, int], dict[bool, list[str]]] = {}
    concepts: dict[str, None] = {}
    for a in annotations:
        if a.key not in row:
            raise KeyError(f"{a.key}: annotated but not among the embedded images")
        name = normalize_name(a.concept)
        if not name:
            continue
        concepts.setdefault(name, None)
        sides = seen.setdefault((name, int(first[row[a.key]])), {True: [], False: []})
        if a.key not in sides[bool(a.positive)]:
            sides[bool(a.positive)].append(a.key)
    names = list(concepts)
    col = {c: j for j, c in enumerate(names)}
    y = np.full((len(keys), len(names)), -1, dtype=np.int8)
    contradictions = []
    for (name, g), sides in seen.items():
        if sides[True] and sides[False]:
            contradictions.append(Contradiction(name, sides[True], sides[False]))
        else:
            y[g, col[name]] = 1 if sides[True] else 0
    for c in contradictions:
        log.warning("contradicting annotations, left out: %s", c)
    return Targets(names, y, contradictions)


# -- fitting ---------------------------------------------------------------------------------------
class _Pull:
    """The regulariser ``½·dᵀ R d`` on ``d = θ − θ₀`` (θ = ``[w, b]``): ``R = diag(reg) + Zᵀ Z`` (Z pads with a
    zero column for the bias). ``Z`` is None for the plain L2 pull; a shaped pull keeps it as rows
    ([n, D]), so applying ``R`` costs O(n·D) and no [D, D] matrix is ever formed."""

    def __init__(self, reg: np.ndarray, Z: np.ndarray | None = None):
        self.reg, self.Z = reg, Z

    def __call__(self, d: np.ndarray) -> np.ndarray:
        out = self.reg * d
        if self.Z is not None:
            out[:-1] += self.Z.T @ (self.Z @ d[:-1])
        return out

    def diag(self) -> np.ndarray:
        if self.Z is None:
            return self.reg
        return self.reg + np.r_[(self.Z * self.Z).sum(0), 0.0]


def shrinkage(n: int, d: int) -> float:
    """α of the shaped pull: the weight of the isotropic part, ``D / (n + D)`` (the posterior mean of a
    covariance under an inverse-Wishart prior worth ``D`` pseudo-examples of the identity): ~1 for a
    few examples, falling as they grow."""
    return d / (n + d)


def _shaped(X: np.ndarray, y: np.ndarray, lam: float, lam_bias: float) -> _Pull:
    """``λ·M`` on w, ``M = α·I + (1 − α)·Σ_w / (tr Σ_w / D)``: Σ_w the examples' within-class covariance
    (positives and negatives each centred on their own mean), scaled to mean eigenvalue 1 like I."""
    n, d = X.shape
    Z = X.copy()
    for side in (0.0, 1.0):
        m = y == side
        if m.any():
            Z[m] -= Z[m].mean(0)
    spread = float((Z * Z).sum()) / n / d  # tr Σ_w / D
    reg = np.full(d + 1, float(lam))
    reg[d] = lam_bias
    if spread <= 0:
        return _Pull(reg)
    alpha = shrinkage(n, d)
    reg[:d] *= alpha
    return _Pull(reg, Z * np.sqrt(lam * (1 - alpha) / (n * spread)))


def _objective(X1, y, theta, prior, pull: _Pull) -> float:
    z = X1 @ theta
    d = theta - prior
    return float((np.logaddexp(0.0, z) - y * z).sum() + 0.5 * (d @ pull(d)))


def fit_probe(X: np.ndarray, y: np.ndarray, *, w0: np.ndarray | None = None, b0: float = 0.0,
              lam: float = LAMBDA, lam_bias: float = LAMBDA_BIAS, steps: int = NEWTON_STEPS,
              start: tuple[np.ndarray, float] | None = None, shaped: bool = False) -> tuple[np.ndarray, float]:
    """One concept's ``w, b`` (see the module docstring); ``X`` [n, D], ``y`` [n] in {0, 1}; Newton starts
    from ``start`` (default: the prior). ``shaped``: the pull on w is ``λ/2·(w − w₀)ᵀ M (w − w₀)`` with M
    from the examples' within-class spread (:func:`_shaped`) instead of ``λ/2·|w − w₀|²``."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    X1 = np.hstack([X, np.ones((n, 1))])
    prior = np.zeros(d + 1)
    if w0 is not None:
        prior[:d] = w0
    prior[d] = b0
    if shaped:
        pull = _shaped(X, y, float(lam), lam_bias)
    else:
        reg = np.full(d + 1, float(lam))
        reg[d] = lam_bias
        pull = _Pull(reg)
    theta = prior.copy() if start is None else np.r_[start[0], start[1]].astype(np.float64)
    loss = _objective(X1, y, theta, prior, pull)
    for _ in range(steps):
        p = sigmoid(X1 @ theta)
        g = X1.T @ (p - y) + pull(theta - prior)
        step = _newton_step(X1, p * (1 - p), pull, g)
        t = 1.0
        for _ in range(30):
            new_theta = theta - t * step
            new = _objective(X1, y, new_theta, prior, pull)
            if new <= loss + 1e-12:
                break
            t /= 2
        else:
            break
        theta, gain, loss = new_theta, loss - new, new
        if gain < 1e-10 * max(1.0, abs(loss)):
            break
    return theta[:d], float(theta[d])


def _newton_step(X1: np.ndarray, s: np.ndarray, pull: _Pull, g: np.ndarray) -> np.ndarray:
    """``H⁻¹ g`` for ``H = X1ᵀ diag(s) X1 + R`` by (Jacobi-preconditioned) conjugate gradients on
    Hessian-vector products: O(n·D) each instead of O(n·D²) for H itself (measured 4-36× faster than
    forming H and solving, at 64 and 512 dimensions, to the same optimum)."""
    d = X1.shape[1]
    precond = 1.0 / ((X1 * X1).T @ s + pull.diag())  # Jacobi
    x = np.zeros(d)
    r = g.copy()
    z = precond * r
    q = z.copy()
    rz = r @ z
    tol = 1e-10 * (g @ g)
    for _ in range(CG_STEPS):
        hq = X1.T @ (s * (X1 @ q)) + pull(q)
        alpha = rz / (q @ hq)
        x += alpha * q
        r -= alpha * hq
        if r @ r <= tol:
            break
        z = precond * r
        rz, rz_old = r @ z, rz
        q = z + (rz / rz_old) * q
    return x


def _folds(y: np.ndarray, k: int) -> np.ndarray:
    """Fold of each row: positives and negatives dealt out by position (deterministic, stratified)."""
    fold = np.empty(len(y), dtype=int)
    for side in (0, 1):
        idx = np.flatnonzero(y == side)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def _calibrate(X, y, w0, b0, lam, start, shaped: bool = False) -> tuple[float, float]:
    """Platt ``a, b`` on out-of-fold logits (identity when a class has fewer than 2 examples)."""
    k = int(min(FOLDS, (y == 1).sum(), (y == 0).sum()))
    if k < 2:
        return 1.0, 0.0
    fold = _folds(y, k)
    z = np.empty(len(y))
    for f in range(k):
        w, b = fit_probe(X[fold != f], y[fold != f], w0=w0, b0=b0, lam=lam, start=start, shaped=shaped)
        z[fold == f] = X[fold == f] @ w + b
    a, c = platt(z[:, None], y[:, None].astype(bool), a0=1.0, b0=0.0, lam=PRIOR_STRENGTH)
    return float(max(a[0], 1e-3)), float(c[0])


# -- the head ----------------------------------------------------------------------------------------
@dataclass
class Head:
    """Learnt concepts over one CLIP model's image embeddings: ``value = sigmoid(a·(w·x + b) + c)``."""

    names: list[str]
    weights: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C]
    a: np.ndarray  # [C] calibration slope
    c: np.ndarray  # [C] calibration intercept
    model_sha256: str
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def check(self, model_sha256: str, model: str = "") -> None:
        """Refuse another CLIP model: its embedding space is not the one the head was trained in."""
        if model_sha256 != self.model_sha256:
            raise HeadMismatch(f"head {self.meta.get('name', self.path)!r} was trained on CLIP model "
                               f"{self.model or '?'} (sha256 {self.model_sha256[:16]}…), not {model or '?'} "
                               f"(sha256 {model_sha256[:16]}…): learn it again on this model")

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Uncalibrated logits [N, C] (float64 sums, as the general scorer's)."""
        emb = np.asarray(embeddings, dtype=np.float64)
        if emb.ndim == 1:
            emb = emb[None]
        if emb.shape[1] != self.dim:
            raise HeadMismatch(f"embeddings of dimension {emb.shape[1]}, the head expects {self.dim}")
        return (emb @ self.weights.astype(np.float64).T + self.bias).astype(np.float32)

    def values(self, embeddings: np.ndarray) -> np.ndarray:
        """Calibrated values in [0, 1], [N, C]."""
        return sigmoid(self.logits(embeddings) * self.a + self.c).astype(np.float32)

    def vocab(self) -> Vocab:
        return Vocab([Concept(id=n, name=n) for n in self.names], source=f"<head {self.meta.get('name', '')}>")

    def scorer(self) -> Scorer:
        return HeadScorer(self)


class HeadScorer(Scorer):
    """A :class:`Scorer` whose logits come from a :class:`Head` (picking, select and the run loop unchanged)."""

    def __init__(self, head: Head):
        cal = Calibration(a=head.a.astype(np.float32), b=head.c.astype(np.float32), scoring="binary",
                          model_sha256=head.model_sha256, path=head.path, own=len(head.names))
        norms = np.linalg.norm(head.weights, axis=1, keepdims=True)
        super().__init__(head.vocab(), (head.weights / np.maximum(norms, 1e-12), np.zeros(head.dim, np.float32)),
                         scoring="binary", calibration=cal)
        self.head = head

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return self.head.logits(embeddings)


def prior_of(scorer: Scorer, name: str) -> tuple[np.ndarray, float] | None:
    """The zero-shot ``(w₀, b₀)`` of ``name`` in ``scorer``'s vocabulary (its logit = w₀·x + b₀), or None."""
    i = scorer.vocab.index(name)
    if i is None:
        return None
    concepts, neutral = scorer.text
    t = concepts[i].astype(np.float64)
    if scorer.scoring == "sigmoid":
        return scorer.logit_scale * t, float(scorer.logit_bias or 0.0)
    if scorer.scoring == "softmax":  # no per-concept logit: use the binary one
        return scorer.logit_scale * (t - neutral), 0.0
    return scorer.logit_scale * (t - neutral.astype(np.float64)), 0.0


def train(embeddings: np.ndarray, t: Targets, *, model_sha256: str, model: str = "",
          priors: dict[str, tuple[np.ndarray, float]] | None = None, lam: float = LAMBDA,
          min_positives: int | None = None, min_negatives: int = MIN_NEGATIVES, name: str = "",
          provenance: dict[str, Any] | None = None, shaped: bool | None = None) -> Head:
    """A :class:`Head` for every concept of ``t``; raises :class:`TooFewExamples` naming each concept short of
    examples (``min_positives``: default ``MIN_POSITIVES``, ``MIN_POSITIVES_PRIOR`` with a prior).
    ``shaped``: the within-class shaped pull (:func:`fit_probe`) for every concept (True), none (False),
    or, by default, for the concepts without a zero-shot prior (``SHAPED_WITH_PRIOR`` says why)."""
    X = np.asarray(embeddings, dtype=np.float64)
    priors = priors or {}
    short = []
    for j, c in enumerate(t.concepts):
        pos, neg = int((t.y[:, j] == 1).sum()), int((t.y[:, j] == 0).sum())
        need = min_positives if min_positives is not None else (MIN_POSITIVES_PRIOR if c in priors else MIN_POSITIVES)
        if pos < need or neg < min_negatives:
            short.append(f"{c!r} has {pos} positive and {neg} negative examples, needs at least {need} and "
                         f"{min_negatives}")
    if not t.concepts:
        raise TooFewExamples("no concept has any example")
    if short:
        raise TooFewExamples("too few examples: " + "; ".join(short))
    W = np.zeros((len(t.concepts), X.shape[1]))
    b, a, c = (np.zeros(len(t.concepts)) for _ in range(3))
    counts = []
    for j, name_j in enumerate(t.concepts):
        m = t.y[:, j] >= 0
        Xj, yj = X[m], t.y[m, j].astype(np.float64)
        w0, b0 = priors.get(name_j, (None, 0.0))
        shape_j = (SHAPED_WITH_PRIOR if w0 is not None else True) if shaped is None else shaped
        W[j], b[j] = fit_probe(Xj, yj, w0=w0, b0=b0, lam=lam, shaped=shape_j)
        a[j], c[j] = _calibrate(Xj, yj, w0, b0, lam, (W[j], b[j]), shape_j)
        counts.append({"concept": name_j, "positives": int(yj.sum()), "negatives": int((yj == 0).sum()),
                       "prior": "zero-shot" if name_j in priors else None})
    meta = {"name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": {"probe": "logistic", "lambda": lam, "lambda_bias": LAMBDA_BIAS, "calibration": f"platt, {FOLDS}-fold",
                       "pull": _PULLS[shaped] if shaped is not None else
                       f"{_PULLS[True]} without a zero-shot prior, {_PULLS[SHAPED_WITH_PRIOR]} with one",
                       "shrinkage": "alpha = D / (n + D)"},
            "concepts": counts, "contradictions": [str(x) for x in t.contradictions], **(provenance or {})}
    return Head(list(t.concepts), W.astype(np.float32), b, a, c, model_sha256, model, meta)


# -- files -------------------------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"head name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return name


def head_path(heads_dir: str | Path, name_or_path: str | Path) -> Path:
    """A head by name (``<heads_dir>/<name>.npz``) or by file path."""
    p = Path(name_or_path)
    if p.suffix == ".npz" or p.is_file():
        return p
    return Path(heads_dir) / f"{check_name(str(name_or_path))}.npz"


def save(head: Head, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "names": head.names, "model_sha256": head.model_sha256, "model": head.model,
           "meta": head.meta}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, weights=head.weights.astype(np.float32), bias=head.bias.astype(np.float64),
                     a=head.a.astype(np.float64), c=head.c.astype(np.float64), doc=np.array(json.dumps(doc)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    head.path = path
    return path


def load(path: str | Path) -> Head:
    """Read a head file; ``ValueError`` saying why when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such learnt head (`localtag learn ... --name NAME` makes one)")
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["doc"]))
            arrays = {k: np.array(z[k]) for k in ("weights", "bias", "a", "c")}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a learnt head ({e})") from None
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {doc.get('format')!r})")
    names = list(doc["names"])
    if arrays["weights"].shape[0] != len(names):
        raise ValueError(f"{path}: {arrays['weights'].shape[0]} weight rows for {len(names)} concepts")
    return Head(names, arrays["weights"], arrays["bias"], arrays["a"], arrays["c"], str(doc["model_sha256"]),
                str(doc.get("model", "")), dict(doc.get("meta", {})), path)
