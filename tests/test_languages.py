"""Clarifai's 23 languages: vocab.txt's lang.XX columns, language=… over the official JSON client, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from clarifai_grpc.channel.clarifai_channel import ClarifaiChannel
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2 as sc
from conftest import tag_images
from live_server import LiveServer
from pydantic import SecretStr

from localtag.core import decode, languages
from localtag.core import vocab as vocab_mod
from localtag.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
KEY = "lang-key-1234"
MD = (("authorization", f"Key {KEY}"),)


def test_shipped_vocab_names_every_concept_in_23_languages():
    v = vocab_mod.load(ROOT / "localtag" / "data" / "vocab.txt")
    for code in languages.LANGUAGES:
        named = sum(1 for c in v if code == "en" or code in c.names)
        assert named / len(v) >= 0.99, (code, named, len(v))
        shown = [c.display(code) for c in v]
        assert len({s.casefold() for s in shown}) == len(shown), code  # no two concepts share a name
    cat = v[v.index("cat")]
    assert (cat.display("de"), cat.display("zh-TW"), cat.display("zh"), cat.display("fr")) == ("Katze", "貓", "猫", "chat")


def test_build_vocab_check_passes_and_reports_coverage():
    r = subprocess.run([sys.executable, "tools/vocab/build_vocab.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "zh-TW   3604/3604 (100.0 %)" in r.stdout and "\nOK\n" in r.stdout and "ERROR" not in r.stdout
    assert "moderation.txt: 5 concepts, named in 22/22 languages" in r.stdout


def test_coverage_check_fails_below_99_percent(tmp_path):
    sys.path.insert(0, str(ROOT / "tools" / "vocab"))
    try:
        import build_vocab
    finally:
        sys.path.pop(0)
    names = {f"c{i}": f"n{i}" for i in range(98)}
    problems = build_vocab.coverage_problems({code: names for code in build_vocab.LANGUAGES}, 100)
    assert len(problems) == 22 and "98/100" in problems[0]
    dup = build_vocab.coverage_problems({"de": {"a": "X", "b": "x"}}, 2)
    assert any("share the name" in p for p in dup)


def test_display_names_do_not_change_the_text_embedding_key(fixture_model):
    """Translations must not invalidate stored text embeddings: the key hashes names, synonyms, prompts."""
    plain = vocab_mod.parse("cat | syn=kitty\ndog\n")
    translated = vocab_mod.parse("cat | syn=kitty | lang.de=Katze | lang.fr=chat\ndog | lang.de=Hund\n")
    assert plain.sha256 == translated.sha256
    assert vocab_mod.parse("cat | syn=kitten\ndog\n").sha256 != plain.sha256


def test_unknown_language_setting_is_refused():
    assert Settings(language="zh_tw").language == "zh-TW"
    assert Settings(directus_language="de-AT").directus_language == "de"
    with pytest.raises(ValueError, match="not one of"):
        Settings(language="klingon")


@pytest.fixture(scope="module")
def cat(cifar_test, fixture_loaded) -> bytes:
    data = [p.read_bytes() for p in cifar_test["cat"]]
    tags = tag_images(fixture_loaded, [decode.decode(d) for d in data])
    return next(d for d, t in zip(data, tags, strict=True) if t[0].name == "cat" and t[0].value > 0.9)


@pytest.fixture(scope="module")
def live(fixture_model, fixture_loaded, cache_dir):
    s = Settings(model=str(fixture_model), cache_dir=cache_dir, device="cpu", api_keys=[SecretStr(KEY)])
    with LiveServer(s, fixture_loaded) as server:
        yield server


def _predict(stub, cat: bytes, language: str, model_id: str = "general-image-recognition"):
    cfg = resources_pb2.OutputConfig(language=language, max_concepts=3)
    model = resources_pb2.Model(output_info=resources_pb2.OutputInfo(output_config=cfg))
    return stub.PostModelOutputs(service_pb2.PostModelOutputsRequest(
        model_id=model_id, model=model,
        inputs=[resources_pb2.Input(data=resources_pb2.Data(image=resources_pb2.Image(base64=cat)))]), metadata=MD)


def test_language_de_names_cat_katze_through_the_json_client(live, cat):
    stub = service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=live.base))
    r = _predict(stub, cat, "de")
    assert r.status.code == sc.SUCCESS, r.status
    assert r.outputs[0].data.concepts[0].name == "Katze"
    assert _predict(stub, cat, "zh-TW").outputs[0].data.concepts[0].name == "貓"
    assert _predict(stub, cat, "").outputs[0].data.concepts[0].name == "cat"
    bad = _predict(stub, cat, "xx")
    assert bad.status.code == sc.MODEL_INVALID_ARGUMENT and "xx" in bad.status.details
    raw = httpx.post(f"{live.base}/v2/models/general-image-recognition/outputs", json={
        "inputs": [{"data": {"image": {"url": "http://127.0.0.1:9/x.jpg"}}}],
        "model": {"output_info": {"output_config": {"language": "klingon"}}}}, headers={"authorization": f"Key {KEY}"})
    assert raw.status_code == 400 and raw.json()["status"]["code"] == 21202


def test_tag_cli_language(fixture_model, cache_dir, cat, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(cat)
    r = subprocess.run([sys.executable, "-m", "localtag", "tag", str(tmp_path / "cat.jpg"), "--json",
                        "--model", str(fixture_model), "--cache-dir", str(cache_dir), "--language", "de",
                        "--max-concepts", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["outputs"][0]["data"]["concepts"][0]["name"] == "Katze"
    bad = subprocess.run([sys.executable, "-m", "localtag", "tag", str(tmp_path / "cat.jpg"), "--language", "xx",
                          "--model", str(fixture_model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not one of" in bad.stderr


def test_family_vocabularies_are_named_in_23_languages():
    from localtag.core.config import shipped
    from localtag.core.family import shipped_vocabularies

    for name in shipped_vocabularies():
        v = vocab_mod.load(shipped(name))
        for code in languages.LANGUAGES:
            shown = [c.display(code) for c in v]
            assert code == "en" or all(code in c.names for c in v), (name, code)
            assert len({s.casefold() for s in shown}) == len(shown), (name, code)
    mod = vocab_mod.load(shipped("moderation.txt"))
    assert mod[mod.index("safe")].display("de") == "unbedenklich"  # not vocab.txt's safe (a strongbox)


def test_nsfw_model_answers_in_german(live, cat):
    stub = service_pb2_grpc.V2Stub(ClarifaiChannel.get_json_channel(base_url=live.base))
    r = _predict(stub, cat, "de", model_id="nsfw-recognition")
    assert r.status.code == sc.SUCCESS, r.status
    assert {c.name for c in r.outputs[0].data.concepts} == {"jugendfrei", "nicht jugendfrei"}
