"""The REST app of ``localtag serve``: a drop-in Clarifai endpoint, Filestack's route, operations.

The work is :class:`localtag.serve.service.Service`'s; gRPC is :mod:`localtag.serve.grpc_service`, the Directus flow
endpoint :mod:`localtag.serve.flow_route`. Routes: every Clarifai predict form (double slashes
collapsed), model info / output_info / concepts / model types, ``/filestack/tags``, ``/healthz``,
``/readyz``, ``/metrics``, ``/docs``. Past ``max_queue`` images the server answers 503 with
``Retry-After`` and a Clarifai-shaped body, so memory stays flat.

The app's lifespan owns the models (Immich's habit): it loads them (:func:`localtag.core.loader.load`),
warms the text side, starts the batchers and, with ``grpc_port`` set, the gRPC server; it stops them
all at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..core import clarifai, memory
from ..core.config import Settings
from ..core.errors import ImageError
from ..core.limits import TooLarge, cap_stream, read_capped_async
from ..core.loader import Loaded
from ..core.scorer import Picking
from . import app_routes, app_service, flow_route, logthrottle, model_routes
from .auth import load_keys
from .budgets import Full, Holding
from .family import Family
from .metrics import Metrics
from .model_service import CustomModels, request_app
from .schema import PredictRequest
from .service import (
    Overloaded,
    Service,
    StatusError,
    build_entries,
    describe_errors,
    parse_json,
    parse_predict,
)
from .workflows import Workflows

log = logging.getLogger(__name__)

PREDICT_PATHS = (
    "/v2/users/{user_id}/apps/{app_id}/models/{model_id}/versions/{version_id}/outputs",
    "/v2/users/{user_id}/apps/{app_id}/models/{model_id}/outputs",
    "/v2/models/{model_id}/versions/{version_id}/outputs",
    "/v2/models/{model_id}/outputs",
    "/v2/users/{user_id}/deployments/{deployment_id}/outputs",
)
MODEL_TYPE_PATHS = ("/v2/users/{user_id}/apps/{app_id}/models/types/{model_type_id}", "/v2/models/types/{model_type_id}")
MODEL_TYPES_PATHS = ("/v2/users/{user_id}/apps/{app_id}/models/types", "/v2/models/types")
MODEL_PATHS = ("/v2/users/{user_id}/apps/{app_id}/models/{model_id}", "/v2/models/{model_id}",
               "/v2/users/{user_id}/apps/{app_id}/models/{model_id}/versions/{version_id}",
               "/v2/models/{model_id}/versions/{version_id}")
MODELS_PATHS = ("/v2/users/{user_id}/apps/{app_id}/models", "/v2/users/{user_id}/models", "/v2/models")
WORKFLOWS_PATHS = ("/v2/users/{user_id}/apps/{app_id}/workflows", "/v2/users/{user_id}/workflows", "/v2/workflows")
WORKFLOW_PATHS = ("/v2/users/{user_id}/apps/{app_id}/workflows/{workflow_id}", "/v2/workflows/{workflow_id}")
WORKFLOW_RESULTS_PATHS = ("/v2/users/{user_id}/apps/{app_id}/workflows/{workflow_id}/versions/{version_id}/results",
                          "/v2/users/{user_id}/apps/{app_id}/workflows/{workflow_id}/results",
                          "/v2/workflows/{workflow_id}/versions/{version_id}/results",
                          "/v2/workflows/{workflow_id}/results")
OUTPUT_INFO_PATHS = tuple(p + "/output_info" for p in MODEL_PATHS)
CONCEPTS_PATHS = tuple(p + "/concepts" for p in MODEL_PATHS)


#: a Filestack body holds one image: its byte cap plus room for the multipart envelope
FORM_OVERHEAD = 1_000_000
#: status recorded for a client that went away mid-request (nginx's convention); nothing is sent
CLIENT_CLOSED = 499
#: a body must keep up ``min_upload_rate`` once this many seconds have passed
UPLOAD_GRACE = 3.0
#: after a refused or failed body this large, freed heap is given back to the system
TRIM_BODY_BYTES = 8_000_000


# -- responses ---------------------------------------------------------------------------------------
class SafeJSON(JSONResponse):
    """JSON as UTF-8; text that cannot be UTF-8 (a lone surrogate a client sent, e.g. ``"\\ud800"``)
    is written as ``\\u`` escapes instead of failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSON(body, status_code=status, headers=headers)


