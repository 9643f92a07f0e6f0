"""Learnt concepts (issue 20): `localtag learn`, `tag`/`eval --model-head`, with real CIFAR JPEGs and the fixture model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.cli_run import run_cli
from tests.conftest import CIFAR_CLASSES, extract_cifar


@pytest.fixture(scope="module")
def cifar40(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("cifar40")
    return root, extract_cifar(root, per_class=40)


@pytest.fixture(scope="module")
def learnt(cifar40, fixture_model, tmp_path_factory):
    """16 ships = vessel-x, 32 other photos (round-robin over the 9 other classes) not: `localtag learn`."""
    root, per = cifar40
    heads = tmp_path_factory.mktemp("heads")
    cache = tmp_path_factory.mktemp("learn-cache")
    others = [per[c][i] for i in range(4) for c in CIFAR_CLASSES if c != "ship"][:32]
    assert len(others) == 32
    rows = [f"{p.relative_to(root).as_posix()},vessel-x" for p in per["ship"][:16]]
    rows += [f"{p.relative_to(root).as_posix()}," for p in others]
    labels = root / "train.csv"
    labels.write_text("path,labels\n" + "\n".join(rows) + "\n")
    held = [f"{p.relative_to(root).as_posix()},{'vessel-x' if c == 'ship' else ''}"
            for c in CIFAR_CLASSES for p in per[c][20:40]]
    (root / "held.csv").write_text("path,labels\n" + "\n".join(held) + "\n")
    env = {"LOCALTAG_MODEL": str(fixture_model), "LOCALTAG_CACHE_DIR": str(cache), "LOCALTAG_HEADS_DIR": str(heads),
           "LOCALTAG_DEVICE": "cpu"}
    r = run_cli("learn", str(root), "--labels", str(labels), "--name", "vessels", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return root, env, json.loads(r.stdout), heads


def test_learn_ranks_heldout_ships_first(learnt):
    root, env, out, heads = learnt
    assert out["concepts"] == [{"concept": "vessel-x", "positives": 16, "negatives": 32, "prior": None}]
    assert Path(out["head"]) == heads / "vessels.npz"
    r = run_cli("eval", str(root), "--labels", str(root / "held.csv"), "--model-head", "vessels", "--json", env=env)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["images"] == 200
    (row,) = ev["per_concept"]
    assert row["name"] == "vessel-x" and row["positives"] == 20
    # issue 20's bar. 0.870 here (the plain L2 pull gave 0.847); bench/bench_learn.py measures the same
    # scenario on 50 random draws: AP >= 0.85 on 49 of them (mean 0.925, lowest 0.827): docs/learn.md
    assert row["ap"] >= 0.85
    # and a made-up word with 16 examples beats the fixture's own zero-shot "ship" on the same images
    held = (root / "held.csv").read_text().replace(",vessel-x", ",ship")
    (root / "held-ship.csv").write_text(held)
    r = run_cli("eval", str(root), "--labels", str(root / "held-ship.csv"), "--json", env=env)
    (zs,) = json.loads(r.stdout)["per_concept"]
    assert zs["name"] == "ship" and zs["positives"] == 20
    assert row["ap"] > zs["ap"] + 0.02, (row["ap"], zs["ap"])


def test_tag_with_the_head(learnt, cifar40):
    root, env, _, _ = learnt
    _, per = cifar40
    ship, cat = per["ship"][30], per["cat"][30]
    r = run_cli("tag", str(ship), str(cat), "--model-head", "vessels", "--jsonl", env=env)
    assert r.returncode == 0, r.stderr
    outs = [json.loads(line) for line in r.stdout.splitlines()]
    values = [{c["name"]: c["value"] for c in o["data"]["concepts"]} for o in outs]
    assert set(values[0]) == {"vessel-x"}  # the head's concepts replace the vocabulary's
    assert values[0]["vessel-x"] > values[1]["vessel-x"]


def test_head_refuses_another_clip_model(learnt, random_store):
    root, env, _, _ = learnt
    r = run_cli("tag", str(next(root.rglob("*.jpg"))), "--model-head", "vessels",
                env={**env, "LOCALTAG_MODELS_DIR": str(random_store), "LOCALTAG_MODEL": "tiny-random"})
    assert r.returncode == 2
    assert "was trained on CLIP model cifar10-tiny" in r.stderr and "learn it again" in r.stderr


def test_too_few_examples_is_a_clear_error(cifar40, fixture_model, tmp_path):
    root, per = cifar40
    labels = tmp_path / "few.csv"
    labels.write_text(f"{per['ship'][0]},vessel-x\n{per['cat'][0]},\n{per['dog'][0]},\n")
    r = run_cli("learn", str(root), "--labels", str(labels), "--name", "few",
                env={"LOCALTAG_MODEL": str(fixture_model), "LOCALTAG_CACHE_DIR": str(tmp_path),
                     "LOCALTAG_HEADS_DIR": str(tmp_path / "heads"), "LOCALTAG_DEVICE": "cpu"})
    assert r.returncode == 2
    assert "'vessel-x' has 1 positive and 2 negative examples, needs at least 2 and 2" in r.stderr
    assert not (tmp_path / "heads" / "few.npz").exists()


def test_contradiction_is_reported_and_left_out(cifar40, fixture_model, tmp_path):
    root, per = cifar40
    twin = tmp_path / "copy-of-ship.jpg"
    shutil.copyfile(per["ship"][0], twin)  # the same photo under another name, labelled the other way
    rows = [f"{p},vessel-x" for p in per["ship"][:6]] + [f"{p}," for p in per["cat"][:6]] + [f"{twin},"]
    labels = tmp_path / "contra.csv"
    labels.write_text("\n".join(rows) + "\n")
    r = run_cli("learn", str(root), "--labels", str(labels), "--name", "contra", "--json", "--holdout", "0",
                env={"LOCALTAG_MODEL": str(fixture_model), "LOCALTAG_CACHE_DIR": str(tmp_path),
                     "LOCALTAG_HEADS_DIR": str(tmp_path / "heads"), "LOCALTAG_DEVICE": "cpu"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (c,) = out["contradictions"]
    assert str(per["ship"][0]) in c and str(twin) in c
    assert out["concepts"][0]["positives"] == 5 and out["concepts"][0]["negatives"] == 6
    assert "contradicting annotations" in r.stderr


def test_training_is_deterministic_and_the_file_round_trips(fixture_tagger, fixture_encoder, cifar_test, tmp_path):
    from PIL import Image

    from localtag.core import learn

    files = cifar_test["ship"][:8] + cifar_test["airplane"][:8] + cifar_test["frog"][:8]
    emb = fixture_encoder.embed([Image.open(p).convert("RGB") for p in files])
    keys = [str(p) for p in files]
    ann = [learn.Annotation(k, "ship", i < 8) for i, k in enumerate(keys)]
    ann += [learn.Annotation(k, "boat-y", i < 8) for i, k in enumerate(keys)]
    priors = {"ship": learn.prior_of(fixture_tagger.scorer, "ship")}
    heads = [learn.train(emb, learn.targets(keys, emb, ann), model_sha256=fixture_tagger.info.sha256, priors=priors)
             for _ in range(2)]
    assert np.array_equal(heads[0].weights, heads[1].weights)
    assert np.array_equal(heads[0].bias, heads[1].bias) and np.array_equal(heads[0].a, heads[1].a)
    assert [c["prior"] for c in heads[0].meta["concepts"]] == ["zero-shot", None]
    path = learn.save(heads[0], tmp_path / "h.npz")
    back = learn.load(path)
    assert np.array_equal(back.values(emb), heads[0].values(emb))
    v = back.values(emb)
    assert v[:8, 0].min() > v[8:, 0].max()  # ships above airplanes and frogs on the training images


def test_prior_alone_is_the_zero_shot_scorer(fixture_tagger):
    """With the zero-shot prior and a huge λ the learnt logits are the zero-shot binary logits."""
    from localtag.core import learn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, fixture_tagger.dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w0, b0 = learn.prior_of(fixture_tagger.scorer, "cat")
    w, b = learn.fit_probe(x, np.array([1, 1, 1, 0, 0, 0.0]), w0=w0, b0=b0, lam=1e9, lam_bias=1e9)
    i = fixture_tagger.vocab.index("cat")
    assert np.allclose(x @ w + b, fixture_tagger.logits(x)[:, i], atol=1e-3)
