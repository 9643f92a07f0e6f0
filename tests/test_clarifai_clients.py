"""Clarifai's own clients against a live localtag on 127.0.0.1, with the CIFAR fixture model (real signal):
clarifai-grpc's JSON and gRPC channels, the ``clarifai`` Python SDK, the npm ``clarifai`` client, and the
request of Directus's Clarifai tutorial."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from conftest import tag_images
from live_server import ImageServer, LiveServer
from pydantic import SecretStr

from localtag.core import decode
from localtag.core.config import Settings

KEY = "clients-key-cdef"
GENERAL = "general-image-recognition"
VERSION = "aa7f35c01e0642fda5cf400f543e7c40"
LEGACY = "aaa03c23b3724a16a56b629203edc62c"
JS_DIR = Path(__file__).resolve().parent / "clarifai_js"


@pytest.fixture(scope="module")
def cats(cifar_test, fixture_loaded) -> list[tuple[bytes, list]]:
    """The 20 CIFAR test cats with the offline tagger's answer for each."""
    data = [p.read_bytes() for p in cifar_test["cat"]]
    tags = tag_images(fixture_loaded, [decode.decode(d) for d in data])
    return list(zip(data, tags, strict=True))


@pytest.fixture(scope="module")
def cat(cats) -> bytes:
    """A CIFAR cat the model calls "cat" first (over 0.95) offline; the clients must get the same answer."""
    return next(d for d, tags in cats if tags[0].name == "cat" and tags[0].value > 0.95)


@pytest.fixture(scope="module")
def web(cat):
    with ImageServer({"cat.jpg": cat, "5f1c-uuid": cat}) as server:
        yield server


@pytest.fixture(scope="module")
def live(fixture_model, fixture_loaded, cache_dir, web):
    s = Settings(model=str(fixture_model), cache_dir=cache_dir, device="cpu", api_keys=[SecretStr(KEY)],
                 grpc_port=0, allow_hosts=[web.host])
    with LiveServer(s, fixture_loaded) as server:
        yield server


def json_stub(base_url: str):
    return service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=base_url))  # stub right after channel


def grpc_stub(port: int):
    return service_pb2_grpc.V2Stub(ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=port))


MD = (("authorization", f"Key {KEY}"),)
USER_APPS = [None, resources_pb2.UserAppIDSet(app_id="main"),  # users/me
             resources_pb2.UserAppIDSet(user_id="clarifai", app_id="main")]


def _exercise(stub, cat: bytes, web, offline) -> None:
    for uai in USER_APPS:
        kw = {"user_app_id": uai} if uai else {}
        for model_id, version in ((GENERAL, VERSION), (GENERAL, ""), (LEGACY, "")):
            req = service_pb2.PostModelOutputsRequest(
                model_id=model_id, version_id=version, **kw,
                inputs=[resources_pb2.Input(data=resources_pb2.Data(image=resources_pb2.Image(base64=cat))),
                        resources_pb2.Input(id="by-url", data=resources_pb2.Data(
                            image=resources_pb2.Image(url=f"{web.base}/img/cat.jpg")))])
            r = stub.PostModelOutputs(req, metadata=MD)
            assert r.status.code == sc.SUCCESS, r.status
            for out in r.outputs:
                assert out.data.concepts[0].name == "cat"
                assert [c.name for c in out.data.concepts] == [t.name for t in offline]
                assert [c.value for c in out.data.concepts] == pytest.approx([t.value for t in offline], abs=1e-5)
                assert out.model.id == model_id
            assert r.outputs[1].input.id == "by-url"
        r = stub.GetModel(service_pb2.GetModelRequest(model_id=GENERAL, **kw), metadata=MD)
        assert r.status.code == sc.SUCCESS and r.model.model_type_id == "visual-classifier"
        r = stub.GetModelOutputInfo(service_pb2.GetModelRequest(model_id=GENERAL, **kw), metadata=MD)
        names = [c.name for c in r.model.output_info.data.concepts]
        assert "cat" in names and "dog" in names
        if uai is not None:  # the JSON client has ListModelConcepts routes with users/… only
            r = stub.ListModelConcepts(service_pb2.ListModelConceptsRequest(model_id=GENERAL, per_page=3, **kw),
                                       metadata=MD)
            assert [c.name for c in r.concepts] == names[:3]