def _answer(result: tuple[int, dict]) -> JSONResponse:
    status, body = result
    return _json(status, body, {"Retry-After": "1"} if status == 503 else None)


def header_bytes(scope: dict) -> int:
    """The size of a request's line and headers as they came on the wire (give or take a few bytes)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


class PathAndMetricsMiddleware:
    """ASGI middleware: refuses headers over ``max_header_bytes`` (431), collapses double slashes
    before routing, and records request metrics."""

    def __init__(self, app, metrics: Metrics, max_header_bytes: int = 65_536):
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_header_bytes and (size := header_bytes(scope)) > self.max_header_bytes:
            # h11 bounds only headers that arrive in pieces; a whole one in a single read is checked here
            msg = f"the request headers are {size} bytes, over the {self.max_header_bytes}-byte limit"
            await _json(431, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, msg),
                        {"Connection": "close"})(scope, receive, send)
            self.metrics.requests.labels("unmatched", "431").inc()
            return
        if "//" in scope["path"]:
            scope = dict(scope)
            scope["path"] = re.sub("/{2,}", "/", scope["path"])
            scope["raw_path"] = scope["path"].encode()
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# -- request helpers ---------------------------------------------------------------------------------
def _service(request: Request) -> Service:
    return request.app.state.service


def _authorized(request: Request) -> JSONResponse | None:
    err = _service(request).check_auth(request.headers.get("authorization"))
    return _answer(err) if err else None


class BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout``, or fell under ``min_upload_rate``."""

    def __init__(self, message: str | None = None):
        super().__init__(message)
        self.message = message


class Disconnected(Exception):
    """The client went away before its body was read."""


def client_of(request: Request) -> str:
    """The client's address: what per-client limits count by."""
    return request.client.host if request.client else ""


async def body_chunks(request: Request, svc: Service, holding: Holding | None = None):
    """The body's chunks, within ``body_timeout`` in all and at ``min_upload_rate`` or faster after the
    first :data:`UPLOAD_GRACE` seconds; each chunk is counted in ``holding`` (a byte budget). Raises
    :class:`BodyTimeout`, :class:`Disconnected` or :class:`~localtag.serve.budgets.Full`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + svc.settings.body_timeout
    rate = svc.settings.min_upload_rate
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        now = loop.time()
        # the rate is kept while received >= rate × (elapsed − grace)
        slow_at = start + UPLOAD_GRACE + received / rate if rate > 0 else deadline
        left = min(deadline, slow_at) - now
        if left <= 0:
            raise BodyTimeout(None if now >= deadline else
                              f"the request body arrived at under {rate} bytes/s ({received} bytes in "
                              f"{now - start:.1f} s)")
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            continue  # the loop says which deadline passed
        except ClientDisconnect:
            raise Disconnected from None
        received += len(chunk)
        if holding is not None:
            holding.add(len(chunk))
        yield chunk


@contextlib.asynccontextmanager
async def trimmed(budget):
    """A byte budget's holding for one client's body; a large body that failed gives its heap back
    (a moment later, once the failure's frames, which hold the chunks, are gone)."""
    with budget as holding:
        try:
            yield holding
        except BaseException:
            if holding.size >= TRIM_BODY_BYTES:
                loop = asyncio.get_running_loop()
                loop.call_later(0.5, lambda: loop.run_in_executor(None, memory.trim))
            raise


async def read_body(request: Request, svc: Service, cap: int | None = None) -> bytes:
    """The body; raises :class:`TooLarge` past ``cap`` (default ``max_request_bytes``) without reading
    the rest, :class:`BodyTimeout`, :class:`Disconnected`, or :class:`~localtag.serve.budgets.Full` past the
    body-reader caps or the byte budget of bodies arriving (in all, and per client)."""
    client = client_of(request)
    with svc.body_slot(client):
        async with trimmed(svc.body_bytes.hold(client)) as holding:
            return await read_capped_async(body_chunks(request, svc, holding), cap or svc.settings.max_request_bytes,
                                           request.headers.get("content-length"))


def _too_large(cap: int) -> JSONResponse:
    return _json(413, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, f"the request body is over {cap} bytes"),
                 {"Connection": "close"})


