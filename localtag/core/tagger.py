"""The Tagger: images in, Clarifai-style concepts out.

Scoring (``scoring=``):

- ``binary`` (default): each concept is scored on its own against a fixed neutral prompt
  ("a photo.", "an image.", …): ``value = sigmoid(s · (cos(image, concept) − cos(image, neutral)))``
  with ``s`` the model's own logit scale (100 for CLIP). It is a two-way softmax between "a photo of
  a cat" and "a photo", so a value does not depend on what else is in the vocabulary, like Clarifai's
  per-concept values, and 0.95 means the concept beats the neutral prompt by ln(19)/s in cosine.
- ``softmax``: a share of 1.0 over the whole vocabulary (CLIP's single-label recipe); it shrinks as the
  vocabulary grows, so it only suits small closed sets.
- ``sigmoid``: ``sigmoid(s · cos + b)`` with the model's learned bias; only for SigLIP-style models.

A calibration file fitted by ``localtag calibrate`` (per-concept ``a · logit + b`` before the sigmoid,
see :mod:`localtag.core.calibrate`) replaces the default mapping when it matches the model, the scoring
and the vocabulary; without one, ``binary`` values are the uncalibrated two-way softmax above.
Structure (see :mod:`localtag.core.vocab`): parents are never below their children, exclusive pairs keep
the stronger concept, per-concept thresholds and priorities apply, hidden concepts are never reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models as model_store
from . import text_store
from .devices import autocast, pick_device, text_precision
from .numeric import sigmoid
from .prompts import NEUTRAL_PROMPTS, TEMPLATES
from .tag import Tag
from .vocab import Vocab

log = logging.getLogger(__name__)

SCORINGS = ("binary", "softmax", "sigmoid")
_CACHE_VERSION = "text-v1"


class SelectError(ValueError):
    """``select_concepts`` matched no concept of the vocabulary."""


class Tagger:
    """The text side of one model with one vocabulary: prompt-ensembled concept embeddings, the value
    mapping (scoring, calibration, parents) and picking. Images are the encoder's job
    (:class:`localtag.core.encoder.ImageEncoder`); both are built together by :func:`localtag.core.loader.load`.
    Read-only after construction, so safe to share between threads."""

    def __init__(
        self,
        info: model_store.ModelInfo,
        vocab: Vocab,
        *,
        model: torch.nn.Module | None = None,
        device: str | torch.device = "auto",
        scoring: str = "binary",
        cache_dir: str | Path | None = None,
        templates: Sequence[str] | None = None,
        calibration: Any | None = None,
    ):
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")
        self.info = info
        self.vocab = vocab
        self.device = pick_device(device)
        self.scoring = scoring
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.templates = tuple(templates or info.templates or TEMPLATES)
        self.model = model if model is not None else model_store.build(info).to(self.device)
        self.tokenizer = model_store.tokenizer_for(info)
        self.logit_scale = float(self.model.logit_scale.exp().clamp(1, 100).item())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = float(bias.item()) if bias is not None else None
        if scoring == "sigmoid" and self.logit_bias is None:
            raise ValueError(f"{info.name} has no learned logit_bias; use scoring 'binary' or 'softmax'")
        if calibration is not None and calibration.scoring != scoring:
            log.warning("calibration %s was fitted for scoring %r, not %r: not used",
                        calibration.path, calibration.scoring, scoring)
            calibration = None
        if calibration is not None and scoring == "softmax":
            log.warning("a calibration does not apply to scoring 'softmax': not used")
            calibration = None
        self.calibration = calibration
        self.text_progress: bool | None = None  # a bar while encoding prompts: None = on a TTY
        self._text: torch.Tensor | None = None
        self._neutral: torch.Tensor | None = None
        self._edges = _parent_edges(vocab)
        self._exclusive = _exclusive_partners(vocab)
        self._hidden = np.array([c.hidden for c in vocab], dtype=bool)
        self._thresholds = np.array([c.threshold or 0.0 for c in vocab], dtype=np.float32)
        self._priority = np.array([c.priority for c in vocab], dtype=np.float32)
        self._one_priority = bool(len(vocab) == 0 or (self._priority == self._priority[0]).all())

    @property
    def model_sha256(self) -> str:
        return self.info.sha256

    @property
    def dim(self) -> int:
        return int(self.text_embeddings.shape[1])

    # -- text side ---------------------------------------------------------------------------------
    def text_key(self) -> str:
        h = hashlib.sha256()
        for part in (_CACHE_VERSION, self.model_sha256, self.vocab.sha256, "\n".join(self.templates),
                     "\n".join(NEUTRAL_PROMPTS)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256,
                     progress: bool | None = False) -> torch.Tensor:
        """L2-normalised text embeddings; ``progress``: a tqdm bar on stderr (None: on a TTY)."""
        out = []
        for i in text_store.progress_range(len(texts), batch_size, progress, "text embeddings"):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with autocast(self.device, text_precision(self.device)):
                feats = _encode_text(self.model, tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _prompt_ensemble(self, groups: list[list[str]]) -> torch.Tensor:
        flat = [t for g in groups for t in g]
        feats = self.encode_texts(flat, progress=self.text_progress if len(flat) > 256 else False)
        rows, i = [], 0
        for g in groups:
            rows.append(feats[i : i + len(g)].mean(0))
            i += len(g)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def build_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        groups = []
        for c in self.vocab:
            templates = c.prompts or self.templates
            groups.append([t.format(n) for n in (c.name, *c.synonyms) for t in templates])
        concepts = self._prompt_ensemble(groups)
        neutral = self._prompt_ensemble([list(NEUTRAL_PROMPTS)])[0]
        return concepts, neutral

    def _load_text(self) -> None:
        stored = text_store.load(self.info, self.text_key(), len(self.vocab))  # `models pull`/`import`
        if stored is not None:
            self._text, self._neutral = stored
            return
        path = self.cache_dir / "text" / f"{self.text_key()}.npz" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    self._text, self._neutral = torch.from_numpy(z["concepts"]), torch.from_numpy(z["neutral"])
                if self._text.shape[0] == len(self.vocab):
                    return
            except (OSError, ValueError, KeyError) as e:
                log.warning("text-embedding cache %s unreadable (%s); rebuilding", path, e)
        log.info("encoding %d concepts × %d templates with %s", len(self.vocab), len(self.templates), self.info.name)
        self._text, self._neutral = self.build_text()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, concepts=self._text.numpy(), neutral=self._neutral.numpy())
                os.replace(tmp, path)
            except OSError as e:
                log.warning("cannot write text-embedding cache %s: %s", path, e)

    @property
    def text_embeddings(self) -> torch.Tensor:
        """[concepts, dim] L2-normalised, prompt-ensembled text embeddings (CPU, float32)."""
        if self._text is None:
            self._load_text()
        return self._text

    @property
    def neutral_embedding(self) -> torch.Tensor:
        if self._neutral is None:
            self._load_text()
        return self._neutral

    # -- scoring -----------------------------------------------------------------------------------
    def logits(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw per-concept logits [N, concepts] before the value mapping."""
        emb = np.asarray(embeddings, dtype=np.float32)
        emb = torch.from_numpy(emb if emb.flags.writeable else emb.copy())  # e.g. a Parquet column's buffer
        cos = emb @ self.text_embeddings.T
        if self.scoring == "binary":
            cos = cos - (emb @ self.neutral_embedding)[:, None]
            return (self.logit_scale * cos).numpy()
        if self.scoring == "sigmoid":
            return (self.logit_scale * cos + self.logit_bias).numpy()
        return (self.logit_scale * cos).numpy()

    def values(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Image embeddings → per-concept values in [0, 1], [N, concepts], calibrated when a calibration
        is loaded, with parents lifted to their children's values."""
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

    def pick(
        self,
        values: np.ndarray,
        *,
        max_concepts: int = 20,
        min_value: float = 0.0,
        select: np.ndarray | None = None,
        language: str | None = None,
    ) -> list[Tag]:
        """One image's values → its reported tags, sorted by value.

        A concept is reported when it is at least ``min_value`` and its own threshold, is not hidden and
        is not beaten by a stronger exclusive partner (exclusions are settled from the strongest concept
        down, among the concepts that pass their thresholds, hidden ones included). With ``select`` only
        those concepts are reported, with their values whatever their thresholds and exclusions.
        When more than ``max_concepts`` remain, higher priorities take the places first.
        """
        v = values.astype(np.float32, copy=True)
        passing = v >= min_value
        if select is not None:
            mask = np.zeros_like(passing)
            mask[select] = True
            reportable = passing & mask & ~self._hidden
        else:
            passing &= v >= self._thresholds
            for loser in _exclusion_losers(v, passing, self._exclusive):
                passing[loser] = False
            reportable = passing & ~self._hidden
        idx = np.flatnonzero(reportable)
        if max_concepts and len(idx) > max_concepts:
            # demoted (negative-priority) concepts only fill the places others leave free
            if self._one_priority:  # a partial sort is enough
                idx = idx[np.argpartition(-v[idx], max_concepts - 1)[:max_concepts]]
            else:
                order = np.lexsort((-v[idx], -self._priority[idx]))
                idx = idx[order[:max_concepts]]
        idx = idx[np.argsort(-v[idx], kind="stable")]
        return [Tag(self.vocab[i].id, self.vocab[i].display(language), float(v[i])) for i in idx]


def _parent_edges(vocab: Vocab) -> list[tuple[int, int]]:
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


def _exclusive_partners(vocab: Vocab) -> dict[int, set[int]]:
    """Concept index → the indices it excludes (symmetric: ``a | exclusive=b`` also excludes a from b)."""
    partners: dict[int, set[int]] = {}
    for i, c in enumerate(vocab):
        for other in c.exclusive:
            j = vocab.index(other)
            if j is not None and j != i:
                partners.setdefault(i, set()).add(j)
                partners.setdefault(j, set()).add(i)
    return partners


def _exclusion_losers(v: np.ndarray, passing: np.ndarray, partners: dict[int, set[int]]) -> list[int]:
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


def _encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text``, with the padding cut off where that cannot change the result.

    open_clip pads every prompt to the context length (77); with CLIP's causal mask and end-of-text
    pooling, positions after the longest prompt of the batch never reach the pooled token, so running
    the transformer on the first ``L`` positions gives the same embeddings, several times faster.
    """
    import open_clip
    from open_clip.transformer import text_global_pool

    causal = getattr(model, "attn_mask", None)
    if (not isinstance(model, open_clip.CLIP) or causal is None
            or getattr(model, "text_pool_type", "argmax") != "argmax"):
        return model.encode_text(tokens)
    length = int((tokens != 0).sum(1).max().item())
    if length >= tokens.shape[1]:
        return model.encode_text(tokens)
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=causal[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, "argmax", eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
