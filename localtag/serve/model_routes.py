"""Clarifai's custom-model routes over :class:`localtag.serve.model_service.CustomModels` (REST).

Every path form of clarifai-grpc's http bindings, app-scoped (``/v2/users/{user_id}/apps/{app_id}/models…``)
and short (``/v2/models…``, app ``me/main``): ``PostModels``, ``ListModels``, ``DeleteModels``,
``GetModel``, ``DeleteModel``, ``PostModelVersions``, ``ListModelVersions``, ``GetModelVersion``,
``DeleteModelVersion`` and ``GetModelOutputInfo``. This router is included before the server's model
routes: a GET of a model the server serves itself (the public family) is answered as before, by the
:class:`~localtag.serve.service.Service`. Predict (``…/outputs``) stays the server's route, which hands a
custom model id to :meth:`CustomModels.predict`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..core import clarifai
from .app_routes import query_int, read_body, send
from .model_service import CustomModels, request_app

router = APIRouter(tags=["models"])
PREFIXES = ("/v2/users/{user_id}/apps/{app_id}", "/v2")


def _guard(request: Request) -> JSONResponse | None:
    svc = request.app.state.service
    if svc is None or getattr(svc, "custom_models", None) is None:
        return send((503, clarifai.error_response(clarifai.INTERNAL_SERVER_ISSUE, "the server is starting")))
    err = svc.check_auth(request.headers.get("authorization"))
    return send(err) if err else None


def _unavailable(request: Request) -> JSONResponse | None:
    """503 when the app store could not be opened (the served models still answer)."""
    if _models(request).api is None:
        return send((503, clarifai.error_response(clarifai.INTERNAL_SERVER_ISSUE, "custom models are unavailable: "
                                                   "the app store cannot be opened (see the server's log)")))
    return None


def _models(request: Request) -> CustomModels:
    return request.app.state.service.custom_models


def _app(request: Request, body: dict | None = None) -> str:
    uai = (body or {}).get("user_app_id")
    if not isinstance(uai, dict):
        q = request.query_params
        uai = {"user_id": q.get("user_app_id.user_id"), "app_id": q.get("user_app_id.app_id")}
    return request_app(request.path_params, uai)


def _scoped(request: Request) -> bool:
    """Does the request name an app (the app-scoped path form, or ``user_app_id`` in the query)?"""
    return "app_id" in request.path_params or bool(request.query_params.get("user_app_id.app_id"))




async def models_route(request: Request):
    """PostModels (POST), ListModels (GET), DeleteModels (DELETE)."""
    if (err := _guard(request)) is not None:
        return err
    m = _models(request)
    if request.method == "GET" and m.api is None:
        return send(request.app.state.service.list_models())
    if (err := _unavailable(request)) is not None:
        return err
    if request.method == "GET":
        return send(await asyncio.to_thread(m.list_models, _app(request) if _scoped(request) else None))
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    if request.method == "DELETE":
        return send(await asyncio.to_thread(m.api.delete_models, _app(request, body), body))
    return send(await asyncio.to_thread(m.api.post_models, _app(request, body), body))


async def model_route(request: Request):
    """GetModel (GET), DeleteModel (DELETE); a served model's GET answers as before."""
    if (err := _guard(request)) is not None:
        return err
    svc, m = request.app.state.service, _models(request)
    model_id, app = request.path_params["model_id"], _app(request)
    if request.method == "GET":
        if model_id == "types":  # ListModelTypes' path, shadowed by this router
            return send(svc.list_model_types())
        if not m.owns(app, model_id):
            return send(svc.get_model(model_id))
        return send(await asyncio.to_thread(m.api.get_model, app, model_id))
    if (err := _unavailable(request)) is not None:
        return err
    return send(await asyncio.to_thread(m.api.delete_model, app, model_id))


async def versions_route(request: Request):
    """PostModelVersions (POST), ListModelVersions (GET)."""
    if (err := _guard(request)) is not None:
        return err
    m = _models(request)
    model_id = request.path_params["model_id"]
    if (err := _unavailable(request)) is not None:
        return err
    if request.method == "GET":
        trained = request.query_params.get("trained_only", "").lower() in ("1", "true")
        return send(await asyncio.to_thread(m.api.list_versions, _app(request), model_id, query_int(request, "page", 1),
                                             query_int(request, "per_page", 128), trained))
    body = await read_body(request)
    if isinstance(body, JSONResponse):
        return body
    app = _app(request, body)
    if not m.owns(app, model_id) and request.app.state.service.entry(model_id) is not None:
        return send((400, clarifai.error_response(clarifai.MODEL_INVALID_ARGUMENT,
                                                   f"model {model_id!r} is a public model: it is not trainable")))
    return send(await asyncio.to_thread(m.post_version, app, model_id, body))


async def version_route(request: Request):
    """GetModelVersion (GET), DeleteModelVersion (DELETE); a served model's GET answers as before."""
    if (err := _guard(request)) is not None:
        return err
    svc, m = request.app.state.service, _models(request)
    p = request.path_params
    app = _app(request)
    if not m.owns(app, p["model_id"]) and request.method == "GET" and svc.entry(p["model_id"]) is not None:
        return send(svc.get_model(p["model_id"]))
    if (err := _unavailable(request)) is not None:
        return err
    if request.method == "GET":
        return send(await asyncio.to_thread(m.api.get_version, app, p["model_id"], p["version_id"]))
    return send(await asyncio.to_thread(m.api.delete_version, app, p["model_id"], p["version_id"]))


async def output_info_route(request: Request):
    """GetModelOutputInfo: a custom model's concepts; a served model's as before."""
    if (err := _guard(request)) is not None:
        return err
    svc, m = request.app.state.service, _models(request)
    model_id, app = request.path_params["model_id"], _app(request)
    if not m.owns(app, model_id):
        return send(svc.get_output_info(model_id))
    return send(await asyncio.to_thread(m.api.get_model, app, model_id))


ROUTES = (
    ("/models", models_route, ("GET", "POST", "DELETE")),
    ("/models/{model_id}", model_route, ("GET", "DELETE")),
    ("/models/{model_id}/versions", versions_route, ("GET", "POST")),
    ("/models/{model_id}/versions/{version_id}", version_route, ("GET", "DELETE")),
    ("/models/{model_id}/output_info", output_info_route, ("GET",)),
    ("/models/{model_id}/versions/{version_id}/output_info", output_info_route, ("GET",)),
)
for _prefix in PREFIXES:
    for _path, _fn, _methods in ROUTES:
        for _method in _methods:
            router.add_api_route(_prefix + _path, _fn, methods=[_method], operation_id=(
                f"{_fn.__name__}_{_method.lower()}_{'app' if '{app_id}' in _prefix else 'v2'}"
                f"{'_v' if '{version_id}' in _path else ''}{'_oi' if 'output_info' in _path else ''}"))
