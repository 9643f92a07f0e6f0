"""Custom models' logic (localtag.app.models) over a real app store with synthetic embeddings: statuses,
training errors, kept versions, the head file format and the CLIP-model guard (no server, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from localtag.app.api import ApiError
from localtag.app.models import ModelsApi
from localtag.app.store import AppStore, NewInput
from localtag.core import clarifai, learn

APP = "me/pics"
KEY = "sha-a|pre|fp32|cpu"


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def api(tmp_path) -> ModelsApi:
    """12 inputs near direction 0 annotated boat = 1, 12 elsewhere annotated boat = 0, one cat = 1 alone."""
    rng = np.random.default_rng(0)
    store = AppStore(tmp_path / "apps")
    axis = np.eye(16, dtype=np.float32)[0]
    news = []
    for i in range(24):
        pos = i < 12
        emb = _unit(rng.normal(size=16) * 0.5 + (3 * axis if pos else 0))
        news.append(NewInput(f"in-{i}", url=f"http://x/{i}.jpg", concepts={"boat": 1 if pos else 0}, embedding=emb))
    news.append(NewInput("lonely", url="http://x/l.jpg", concepts={"cat": 1}, embedding=_unit(rng.normal(size=16))))
    store.add(APP, news, KEY)
    return ModelsApi(store, KEY, "sha-a", "model-a")


def _model(api: ModelsApi, mid: str, concepts: list[str]) -> tuple[int, dict]:
    return api.post_models(APP, {"model": {"id": mid, "model_type_id": "embedding-classifier",
                                           "output_info": {"data": {"concepts": [{"id": c} for c in concepts]}}}})


def test_post_models_checks_what_it_is_given(api):
    assert _model(api, "m", [])[1]["status"]["code"] == clarifai.MODEL_INVALID_ARGUMENT
    http, body = api.post_models(APP, {"model": {"id": "m", "model_type_id": "visual-detector", "output_info": {
        "data": {"concepts": [{"id": "boat"}]}}}})
    assert http == 400 and "embedding-classifier" in body["status"]["details"]
    http, body = api.post_models(APP, {"model": {"id": "m", "output_info": {"data": {"concepts": 5}}}})
    assert body["status"]["code"] == clarifai.MODEL_INVALID_ARGUMENT
    http, body = api.post_models(APP, {"model": {"id": "m", "output_info": {
        "data": {"concepts": [{"id": "boat"}]}, "output_config": {"min_value": "high"}}}})
    assert http == 400 and "min_value" in body["status"]["details"]
    http, body = _model(api, "m", ["boat"])
    assert http == 200 and body["model"]["model_type_id"] == "embedding-classifier"
    assert "model_version" not in body["model"]  # no version yet
    assert _model(api, "m", ["boat"])[0] == 409


def test_a_version_is_queued_then_trained_and_kept(api, tmp_path):
    _model(api, "boats", ["boat"])
    (http, body), vid = api.post_version(APP, "boats", {})
    assert http == 200 and body["model"]["model_version"]["status"]["code"] == clarifai.MODEL_QUEUED_FOR_TRAINING
    with pytest.raises(ApiError) as e:
        api.head(APP, "boats")
    assert e.value.code == clarifai.MODEL_UNTRAINED
    assert api.train(APP, "boats", vid) == clarifai.MODEL_TRAINED
    v = api.get_version(APP, "boats", vid)[1]["model_version"]
    assert v["status"]["code"] == clarifai.MODEL_TRAINED and v["total_input_count"] == 24
    head, _, version = api.head(APP, "boats")
    assert head.names == ["boat"] and version["id"] == vid
    # the head file is the format `--model-head` reads, with the CLIP model it was trained on
    loaded = learn.load(api.models.heads / version["head"])
    assert loaded.model_sha256 == "sha-a" and loaded.names == ["boat"]
    ids, mat = api.store.matrix(APP, KEY)
    values = head.values(mat)[:, 0]
    pos = np.array([i.startswith("in-") and int(i[3:]) < 12 for i in ids])
    assert values[pos].min() > values[~pos & (np.array(ids) != "lonely")].max()
    (_, _), v2 = api.post_version(APP, "boats", {})
    api.train(APP, "boats", v2)
    listed = api.list_versions(APP, "boats")[1]["model_versions"]
    assert [x["id"] for x in listed] == [v2, vid]
    assert api.head(APP, "boats", vid)[2]["id"] == vid and api.head(APP, "boats")[2]["id"] == v2
    # another CLIP model (another embedding space) refuses the model
    other = ModelsApi(api.store, "sha-b|pre|fp32|cpu", "sha-b", "model-b")
    with pytest.raises(ApiError) as e:
        other.head(APP, "boats")
    assert e.value.code == clarifai.MODEL_INVALID_ARGUMENT and "learn it again" in e.value.details
    # delete: the model, its versions and head files
    folder = api.models.head_dir(APP, "boats")
    assert len(list(folder.glob("*.npz"))) == 2
    assert api.delete_model(APP, "boats")[0] == 200 and not folder.exists()
    assert api.get_model(APP, "boats")[1]["status"]["code"] == clarifai.MODEL_DOES_NOT_EXIST


@pytest.mark.parametrize(("concepts", "code", "words"), [
    (["nothing"], clarifai.MODEL_TRAINING_NO_DATA, "no input of app 'me/pics' is annotated with 'nothing'"),
    (["cat"], clarifai.MODEL_TRAINING_INSUFFICIENT_DATA, "'cat' has 1 positive and 0 negative examples"),
])
def test_too_little_data_is_a_clear_status(api, concepts, code, words):
    _model(api, "m", concepts)
    (_, _), vid = api.post_version(APP, "m", {})
    assert api.train(APP, "m", vid) == code
    status = api.get_version(APP, "m", vid)[1]["model_version"]["status"]
    assert status["code"] == code and words in status["details"]
    with pytest.raises(ApiError) as e:
        api.head(APP, "m", vid)
    assert e.value.code == clarifai.MODEL_UNTRAINED and "not trained" in e.value.details


def test_a_concept_with_negatives_only_has_no_positives(api):
    api.store.patch(APP, "in-0", concepts={"gull": 0})
    _model(api, "m", ["boat", "gull"])
    (_, _), vid = api.post_version(APP, "m", {})
    assert api.train(APP, "m", vid) == clarifai.MODEL_TRAINING_NO_POSITIVES
    assert "'gull'" in api.get_version(APP, "m", vid)[1]["model_version"]["status"]["details"]
