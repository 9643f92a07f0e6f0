"""Clarifai's model family on the server's one CLIP model: concept models, the embedding, colours.

Every family model shares the default entry's weights and image encoder: an image is fetched, decoded
and encoded once (:meth:`Family.analyse`), then each asked model turns that one embedding (or the
decoded pixels, for colours) into its output. Concept models are a :class:`~localtag.core.tagger.Tagger`
each (a shipped vocabulary's text index and scorer on the shared model), so adding one costs its text
embeddings, not another image tower. The table of ids is :mod:`localtag.core.family`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..core import clarifai, decode, errors, memory
from ..core import family as fam
from ..core import vocab as vocab_mod
from ..core.colors import Color, dominant_colors
from ..core.config import Settings, shipped
from ..core.errors import ImageError
from ..core.properties import Properties, properties
from ..core.scorer import Picking
from ..core.tagger import SelectError, Tagger
from .batcher import Batcher
from .fairpool import FairPool, RequestPixels
from .metrics import Metrics
from .schema import InputIn, PredictRequest
from .service import MAX_INPUTS, ModelEntry, Overloaded, PredictOptions, StatusError

log = logging.getLogger(__name__)


class Svc(Protocol):
    """What the family needs of :class:`localtag.serve.service.Service` (the service passes itself)."""

    settings: Settings
    metrics: Metrics
    decoder: FairPool

    async def admit(self, entry: ModelEntry, budget: RequestPixels, *, url: str | None, b64: str | bytes | None,
                    data: bytes | None) -> tuple[bytes, int]: ...

    def _draft(self, entry: ModelEntry) -> int: ...

    def options(self, entry: ModelEntry, req: PredictRequest) -> PredictOptions: ...

    def admitted(self, n: int) -> AbstractContextManager[Any]: ...

    def overloaded_response(self) -> tuple[int, dict]: ...


#: one model of a run: (its id, the general entry or a family one, its options)
Run = tuple[str, "ModelEntry | FamilyEntry", PredictOptions]


class _Embeddings:
    """What a :class:`Batcher` maps a batch's embeddings to: the embeddings themselves."""

    @staticmethod
    def values(embeddings: Any) -> np.ndarray:
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.float().cpu().numpy()
        return np.asarray(embeddings, dtype=np.float32)


@dataclass
class Analysis:
    """One image, looked at once: its embedding and (when asked) its colours."""

    embedding: np.ndarray | None
    colors: list[Color] | None
    properties: Properties | None = None


class FamilyEntry:
    """One family model as the service's model routes see it (``model_json``, ``visible``, ``concept_json``)."""

    def __init__(self, model: fam.FamilyModel, tagger: Tagger | None, default: ModelEntry):
        self.model = model
        self.tagger = tagger
        self.general = False
        self.default = default
        sha = tagger.vocab.sha256 if tagger is not None else model.kind
        self.version_id = hashlib.sha256(f"{default.tagger.info.sha256}:{model.key}:{sha}".encode()).hexdigest()[:32]
        self.app_id, self.user_id = clarifai.APP_ID, clarifai.USER_ID
        self.visible = [c for c in tagger.vocab if not c.hidden] if tagger is not None else []

    def model_json(self, model_id: str, **extra: Any) -> dict[str, Any]:
        return clarifai.model_json(model_id, self.version_id, name=self.model.name,
                                   model_type_id=self.model.model_type_id, **extra)

    def concept_json(self, c, language: str | None = None) -> dict[str, Any]:
        return {"id": c.id, "name": c.display(language), "value": 1.0, "created_at": clarifai.EPOCH,
                "app_id": self.app_id, "user_id": self.user_id}


