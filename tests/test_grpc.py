"""The gRPC V2 service, live on 127.0.0.1, through clarifai-grpc's own stub and insecure channel."""

from __future__ import annotations

import grpc
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from conftest import tag_images
from live_server import ImageServer, LiveServer
from pydantic import SecretStr

from localtag.core import decode
from localtag.core.config import Settings
from localtag.core.loader import load

KEY = "grpc-key-89ab"
MD = (("authorization", f"Key {KEY}"),)
VOCAB = "cat\ndog\nbird\nairplane\ntruck\nship\n"
MODEL = "general-image-recognition"


@pytest.fixture(scope="module")
def jpegs(coco_images):
    return [p.read_bytes() for p in coco_images[4:7]]


@pytest.fixture(scope="module")
def setup(random_store, cache_dir, tmp_path_factory, jpegs):
    d = tmp_path_factory.mktemp("grpc")
    (d / "vocab.txt").write_text(VOCAB)
    with ImageServer({"a.jpg": jpegs[0]}) as web:
        s = Settings(models_dir=random_store, model="tiny-random", vocab=d / "vocab.txt", cache_dir=cache_dir,
                     device="cpu", api_keys=[SecretStr(KEY)], grpc_port=0, allow_hosts=[web.host],
                     model_ids={"animals": ("tiny-random", d / "vocab.txt")})
        loaded = load(s)
        with LiveServer(s, loaded) as live:
            channel = ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=live.grpc_port)
            stub = service_pb2_grpc.V2Stub(channel)  # right after its channel: the stub module keys off the last one
            yield stub, loaded, web, live
            channel.close()


def image_input(data: bytes | None = None, url: str | None = None, id: str = "") -> resources_pb2.Input:
    img = resources_pb2.Image(base64=data) if data is not None else resources_pb2.Image(url=url)
    return resources_pb2.Input(id=id, data=resources_pb2.Data(image=img))


def test_predict_bytes_and_url(setup, jpegs):
    stub, loaded, web, _ = setup
    req = service_pb2.PostModelOutputsRequest(
        user_app_id=resources_pb2.UserAppIDSet(user_id="clarifai", app_id="main"), model_id=MODEL,
        inputs=[image_input(jpegs[0], id="first"), image_input(url=f"{web.base}/img/a.jpg")])
    r = stub.PostModelOutputs(req, metadata=MD)
    assert r.status.code == sc.SUCCESS and len(r.outputs) == 2
    expected = tag_images(loaded, [decode.decode(jpegs[0])])[0]
    for out in r.outputs:
        assert out.status.code == sc.SUCCESS
        assert [c.id for c in out.data.concepts] == [t.id for t in expected]
        assert [c.value for c in out.data.concepts] == pytest.approx([t.value for t in expected], abs=1e-5)
        assert out.model.id == MODEL and out.model.model_type_id == "visual-classifier"
        assert out.created_at.seconds > 0
    assert r.outputs[0].input.id == "first" and len(r.outputs[1].input.id) == 32
    assert r.outputs[1].input.data.image.url == f"{web.base}/img/a.jpg"


def test_output_config_and_configured_model_id(setup, jpegs):
    stub, loaded, _, _ = setup
    cfg = resources_pb2.OutputConfig(max_concepts=2, select_concepts=[resources_pb2.Concept(name="dog"),
                                                                      resources_pb2.Concept(name="ship"),
                                                                      resources_pb2.Concept(name="cat")])
    model = resources_pb2.Model(model_version=resources_pb2.ModelVersion(output_info=resources_pb2.OutputInfo(
        output_config=cfg)))
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id="animals", inputs=[image_input(jpegs[1])],
                                                                  model=model), metadata=MD)
    assert r.status.code == sc.SUCCESS
    got = [c.name for c in r.outputs[0].data.concepts]
    tagger, encoder = loaded
    values = tagger.values(encoder.embed([decode.decode(jpegs[1])]))[0]
    top2 = sorted(["dog", "ship", "cat"], key=lambda n: -values[tagger.vocab.index(n)])[:2]
    assert got == top2
    assert r.outputs[0].model.id == "animals" and r.outputs[0].model.model_version.id != ""