def test_json_channel(live, cat, cats, web):
    offline = next(tags for d, tags in cats if d == cat)
    for base in (live.base, live.base + "/"):  # a trailing slash makes the client send //v2/…
        _exercise(json_stub(base), cat, web, offline)


def test_grpc_channel(live, cat, cats, web):
    offline = next(tags for d, tags in cats if d == cat)
    _exercise(grpc_stub(live.grpc_port), cat, web, offline)


def test_real_signal_over_twenty_cats(live, cats):
    """One request with the 20 test cats: the answers equal the offline tagger's, and most say "cat"."""
    stub = json_stub(live.base)
    inputs = [resources_pb2.Input(id=f"cat{i}", data=resources_pb2.Data(image=resources_pb2.Image(base64=d)))
              for i, (d, _) in enumerate(cats)]
    r = stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(model_id=GENERAL, inputs=inputs), metadata=MD)
    assert r.status.code == sc.SUCCESS
    for out, (_, offline) in zip(r.outputs, cats, strict=True):
        assert [c.name for c in out.data.concepts] == [t.name for t in offline]
    first = [out.data.concepts[0].name for out in r.outputs]
    assert first.count("cat") >= 10, first


def test_python_sdk(live, cat, web):
    from clarifai.client.model import Model

    url = "https://clarifai.com/clarifai/main/models/general-image-recognition"
    base = f"http://127.0.0.1:{live.grpc_port}"
    model = Model(url=url, pat=KEY, base_url=base)
    r = model.predict_by_url(f"{web.base}/img/cat.jpg", input_type="image")
    assert r.status.code == sc.SUCCESS and r.outputs[0].data.concepts[0].name == "cat"
    r = model.predict_by_bytes(cat, input_type="image")
    assert r.outputs[0].data.concepts[0].name == "cat"
    # without input_type the SDK asks GetModel and GetModelType first
    model = Model(url=url, pat=KEY, base_url=base)
    r = model.predict_by_bytes(cat, output_config={"max_concepts": 3})
    assert len(r.outputs[0].data.concepts) == 3 and r.outputs[0].data.concepts[0].name == "cat"
    r = model.predict_by_bytes(cat, input_type="image", output_config={"select_concepts": [
        resources_pb2.Concept(name="dog"), resources_pb2.Concept(name="truck")]})
    assert sorted(c.name for c in r.outputs[0].data.concepts) == ["dog", "truck"]
    with pytest.raises(Exception, match="11008|API key is invalid"):  # the SDK raises on any non-10000
        Model(url=url, pat="wrong-pat", base_url=base).predict_by_bytes(cat, input_type="image")


def test_directus_tutorial_request(live, web, cat, cats):
    """The Webhook / Request URL operation of Directus's Clarifai tutorial, and its script's filter."""
    offline = next(tags for d, tags in cats if d == cat)
    url = f"{live.base}/v2/users/clarifai/apps/main/models/general-image-recognition/versions/{VERSION}/outputs"
    body = {"inputs": [{"data": {"image": {"url": f"{web.base}/assets/5f1c-uuid?access_token={web.token}"}}}]}
    r = httpx.post(url, content=json.dumps(body), headers={"Authorization": f"key {KEY}",
                                                             "Content-Type": "application/json"})
    assert r.status_code == 200
    data = r.json()
    # outputs[0].data.concepts.filter(c => c.value > 0.95).map(c => c.name)
    tags = [c["name"] for c in data["outputs"][0]["data"]["concepts"] if c["value"] > 0.95]
    assert tags == [t.name for t in offline if t.value > 0.95]
    assert tags[0] == "cat"  # the flow would tag the cat "cat"


def _node(*args: str) -> dict:
    out = subprocess.run(["node", str(JS_DIR / "predict.js"), *args], capture_output=True, text=True, timeout=60,
                         cwd=JS_DIR)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def npm_client():
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("the npm clarifai client test needs node and npm on PATH")
    if not (JS_DIR / "node_modules" / "clarifai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, capture_output=True,
                       timeout=300)
    return JS_DIR


