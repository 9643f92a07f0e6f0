"""The server's custom models (:mod:`localtag.app.models`): the training worker, predict and workflow entries.

One :class:`CustomModels` per server, built and started by the lifespan (after the app API) and stopped
at shutdown. ``PostModelVersions`` queues a version; the worker trains queued versions one at a time off
the event loop (``asyncio.to_thread``), so a client polls ``GetModelVersion`` until 21100. Versions a
stopped server left queued or training are queued again at start.

Predicting with a custom model goes through the model family's path (:meth:`Family.run_input`): the
image is fetched, decoded and embedded once by the shared encoder, then the version's head scores the
embedding; a :class:`CustomEntry` is what the family code, :meth:`Service.options` and the workflows
see (``tagger.scorer``, ``tagger.values``, ``model_json``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

import numpy as np

from ..app.api import ApiError
from ..app.models import MODEL_TYPE, ModelsApi
from ..app.store import app_key
from ..core import clarifai, learn
from .app_service import api_for
from .schema import ModelIn

log = logging.getLogger(__name__)


class HeadTagger:
    """The part of a :class:`~localtag.core.tagger.Tagger` the predict path uses, over a learnt head."""

    def __init__(self, head: learn.Head):
        self.head = head
        self.scorer = head.scorer()
        self.vocab = self.scorer.vocab

    def values(self, embeddings: Any) -> np.ndarray:
        return self.scorer.values(np.asarray(embeddings, dtype=np.float32))

    def select_indices(self, select: Any) -> Any:
        return self.scorer.select_indices(select)


class CustomEntry:
    """One trained version of a custom model, as the predict and workflow code sees a served model."""

    general = False

    def __init__(self, head: learn.Head, app: str, model: dict, version: dict):
        self.tagger = HeadTagger(head)
        self.user_id, self.app_id = app.split("/", 1)
        self.version_id = version["id"]
        self.model = model
        self.config = model.get("config") or {}
        self.visible = list(self.tagger.vocab)

    def model_json(self, model_id: str, **extra: Any) -> dict[str, Any]:
        return {"id": model_id, "name": self.model["name"], "app_id": self.app_id, "user_id": self.user_id,
                "model_type_id": MODEL_TYPE,
                "model_version": {"id": self.version_id, "status": clarifai.status(clarifai.MODEL_TRAINED)}, **extra}

    def concept_json(self, c, language: str | None = None) -> dict[str, Any]:
        return {"id": c.id, "name": c.name, "value": 1.0, "app_id": self.app_id, "user_id": self.user_id}


def request_app(path_params: dict, body_user_app_id: Any = None) -> str:
    """The app a request names: the path's ``user_id``/``app_id``, else the body's ``user_app_id``, else ``me/main``."""
    uai = body_user_app_id
    get = (lambda k: uai.get(k)) if isinstance(uai, dict) else (lambda k: getattr(uai, k, None))
    return app_key(path_params.get("user_id") or get("user_id"), path_params.get("app_id") or get("app_id"))


class CustomModels:
    """The custom models of one server (REST: :mod:`localtag.serve.model_routes`; gRPC: grpc_service)."""

    def __init__(self, service: Any):
        self.service = service
        self.api: ModelsApi | None = None
        self.queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        svc = self.service
        self.loop = asyncio.get_running_loop()
        try:
            app_api = await api_for(svc)
        except (OSError, sqlite3.Error) as e:  # an unwritable app folder: the rest of the server still serves
            log.warning("custom models are unavailable: the app store cannot be opened (%s)", e)
            return
        tagger = svc.default.tagger
        scorer = tagger.scorer

        def prior(name: str):
            return learn.prior_of(scorer, name) if tagger.head is None else None

        self.api = await asyncio.to_thread(ModelsApi, app_api.store, app_api.key, tagger.info.sha256,
                                           tagger.info.name, prior, lambda mid: svc.entry(mid) is not None)
        for v in await asyncio.to_thread(self.api.models.pending):
            self.queue.put_nowait((v["app"], v["model"], v["id"]))
        self.task = asyncio.create_task(self._worker(), name="localtag-model-training")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def _worker(self) -> None:
        while True:
            app, model_id, vid = await self.queue.get()
            try:
                code = await asyncio.to_thread(self.api.train, app, model_id, vid)
                log.info("model %s/%s version %s: %d", app, model_id, vid, code)
            except Exception as e:  # noqa: BLE001 - the worker goes on with the next version
                log.error("training %s/%s %s failed", app, model_id, vid, exc_info=e)
            finally:
                self.queue.task_done()

    # -- calls --------------------------------------------------------------------------------------
    def owns(self, app: str, model_id: str | None) -> bool:
        """Is ``model_id`` a custom model of ``app`` (and not a model the server serves itself)?"""
        return self.api is not None and self.service.entry(model_id) is None and self.api.owns(app, model_id)

    def post_version(self, app: str, model_id: str, body: dict) -> tuple[int, dict]:
        """``PostModelVersions`` (from any thread): the version is queued (21103) for the worker."""
        result, vid = self.api.post_version(app, model_id, body)
        if vid is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (app, model_id, vid))
        return result

    def list_models(self, app: str | None) -> tuple[int, dict]:
        """``ListModels``: with an app named, its custom models; else (or ``clarifai/main``) the served family
        (as before) and the custom models of ``me/main``."""
        if app is not None and app != app_key(clarifai.USER_ID, clarifai.APP_ID):  # clarifai/main: the public ones
            return self.api.ok(models=self.api.list_json(app))
        _, body = self.service.list_models()
        body["models"] = body.get("models", []) + self.api.list_json(app_key(None, None))
        return 200, body

    def entry(self, app: str, model_id: str, version_id: str | None = None) -> CustomEntry:
        """Raises :class:`ApiError` (unknown model or version, untrained, trained on another CLIP model)."""
        head, model, v = self.api.head(app, model_id, version_id)
        return CustomEntry(head, app, model, v)

    async def predict(self, req: Any, model_id: str, app: str, version_id: str | None) -> tuple[int, dict]:
        """``PostModelOutputs`` with a custom model: ``version_id``'s head, else the newest trained one's."""
        try:
            entry = self.entry(app, model_id, version_id or None)
        except ApiError as e:
            return self.api.error(e)
        cfg = entry.config
        if cfg and not (req.model and (req.model.output_info or req.model.model_version)):
            # the model's own output_config, unless the request brings one
            req = req.model_copy(update={"model": ModelIn.model_validate({"output_info": {"output_config": {
                k: cfg[k] for k in ("max_concepts", "min_value") if k in cfg}}})})
        return await self.service.family.predict(self.service, req, model_id, entry)
