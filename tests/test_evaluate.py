"""Metrics on hand-made cases with known answers, the labels file, and `localtag eval` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CIFAR_CLASSES

from localtag import cli
from localtag.core import labels as labels_file
from localtag.core import vocab as vocab_mod
from localtag.core.evaluate import (
    average_precision,
    expected_calibration_error,
    label_matrix,
    mean_average_precision,
    prf_at,
    reliability,
    topk_accuracy,
)

# -- metrics ---------------------------------------------------------------------------------------


def test_average_precision_of_known_rankings():
    s = [0.9, 0.8, 0.7, 0.6]
    assert average_precision(s, [1, 0, 1, 0]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision(s, [0, 1, 0, 1]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(s, [1, 1, 0, 0]) == pytest.approx(1.0)
    assert average_precision(s, [0, 0, 0, 1]) == pytest.approx(0.25)
    # tied scores are one threshold: {.5,.5,.5} holds 1 of 3 positives, then .1 adds the second
    assert average_precision([0.5, 0.5, 0.5, 0.1], [1, 0, 0, 1]) == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))
    assert np.isnan(average_precision(s, [0, 0, 0, 0]))


def test_map_skips_concepts_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.2], [0.1, 0.9, 0.1]])
    labels = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=bool)
    # column 0: positive ranked first → 1.0; column 1: positive first → 1.0; column 2 has none
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)
    labels[1, 0] = False
    labels[0, 0] = False
    labels[2, 0] = True  # column 0's only positive is ranked last of three → 1/3
    assert mean_average_precision(scores, labels) == pytest.approx((1 / 3 + 1.0) / 2)


def test_topk_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.3, 0.3, 0.9], [0.2, 0.3, 0.1]])
    labels = np.array([[0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)  # row 3 has no label
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(3 / 3)  # row 2: 0.3 ties 0.3, first column wins
    multi = np.array([[0, 1, 1]], dtype=bool)
    assert topk_accuracy(np.array([[0.9, 0.5, 0.1]]), multi, 1) == 0.0
    assert topk_accuracy(np.array([[0.9, 0.5, 0.1]]), multi, 2) == 1.0


def test_expected_calibration_error_of_a_known_binning():
    # two bins: [0, .5) holds .1, .1 with one positive (|.5 − .1| = .4), [.5, 1] holds .9, .9, both positive (.1)
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    # values that equal the positive rate of their bin: no error; 1.0 falls in the last bin
    p = np.array([0.25, 0.25, 0.25, 0.25, 1.0])
    y = np.array([1, 0, 0, 0, 1])
    assert expected_calibration_error(p, y, bins=10) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([[0.8, 0.8], [0.8, 0.8]]), np.zeros((2, 2)), bins=15) == pytest.approx(0.8)
    bins = reliability(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1]), bins=2)
    assert bins == [{"lo": 0.0, "hi": 0.5, "n": 2, "value": pytest.approx(0.1), "positive": 0.5},
                    {"lo": 0.5, "hi": 1.0, "n": 2, "value": pytest.approx(0.9), "positive": 1.0}]


def test_precision_recall_f1_at_thresholds():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.8, 0.3]])
    labels = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=bool)
    r = prf_at(scores, labels, np.array([0.5, 0.5]))
    # column 0: predicted rows 0, 1, 3 → tp 2, fp 1, fn 1; column 1: row 1 → tp 1
    assert r["precision"] == pytest.approx([2 / 3, 1.0])
    assert r["recall"] == pytest.approx([2 / 3, 1.0])
    assert r["f1"] == pytest.approx([2 / 3, 1.0])
    assert r["micro"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4})
    assert r["macro"]["f1"] == pytest.approx((2 / 3 + 1) / 2)
    r = prf_at(scores, labels, np.array([0.85, 0.5]))  # per-concept thresholds
    assert r["precision"][0] == 1.0 and r["recall"][0] == pytest.approx(1 / 3)


# -- labels ----------------------------------------------------------------------------------------


def test_read_labels(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text('path,labels\na/1.jpg,cat\n"b,2.jpg",dog; Cat \n# skipped,x\n/abs/3.jpg,\na/1.jpg,pet;cat\n\n')
    rows = labels_file.read(f, tmp_path / "root")
    assert rows == [(tmp_path / "root" / "a/1.jpg", ["cat", "pet"]),
                    (tmp_path / "root" / "b,2.jpg", ["dog", "Cat"]),
                    (Path("/abs/3.jpg"), [])]
    f.write_text("x.jpg,cat\n")  # no header
    assert labels_file.read(f, tmp_path) == [(tmp_path / "x.jpg", ["cat"])]
    f.write_text("x.jpg,cat,dog\n")
    with pytest.raises(ValueError, match="expected 'path,labels'"):
        labels_file.read(f, tmp_path)


def test_label_matrix_merges_synonyms_and_adds_ancestors(tmp_path):
    v = vocab_mod.parse("animal\ncat | syn=kitty | parents=animal\ndog | parents=animal\ncar\n")
    rows = [(tmp_path / "1", ["Kitty"]), (tmp_path / "2", ["dog", "unicorn"]), (tmp_path / "3", ["car", "cat"])]
    y, concepts, unknown = label_matrix(rows, v)
    assert y.tolist() == [[True, True, False, False], [True, False, True, False], [True, True, False, True]]
    assert concepts.tolist() == [1, 2, 3]  # animal is never named: it is not an evaluated concept
    assert unknown == {"unicorn": 1}
    y, _, _ = label_matrix(rows, v, expand_parents=False)
    assert not y[:, 0].any()


# -- localtag eval ---------------------------------------------------------------------------------


def _write_cifar_labels(root, cifar_test, per_class=6, extra=""):
    lines = ["path,labels"]
    for cls in CIFAR_CLASSES:
        for p in cifar_test[cls][:per_class]:
            lines.append(f"{p.relative_to(root).as_posix()},{cls}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n" + extra)
    return root / "labels.csv"


def test_eval_cli_single_label_and_cache_reuse(fixture_model, fixture_loaded, cifar_test, tmp_path, capsys):
    from PIL import Image

    root = cifar_test["cat"][0].parents[2]
    labels = tmp_path / "labels.csv"
    shutil.copy(_write_cifar_labels(root, cifar_test, extra="test/cat/missing.jpg,cat\n"), labels)
    cache = tmp_path / "cache"
    args = ["eval", str(root), "--labels", str(labels), "--model", str(fixture_model), "--cache-dir", str(cache),
            "--device", "cpu", "--json", "--no-calibration"]
    assert cli.main(args) == 1  # the missing image fails; the other 60 are evaluated
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "single-label" and out["images"] == 60 and out["failed"] == 1
    assert out["encoded"] == 60 and out["cached"] == 0 and out["concepts"] == 10

    # the same top-1 computed independently, image by image, through the Tagger
    t, encoder = fixture_loaded
    hits = []
    for cls in CIFAR_CLASSES:
        emb = encoder.embed([Image.open(p).convert("RGB") for p in cifar_test[cls][:6]])
        values = t.logits_to_values(t.logits(emb), None)
        hits += [t.vocab[int(i)].name == cls for i in values.argmax(1)]
    assert out["top1"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert out["top1"] > 0.3  # the fixture model has real signal (chance is 0.1)
    assert out["top5"] >= out["top1"] and 0 < out["map"] <= 1 and 0 <= out["ece"] <= 1
    assert len(out["per_concept"]) == 10 and all(r["positives"] == 6 for r in out["per_concept"])

    # another vocabulary (a synonym changes the concept's prompts) and thresholds: no image is encoded again
    vocab = tmp_path / "vocab.txt"
    vocab.write_text((fixture_model / "vocab.txt").read_text().replace("\nautomobile", "\nautomobile | syn=car", 1))
    assert "syn=car" in vocab.read_text()
    assert cli.main([*args, "--vocab", str(vocab), "--threshold", "0.9"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert again["cached"] == 60 and again["encoded"] == 0 and again["threshold"] == 0.9
    assert again["vocab"] == str(vocab)


def test_eval_cli_multi_label_table_and_pr_curves(random_store, coco_images, tmp_path, capsys):
    root = coco_images[0].parent
    (tmp_path / "labels.csv").write_text(
        "path,labels\n" + "".join(f"{p.name},{labs}\n" for p, labs in zip(
            coco_images[:8], ["dog;person", "person", "cat", "", "dog", "person;car", "car", "cat;dog"], strict=True)))
    (tmp_path / "vocab.txt").write_text("person\ndog | parents=animal\ncat | parents=animal\ncar\nanimal\nbus\n")
    base = ["eval", str(root), "--labels", str(tmp_path / "labels.csv"), "--vocab", str(tmp_path / "vocab.txt"),
            "--model", "tiny-random", "--models-dir", str(random_store), "--cache-dir", str(tmp_path / "c"),
            "--device", "cpu"]
    png = tmp_path / "pr.png"
    assert cli.main([*base, "--json", "--pr-curves", str(png), "--worst", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "multi-label" and out["images"] == 8 and out["concepts"] == 4
    assert {r["name"]: r["positives"] for r in out["per_concept"]} == {"person": 3, "dog": 3, "cat": 2, "car": 2}
    assert 0 < out["map"] <= 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out["pr_curves"] is None and not png.exists()
    else:
        assert out["pr_curves"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(base) == 0
    table = capsys.readouterr().out
    assert "multi-label" in table and "mAP" in table and "person" in table and "bus" not in table
    assert table.index("mAP") < table.index("top-1")
