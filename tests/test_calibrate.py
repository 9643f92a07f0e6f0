"""Calibration: Platt fits with known answers, the file beside the vocabulary, its matching rules,
the Tagger using it, and `localtag calibrate` improving the calibration error on held-out data."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import CIFAR_CLASSES

from localtag import cli
from localtag.core import calibrate as cal
from localtag.core import vocab as vocab_mod
from localtag.core.config import Settings
from localtag.core.evaluate import expected_calibration_error
from localtag.core.loader import load
from localtag.core.models import ModelStore


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _synthetic(n=40000, a=(2.0, 0.5), b=(-1.0, 1.0), seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, len(a)))
    y = rng.random((n, len(a))) < _sigmoid(z * np.array(a) + np.array(b))
    return z, y


def test_platt_recovers_known_parameters():
    z, y = _synthetic()
    a, b = cal.platt(z, y)
    assert a == pytest.approx([2.0, 0.5], abs=0.1)  # ~3 standard errors
    assert b == pytest.approx([-1.0, 1.0], abs=0.1)
    # calibrated values match the true probabilities; the raw sigmoid(z) does not
    z2, y2 = _synthetic(seed=1)
    assert expected_calibration_error(_sigmoid(z2 * a + b), y2) < 0.02
    assert expected_calibration_error(_sigmoid(z2), y2) > 0.05


def test_fit_uses_the_global_map_for_concepts_with_few_labels():
    z, y = _synthetic(n=400)
    z = np.c_[z, z[:, 0]]
    y = np.c_[y, np.zeros(400, dtype=bool)]
    y[:3, 2] = True  # 3 positives < min_labels
    f = cal.fit(z, y, min_labels=5)
    assert f.fitted.tolist() == [True, True, False]
    assert (f.a[2], f.b[2]) == (f.global_a, f.global_b)
    assert f.positives.tolist() == [int(y[:, 0].sum()), int(y[:, 1].sum()), 3]
    with pytest.raises(ValueError, match="positive and negative"):
        cal.fit(z, np.zeros_like(y))


def test_fit_never_reverses_a_ranking():
    # scores that fall as the label becomes likelier (a model with no useful signal): the maps stay
    # increasing, so every concept keeps the order (and AP) of its scores, and values become the base rate
    z, y = _synthetic(n=2000, a=(-1.0, -0.5), b=(-2.0, -2.0))
    f = cal.fit(z, y)
    assert (f.a > 0).all() and not f.fitted.any()
    values = _sigmoid(z * f.a + f.b)
    assert values.mean() == pytest.approx(y.mean(), abs=0.01)
    assert (np.argsort(values[:, 0], kind="stable") == np.argsort(z[:, 0], kind="stable")).all()


@pytest.fixture()
def stored(random_store, tmp_path):
    """A calibration file beside a vocabulary in tmp_path, for the tiny-random model."""
    info = ModelStore(random_store).resolve("tiny-random")
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("cat | syn=kitty\ndog\ncar\n")
    vocab = vocab_mod.load(vocab_file)
    z, y = _synthetic(n=500)
    f = cal.fit(z, y)
    doc = cal.to_json(f, np.array([0, 1]), vocab, info, scoring="binary", templates=None)
    path = cal.save(doc, cal.path_for(vocab_file, info.sha256))
    return info, vocab_file, f, path


def test_file_beside_vocab_and_matching(stored):
    info, vocab_file, f, path = stored
    assert path == vocab_file.parent / f"vocab.txt.calibration.{info.sha256[:16]}.json"
    c = cal.find_for(vocab_mod.load(vocab_file), info)
    assert c is not None and c.own == 2 and c.path == path
    z = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(c.apply(z), [[f.a[0] * 1.0 + f.b[0], f.a[1] * -2.0 + f.b[1],
                                             f.global_a * 0.5 + f.global_b]], atol=1e-5)
    # another model's weights: not used
    assert cal.find_for(vocab_mod.load(vocab_file), dataclasses.replace(info, sha256="0" * 64)) is None
    # a vocabulary with other concept ids beside the same file name: not used
    vocab_file.write_text("tree\nhouse\n")
    assert cal.find_for(vocab_mod.load(vocab_file), info) is None
    # an edited concept (new synonym → new prompts) falls back to the global map; a new one too
    vocab_file.write_text("cat | syn=kitty, house cat\ndog\ncar\nbus\n")
    c = cal.find_for(vocab_mod.load(vocab_file), info)
    assert c.own == 1
    assert c.a.tolist() == pytest.approx([f.global_a, f.a[1], f.global_a, f.global_a])
    # a corrupt file is ignored with a warning, never an error
    path.write_text("{not json")
    assert cal.find_for(vocab_mod.load(vocab_file), info) is None
    path.write_text(json.dumps({"format": "something-else"}))
    assert cal.find_for(vocab_mod.load(vocab_file), info) is None


def test_tagger_uses_the_calibration(stored, coco_images, tmp_path):
    from PIL import Image

    info, vocab_file, f, _ = stored
    settings = Settings(model=str(info.path), vocab=vocab_file, cache_dir=tmp_path / "c", device="cpu")
    tagger, encoder = load(settings)
    assert tagger.calibration is not None
    emb = encoder.embed([Image.open(p).convert("RGB") for p in coco_images[:4]])
    z = tagger.logits(emb)
    expected = _sigmoid(z * np.r_[f.a, f.global_a] + np.r_[f.b, f.global_b])
    np.testing.assert_allclose(tagger.values(emb), expected, atol=1e-5)
    np.testing.assert_allclose(tagger.logits_to_values(z, None), _sigmoid(z), atol=1e-5)
    # fitted for the binary scoring: not applied to another
    soft = load(Settings(model=str(info.path), vocab=vocab_file, cache_dir=tmp_path / "c", device="cpu",
                         scoring="softmax")).tagger
    assert soft.calibration is None


def test_calibrate_improves_ece_on_heldout_fixture_data(fixture_model, cifar_test, tmp_path, capsys):
    root = cifar_test["cat"][0].parents[2]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,labels\n" + "".join(f"{p.relative_to(root).as_posix()},{cls}\n"
                                                for cls in CIFAR_CLASSES for p in cifar_test[cls]))
    vocab = tmp_path / "vocab.txt"
    shutil.copy(fixture_model / "vocab.txt", vocab)
    common = [str(root), "--labels", str(labels), "--model", str(fixture_model), "--vocab", str(vocab),
              "--cache-dir", str(tmp_path / "c"), "--device", "cpu", "--json"]
    assert cli.main(["calibrate", *common, "--holdout", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 70 <= out["heldout_images"] <= 130 and out["fit_images"] + out["heldout_images"] == 200
    before, after = out["before"]["ece"], out["after"]["ece"]
    assert after < before * 0.75, (before, after)
    assert out["after"]["map"] == pytest.approx(out["before"]["map"], abs=0.02)  # monotone per concept
    path = cal.path_for(vocab, ModelStore(fixture_model.parent).resolve(str(fixture_model)).sha256)
    assert out["calibration"] == str(path) and path.is_file()
    doc = json.loads(path.read_text())
    assert doc["labels"]["images"] == 200 and len(doc["concepts"]) == 10
    assert all("a" in c for c in doc["concepts"])  # 20 positives each: every concept has its own map

    # eval finds it beside the vocabulary and reports the calibrated values (from the cache: no encoding)
    assert cli.main(["eval", *common]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["calibration"] == str(path) and calibrated["encoded"] == 0
    assert cli.main(["eval", *common, "--no-calibration"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["calibration"] is None and calibrated["ece"] < raw["ece"]