def _body_failed(e: Exception, svc: Service, filestack: bool = False) -> Response:
    """The answer when a body could not be read: too large, too slow, the client gone, too many readers."""
    if isinstance(e, Disconnected):
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(e, Full):
        status, body = svc.overloaded_response(e)
        body = {"error": body["status"]["details"], "code": clarifai.MODEL_BUSY} if filestack else body
        return _json(503, body, {"Retry-After": "1", "Connection": "close"})
    if isinstance(e, BodyTimeout):
        svc.metrics.timeouts.inc()
        msg = e.message or f"the request body did not arrive within {svc.settings.body_timeout:g} s"
        body = {"error": msg} if filestack else clarifai.error_response(clarifai.CONN_INVALID_REQUEST, msg)
        return _json(408, body, {"Connection": "close"})
    assert isinstance(e, TooLarge)
    if filestack:
        return _json(413, {"error": f"the request body is over {e.cap} bytes"}, {"Connection": "close"})
    return _too_large(e.cap)


async def _read_predict(request: Request, svc: Service) -> PredictRequest | Response:
    try:
        raw = await read_body(request, svc)
    except (TooLarge, BodyTimeout, Disconnected, Full) as e:
        return _body_failed(e, svc)
    try:  # a large body is parsed off the event loop
        return await asyncio.to_thread(parse_predict, raw) if len(raw) > 256_000 else parse_predict(raw)
    except StatusError as e:
        return _json(400, clarifai.error_response(e.code, e.details))


def _int_param(request: Request, name: str, default: int) -> int | None:
    v = request.query_params.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        return None


# -- Clarifai routes ---------------------------------------------------------------------------------
async def predict(request: Request):
    svc = _service(request)
    if (denied := _authorized(request)) is not None:
        return denied
    if svc.busy(1):
        return _answer(svc.overloaded_response())
    req = await _read_predict(request, svc)
    if isinstance(req, Response):
        return req
    p = request.path_params  # the deployment form names its model in the body, else by the deployment id
    model_id = p.get("model_id") or req.model_id or (req.model.id if req.model else None) or p.get("deployment_id")
    custom, app = svc.custom_models, request_app(p, req.user_app_id)
    if custom is not None and custom.owns(app, model_id):  # an app's custom model (serve.model_service)
        version = p.get("version_id") or req.version_id or (req.model.model_version.id if req.model and
                                                             req.model.model_version else None)
        return _answer(await custom.predict(req, model_id, app, version))
    return _answer(await svc.predict(req, model_id))


async def get_model(request: Request):
    return _authorized(request) or _answer(_service(request).get_model(request.path_params["model_id"]))


async def get_output_info(request: Request):
    return _authorized(request) or _answer(_service(request).get_output_info(request.path_params["model_id"]))


async def list_concepts(request: Request):
    if (denied := _authorized(request)) is not None:
        return denied
    page, per_page = _int_param(request, "page", 1), _int_param(request, "per_page", 128)
    if page is None or per_page is None:
        return _json(400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, "page and per_page are integers"))
    return _answer(_service(request).list_concepts(request.path_params["model_id"], page, per_page))


async def _read_json(request: Request, svc: Service) -> Any:
    """A request body's JSON ({} when empty), or the Response that says why it could not be read."""
    try:
        raw = await read_body(request, svc)
    except (TooLarge, BodyTimeout, Disconnected, Full) as e:
        return _body_failed(e, svc)
    try:
        return await asyncio.to_thread(parse_json, raw) if len(raw) > 256_000 else (parse_json(raw) if raw else {})
    except StatusError as e:
        return _json(400, clarifai.error_response(e.code, e.details))


