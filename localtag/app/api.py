"""Clarifai's app API over an :class:`~localtag.app.store.AppStore`, in Clarifai's JSON (protocol-free:
the REST routes in :mod:`localtag.serve.app_routes` hand it parsed bodies and send back its answers).

Methods answer ``(http_status, body)``. Shapes follow clarifai-grpc's protos (``PostInputsRequest``,
``MultiInputResponse``, ``SingleInputCountResponse``, ``PostInputsSearchesRequest`` → ``MultiSearchResponse``
with ``hits[{score, input}]``, ``Query{ranks, filters, ands}``, ``Filter/Rank/And{negate}``). Fields this
module does not know are ignored, as Clarifai's clients send many.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..core import clarifai
from ..core.errors import ImageError
from .search import VectorSearch, to_score
from .store import (
    STATUS_DESCRIPTIONS,
    STATUS_FAILED,
    STATUS_IN_PROGRESS,
    STATUS_OK,
    STATUS_PENDING,
    AppStore,
    NewInput,
    StoreError,
)
from .worker import AppWorker

log = logging.getLogger(__name__)

MAX_INPUTS_PER_CALL = 128  # Clarifai's own cap on PostInputs
MAX_PAGE = 1_000_000
MAX_URL = 8192


def _int(value: Any, default: int) -> int:
    """A pagination number (int or numeric string) → int; anything else is a Clarifai error."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"{value!r} is not a number") from None
    if not 0 <= n <= MAX_PAGE:
        raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"{n} is out of range")
    return n


@dataclass
class Limits:
    max_per_page: int = 1000
    max_inputs: int = MAX_INPUTS_PER_CALL  # inputs per PostInputs call
    max_text: int = 1000  # characters of a text query
    max_ranks: int = 16
    max_filters: int = 64


class ApiError(Exception):
    def __init__(self, code: int, details: str, http: int = 400):
        super().__init__(details)
        self.code, self.details, self.http = code, details, http


def _ts(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list:
    return x if isinstance(x, list) else []


def concept_values(concepts: Any) -> dict[str, int]:
    """Clarifai concepts ``[{id|name, value}]`` → {id: 1 or 0} (a missing value is 1, as Clarifai reads it)."""
    out: dict[str, int] = {}
    for c in _list(concepts):
        c = _dict(c)
        cid = c.get("id") or c.get("name")
        if not isinstance(cid, str) or not cid:
            raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "a concept needs an id or a name")
        value = c.get("value", 1)
        out[cid] = 1 if (value if isinstance(value, int | float) else 1) >= 0.5 else 0
    return out


