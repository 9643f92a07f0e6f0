"""Clarifai workflows through the official clarifai-grpc clients (JSON and gRPC) against a live server with
the CIFAR fixture model: PostWorkflows (general + color + nsfw) answers three outputs per input, each
input encoded once; stored workflows survive a restart; errors are Clarifai statuses, not 500s."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from live_server import LiveServer
from pydantic import SecretStr
from test_family import half_red_half_blue

from localtag.core.config import Settings

KEY = "wf-key-9012"
MD = (("authorization", f"Key {KEY}"),)


def _settings(fixture_model, tmp_path) -> Settings:
    return Settings(model=str(fixture_model), cache_dir=tmp_path / "cache", device="cpu",
                    api_keys=[SecretStr(KEY)], grpc_port=0)


def _inputs(*images: bytes):
    return [resources_pb2.Input(id=f"in-{i}", data=resources_pb2.Data(image=resources_pb2.Image(base64=b)))
            for i, b in enumerate(images)]


def _node(node_id: str, model_id: str):
    return resources_pb2.WorkflowNode(id=node_id, model=resources_pb2.Model(id=model_id))


@pytest.fixture(scope="module")
def cat(cifar_test) -> bytes:
    return cifar_test["cat"][0].read_bytes()


def test_workflow_general_color_nsfw(fixture_model, fixture_loaded, tmp_path, cat):
    with LiveServer(_settings(fixture_model, tmp_path), fixture_loaded) as live:
        stubs = {"json": service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=live.base)),
                 "grpc": service_pb2_grpc.V2Stub(ClarifaiChannel.get_insecure_grpc_channel(
                     base="127.0.0.1", port=live.grpc_port))}
        for kind, stub in stubs.items():
            wid = f"mine-{kind}"
            r = stub.PostWorkflows(service_pb2.PostWorkflowsRequest(workflows=[resources_pb2.Workflow(
                id=wid, nodes=[_node("concepts", "general-image-recognition"),
                               _node("colours", "eeed0b6733a644cea07cf4c60f87ebb7"),
                               _node("safety", "nsfw-recognition")])]), metadata=MD)
            assert r.status.code == sc.SUCCESS, r.status
            got = stub.GetWorkflow(service_pb2.GetWorkflowRequest(workflow_id=wid), metadata=MD)
            assert [n.model.id for n in got.workflow.nodes] == [
                "general-image-recognition", "eeed0b6733a644cea07cf4c60f87ebb7", "nsfw-recognition"]
            encoded = live.service.family.embedder  # one embedding per input, however many nodes
            before = _embedded(encoded)
            res = stub.PostWorkflowResults(service_pb2.PostWorkflowResultsRequest(
                workflow_id=wid, inputs=_inputs(cat, half_red_half_blue())), metadata=MD)
            assert res.status.code == sc.SUCCESS, res.status
            assert _embedded(encoded) - before == 2
            assert len(res.results) == 2
            for result in res.results:
                assert len(result.outputs) == 3
                general, colours, nsfw = result.outputs
                assert general.data.concepts and {c.name for c in nsfw.data.concepts} == {"sfw", "nsfw"}
                assert sum(c.value for c in nsfw.data.concepts) == pytest.approx(1.0, abs=1e-4)
                assert sum(c.value for c in colours.data.colors) == pytest.approx(1.0, abs=1e-5)
            assert res.results[0].outputs[0].data.concepts[0].name == "cat"
            assert {c.w3c.name for c in res.results[1].outputs[1].data.colors[:2]} == {"Red", "Blue"}
            assert res.results[1].input.id == "in-1"
            listed = stub.ListWorkflows(service_pb2.ListWorkflowsRequest(), metadata=MD)
            assert {"General", wid} <= {w.id for w in listed.workflows}
        # built-in General: general + embedding
        stub = stubs["json"]
        res = stub.PostWorkflowResults(service_pb2.PostWorkflowResultsRequest(
            workflow_id="General", inputs=_inputs(cat)), metadata=MD)
        assert res.status.code == sc.SUCCESS, res.status
        general, embed = res.results[0].outputs
        assert general.data.concepts[0].name == "cat"
        assert embed.data.embeddings[0].num_dimensions == 64
        assert np.linalg.norm(embed.data.embeddings[0].vector) == pytest.approx(1.0, abs=1e-4)
        # errors: a Clarifai status each, never a 500
        bad = stub.PostWorkflows(service_pb2.PostWorkflowsRequest(workflows=[resources_pb2.Workflow(
            id="broken", nodes=[_node("x", "no-such-model")])]), metadata=MD)
        assert bad.status.code == sc.MODEL_DOES_NOT_EXIST and "no-such-model" in bad.status.details
        dup = stub.PostWorkflows(service_pb2.PostWorkflowsRequest(workflows=[resources_pb2.Workflow(
            id="mine-json", nodes=[_node("x", "nsfw-recognition")])]), metadata=MD)
        assert dup.status.code == sc.WORKFLOW_DUPLICATE
        missing = stub.PostWorkflowResults(service_pb2.PostWorkflowResultsRequest(
            workflow_id="nope", inputs=_inputs(cat)), metadata=MD)
        assert missing.status.code == sc.WORKFLOW_DOES_NOT_EXIST
        too_many = stub.PostWorkflowResults(service_pb2.PostWorkflowResultsRequest(
            workflow_id="General", inputs=_inputs(*[cat] * 33)), metadata=MD)
        assert too_many.status.code == sc.CONN_INVALID_REQUEST and "32" in too_many.status.details
        for path in ("/v2/users/me/apps/main/workflows/General/results",
                     "/v2/users/clarifai/apps/main/workflows/General/versions/general/results"):
            rest = httpx.post(live.base + path, headers={"authorization": f"Key {KEY}"}, timeout=60,
                              json={"inputs": [{"data": {"image": {"base64": base64.b64encode(cat).decode()}}}]})
            assert rest.status_code == 200 and len(rest.json()["results"][0]["outputs"]) == 2, rest.text[:300]
        raw = httpx.post(f"{live.base}/v2/users/me/apps/main/workflows", content=b"{not json",
                         headers={"authorization": f"Key {KEY}"})
        assert raw.status_code == 400 and raw.json()["status"]["code"] == 11100
        gone = stub.DeleteWorkflows(service_pb2.DeleteWorkflowsRequest(ids=["mine-grpc"]), metadata=MD)
        assert gone.status.code == sc.SUCCESS
    # a restart: the stored workflow is still there, the deleted one is not
    with LiveServer(_settings(fixture_model, tmp_path), fixture_loaded) as live:
        stub = service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=live.base))
        ids = {w.id for w in stub.ListWorkflows(service_pb2.ListWorkflowsRequest(), metadata=MD).workflows}
        assert "mine-json" in ids and "mine-grpc" not in ids
        res = stub.PostWorkflowResults(service_pb2.PostWorkflowResultsRequest(
            workflow_id="mine-json", inputs=_inputs(cat)), metadata=MD)
        assert res.status.code == sc.SUCCESS and len(res.results[0].outputs) == 3
    assert not list((tmp_path / "cache" / "workflows").glob(".wf-*"))  # no temp file left behind


def _embedded(batcher) -> int:
    return batcher.images