async def workflows_route(request: Request):
    """PostWorkflows, ListWorkflows, DeleteWorkflows (by method), GetWorkflow, DeleteWorkflow (by id)."""
    svc = _service(request)
    if (denied := _authorized(request)) is not None:
        return denied
    wf, wid = svc.workflows, request.path_params.get("workflow_id")
    if request.method == "GET":
        if wid:
            return _answer(wf.get(wid))
        page, per_page = _int_param(request, "page", 1), _int_param(request, "per_page", 128)
        if page is None or per_page is None or page < 1 or per_page < 1:
            return _json(400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, "page and per_page: positive"))
        return _answer(wf.list(page, per_page))
    body = await _read_json(request, svc)
    if isinstance(body, Response):
        return body
    if request.method == "DELETE":
        return _answer(wf.delete(body, wid))
    return _answer(wf.post(body))


async def workflow_results(request: Request):
    svc = _service(request)
    if (denied := _authorized(request)) is not None:
        return denied
    if svc.busy(1):
        return _answer(svc.overloaded_response())
    body = await _read_json(request, svc)
    if isinstance(body, Response):
        return body
    return _answer(await svc.workflows.results(request.path_params["workflow_id"], body))


async def list_models(request: Request):
    return _authorized(request) or _answer(_service(request).list_models())


async def get_model_type(request: Request):
    return _authorized(request) or _answer(_service(request).get_model_type(request.path_params["model_type_id"]))


async def list_model_types(request: Request):
    return _authorized(request) or _answer(_service(request).list_model_types())


# -- Filestack ---------------------------------------------------------------------------------------
async def _filestack_input(request: Request, svc: Service) -> tuple[str | None, bytes | None] | Response:
    """The image of a Filestack request: ``(url, None)`` or ``(None, bytes)``, or the error answer.

    The body is streamed under a cap of ``max_bytes`` plus the form's envelope: a chunked upload is
    stopped at the cap, never spooled in full."""
    settings = svc.settings
    url, data = request.query_params.get("url"), None
    if request.method != "POST" or url is not None:
        return url, None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    cap = min(settings.max_request_bytes, settings.max_bytes + FORM_OVERHEAD)
    client = client_of(request)
    multipart = ctype in ("multipart/form-data", "application/x-www-form-urlencoded")
    # a form's file goes to a temp file (the spool budget), any other body stays in memory
    budget = (svc.spool if multipart else svc.body_bytes).hold(client)
    try:
        with svc.body_slot(client):
            async with trimmed(budget) as holding:
                if multipart:
                    stream = cap_stream(body_chunks(request, svc, holding), cap, request.headers.get("content-length"))
                    if ctype == "multipart/form-data":
                        parser: Any = MultiPartParser(request.headers, stream, max_files=1, max_fields=20)
                    else:
                        parser = FormParser(request.headers, stream)
                    form = await parser.parse()
                    try:
                        for value in form.values():
                            if not isinstance(value, str):  # an UploadFile
                                data = await value.read(settings.max_bytes + 1)
                        url = form.get("url") if data is None and isinstance(form.get("url"), str) else None
                    finally:
                        await form.close()
                else:
                    body = await read_capped_async(body_chunks(request, svc, holding), cap,
                                                   request.headers.get("content-length"))
                    if ctype == "application/json":
                        raw = parse_json(body)
                        url = raw.get("url") if isinstance(raw, dict) and isinstance(raw.get("url"), str) else None
                    else:
                        data = body
    except (TooLarge, BodyTimeout, Disconnected, Full) as e:
        return _body_failed(e, svc, filestack=True)
    except StatusError as e:
        return _json(400, {"error": e.details, "code": e.code})
    except (ValueError, UnicodeDecodeError, MultiPartException) as e:
        return _json(400, {"error": f"malformed request: {e}"})
    except StarletteHTTPException as e:
        return _json(400, {"error": str(e.detail)})
    return url, data