class AppApi:
    """``embed_images(list of bytes) → list of embedding | ImageError`` (blocking, run in a thread),
    ``embed_text(str) → embedding``, ``fetch(url) → bytes`` (the guarded fetcher), ``key``: the
    embedding key of the encoder (model sha | preprocessing | precision | device)."""

    def __init__(self, store: AppStore, key: str, embed_images: Callable[[list[bytes]], list],
                 embed_text: Callable[[str], np.ndarray], fetch: Callable[[str], Awaitable[bytes]],
                 limits: Limits | None = None, max_bytes: int = 20_000_000, vectors: VectorSearch | None = None):
        self.store, self.key = store, key
        self.vectors = vectors or VectorSearch(store.root / "index")
        self.embed_images, self.embed_text, self.fetch = embed_images, embed_text, fetch
        self.limits = limits or Limits()
        self.max_bytes = max_bytes
        #: processes what post_inputs accepts; the server's lifespan starts and stops it
        self.worker = AppWorker(store, key, embed_images, fetch)

    # -- JSON shapes --------------------------------------------------------------------------------
    def input_json(self, rec: dict) -> dict:
        data: dict[str, Any] = {"image": {"url": rec["url"]} if rec["url"] else {}}
        if rec["concepts"]:
            data["concepts"] = [{"id": c, "name": c, "value": float(v)} for c, v in rec["concepts"].items()]
        if rec["metadata"]:
            data["metadata"] = rec["metadata"]
        status = clarifai.status(rec["status"], STATUS_DESCRIPTIONS.get(rec["status"]), rec["details"])
        return {"id": rec["id"], "data": data, "created_at": _ts(rec["created"]), "modified_at": _ts(rec["modified"]),
                "status": status}

    @staticmethod
    def ok(**body: Any) -> tuple[int, dict]:
        return 200, {"status": clarifai.status(clarifai.SUCCESS), **body}

    @staticmethod
    def error(e: ApiError) -> tuple[int, dict]:
        return e.http, clarifai.error_response(e.code, e.details)

    # -- inputs -------------------------------------------------------------------------------------
    def _source(self, image: dict) -> tuple[str | None, bytes | None]:
        """(url, bytes) of one input, checked but not fetched: base64 decoded and within the blob cap,
        or an http(s) URL. Raises :class:`ApiError` with the input's own status code."""
        if image.get("base64"):
            try:
                data = base64.b64decode(image["base64"], validate=False)
            except (binascii.Error, ValueError, TypeError):
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "data.image.base64 is not base64") from None
            if len(data) > self.max_bytes:
                raise ApiError(clarifai.INPUT_OVER_LIMIT,
                               f"{len(data)} bytes is over the {self.max_bytes}-byte limit of one image")
            url = image.get("url")
            return (url if isinstance(url, str) and url else None), data
        url = image.get("url")
        if not isinstance(url, str) or not url:
            raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "an input needs data.image.url or data.image.base64")
        if urlsplit(url).scheme.lower() not in ("http", "https") or len(url) > MAX_URL:
            raise ApiError(clarifai.INPUT_INVALID_URL, f"{url[:200]!r} is not an http(s) URL")
        return url, None

    async def post_inputs(self, app: str, body: dict) -> tuple[int, dict]:
        """Check and store up to ``limits.max_inputs`` inputs, and answer at once: each accepted input
        is pending (30001) until the worker (:mod:`localtag.app.worker`) has fetched, decoded and
        embedded it; an input that fails the checks answers its own status (bad base64, over the blob
        cap, not an http(s) URL) and is not stored. The whole call fails only on a bad request."""
        inputs = _list(body.get("inputs"))
        cap = self.limits.max_inputs
        try:
            if not inputs:
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "inputs is empty")
            if len(inputs) > cap:
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"{len(inputs)} inputs; at most {cap} per call")
            news: list[NewInput] = []
            seen: set[str] = set()
            for raw in inputs:
                raw = _dict(raw)
                data = _dict(raw.get("data"))
                iid = raw.get("id") or uuid.uuid4().hex
                if not isinstance(iid, str) or iid in seen:
                    raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"input id {iid!r} is repeated or not a string")
                seen.add(iid)
                meta = data.get("metadata") or {}
                if not isinstance(meta, dict):
                    raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "data.metadata must be a JSON object")
                news.append(NewInput(iid, concepts=concept_values(data.get("concepts")), metadata=meta,
                                     status=STATUS_PENDING))
            taken = self.store.records(app, [n.id for n in news])
            if taken:
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"input id(s) already exist: {sorted(taken)[:5]}")
        except ApiError as e:
            return self.error(e)
        refused: dict[str, ApiError] = {}
        for n, raw in zip(news, inputs, strict=True):
            try:
                n.url, n.data = self._source(_dict(_dict(_dict(raw).get("data")).get("image")))
            except ApiError as e:
                refused[n.id] = e
        stored = [n for n in news if n.id not in refused]
        try:
            if stored:
                await asyncio.to_thread(self.store.add, app, stored, self.key)
        except StoreError as e:
            return self.error(ApiError(clarifai.INPUT_OVER_LIMIT if e.kind in ("limit", "blob")
                                       else clarifai.INPUT_INVALID_ARGUMENT, str(e)))
        if stored:
            self.worker.wake()
        recs = self.store.records(app, [n.id for n in stored])
        out = []
        for n in news:
            if n.id in recs:
                out.append(self.input_json(recs[n.id]))
            else:
                e = refused[n.id]
                out.append({"id": n.id, "data": {}, "status": clarifai.status(e.code, None, e.details)})
        code = clarifai.batch_code(len(news), len(refused))
        return 200, {"status": clarifai.status(code), "inputs": out}

    def get_input(self, app: str, input_id: str) -> tuple[int, dict]:
        rec = self.store.get(app, input_id)
        if rec is None:
            return 404, clarifai.error_response(clarifai.CONN_DOES_NOT_EXIST, f"input {input_id!r} not found")
        return self.ok(input=self.input_json(rec))

    def list_inputs(self, app: str, page: int, per_page: int, ids: Sequence[str] = ()) -> tuple[int, dict]:
        per_page = max(1, min(per_page or 20, self.limits.max_per_page))
        page = min(max(page, 1), MAX_PAGE)
        return self.ok(inputs=[self.input_json(r) for r in self.store.list(app, max(page, 1), per_page, list(ids))])

    def count(self, app: str) -> tuple[int, dict]:
        """GetInputCount: inputs processed, pending (to_process), failed (errors) and in progress."""
        by = self.store.count(app)
        return self.ok(counts={"processed": by.get(STATUS_OK, 0), "to_process": by.get(STATUS_PENDING, 0),
                               "errors": by.get(STATUS_FAILED, 0), "processing": by.get(STATUS_IN_PROGRESS, 0)})

    def patch_inputs(self, app: str, body: dict) -> tuple[int, dict]:
        action = body.get("action") or "merge"
        if action not in ("merge", "remove", "overwrite"):
            return self.error(ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"action must be merge, remove or overwrite"
                                                                        f", not {action!r}"))
        done = []
        try:
            for raw in _list(body.get("inputs")):
                raw = _dict(raw)
                data = _dict(raw.get("data"))
                meta = data.get("metadata")
                if meta is not None and not isinstance(meta, dict):
                    raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "data.metadata must be a JSON object")
                if not self.store.patch(app, str(raw.get("id")), concepts=concept_values(data.get("concepts")),
                                        metadata=meta, action=action):
                    raise ApiError(clarifai.CONN_DOES_NOT_EXIST, f"input {raw.get('id')!r} not found", 404)
                done.append(str(raw.get("id")))
        except ApiError as e:
            return self.error(e)
        recs = self.store.records(app, done)
        return self.ok(inputs=[self.input_json(recs[i]) for i in done if i in recs])

    def delete_inputs(self, app: str, ids: Sequence[str]) -> tuple[int, dict]:
        if not ids:
            return self.error(ApiError(clarifai.INPUT_INVALID_ARGUMENT, "ids is empty"))
        self.store.delete(app, ids)
        return self.ok()

    def list_concepts(self, app: str, page: int = 1, per_page: int = 128) -> tuple[int, dict]:
        cs = self.store.concepts(app)
        per_page = max(1, min(per_page or 128, self.limits.max_per_page))
        page = min(max(page, 1), MAX_PAGE)
        cs = cs[(max(page, 1) - 1) * per_page : max(page, 1) * per_page]
        return self.ok(concepts=[{"id": c, "name": n, "value": 1.0, "app_id": app.split("/", 1)[1]} for c, n in cs])

    def post_concepts(self, app: str, body: dict) -> tuple[int, dict]:
        pairs = []
        for c in _list(body.get("concepts")):
            c = _dict(c)
            cid = c.get("id") or c.get("name")
            if not isinstance(cid, str) or not cid:
                return self.error(ApiError(clarifai.INPUT_INVALID_ARGUMENT, "a concept needs an id"))
            pairs.append((cid, str(c.get("name") or cid)))
        self.store.add_concepts(app, pairs)
        return self.ok(concepts=[{"id": c, "name": n, "value": 1.0} for c, n in pairs])

    # -- search -------------------------------------------------------------------------------------
    async def search(self, app: str, body: dict, *, annotations: bool = False) -> tuple[int, dict]:
        """PostInputsSearches / PostAnnotationsSearches / PostSearches (``query.ands``)."""
        searches = _list(body.get("searches")) or ([{"query": body["query"]}] if isinstance(body.get("query"), dict)
                                                   else [])
        pag = _dict(body.get("pagination"))
        try:
            page, per_page = _int(pag.get("page"), 1), _int(pag.get("per_page"), 20)
            if per_page > self.limits.max_per_page or page < 1 or per_page < 1:
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT,
                               f"pagination: page ≥ 1, 1 ≤ per_page ≤ {self.limits.max_per_page}")
            query = _dict(_dict(searches[0] if searches else {}).get("query"))
            ranks, filters = self._parse(query)
            vec = await self._rank_vector(app, ranks)
            hits = self._hits(app, vec, filters, page * per_page)[(page - 1) * per_page :]
        except ApiError as e:
            return self.error(e)
        except ImageError as e:
            return self.error(ApiError(clarifai.INPUT_DOWNLOAD_FAILED, str(e)))
        user_id, app_id = app.split("/", 1)
        recs = self.store.records(app, [h[0] for h in hits])
        out = []
        for iid, score in hits:
            if iid not in recs:
                continue  # deleted meanwhile
            hit = {"score": float(score), "input": self.input_json(recs[iid]), "user_id": user_id, "app_id": app_id}
            if annotations:
                hit["annotation"] = {"id": iid, "input_id": iid, "data": {
                    "concepts": self.input_json(recs[iid])["data"].get("concepts", [])}}
            out.append(hit)
        echo = [{"id": uuid.uuid4().hex, "query": _dict(_dict(s).get("query"))} for s in searches]
        return self.ok(id=uuid.uuid4().hex, hits=out, searches=echo)

    def _parse(self, query: dict) -> tuple[list[tuple[dict, bool]], list[tuple[dict, bool]]]:
        """(ranks, filters) as (annotation-like dict, negate) pairs; ``ands`` map to both."""
        ranks = [(_dict(_dict(r).get("annotation")), bool(_dict(r).get("negate"))) for r in _list(query.get("ranks"))]
        filters = []
        for f in _list(query.get("filters")):
            f = _dict(f)
            filters.append((_dict(f.get("annotation")) or _dict(f.get("input")), bool(f.get("negate"))))
        for a in _list(query.get("ands")):
            a = _dict(a)
            neg = bool(a.get("negate"))
            out_in = _dict(_dict(a.get("output")).get("input"))
            if out_in:
                ranks.append((out_in, neg))
            elif a.get("input") or a.get("annotation"):
                filters.append((_dict(a.get("input")) or _dict(a.get("annotation")), neg))
        if len(ranks) > self.limits.max_ranks or len(filters) > self.limits.max_filters:
            raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"at most {self.limits.max_ranks} ranks and "
                                                            f"{self.limits.max_filters} filters")
        return ranks, filters

    async def _rank_vector(self, app: str, ranks: list[tuple[dict, bool]]) -> np.ndarray | None:
        total = None
        for ann, negate in ranks:
            data = _dict(ann.get("data"))
            vecs = []
            text = _dict(data.get("text")).get("raw")
            if text is not None and not isinstance(text, str):
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "data.text.raw must be a string")
            if text:
                if len(text) > self.limits.max_text:
                    raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, f"text over {self.limits.max_text} characters")
                vecs.append(await asyncio.to_thread(self.embed_text, text))
            image = _dict(data.get("image"))
            if image.get("url") or image.get("base64"):
                url, raw = self._source(image)
                if raw is None:
                    raw = await self.fetch(url)
                got = (await asyncio.to_thread(self.embed_images, [raw]))[0]
                if isinstance(got, ImageError):
                    raise got
                vecs.append(got)
            input_id = ann.get("input_id")
            if input_id is not None and not isinstance(input_id, str):
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "input_id must be a string")
            if input_id:
                emb = self.store.embedding(app, input_id, self.key)
                if emb is None:
                    rec = self.store.get(app, input_id)
                    if rec is None:
                        raise ApiError(clarifai.CONN_DOES_NOT_EXIST, f"input {input_id!r} not found", 404)
                    raise ApiError(clarifai.SEARCH_BY_NOT_FULLY_INDEXED_INPUT, f"input {input_id!r} is not processed "
                                   f"({STATUS_DESCRIPTIONS.get(rec['status'], rec['status'])})")
                vecs.append(emb)
            for cid, value in concept_values(data.get("concepts")).items():
                v = await asyncio.to_thread(self.embed_text, cid)
                vecs.append(v if value else -v)
            if not vecs and not data.get("metadata"):
                raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "a rank needs text, an image, an input id or concepts")
            for v in vecs:
                v = -v if negate else v
                total = v.astype(np.float32) if total is None else total + v
        if total is None:
            return None
        return total / max(float(np.linalg.norm(total)), 1e-12)

    def _allowed(self, app: str, filters: list[tuple[dict, bool]]) -> set[str] | None:
        if not filters:
            return None
        ids = set(self.store.all_ids(app))
        allowed = set(ids)
        for ann, negate in filters:
            data = _dict(ann.get("data"))
            match = set(ids)
            for cid, value in concept_values(data.get("concepts")).items():
                match &= self.store.annotated(app, cid, value)
            meta = data.get("metadata")
            if isinstance(meta, dict) and meta:
                recs = self.store.records(app, sorted(match))
                match = {i for i, r in recs.items() if _contains(r["metadata"], meta)}
            code = _dict(ann.get("status")).get("code")
            if code:
                code = _int(code, 0)
                recs = self.store.records(app, sorted(match))
                match = {i for i, r in recs.items() if r["status"] == int(code)}
            allowed &= (ids - match) if negate else match
        return allowed

    def _hits(self, app: str, vec: np.ndarray | None, filters: list[tuple[dict, bool]], k: int
              ) -> list[tuple[str, float]]:
        allowed = self._allowed(app, filters)
        if vec is None:  # filters alone: newest first, score 1; processed inputs unless a filter names a status
            by_status = any(_dict(ann.get("status")).get("code") for ann, _ in filters)
            ids = list(reversed(self.store.all_ids(app, None if by_status else STATUS_OK)))
            return [(i, 1.0) for i in ids if allowed is None or i in allowed][:k]
        ids, mat = self.store.matrix(app, self.key)
        if not ids:
            return []
        if mat.shape[1] != vec.shape[0]:
            raise ApiError(clarifai.INPUT_INVALID_ARGUMENT, "the query's embedding dimension is not the app's")
        mask = None if allowed is None else np.fromiter((i in allowed for i in ids), bool, len(ids))
        rows, sims = self.vectors.top(VectorSearch.name(app, self.key), ids, mat, vec, k, mask)
        return [(ids[r], float(s)) for r, s in zip(rows, to_score(sims), strict=True)]


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _contains(have[k], v) for k, v in want.items())
    return have == want