def test_npm_client(npm_client, live, web, cat):
    # Clarifai.GENERAL_MODEL is the legacy id; the client posts to /v2/models/{id}/outputs
    r = _node(live.base, KEY, "GENERAL_MODEL", f"{web.base}/img/cat.jpg")
    assert r["ok"], r
    out = r["response"]["outputs"][0]
    assert out["data"]["concepts"][0]["name"] == "cat" and out["model"]["id"] == LEGACY
    r = _node(live.base, KEY, GENERAL, base64.b64encode(cat).decode(), json.dumps({"maxConcepts": 2}))
    assert r["ok"], r
    concepts = r["response"]["outputs"][0]["data"]["concepts"]
    assert len(concepts) == 2 and concepts[0]["name"] == "cat"
    r = _node(live.base, "wrong-key", GENERAL, f"{web.base}/img/cat.jpg")
    assert not r["ok"] and r["http_status"] == 401 and r["body"]["status"]["code"] == 11008


def test_npm_client_family_constants(npm_client, live, web):
    """The npm client's own constants for Clarifai's other public models reach their local stand-ins."""
    fields = {"COLOR_MODEL": "colors", "GENERAL_EMBED_MODEL": "embeddings", "NSFW_MODEL": "concepts",
              "MODERATION_MODEL": "concepts", "FOOD_MODEL": "concepts", "TRAVEL_MODEL": "concepts",
              "APPAREL_MODEL": "concepts", "WEDDINGS_MODEL": "concepts"}
    for constant, field in fields.items():
        r = _node(live.base, KEY, constant, f"{web.base}/img/cat.jpg")
        assert r["ok"], (constant, r)
        out = r["response"]["outputs"][0]
        assert out["status"]["code"] == 10000 and out["data"][field], (constant, out)
    r = _node(live.base, KEY, "MODERATION_MODEL", f"{web.base}/img/cat.jpg")
    names = {c["name"] for c in r["response"]["outputs"][0]["data"]["concepts"]}
    assert names == {"safe", "suggestive", "explicit", "drug", "gore"}


def _sdk_model(live, model_id: str):
    from clarifai.client.model import Model

    return Model(model_id=model_id, user_id="clarifai", app_id="main", pat=KEY,
                 base_url=f"http://127.0.0.1:{live.grpc_port}")


def _rest_concepts(live, model_id: str, image: bytes) -> list[tuple[str, float]]:
    """The same model asked over REST with plain JSON, not through the SDK."""
    r = httpx.post(f"{live.base}/v2/models/{model_id}/outputs", headers={"authorization": f"Key {KEY}"},
                   timeout=60, json={"inputs": [{"data": {"image": {"base64": base64.b64encode(image).decode()}}}],
                                     "model": {"output_info": {"output_config": {"max_concepts": 200}}}})
    return [(c["name"], c["value"]) for c in r.json()["outputs"][0]["data"]["concepts"]]