async def filestack_tags(request: Request):
    """Filestack's image-tagging shape for an upload (multipart, or a raw image body) or a URL."""
    svc = _service(request)
    settings = svc.settings
    if (denied := _authorized(request)) is not None:
        return denied
    if svc.busy(1):
        status, body = svc.overloaded_response()
        return _json(503, {"error": body["status"]["details"]}, {"Retry-After": "1"})
    got = await _filestack_input(request, svc)
    if isinstance(got, Response):
        return got
    url, data = got
    if not url and not data:
        return _json(400, {"error": "send an image (multipart file or raw body) or a url"})
    if data is not None and len(data) > settings.max_bytes:
        return _json(413, {"error": f"the image is over {settings.max_bytes} bytes"})
    entry = svc.default
    try:
        with svc.admitted(1):
            tags = await svc.image_tags(entry, Picking(settings.max_concepts, settings.min_value), url=url, data=data)
    except Overloaded:
        return _json(503, {"error": "the request queue is full; retry later"}, {"Retry-After": "1"})
    except (ImageError, StatusError) as e:
        svc.metrics.images.labels("error").inc()
        status = clarifai.image_error_status(e) if isinstance(e, ImageError) else {"code": e.code}
        return _json(400, {"error": str(e), "code": status["code"]})
    svc.metrics.images.labels("ok").inc()
    return {"tags": {"auto": {t.name: int(round(t.value * 100)) for t in tags}, "user": None}}


# -- operations --------------------------------------------------------------------------------------
async def healthz():
    return {"status": "ok"}


async def readyz(request: Request):
    svc = request.app.state.service
    if svc is None or not svc.ready:
        return _json(503, {"status": "starting"})
    # queue: images admitted (bounded by max_queue); waiting: decoded, waiting for the model;
    # reading: request bodies still arriving (not work yet)
    flow = request.app.state.directus_flow
    # precision: per model, the image tower's precision and why (`auto`: measured once per model and
    # CPU and kept in the cache folder, so it is the same on every start)
    precision = {k: e.encoder.choice.to_json() for k, e in svc.entries.items()}
    return {"status": "ready", "models": sorted(svc.entries), "queue": svc.load, "waiting": svc.waiting,
            "reading": svc.reading, "precision": precision,
            "directus_flow": flow.state() if flow is not None else None}


