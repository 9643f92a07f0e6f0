"""The one :class:`~localtag.app.api.AppApi` of a server, shared by REST (:mod:`localtag.serve.app_routes`) and
gRPC (:mod:`localtag.serve.grpc_service`): built on first use over the default model and the store in
``settings.resolved_app_dir()``."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from ..app.api import AppApi, Limits
from ..app.search import VectorSearch
from ..app.store import AppStore
from ..core.cache import cache_key
from ..core.fetch import fetch
from ..core.pipeline import Job

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
        return entry.tagger.text.encode([text])[0].numpy().astype(np.float32)

    async def fetch_url(url: str) -> bytes:
        return await fetch(url, svc.policy)

    vectors = VectorSearch(store.root / "index", min_rows=s.app_ann_min_rows, background=True)
    return AppApi(store, key, embed_images, embed_text, fetch_url, Limits(max_per_page=s.app_max_per_page),
                  max_bytes=min(s.max_bytes, s.app_max_blob_bytes), vectors=vectors)


async def api_for(svc: Any) -> AppApi:
    """The service's AppApi (built once, off the event loop)."""
    api = getattr(svc, "app_api", None)
    if api is None:
        async with _lock:
            api = getattr(svc, "app_api", None)
            if api is None:
                api = await asyncio.to_thread(build_api, svc)
                svc.app_api = api
    return api