def test_python_sdk_family_models(live, cat, web, fixture_loaded):
    """The ``clarifai`` SDK calls the family by string and legacy ids; shapes and values are real."""
    import numpy as np
    from test_family import half_red_half_blue

    from localtag.core import family
    from localtag.core import vocab as vocab_mod
    from localtag.core.config import shipped

    r = _sdk_model(live, "color-recognition").predict_by_bytes(half_red_half_blue(), input_type="image")
    colors = r.outputs[0].data.colors
    assert [c.w3c.name for c in colors[:2]] in (["Red", "Blue"], ["Blue", "Red"]), colors
    assert sum(c.value for c in colors) == pytest.approx(1.0, abs=1e-5)
    assert [c.value for c in colors[:2]] == pytest.approx([0.5, 0.5], abs=0.05)

    cfg = {"max_concepts": 200, "min_value": 0}
    for key, legacy in (("nsfw", "e9576d86d2004ed1a38ba0cf39ecb4b1"), ("moderation", "d16f390eb32cad478c7ae150069bd2c6")):
        m = family.by_id(key)
        assert m.legacy_id == legacy
        answers = [[(c.name, c.value) for c in _sdk_model(live, mid).predict_by_bytes(
            cat, input_type="image", output_config=cfg).outputs[0].data.concepts] for mid in (m.id, legacy)]
        assert answers[0] == answers[1]  # one model under two ids
        assert {n for n, _ in answers[0]} == {c.name for c in vocab_mod.load(shipped(m.vocab))}
        assert sum(v for _, v in answers[0]) == pytest.approx(1.0, abs=1e-4)  # single-label
        assert answers[0] == [(n, pytest.approx(v, abs=1e-6)) for n, v in _rest_concepts(live, m.id, cat)]

    food = family.by_id("food")
    by_string = _sdk_model(live, "food-item-recognition").predict_by_url(
        f"{web.base}/img/cat.jpg", input_type="image", output_config=cfg).outputs[0].data.concepts
    by_legacy = _sdk_model(live, "bd367be194cf45149e75f01d59f77ba7").predict_by_bytes(
        cat, input_type="image", output_config=cfg).outputs[0].data.concepts
    assert [(c.name, c.value) for c in by_string] == [(c.name, c.value) for c in by_legacy]
    assert {c.name for c in by_string} == {c.name for c in vocab_mod.load(shipped(food.vocab))}
    assert [(c.name, c.value) for c in by_string] == [(n, pytest.approx(v, abs=1e-6))
                                                        for n, v in _rest_concepts(live, food.id, cat)]

    offline = fixture_loaded.encoder.embed([decode.decode(cat)])[0]
    for mid in ("general-image-embedding", "bbb5f41425b8468d9b7a554ff10f8581"):
        (emb,) = _sdk_model(live, mid).predict_by_bytes(cat, input_type="image").outputs[0].data.embeddings
        vec = np.array(emb.vector)
        assert emb.num_dimensions == vec.size == offline.size
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
        assert vec == pytest.approx(offline, abs=1e-4) and float(vec @ offline) >= 0.9999


def test_python_sdk_workflow(live, cat, tmp_path):
    """The SDK makes a workflow from its YAML (App.create_workflow: GetModel per node, then PostWorkflows)
    and runs it (Workflow.predict_by_bytes: PostWorkflowResults): one output per node, in node order."""
    from clarifai.client.app import App
    from clarifai.client.workflow import Workflow
    from test_family import half_red_half_blue

    base = f"http://127.0.0.1:{live.grpc_port}"
    nodes = [("concepts", GENERAL), ("colours", "color-recognition"), ("safety", "e9576d86d2004ed1a38ba0cf39ecb4b1")]
    (tmp_path / "wf.yml").write_text("workflow:\n  id: sdk-three\n  nodes:\n" + "".join(
        f"    - id: {nid}\n      model:\n        model_id: {mid}\n"
        for nid, mid in nodes))
    app = App(app_id="main", user_id="clarifai", pat=KEY, base_url=base)
    app.create_workflow(config_filepath=str(tmp_path / "wf.yml"), display=False)
    wf = Workflow(workflow_id="sdk-three", user_id="clarifai", app_id="main", pat=KEY, base_url=base)
    for image in (cat, half_red_half_blue()):
        r = wf.predict_by_bytes(image, input_type="image")
        assert r.status.code == sc.SUCCESS and len(r.results) == 1
        general, colours, nsfw = r.results[0].outputs
        assert [o.model.id for o in r.results[0].outputs] == [mid for _, mid in nodes]
        assert general.data.concepts and not general.data.colors
        assert sum(c.value for c in colours.data.colors) == pytest.approx(1.0, abs=1e-5)
        assert {c.name for c in nsfw.data.concepts} == {"sfw", "nsfw"}
        assert sum(c.value for c in nsfw.data.concepts) == pytest.approx(1.0, abs=1e-4)
    assert r.results[0].outputs[1].data.colors[0].w3c.name in ("Red", "Blue")
    first = wf.predict_by_bytes(cat, input_type="image").results[0].outputs[0].data.concepts[0]
    assert first.name == "cat"
    # the built-in public workflow, found by URL as the SDK's docs show it
    general = Workflow(url="https://clarifai.com/clarifai/main/workflows/General", pat=KEY, base_url=base)
    tags, embedding = general.predict_by_bytes(cat, input_type="image").results[0].outputs
    assert tags.data.concepts[0].name == "cat" and embedding.data.embeddings[0].num_dimensions == 64