async def metrics_route(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- errors in Clarifai's shape ----------------------------------------------------------------------
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = clarifai.CONN_DOES_NOT_EXIST if exc.status_code == 404 else clarifai.CONN_INVALID_REQUEST
    return _json(exc.status_code, clarifai.error_response(code, str(exc.detail)), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    return _json(400, clarifai.error_response(clarifai.CONN_INVALID_REQUEST, describe_errors(exc.errors())))


async def _internal_error(request: Request, exc: Exception):
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
    return _json(500, clarifai.error_response(clarifai.INTERNAL_SERVER_ISSUE))


# -- the app -----------------------------------------------------------------------------------------
def _path_params(path: str) -> list[dict]:
    return [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in re.findall(r"{(\w+)}", path)]


def _query(name: str, kind: str = "string") -> dict:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def _clarifai_routes(app: FastAPI) -> None:
    predict_body = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}
    response_doc = {"200": {"description": "Clarifai MultiOutputResponse"}}
    routes: list[tuple[str, str, Any, dict]] = []
    routes += [("POST", p, predict, {"requestBody": predict_body}) for p in PREDICT_PATHS]
    routes += [("GET", p, get_model_type, {}) for p in MODEL_TYPE_PATHS]
    routes += [("GET", p, list_model_types, {}) for p in MODEL_TYPES_PATHS]
    routes += [("GET", p, get_output_info, {}) for p in OUTPUT_INFO_PATHS]
    routes += [("GET", p, list_concepts, {"parameters": [_query("page", "integer"), _query("per_page", "integer")]})
               for p in CONCEPTS_PATHS]
    routes += [("GET", p, get_model, {}) for p in MODEL_PATHS]
    routes += [("GET", p, list_models, {}) for p in MODELS_PATHS]
    routes += [(m, p, workflows_route, {}) for p in WORKFLOWS_PATHS for m in ("GET", "POST", "DELETE")]
    routes += [(m, p, workflows_route, {}) for p in WORKFLOW_PATHS for m in ("GET", "DELETE")]
    routes += [("POST", p, workflow_results, {}) for p in WORKFLOW_RESULTS_PATHS]
    for method, path, fn, extra in routes:
        op_id = fn.__name__ + "_" + re.sub(r"\W+", "_", path.strip("/"))
        op_id += f"_{method.lower()}" if fn is workflows_route else ""
        openapi = {"parameters": _path_params(path) + extra.pop("parameters", []), **extra}
        app.add_api_route(path, fn, methods=[method], operation_id=op_id, openapi_extra=openapi,
                          responses=response_doc, tags=["clarifai"])


def _filestack_routes(app: FastAPI) -> None:
    doc = {
        "parameters": [_query("url")],
        "requestBody": {"required": False, "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}, "url": {"type": "string"}}}},
            "application/json": {"schema": {"type": "object", "properties": {"url": {"type": "string"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    }
    responses = {"200": {"description": 'Filestack tags: {"tags": {"auto": {name: 0-100}, "user": null}}'}}
    app.add_api_route("/filestack/tags", filestack_tags, methods=["POST"], operation_id="filestack_tags_post",
                      openapi_extra=doc, responses=responses, tags=["filestack"])
    app.add_api_route("/filestack/tags", filestack_tags, methods=["GET"], operation_id="filestack_tags_get",
                      openapi_extra={"parameters": [_query("url")]}, responses=responses, tags=["filestack"])


def _openapi(app: FastAPI):
    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            defs = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["PredictRequest"] = defs
            app.openapi_schema = doc
        return app.openapi_schema

    return schema


def _lifespan(settings: Settings, loaded: Loaded | None, keys: list[bytes], metrics: Metrics):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        entries = await asyncio.to_thread(build_entries, settings, loaded, metrics.batch_size.observe)
        unique = {id(e): e for e in entries.values()}.values()
        for e in unique:
            await asyncio.to_thread(lambda e=e: e.tagger.text_embeddings)  # warm the text side once
            e.batcher.start()
        service = Service(settings, entries, keys, metrics)
        service.family = Family(service.default, settings, on_batch=metrics.batch_size.observe)
        await asyncio.to_thread(service.family.warm)
        service.workflows = Workflows(service, settings.cache_dir / "workflows")
        service.family.embedder.start()
        service.custom_models = CustomModels(service)
        await service.custom_models.start()  # the training worker of custom models
        app.state.service = service
        grpc_server = None
        if settings.grpc_port is not None:
            from .grpc_service import start_grpc

            grpc_server, app.state.grpc_port = await start_grpc(service, settings.host, settings.grpc_port)
        if flow_route.flow_configured(settings):
            app.state.directus_flow = flow_route.make_worker(service, settings)
        await app_service.start(service)  # the app's store and its PostInputs worker
        service.ready = True
        log.info("serving %s on %d model(s)%s", ", ".join(sorted(entries)), len(unique),
                 "" if keys else " without API keys (any key is accepted)")
        try:
            yield
        finally:
            service.ready = False
            if app.state.directus_flow is not None:
                await app.state.directus_flow.drain()
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await app_service.stop(service)
            for e in unique:
                await e.batcher.stop()
            await service.custom_models.stop()
            await service.family.embedder.stop()
            service.decoder.shutdown()

    return lifespan


def create_app(settings: Settings, loaded: Loaded | None = None) -> FastAPI:
    """The REST app (and, with ``settings.grpc_port`` set, the gRPC server in its lifespan).

    ``loaded``: an already loaded default model (tests); else the lifespan loads ``settings.model``.
    """
    metrics = Metrics()
    keys = load_keys(settings)
    app = FastAPI(title="localtag", version="0.1.0", lifespan=_lifespan(settings, loaded, keys, metrics),
                  default_response_class=SafeJSON,
                  description="Offline image tagging with a Clarifai-compatible API.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.directus_flow = None
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(model_routes.router)  # before the model routes: custom models first, the rest as before
    _clarifai_routes(app)
    _filestack_routes(app)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["ops"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["ops"])
    app.add_api_route("/metrics", metrics_route, methods=["GET"], tags=["ops"])
    app.include_router(flow_route.router)
    app.include_router(app_routes.router)
    app.openapi = _openapi(app)
    app.add_middleware(PathAndMetricsMiddleware, metrics=metrics, max_header_bytes=settings.max_header_bytes)
    logthrottle.install()
    return app
