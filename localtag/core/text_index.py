"""The text index: a vocabulary's prompts → prompt-ensembled, L2-normalised text embeddings, cached.

Where embeddings come from, first found wins: the model folder (``text/<key>.npz``, stored at
``models import``/``pull`` by :func:`localtag.core.loader.precompute_text`), the cache folder, or the
text tower (then kept in the cache folder). ``key`` covers everything that changes them: the model's
sha256, the vocabulary's sha256, the templates, the neutral prompts and the format version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import models as model_store
from . import text_store
from .devices import autocast, text_precision
from .prompts import NEUTRAL_PROMPTS, TEMPLATES
from .vocab import Vocab

log = logging.getLogger(__name__)

_CACHE_VERSION = "text-v1"


class TextIndex:
    """One model's text tower over one vocabulary; :meth:`embeddings` is what the scorer scores against."""

    def __init__(self, info: model_store.ModelInfo, vocab: Vocab,
                 model: torch.nn.Module | Callable[[], torch.nn.Module], device: torch.device,
                 *, cache_dir: str | Path | None = None, templates: Sequence[str] | None = None):
        """``model``: the CLIP model, or a function that builds it when the text tower must run (a
        vocabulary whose embeddings are stored never builds it)."""
        self.info = info
        self.vocab = vocab
        self._model = model
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.templates = tuple(templates or info.templates or TEMPLATES)
        self._tokenizer = None
        self.progress: bool | None = None  # a bar while encoding prompts: None = on a TTY

    @property
    def model(self) -> torch.nn.Module:
        if not isinstance(self._model, torch.nn.Module):
            self._model = self._model()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = model_store.tokenizer_for(self.info)
        return self._tokenizer

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (_CACHE_VERSION, self.info.sha256, self.vocab.sha256, "\n".join(self.templates),
                     "\n".join(NEUTRAL_PROMPTS)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = False) -> torch.Tensor:
        """L2-normalised text embeddings; ``progress``: a tqdm bar on stderr (None: on a TTY)."""
        out = []
        for i in text_store.progress_range(len(texts), batch_size, progress, "text embeddings"):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with autocast(self.device, text_precision(self.device)):
                feats = _encode_text(self.model, tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def query(self, text: str) -> np.ndarray:
        """A free-text query embedded as a concept is: ``text`` through every template, averaged and
        L2-normalised (float32 [D]), so the search query "ship" is the concept "ship"'s embedding."""
        return self._ensemble([[t.format(text) for t in self.templates]])[0].numpy().astype(np.float32)

    def _ensemble(self, groups: list[list[str]]) -> torch.Tensor:
        flat = [t for g in groups for t in g]
        feats = self.encode(flat, progress=self.progress if len(flat) > 256 else False)
        rows, i = [], 0
        for g in groups:
            rows.append(feats[i : i + len(g)].mean(0))
            i += len(g)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def build(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the text tower over every prompt of the vocabulary: (concepts [C, D], neutral [D])."""
        groups = []
        for c in self.vocab:
            templates = c.prompts or self.templates
            groups.append([t.format(n) for n in (c.name, *c.synonyms) for t in templates])
        concepts = self._ensemble(groups)
        neutral = self._ensemble([list(NEUTRAL_PROMPTS)])[0]
        return concepts, neutral

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(concepts [C, D], neutral [D]) float32, from the model folder, the cache or the text tower."""
        key = self.key()
        stored = text_store.load(self.info, key, len(self.vocab))
        if stored is not None:
            return stored[0].numpy(), stored[1].numpy()
        path = self.cache_dir / "text" / f"{key}.npz" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                with np.load(path) as z:
                    concepts, neutral = z["concepts"], z["neutral"]
                if concepts.shape[0] == len(self.vocab):
                    return concepts, neutral
            except (OSError, ValueError, KeyError) as e:
                log.warning("text-embedding cache %s unreadable (%s); rebuilding", path, e)
        log.info("encoding %d concepts × %d templates with %s", len(self.vocab), len(self.templates), self.info.name)
        concepts_t, neutral_t = self.build()
        concepts, neutral = concepts_t.numpy(), neutral_t.numpy()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, concepts=concepts, neutral=neutral)
                os.replace(tmp, path)
            except OSError as e:
                log.warning("cannot write text-embedding cache %s: %s", path, e)
        return concepts, neutral


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