class Family:
    """The family models served next to the general one (built in the server's lifespan)."""

    def __init__(self, default: ModelEntry, settings: Settings, *, on_batch=None):
        self.default = default
        self.settings = settings
        base = default.tagger
        self.entries: dict[str, FamilyEntry] = {}
        for m in fam.FAMILY:
            if m.key == "general":
                continue
            tagger = None
            if m.kind == fam.CONCEPTS:
                tagger = Tagger(base.info, vocab_mod.load(shipped(m.vocab)), model=base.model, device=base.device,
                                scoring=m.scoring, cache_dir=settings.cache_dir)
            self.entries[m.key] = FamilyEntry(m, tagger, default)
        # embeddings of images for family models and workflows: one batcher on the shared encoder
        self.embedder = Batcher(_Embeddings(), default.encoder, max_batch=default.encoder.batch_size,
                                window=settings.batch_window_ms / 1000, on_batch=on_batch)

    def warm(self) -> None:
        """The concept models' text embeddings (stored at ``models import``/``pull``, else encoded now)."""
        for e in self.entries.values():
            if e.tagger is not None:
                e.tagger.text_embeddings  # noqa: B018 - computed on first access

    def entry(self, model_id: str | None) -> FamilyEntry | None:
        m = fam.by_id(model_id)
        return self.entries.get(m.key) if m is not None and m.key != "general" else None

    def list_models(self) -> list[tuple[str, ModelEntry | FamilyEntry]]:
        """(string id, entry) of every family model, general first."""
        out: list[tuple[str, ModelEntry | FamilyEntry]] = [(fam.FAMILY[0].id, self.default)]
        out += [(e.model.id, e) for e in self.entries.values()]
        return out

    # -- one image, once ---------------------------------------------------------------------------
    async def analyse(self, svc: Svc, *, url: str | None = None, b64: str | bytes | None = None,
                      data: bytes | None = None, budget: RequestPixels | None = None, embed: bool = True,
                      colors: bool = False, props: bool = False) -> Analysis:
        """Fetch, decode (once), then embed with the shared encoder and/or find the colours."""
        budget = budget or RequestPixels(self.settings.max_request_pixels)
        entry = self.default
        data, cost = await svc.admit(entry, budget, url=url, b64=b64, data=data)
        tensor, cols, found, error = await svc.decoder.run(budget, self._prepare, data, svc._draft(entry), embed,
                                                           colors, props, cost=cost)
        if cost >= 16_000_000:
            await svc.decoder.run(budget, memory.trim)
        if error is not None:
            raise error
        embedding = await self.embedder.submit(tensor) if embed else None
        return Analysis(embedding, cols, found)

    def _prepare(self, data: bytes, draft: int, embed: bool, colors: bool, props: bool):
        """On a decode thread: bytes → (the model's tensor, the colours, the properties, an ImageError)."""
        try:
            img = decode.decode(data, max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_bytes,
                                draft=draft)
            tensor = self.default.pipeline.pre.tensor(img) if embed else None
            cols = dominant_colors(img) if colors or props else None
            return tensor, cols, properties(img, cols) if props else None, None
        except ImageError as e:
            return None, None, None, e
        except Exception as e:  # noqa: BLE001 - a bug, told as one (traceback logged), this input alone
            log.error("preparing an image failed: internal error", exc_info=e)
            return None, None, None, ImageError(errors.INTERNAL, f"internal error ({type(e).__name__})")

    # -- outputs -----------------------------------------------------------------------------------
    def data_of(self, entry: ModelEntry | FamilyEntry, analysis: Analysis, picking: Picking) -> dict[str, Any]:
        """A model's ``output.data`` for one analysed image (``entry``: the general entry or a family one)."""
        kind = entry.model.kind if isinstance(entry, FamilyEntry) else fam.CONCEPTS
        if kind == fam.EMBEDDING:
            vec = analysis.embedding
            return {"embeddings": [{"vector": [float(x) for x in vec], "num_dimensions": int(vec.shape[0])}]}
        if kind == fam.COLOR:
            return {"colors": [c.to_json() for c in analysis.colors or ()]}
        if kind == fam.PROPERTIES:
            return {"metadata": analysis.properties.to_json()}
        scorer = entry.tagger.scorer
        tags = scorer.tags_of_values(entry.tagger.values(analysis.embedding[None]), picking)[0]
        return {"concepts": [clarifai.concept_json(t, entry.app_id, entry.user_id) for t in tags]}

    def picking(self, entry: ModelEntry | FamilyEntry, opts: PredictOptions) -> Picking:
        return Picking(opts.max_concepts, opts.min_value, opts.select, opts.language)

    async def predict(self, svc: Svc, req: PredictRequest, model_id: str, entry: FamilyEntry) -> tuple[int, dict]:
        """``PostModelOutputs`` on a family model."""
        req_id = clarifai.new_id()
        n = len(req.inputs)
        if n == 0 or n > MAX_INPUTS:
            details = "the request has no inputs" if n == 0 else f"{n} inputs is over the limit of {MAX_INPUTS}"
            return 400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, details, req_id=req_id)
        try:
            if entry.tagger is not None:
                opts = svc.options(entry, req)
            else:
                opts = PredictOptions(svc.settings.max_concepts, svc.settings.min_value, None, None)
        except SelectError as e:
            return 400, clarifai.error_response(clarifai.MODEL_INVALID_ARGUMENT, str(e), req_id=req_id)
        budget = RequestPixels(self.settings.max_request_pixels)
        try:
            with svc.admitted(n):
                outputs = await asyncio.gather(*(self.run_input(svc, [(model_id, entry, opts)], inp, budget)
                                                 for inp in req.inputs))
        except Overloaded:
            return svc.overloaded_response()
        body = clarifai.response([o[0] for o in outputs], req_id)
        return (400 if body["status"]["code"] == clarifai.FAILURE else 200), body

    async def run_input(self, svc: Svc, models: list[Run], inp: InputIn, budget: RequestPixels) -> list[dict]:
        """One input through several models (``(model id, entry, PredictOptions)``): one fetch, one decode,
        one embedding; one output per model."""
        input_id = inp.id or clarifai.new_id()
        image = inp.data.image if inp.data else None
        url = image.url if image else None
        b64 = image.base64 if image else None
        echo = {"image": {"url": url}} if url and not b64 else {"image": {"base64": "dHJ1ZQ=="}}
        kinds = {e.model.kind if isinstance(e, FamilyEntry) else fam.CONCEPTS for _, e, _ in models}
        try:
            analysis = await self.analyse(svc, url=url, b64=b64, budget=budget,
                                          embed=bool(kinds - {fam.COLOR, fam.PROPERTIES}), colors=fam.COLOR in kinds,
                                          props=fam.PROPERTIES in kinds)
        except (ImageError, StatusError) as e:
            svc.metrics.images.labels("error").inc()
            status = (clarifai.image_error_status(e) if isinstance(e, ImageError)
                      else clarifai.status(e.code, details=e.details))
            return [clarifai.output_json(input_id, echo if image else {}, e_.model_json(mid), error=status)
                    for mid, e_, _ in models]
        except Exception as e:  # noqa: BLE001 - a bug fails this input alone, told as one
            svc.metrics.images.labels("internal_error").inc()
            log.error("input %s failed: internal error", input_id, exc_info=e)
            status = clarifai.status(clarifai.INTERNAL_SERVER_ISSUE, details=type(e).__name__)
            return [clarifai.output_json(input_id, echo if image else {}, e_.model_json(mid), error=status)
                    for mid, e_, _ in models]
        svc.metrics.images.labels("ok").inc()
        outs = []
        for mid, e_, opts in models:
            out = clarifai.output_json(input_id, echo, e_.model_json(mid), [])
            out["data"] = self.data_of(e_, analysis, self.picking(e_, opts))
            outs.append(out)
        return outs
