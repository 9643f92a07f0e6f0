"""Clarifai's gRPC ``V2`` service on the classes ``clarifai-grpc`` ships, over the same :class:`Service`.

Implemented: ``PostModelOutputs``, ``ListModels``, the workflow calls (``PostWorkflows``, ``GetWorkflow``,
``ListWorkflows``, ``DeleteWorkflows``, ``DeleteWorkflow``, ``PostWorkflowResults``), ``GetModel``, ``GetModelType``, ``ListModelTypes``,
``GetModelOutputInfo``, ``ListModelConcepts``, the app calls and the custom-model calls (``PostModels``,
``DeleteModel(s)``, ``PostModelVersions``, ``GetModelVersion``, ``ListModelVersions``, ``DeleteModelVersion``). As on Clarifai's servers, errors travel in
``response.status``; the gRPC status stays OK. The servicer runs on the REST server's event loop
(``grpc.aio``), so both share the models, the batcher and the admission queue.

Connections are bounded (:func:`channel_options`): at most ``grpc_max_connections`` open (past it
gRPC closes new ones at once), a connection must finish its HTTP/2 handshake within
``header_timeout``, one with no call for ``grpc_idle_timeout`` gets a GOAWAY, the server pings quiet
clients and drops those that do not answer, and a client pinging too often is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from clarifai_grpc.grpc.api import service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_pb2 as status_pb2_base
from clarifai_grpc.grpc.api.status.status_pb2 import BaseResponse
from google.protobuf import json_format
from pydantic import ValidationError

from ..app.store import app_key
from ..core import clarifai
from .app_service import api_for, throttled
from .schema import DataIn, ImageIn, PredictRequest
from .service import Service, describe_errors

log = logging.getLogger(__name__)


def _to_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _to_proto(body: dict, message_type):
    return json_format.ParseDict(body, message_type(), ignore_unknown_fields=True)


def predict_request(request: service_pb2.PostModelOutputsRequest):
    """The request as the REST model, image bytes passed through as bytes (no base64 round trip)."""
    raw = [inp.data.image.base64 for inp in request.inputs]
    light = service_pb2.PostModelOutputsRequest()
    light.CopyFrom(request)
    for inp in light.inputs:
        inp.data.image.ClearField("base64")
    body = json_format.MessageToDict(light, preserving_proto_field_name=True)
    req = PredictRequest.model_validate(body)
    for inp, data in zip(req.inputs, raw, strict=True):
        if data:
            if inp.data is None or inp.data.image is None:
                inp.data = inp.data or DataIn()
                inp.data.image = inp.data.image or ImageIn()
            inp.data.image.base64 = data  # bytes: Service skips base64 decoding
    return req


def _concept_values(request, body: dict) -> dict:
    """Each input's concept values as sent: proto3 leaves a value of 0 (a negative) out of the dict, where
    the JSON API would read a missing value as 1."""
    for raw, inp in zip(body.get("inputs") or [], request.inputs, strict=False):
        for c, concept in zip((raw.get("data") or {}).get("concepts") or [], inp.data.concepts, strict=False):
            c["value"] = concept.value
    return body


class V2Servicer(service_pb2_grpc.V2Servicer):
    def __init__(self, service: Service):
        self.service = service

    def _denied(self, context: grpc.aio.ServicerContext) -> dict | None:
        header = next((v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"), None)
        err = self.service.check_auth(header if isinstance(header, str) else None)
        return err[1] if err else None

    async def PostModelOutputs(self, request, context):  # noqa: N802 - gRPC method names
        if (denied := self._denied(context)) is not None:
            return _to_proto(denied, service_pb2.MultiOutputResponse)
        try:
            req = predict_request(request)
        except ValidationError as e:
            body = clarifai.error_response(clarifai.CONN_INVALID_REQUEST, describe_errors(e.errors()))
            return _to_proto(body, service_pb2.MultiOutputResponse)
        custom, app = self._custom(request)
        if custom is not None and custom.owns(app, request.model_id):
            _, body = await custom.predict(req, request.model_id, app, request.version_id or None)
        else:
            _, body = await self.service.predict(req, request.model_id or None)
        return _to_proto(body, service_pb2.MultiOutputResponse)

    def _custom(self, request):
        """The server's custom models (serve.model_service) and the app the request names."""
        uai = request.user_app_id
        return self.service.custom_models, app_key(uai.user_id or None, uai.app_id or None)

    async def GetModel(self, request, context):  # noqa: N802
        custom, app = self._custom(request)
        if (body := self._denied(context)) is None:
            owned = custom is not None and custom.owns(app, request.model_id)
            body = (custom.api.get_model(app, request.model_id) if owned else self.service.get_model(request.model_id))[1]
        return _to_proto(body, service_pb2.SingleModelResponse)

    async def GetModelOutputInfo(self, request, context):  # noqa: N802
        custom, app = self._custom(request)
        if (body := self._denied(context)) is None:
            owned = custom is not None and custom.owns(app, request.model_id)
            body = (custom.api.get_model(app, request.model_id) if owned
                    else self.service.get_output_info(request.model_id))[1]
        return _to_proto(body, service_pb2.SingleModelResponse)

    # custom models (serve.model_service, app.models)
    async def _models_call(self, request, context, answer_type, call):
        if (denied := self._denied(context)) is not None:
            return _to_proto(denied, answer_type)
        custom, app = self._custom(request)
        if custom is None or custom.api is None:
            return _to_proto(clarifai.error_response(clarifai.INTERNAL_SERVER_ISSUE, "the server is starting"),
                             answer_type)
        _, out = await asyncio.to_thread(call, custom, app, _to_dict(request))
        return _to_proto(out, answer_type)

    async def PostModels(self, request, context):  # noqa: N802
        return await self._models_call(request, context, service_pb2.SingleModelResponse,
                                       lambda m, app, body: m.api.post_models(app, body))

    async def DeleteModel(self, request, context):  # noqa: N802
        return await self._models_call(request, context, BaseResponse,
                                       lambda m, app, body: m.api.delete_model(app, request.model_id))

    async def DeleteModels(self, request, context):  # noqa: N802
        return await self._models_call(request, context, BaseResponse,
                                       lambda m, app, body: m.api.delete_models(app, body))

    async def PostModelVersions(self, request, context):  # noqa: N802
        return await self._models_call(request, context, service_pb2.SingleModelResponse,
                                       lambda m, app, body: m.post_version(app, request.model_id, body))

    async def GetModelVersion(self, request, context):  # noqa: N802
        def call(m, app, body):
            if not m.owns(app, request.model_id) and self.service.entry(request.model_id) is not None:
                return self.service.get_model(request.model_id)
            return m.api.get_version(app, request.model_id, request.version_id)

        return await self._models_call(request, context, service_pb2.SingleModelVersionResponse, call)

    async def ListModelVersions(self, request, context):  # noqa: N802
        return await self._models_call(request, context, service_pb2.MultiModelVersionResponse, lambda m, app, body:
                                       m.api.list_versions(app, request.model_id, request.page or 1,
                                                           request.per_page or 128, request.trained_only))

    async def DeleteModelVersion(self, request, context):  # noqa: N802
        return await self._models_call(request, context, BaseResponse, lambda m, app, body:
                                       m.api.delete_version(app, request.model_id, request.version_id))

    async def ListModelConcepts(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.list_concepts(request.model_id, request.page,
                                                                    request.per_page)[1]
        return _to_proto(body, service_pb2.MultiConceptResponse)

    async def ListModels(self, request, context):  # noqa: N802
        custom, app = self._custom(request)
        if (body := self._denied(context)) is None:
            scoped = app if request.user_app_id.app_id else None
            body = custom.list_models(scoped)[1] if custom is not None and custom.api is not None else \
                self.service.list_models()[1]
        return _to_proto(body, service_pb2.MultiModelResponse)

    # workflows (localtag.serve.workflows)
    async def PostWorkflows(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.workflows.post(_to_dict(request))[1]
        return _to_proto(body, service_pb2.MultiWorkflowResponse)

    async def GetWorkflow(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.workflows.get(request.workflow_id)[1]
        return _to_proto(body, service_pb2.SingleWorkflowResponse)

    async def ListWorkflows(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.workflows.list(request.page, request.per_page)[1]
        return _to_proto(body, service_pb2.MultiWorkflowResponse)

    async def DeleteWorkflows(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.workflows.delete(_to_dict(request))[1]
        return _to_proto(body, status_pb2_base.BaseResponse)

    async def DeleteWorkflow(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.workflows.delete({}, request.workflow_id)[1]
        return _to_proto(body, status_pb2_base.BaseResponse)

    async def PostWorkflowResults(self, request, context):  # noqa: N802
        if (denied := self._denied(context)) is not None:
            return _to_proto(denied, service_pb2.PostWorkflowResultsResponse)
        _, body = await self.service.workflows.results(request.workflow_id, _to_dict(request))
        return _to_proto(body, service_pb2.PostWorkflowResultsResponse)

    async def GetModelType(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.get_model_type(request.model_type_id)[1]
        return _to_proto(body, service_pb2.SingleModelTypeResponse)

    async def ListModelTypes(self, request, context):  # noqa: N802
        body = self._denied(context) or self.service.list_model_types()[1]
        return _to_proto(body, service_pb2.MultiModelTypeResponse)

    # -- the app (localtag.app.api): requests as Clarifai JSON, answers parsed back -------------------
    async def _app_call(self, request, context, answer_type, call):
        if (denied := self._denied(context)) is not None:
            return _to_proto(denied, answer_type)
        body = json_format.MessageToDict(request, preserving_proto_field_name=True)
        app = app_key(request.user_app_id.user_id or None, request.user_app_id.app_id or None)
        result = call(await api_for(self.service), app, body)
        _, out = await result if hasattr(result, "__await__") else result
        return _to_proto(out, answer_type)

    async def PostInputs(self, request, context):  # noqa: N802
        def post(api, app, body):
            limited = throttled(self.service, _peer_host(context.peer() or ""), body)
            return (limited[0], limited[1]) if limited else api.post_inputs(app, _concept_values(request, body))

        return await self._app_call(request, context, service_pb2.MultiInputResponse, post)

    async def GetInput(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.SingleInputResponse,
                                    lambda api, app, body: api.get_input(app, request.input_id))

    async def ListInputs(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiInputResponse, lambda api, app, body:
                                    api.list_inputs(app, request.page or 1, request.per_page or 20, list(request.ids)))

    async def PatchInputs(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiInputResponse,
                                    lambda api, app, body: api.patch_inputs(app, _concept_values(request, body)))

    async def DeleteInput(self, request, context):  # noqa: N802
        return await self._app_call(request, context, BaseResponse,
                                    lambda api, app, body: api.delete_inputs(app, [request.input_id]))

    async def DeleteInputs(self, request, context):  # noqa: N802
        return await self._app_call(request, context, BaseResponse,
                                    lambda api, app, body: api.delete_inputs(app, list(request.ids)))

    async def GetInputCount(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.SingleInputCountResponse,
                                    lambda api, app, body: api.count(app))

    async def PostInputsSearches(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiSearchResponse,
                                    lambda api, app, body: api.search(app, body))

    async def PostAnnotationsSearches(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiSearchResponse,
                                    lambda api, app, body: api.search(app, body, annotations=True))

    async def PostSearches(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiSearchResponse,
                                    lambda api, app, body: api.search(app, body))

    async def ListConcepts(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiConceptResponse, lambda api, app, body:
                                    api.list_concepts(app, request.page or 1, request.per_page or 128))

    async def PostConcepts(self, request, context):  # noqa: N802
        return await self._app_call(request, context, service_pb2.MultiConceptResponse,
                                    lambda api, app, body: api.post_concepts(app, body))


#: the server pings a client quiet this long, and drops it without an answer within KEEPALIVE_TIMEOUT_MS
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
#: pings a client may send too often before the server drops it
MAX_PING_STRIKES = 2


def channel_options(settings) -> list[tuple[str, int]]:
    """gRPC core's server options for ``settings``: message sizes, and the connection bounds above."""
    limit = settings.max_request_bytes
    options = [
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.server_handshake_timeout_ms", max(1, int(settings.header_timeout * 1000))),
        ("grpc.max_connection_idle_ms", max(1, int(settings.grpc_idle_timeout * 1000))),
        ("grpc.max_connection_age_ms", max(1, int(settings.connection_max_age * 1000))),
        ("grpc.max_connection_age_grace_ms", max(1, int(settings.body_timeout * 1000))),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS), ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]
    if settings.grpc_max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", settings.grpc_max_connections))
    return options


async def start_grpc(service: Service, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on the running loop; returns it and the bound port (``port=0``: a free one)."""
    server = grpc.aio.server(
        # the generated base class answers UNIMPLEMENTED for the other methods from this small pool
        migration_thread_pool=ThreadPoolExecutor(1, thread_name_prefix="localtag-grpc"),
        options=channel_options(service.settings),
    )
    service_pb2_grpc.add_V2Servicer_to_server(V2Servicer(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    log.info("gRPC on %s:%d", host, bound)
    return server, bound


def _peer_host(peer: str) -> str:
    """gRPC's peer ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555") → the address the REST routes count by."""
    addr = peer.split(":", 1)[1] if ":" in peer else peer
    return addr.rsplit(":", 1)[0].strip("[]") if addr.count(":") >= 1 else addr
