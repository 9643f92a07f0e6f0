"""The Tagger: one model's text index and scorer over one vocabulary, on the weights the image encoder
shares (both built by :func:`localtag.core.loader.load`).

The work is done by :class:`~localtag.core.text_index.TextIndex` (prompts → text embeddings, cached)
and :class:`~localtag.core.scorer.Scorer` (embeddings → values → tags, pure numpy). The Tagger ties
them to the model and keeps a few short names for the callers and tests that score one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models as model_store
from .devices import pick_device
from .scorer import SCORINGS, Picking, Scorer, SelectError
from .tag import Tag
from .text_index import TextIndex
from .vocab import Vocab

__all__ = ["SCORINGS", "Picking", "SelectError", "Tagger"]


class Tagger:
    """Read-only after construction, so safe to share between threads."""

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
        self.head: Any = None  # a learnt head that replaced the vocabulary (use_head) or joined it (add_head)
        self.device = pick_device(device)
        self.model = model if model is not None else model_store.build(info).to(self.device)
        self.text = TextIndex(info, vocab, self.model, self.device, cache_dir=cache_dir, templates=templates)
        bias = getattr(self.model, "logit_bias", None)
        if scoring == "sigmoid" and bias is None:
            raise ValueError(f"{info.name} has no learned logit_bias; use scoring 'binary' or 'softmax'")
        self.scorer = Scorer(vocab, self.text.embeddings, scoring=scoring,
                             logit_scale=float(self.model.logit_scale.exp().clamp(1, 100).item()),
                             logit_bias=float(bias.item()) if bias is not None else None, calibration=calibration)

    def use_head(self, head: Any) -> None:
        """Score with a learnt :class:`~localtag.core.learn.Head` instead of the vocabulary (refused when it
        was trained on another CLIP model)."""
        head.check(self.info.sha256, self.info.name)
        self.scorer = head.scorer()
        self.vocab = self.scorer.vocab
        self.head = head

    def add_head(self, head: Any) -> None:
        """Score with the vocabulary *and* a learnt head (:class:`~localtag.core.head_mix.MixedScorer`:
        its concepts replace same-named ones and add the others); refused on another CLIP model."""
        from .head_mix import MixedScorer

        head.check(self.info.sha256, self.info.name)
        self.scorer = MixedScorer(self.scorer, head)
        self.vocab = self.scorer.vocab
        self.head = head

    # -- what it is ------------------------------------------------------------------------------------
    @property
    def model_sha256(self) -> str:
        return self.info.sha256

    @property
    def dim(self) -> int:
        return int(self.scorer.concepts.shape[1])

    @property
    def templates(self) -> tuple[str, ...]:
        return self.text.templates

    @property
    def scoring(self) -> str:
        return self.scorer.scoring

    @property
    def calibration(self) -> Any | None:
        return self.scorer.calibration

    @property
    def text_progress(self) -> bool | None:
        return self.text.progress

    @text_progress.setter
    def text_progress(self, value: bool | None) -> None:
        self.text.progress = value

    # -- text side (the index) -------------------------------------------------------------------------
    def text_key(self) -> str:
        return self.text.key()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = False) -> torch.Tensor:
        return self.text.encode(texts, batch_size, progress)

    def build_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.build()

    @property
    def text_embeddings(self) -> torch.Tensor:
        """[concepts, dim] L2-normalised, prompt-ensembled text embeddings (CPU, float32)."""
        return torch.from_numpy(self.scorer.concepts)

    @property
    def neutral_embedding(self) -> torch.Tensor:
        return torch.from_numpy(self.scorer.neutral)

    # -- scoring (the scorer) --------------------------------------------------------------------------
    def logits(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.scorer.logits(np.asarray(embeddings, dtype=np.float32))

    def values(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.scorer.values(np.asarray(embeddings, dtype=np.float32))

    def logits_to_values(self, logits: np.ndarray, calibration: Any | None = ...) -> np.ndarray:
        return self.scorer.logits_to_values(logits, calibration)

    def select_indices(self, select: Sequence[str] | None) -> np.ndarray | None:
        return self.scorer.select_indices(select)

    def pick(self, values: np.ndarray, *, max_concepts: int = 20, min_value: float = 0.0,
             select: np.ndarray | None = None, language: str | None = None) -> list[Tag]:
        """One image's values → its tags (see :meth:`Scorer.pick`)."""
        return self.scorer.tags_of_values(values[None], Picking(max_concepts, min_value, select, language))[0]
