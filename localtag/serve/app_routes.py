"""Clarifai's app routes (inputs, concepts, searches) over :class:`localtag.app.api.AppApi`.

The API's image embeddings come from the default model's encoder through its pipeline, text
embeddings from its text tower (``TextIndex.encode``); URLs through the server's guarded fetcher.
Paths follow clarifai-grpc's http bindings: ``/v2/users/{user_id}/apps/{app_id}/…`` and ``/v2/…``
(app ``me/main``). The same API key check as predict.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..app.api import AppApi
from ..app.store import app_key
from ..core import clarifai
from ..core.limits import TooLarge, read_capped_async
from .app_service import api_for, throttled
from .budgets import Full, Holding

router = APIRouter(tags=["app"])
PREFIXES = ("/v2/users/{user_id}/apps/{app_id}", "/v2")


async def _api(request: Request) -> AppApi:
    return await api_for(request.app.state.service)


def send(result: tuple[int, dict], retry_after: float | None = None, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": f"{retry_after:.0f}"} if retry_after else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse(result[1], status_code=result[0], headers=headers or None)


def _app(request: Request, body: dict | None = None) -> str:
    p = request.path_params
    uai = (body or {}).get("user_app_id") if isinstance((body or {}).get("user_app_id"), dict) else {}
    user = p.get("user_id") or uai.get("user_id") or request.query_params.get("user_app_id.user_id")
    app = p.get("app_id") or uai.get("app_id") or request.query_params.get("user_app_id.app_id")
    return app_key(user, app)


async def _guard(request: Request) -> JSONResponse | None:
    svc = request.app.state.service
    if svc is None:
        return send((503, clarifai.error_response(clarifai.INTERNAL_SERVER_ISSUE, "the server is starting")))
    err = svc.check_auth(request.headers.get("authorization"))
    return send(err) if err else None


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


async def _chunks(request: Request, holding: Holding):
    async for chunk in request.stream():
        holding.add(len(chunk))
        yield chunk


async def read_body(request: Request) -> dict | JSONResponse:
    """The JSON body, read as the predict routes read theirs: within ``max_request_bytes`` (413), the
    server's body readers and body-byte budgets, in all and per client (503, Clarifai's 21354, the
    official clients retry it) and ``body_timeout`` (408)."""
    svc = request.app.state.service
    s, client = svc.settings, _client(request)
    cap = s.max_request_bytes
    try:
        with svc.body_slot(client), svc.body_bytes.hold(client) as holding:
            raw = await asyncio.wait_for(read_capped_async(_chunks(request, holding), cap,
                                                           request.headers.get("content-length")), s.body_timeout)
    except TooLarge:
        return send((413, clarifai.error_response(clarifai.CONN_INVALID_REQUEST,
                                                   f"the request body is over {cap} bytes")), close=True)
    except Full as e:
        return send(svc.overloaded_response(e), retry_after=1, close=True)
    except asyncio.TimeoutError:
        return send((408, clarifai.error_response(clarifai.CONN_INVALID_REQUEST,
                                                   f"the request body did not arrive within {s.body_timeout:g} s")),
                     close=True)
    except ClientDisconnect:
        return JSONResponse({}, status_code=499)
    if not raw.strip():
        return {}
    try:
        body = await asyncio.to_thread(json.loads, raw) if len(raw) > 256_000 else json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return send((400, clarifai.error_response(clarifai.CONN_BAD_REQUEST_FORMAT, "the body is not JSON")))
    if not isinstance(body, dict):
        return send((400, clarifai.error_response(clarifai.CONN_BAD_REQUEST_FORMAT, "the body is not a JSON object")))
    return body


def query_int(request: Request, name: str, default: int) -> int:
    try:
        return int(request.query_params.get(name) or default)
    except ValueError:
        return default


async def post_inputs(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    api = await _api(request)
    if (limited := throttled(request.app.state.service, _client(request), body)) is not None:
        return send(limited[:2], retry_after=limited[2])
    return send(await api.post_inputs(_app(request, body), body))


async def list_inputs(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    api = await _api(request)
    ids = request.query_params.getlist("ids")
    return send(api.list_inputs(_app(request), query_int(request, "page", 1), query_int(request, "per_page", 20), ids))


async def get_input(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    return send((await _api(request)).get_input(_app(request), request.path_params["input_id"]))


async def count_inputs(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    return send((await _api(request)).count(_app(request)))


async def patch_inputs(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    return send(await asyncio.to_thread((await _api(request)).patch_inputs, _app(request, body), body))


async def delete_inputs(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    ids = body.get("ids") if isinstance(body.get("ids"), list) else []
    if "input_id" in request.path_params:
        ids = [request.path_params["input_id"]]
    ids = [str(i) for i in ids]
    return send(await asyncio.to_thread((await _api(request)).delete_inputs, _app(request, body), ids))


async def searches(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    annotations = request.url.path.endswith("/annotations/searches")
    return send(await (await _api(request)).search(_app(request, body), body, annotations=annotations))


async def list_concepts(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    api = await _api(request)
    return send(api.list_concepts(_app(request), query_int(request, "page", 1), query_int(request, "per_page", 128)))


async def post_concepts(request: Request):
    if (err := await _guard(request)) is not None:
        return err
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    return send(await asyncio.to_thread((await _api(request)).post_concepts, _app(request, body), body))


ROUTES = (
    ("/inputs", post_inputs, "POST"), ("/inputs", list_inputs, "GET"), ("/inputs", patch_inputs, "PATCH"),
    ("/inputs", delete_inputs, "DELETE"), ("/inputs/status", count_inputs, "GET"),
    ("/inputs/searches", searches, "POST"), ("/annotations/searches", searches, "POST"), ("/searches", searches, "POST"),
    ("/inputs/{input_id}", get_input, "GET"), ("/inputs/{input_id}", delete_inputs, "DELETE"),
    ("/concepts", list_concepts, "GET"), ("/concepts", post_concepts, "POST"),
)
for _prefix in PREFIXES:
    for _path, _fn, _method in ROUTES:
        router.add_api_route(_prefix + _path, _fn, methods=[_method],
                             operation_id=f"{_fn.__name__}_{_method.lower()}_{'app' if '{app_id}' in _prefix else 'v2'}")