def test_model_info_methods(setup):
    stub, (tagger, _), _, _ = setup
    r = stub.GetModel(service_pb2.GetModelRequest(model_id=MODEL), metadata=MD)
    assert r.status.code == sc.SUCCESS and r.model.model_type_id == "visual-classifier"
    assert r.model.model_version.id == "aa7f35c01e0642fda5cf400f543e7c40"
    r = stub.GetModelType(service_pb2.GetModelTypeRequest(model_type_id="visual-classifier"), metadata=MD)
    assert r.status.code == sc.SUCCESS and list(r.model_type.input_fields) == ["image"]
    r = stub.ListModelTypes(service_pb2.ListModelTypesRequest(), metadata=MD)
    assert [t.id for t in r.model_types] == ["visual-classifier"]
    r = stub.GetModelOutputInfo(service_pb2.GetModelRequest(model_id="aaa03c23b3724a16a56b629203edc62c"), metadata=MD)
    assert [c.name for c in r.model.output_info.data.concepts] == VOCAB.split()
    pages = [[c.name for c in stub.ListModelConcepts(service_pb2.ListModelConceptsRequest(
        model_id=MODEL, page=p, per_page=4), metadata=MD).concepts] for p in (1, 2, 3)]
    assert pages == [VOCAB.split()[:4], VOCAB.split()[4:], []]


def test_errors_travel_in_the_status(setup, jpegs):
    stub, _, _, _ = setup
    one = [image_input(jpegs[0])]
    # gRPC status stays OK (no RpcError); Clarifai's status says what went wrong
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id="nope", inputs=one), metadata=MD)
    assert r.status.code == sc.MODEL_DOES_NOT_EXIST
    r = stub.GetModel(service_pb2.GetModelRequest(model_id="nope"), metadata=MD)
    assert r.status.code == sc.MODEL_DOES_NOT_EXIST
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL, inputs=one))
    assert r.status.code == sc.CONN_KEY_NOT_FOUND
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL, inputs=one),
                              metadata=(("authorization", "Key wrong"),))
    assert r.status.code == sc.CONN_KEY_INVALID
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL, inputs=one),
                              metadata=(("authorization", f"key {KEY}"),))
    assert r.status.code == sc.SUCCESS
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL, inputs=one * 129), metadata=MD)
    assert r.status.code == sc.CONN_INVALID_REQUEST and "128" in r.status.details
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL), metadata=MD)
    assert r.status.code == sc.CONN_INVALID_REQUEST
    mixed = one + [image_input(b"not an image"), image_input(url="http://169.254.169.254/latest/meta-data/")]
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=MODEL, inputs=mixed), metadata=MD)
    assert r.status.code == sc.MIXED_STATUS
    assert [o.status.code for o in r.outputs] == [sc.SUCCESS, sc.INPUT_UNSUPPORTED_FORMAT, sc.INPUT_INVALID_URL]
    cfg = resources_pb2.OutputConfig(select_concepts=[resources_pb2.Concept(id="ai_doesnotexist")])
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(
        model_id=MODEL, inputs=one, model=resources_pb2.Model(output_info=resources_pb2.OutputInfo(output_config=cfg))),
        metadata=MD)
    assert r.status.code == sc.MODEL_INVALID_ARGUMENT


def test_unimplemented_methods_say_so(setup):
    stub, _, _, _ = setup
    with pytest.raises(grpc.RpcError) as e:
        stub.ListApps(service_pb2.ListAppsRequest(), metadata=MD)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # and the service goes on
    assert stub.GetModel(service_pb2.GetModelRequest(model_id=MODEL), metadata=MD).status.code == sc.SUCCESS
