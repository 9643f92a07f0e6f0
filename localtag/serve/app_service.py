"""The one :class:`~localtag.app.api.AppApi` of a server, shared by REST (:mod:`localtag.serve.app_routes`) and
gRPC (:mod:`localtag.serve.grpc_service`): built over the default model and the store in
``settings.resolved_app_dir()``. The server's lifespan calls :func:`start` (the API and its background
worker, :mod:`localtag.app.worker`) and :func:`stop`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from ..app.api import AppApi, Limits
from ..app.search import VectorSearch
from ..app.store import AppStore
from ..core import clarifai
from ..core.cache import cache_key
from ..core.fetch import fetch
from ..core.pipeline import Job
from .budgets import Rate, Throttled

log = logging.getLogger(__name__)
_lock = asyncio.Lock()


def build_api(svc: Any) -> AppApi:
    s = svc.settings
    entry = svc.default
    store = AppStore(s.resolved_app_dir(), max_inputs=s.app_max_inputs, max_blob_bytes=s.app_max_blob_bytes)
    key = cache_key(entry.tagger.info.sha256, **entry.encoder.variant(s.fast_decode))

    def embed_images(datas: list[bytes]) -> list:
        results = entry.pipeline.run(Job(str(i), d) for i, d in enumerate(datas))
        return [r.embedding if r.ok else r.error for r in results]

    def embed_text(text: str) -> np.ndarray:
        return entry.tagger.text.query(text)  # the prompt templates, as concepts are embedded

    async def fetch_url(url: str) -> bytes:
        return await fetch(url, svc.policy)

    vectors = VectorSearch(store.root / "index", min_rows=s.app_ann_min_rows, background=True)
    limits = Limits(max_per_page=s.app_max_per_page, max_inputs=s.app_max_inputs_per_call,
                    max_text=s.app_max_query_chars)
    return AppApi(store, key, embed_images, embed_text, fetch_url, limits,
                  max_bytes=min(s.max_bytes, s.app_max_blob_bytes), vectors=vectors)


async def api_for(svc: Any) -> AppApi:
    """The service's AppApi (built once, off the event loop)."""
    api = getattr(svc, "app_api", None)
    if api is None:
        async with _lock:
            api = getattr(svc, "app_api", None)
            if api is None:
                api = await asyncio.to_thread(build_api, svc)
                svc.app_uploads = Rate("inputs added", svc.settings.app_client_inputs_per_minute)
                svc.app_api = api
    return api


async def start(svc: Any) -> None:
    """Build the API and start its worker: inputs left pending or in progress by a crash are processed.
    A store that cannot be opened (a read-only cache folder) does not stop the server: the app routes
    try again on use and answer the error."""
    try:
        await (await api_for(svc)).worker.start()
    except Exception as e:  # noqa: BLE001 - the predict routes serve on without the app
        log.error("the app store in %s is unavailable: %s: %s", svc.settings.resolved_app_dir(), type(e).__name__, e)


async def stop(svc: Any) -> None:
    api = getattr(svc, "app_api", None)
    if api is not None:
        await api.worker.stop()


def throttled(svc: Any, client: str, body: dict) -> tuple[int, dict, float] | None:
    """None when ``client`` may add the inputs of a PostInputs ``body``, else (429, Clarifai's 11005
    CONN_THROTTLED body, seconds to wait): ``settings.app_client_inputs_per_minute`` per client address."""
    inputs = body.get("inputs")
    n = len(inputs) if isinstance(inputs, list) else 0
    if n > svc.settings.app_max_inputs_per_call:
        return None  # refused for its size (AppApi.post_inputs), nothing spent
    try:
        svc.app_uploads.take(client, n)
    except Throttled as e:
        return 429, clarifai.error_response(clarifai.CONN_THROTTLED, str(e)), e.retry_after
    return None

