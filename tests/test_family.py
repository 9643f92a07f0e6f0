"""Clarifai's public model family answered locally, through the official clarifai-grpc clients (JSON and
gRPC) against a live server with the CIFAR fixture model: concept models from their own vocabularies,
the embedding (equal to ``localtag embed``), colours from pixels, ``ListModels`` and output_info."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from live_server import LiveServer
from PIL import Image
from pydantic import SecretStr

from localtag.core import family
from localtag.core import vocab as vocab_mod
from localtag.core.config import Settings, shipped

ROOT = Path(__file__).resolve().parents[1]
KEY = "family-key-5678"
MD = (("authorization", f"Key {KEY}"),)


def half_red_half_blue(fmt: str = "PNG", mode: str = "RGB") -> bytes:
    a = np.zeros((60, 120, 3), np.uint8)
    a[:, :60] = (255, 0, 0)
    a[:, 60:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat(cifar_test) -> bytes:
    return cifar_test["cat"][0].read_bytes()


@pytest.fixture(scope="module")
def live(fixture_model, fixture_loaded, cache_dir):
    s = Settings(model=str(fixture_model), cache_dir=cache_dir, device="cpu", api_keys=[SecretStr(KEY)], grpc_port=0)
    with LiveServer(s, fixture_loaded) as server:
        yield server


@pytest.fixture(scope="module", params=["json", "grpc"])
def stub(request, live):
    if request.param == "json":
        return service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=live.base))
    return service_pb2_grpc.V2Stub(ClarifaiChannel.get_insecure_grpc_channel(base="127.0.0.1", port=live.grpc_port))


def predict(stub, model_id: str, *images: bytes, max_concepts: int = 0):
    cfg = resources_pb2.OutputConfig(max_concepts=max_concepts)
    return stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(
        model_id=model_id, model=resources_pb2.Model(output_info=resources_pb2.OutputInfo(output_config=cfg)),
        inputs=[resources_pb2.Input(data=resources_pb2.Data(image=resources_pb2.Image(base64=b))) for b in images]),
        metadata=MD)


def test_color_model_half_red_half_blue(stub):
    for model_id in ("color-recognition", "eeed0b6733a644cea07cf4c60f87ebb7"):
        for img in (half_red_half_blue(), half_red_half_blue("JPEG"), half_red_half_blue("PNG", "RGBA"),
                    half_red_half_blue("TIFF", "CMYK")):
            r = predict(stub, model_id, img)
            assert r.status.code == sc.SUCCESS, r.status
            colors = r.outputs[0].data.colors
            assert {c.w3c.name for c in colors[:2]} == {"Red", "Blue"}, colors
            assert sum(c.value for c in colors) == pytest.approx(1.0, abs=1e-5)
            assert abs(colors[0].value - 0.5) < 0.1 and colors[0].raw_hex.startswith("#")
            assert r.outputs[0].model.id == model_id


@pytest.mark.parametrize("key", ["nsfw", "moderation", "food", "travel", "apparel", "weddings", "textures",
                                 "landscape-quality", "portrait-quality"])
def test_concept_models_answer_from_their_own_vocabularies(stub, cat, key):
    m = family.by_id(key)
    names = {c.name for c in vocab_mod.load(shipped(m.vocab))}
    for model_id in (m.id, m.legacy_id):
        r = predict(stub, model_id, cat, half_red_half_blue(), max_concepts=200)
        assert r.status.code == sc.SUCCESS, r.status
        for out in r.outputs:
            got = [c.name for c in out.data.concepts]
            assert set(got) == names, (key, got)  # every concept of its vocabulary, nothing else
            values = [c.value for c in out.data.concepts]
            assert values == sorted(values, reverse=True)
            if m.scoring == "softmax":  # single-label
                assert sum(values) == pytest.approx(1.0, abs=1e-4)
        # the model sees the image: two different pictures do not get the same values
        assert [c.value for c in r.outputs[0].data.concepts] != [c.value for c in r.outputs[1].data.concepts]


def test_embedding_equals_localtag_embed(stub, cat, fixture_model, cache_dir, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(cat)
    out = tmp_path / "e.npy"
    r = subprocess.run([sys.executable, "-m", "localtag", "embed", str(tmp_path / "cat.jpg"), "-o", str(out),
                        "--model", str(fixture_model), "--cache-dir", str(cache_dir), "--no-cache"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    offline = np.load(out)[0]
    for model_id in ("general-image-embedding", "bbb5f41425b8468d9b7a554ff10f8581"):
        resp = predict(stub, model_id, cat)
        assert resp.status.code == sc.SUCCESS, resp.status
        (emb,) = resp.outputs[0].data.embeddings
        vec = np.array(emb.vector, dtype=np.float64)
        assert emb.num_dimensions == vec.size == offline.size == 64
        cos = float(vec @ offline / np.linalg.norm(vec) / np.linalg.norm(offline))
        assert cos >= 0.9999, cos


def test_list_models_and_output_info(stub):
    r = stub.ListModels(service_pb2.ListModelsRequest(), metadata=MD)
    assert r.status.code == sc.SUCCESS, r.status
    ids = [m.id for m in r.models]
    assert ids[0] == "general-image-recognition" and set(ids) >= {m.id for m in family.FAMILY}
    for m in family.FAMILY:
        info = stub.GetModelOutputInfo(service_pb2.GetModelRequest(model_id=m.legacy_id), metadata=MD)
        assert info.status.code == sc.SUCCESS, (m.id, info.status)
        assert info.model.model_type_id == m.model_type_id
        if m.vocab:
            assert {c.name for c in info.model.output_info.data.concepts} == {
                c.name for c in vocab_mod.load(shipped(m.vocab))}
    missing = stub.GetModel(service_pb2.GetModelRequest(model_id="no-such-model"), metadata=MD)
    assert missing.status.code == sc.MODEL_DOES_NOT_EXIST


def test_image_properties(stub):
    a = np.zeros((60, 120, 3), np.uint8)
    a[:, 60:] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    r = predict(stub, "image-properties", buf.getvalue(), half_red_half_blue())
    assert r.status.code == sc.SUCCESS, r.status
    bw, rb = (dict(o.data.metadata) for o in r.outputs)
    assert bw["brightness"] == pytest.approx(0.5, abs=0.02) and bw["contrast"] == pytest.approx(1.0, abs=0.01)
    assert {c["name"] for c in bw["simplified_colors"]} == {"black", "white"}
    assert {c["name"] for c in rb["simplified_colors"]} == {"red", "blue"}
    assert sum(c["value"] for c in rb["simplified_colors"]) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= rb["sharpness"] <= 1.0 and rb["contrast"] < bw["contrast"]
