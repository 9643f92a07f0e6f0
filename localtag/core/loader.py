"""Loading: settings → the :class:`~localtag.core.tagger.Tagger` and the :class:`~localtag.core.encoder.ImageEncoder`
of one model, sharing one set of weights on one device.

The one place that resolves a model in the store (and verifies its weights), reads the vocabulary,
finds its calibration (:func:`localtag.core.calibrate.find_for`) and builds the open_clip model. Every
adapter (CLI, server, Directus, batch) calls :func:`load`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from . import calibrate, text_store
from . import models as model_store
from . import vocab as vocab_mod
from .config import Settings
from .devices import pick_device
from .encoder import ImageEncoder
from .scorer import Scorer
from .tagger import Tagger
from .text_index import TextIndex

log = logging.getLogger(__name__)


class Loaded(NamedTuple):
    tagger: Tagger
    encoder: ImageEncoder


def load(settings: Settings, *, verify: bool = True, head: str = "replace") -> Loaded:
    """The tagger (text side, scoring, picking) and the image encoder of ``settings.model``.

    ``settings.model_head`` (a learnt head) replaces the vocabulary (``head="replace"``: ``tag``, ``eval``) or
    joins it (``"add"``: ``directus sync``, the server and its flow, ``batch``; see :mod:`localtag.core.head_mix`)."""
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
    if settings.model_head:
        from . import learn

        learnt = learn.load(learn.head_path(settings.heads_dir, settings.model_head))
        if head == "add":
            tagger.add_head(learnt)
        else:
            tagger.use_head(learnt)
    return Loaded(tagger, encoder)


def precompute_text(info: model_store.ModelInfo, vocabs: list[Path], *, progress: bool | None = None) -> list[dict]:
    """Encode each vocabulary's prompts with the model and store them in its folder (:mod:`localtag.core.text_store`).

    ``models pull`` and ``models import`` call it, so a host never runs the text tower for these
    vocabularies. Vocabularies already stored under the same key are skipped; returns the entries written.
    """
    known = {e.get("key"): e for e in text_store.entries(info)}
    new: list[dict] = []
    torch_device = pick_device("cpu")
    model: Any = lambda: model_store.build(info)  # noqa: E731 - built only if a vocabulary needs it
    for vpath in dict.fromkeys(Path(v).resolve() for v in vocabs):
        vocab = vocab_mod.load(vpath)
        text = TextIndex(info, vocab, model, torch_device)
        key = text.key()
        if key in known and text_store.load(info, key, len(vocab)) is not None:
            continue
        log.info("text embeddings of %s: %d concepts", vpath, len(vocab))
        text.progress = progress
        concepts, neutral = text.build()
        model = text.model  # built once, for the next vocabulary too
        new.append(text_store.store(info, known, key, vpath, vocab, concepts, neutral, list(text.templates)))
    if new:
        text_store.record(info, known)
    return new


def load_scorer(settings: Settings) -> tuple[model_store.ModelInfo, Scorer]:
    """The scorer of ``settings`` without the image tower: the logit scale is read from the weights and
    the text embeddings from the model folder or the cache; the model is built only if the text tower
    must run (a vocabulary never encoded before). For ``batch rescore``."""
    store = model_store.ModelStore(settings.models_dir)
    info = store.resolve(settings.model)
    vocab = vocab_mod.load(settings.resolved_vocab(info.vocab_path))
    params = model_store.logit_params(info)
    if params is None:  # only a full load can tell
        tagger = load(settings, verify=False, head="add").tagger
        return info, tagger.scorer
    device = pick_device("cpu")
    text = TextIndex(info, vocab, lambda: model_store.build(info), device, cache_dir=settings.cache_dir)
    scorer = Scorer(vocab, text.embeddings, scoring=settings.scoring, logit_scale=params[0],
                    logit_bias=params[1], calibration=calibrate.find_for(vocab, info))
    if settings.model_head:  # a learnt head joins the vocabulary (as in `batch run`)
        from . import learn
        from .head_mix import MixedScorer

        learnt = learn.load(learn.head_path(settings.heads_dir, settings.model_head))
        learnt.check(info.sha256, info.name)
        scorer = MixedScorer(scorer, learnt)
    return info, scorer


def fingerprint(settings: Settings) -> dict[str, Any]:
    """What decides a batch run's answers, from the manifest, the vocabulary, the templates and the
    calibration file alone (no model is loaded): a run dir holds results of exactly one fingerprint."""
    import hashlib

    from .prompts import TEMPLATES

    info = model_store.ModelStore(settings.models_dir).resolve(settings.model)
    vocab = vocab_mod.load(settings.resolved_vocab(info.vocab_path))
    cal = calibrate.find_for(vocab, info)
    if cal is not None and (cal.scoring != settings.scoring or settings.scoring == "softmax"):
        cal = None  # the scorer will not use it either
    cal_id = None
    if cal is not None:
        path = cal.path
        cal_id = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else repr(cal)
    head = {}
    if settings.model_head:  # only then: the fingerprints of runs without a head stay as they were
        from . import learn

        loaded = learn.load(learn.head_path(settings.heads_dir, settings.model_head))
        sha = hashlib.sha256(loaded.path.read_bytes()).hexdigest()
        # the provenance record's `head` entry (core.head_mix.head_record's shape), for `batch push`
        record = {"name": loaded.meta.get("name") or "", "sha256": sha, "concepts": list(loaded.names)}
        head = {"model_head_sha256": sha, "model_head": record}
    return {
        **head,
        "model": info.name,
        "model_sha256": info.sha256,
        "vocab_sha256": vocab.sha256,
        "templates": list(info.templates or TEMPLATES),
        "scoring": settings.scoring,
        "calibration_sha256": cal_id,
        "preprocess": info.preprocess,
        "max_pixels": settings.max_pixels,
        "max_bytes": settings.max_bytes,
        "fast_decode": settings.fast_decode,
        "precision": settings.precision,
        "max_concepts": settings.max_concepts,
        "min_value": settings.min_value,
    }


#: the part of a fingerprint the stored embeddings depend on (``rescore`` may change the rest)
IMAGE_KEYS = ("model_sha256", "preprocess", "max_pixels", "max_bytes", "fast_decode", "precision")
