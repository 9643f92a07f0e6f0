"""Loading: settings → the :class:`~localtag.core.tagger.Tagger` and the :class:`~localtag.core.encoder.ImageEncoder`
of one model, sharing one set of weights on one device.

The one place that resolves a model in the store (and verifies its weights), reads the vocabulary,
finds its calibration (:func:`localtag.core.calibrate.find_for`) and builds the open_clip model. Every
adapter (CLI, server, Directus, batch) calls :func:`load`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from . import calibrate, text_store
from . import models as model_store
from . import vocab as vocab_mod
from .config import Settings
from .devices import pick_device
from .encoder import ImageEncoder
from .tagger import Tagger

log = logging.getLogger(__name__)


class Loaded(NamedTuple):
    tagger: Tagger
    encoder: ImageEncoder


def load(settings: Settings, *, verify: bool = True) -> Loaded:
    """The tagger (text side, scoring, picking) and the image encoder of ``settings.model``."""
    store = model_store.ModelStore(settings.models_dir)
    info = store.resolve(settings.model)
    if verify:
        store.verify(info, stamp_dir=settings.cache_dir)
    vocab = vocab_mod.load(settings.resolved_vocab(info.vocab_path))
    device = pick_device(settings.device)
    model = model_store.build(info).to(device)
    tagger = Tagger(info, vocab, model=model, device=device, scoring=settings.scoring, cache_dir=settings.cache_dir,
                    calibration=calibrate.find_for(vocab, info))
    encoder = ImageEncoder(model, model_store.preprocess_for(info), image_size=info.preprocess["size"], device=device,
                           precision=settings.precision, compile=settings.compile, batch_size=settings.batch_size,
                           max_pixels=settings.max_pixels, max_bytes=settings.max_bytes, model_key=info.sha256,
                           cache_dir=settings.cache_dir)
    return Loaded(tagger, encoder)


def precompute_text(info: model_store.ModelInfo, vocabs: list[Path], *, progress: bool | None = None) -> list[dict]:
    """Encode each vocabulary's prompts with the model and store them in its folder (:mod:`localtag.core.text_store`).

    ``models pull`` and ``models import`` call it, so a host never runs the text tower for these
    vocabularies. Vocabularies already stored under the same key are skipped; returns the entries written.
    """
    known = {e.get("key"): e for e in text_store.entries(info)}
    new: list[dict] = []
    for vpath in dict.fromkeys(Path(v).resolve() for v in vocabs):
        vocab = vocab_mod.load(vpath)
        tagger = Tagger(info, vocab, device="cpu")
        key = tagger.text_key()
        if key in known and text_store.load(info, key, len(vocab)) is not None:
            continue
        log.info("text embeddings of %s: %d concepts", vpath, len(vocab))
        tagger.text_progress = progress
        concepts, neutral = tagger.build_text()
        new.append(text_store.store(info, known, key, vpath, vocab, concepts, neutral, list(tagger.templates)))
    if new:
        text_store.record(info, known)
    return new
