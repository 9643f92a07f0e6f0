"""`localtag batch run | rescore --model-head`: a learnt head's concepts join the vocabulary in every row.

Real CIFAR-10 JPEGs, the trained fixture model, the local engine. The head learns a new concept
(``vessel-x``: ships) and corrects one the vocabulary has (``cat``); rows must carry the vocabulary's
concepts with the head's values for ``cat`` and ``vessel-x`` added, exactly as
:class:`~localtag.core.head_mix.MixedScorer` scores the stored embedding.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from batch_helpers import batch, model_args

from localtag.batch.store import RunStore
from localtag.core import learn
from localtag.core.decode import decode
from localtag.core.head_mix import MixedScorer


@pytest.fixture(scope="module")
def head_and_images(cifar_test, fixture_loaded, tmp_path_factory):
    """A head trained on 12 images of each class; the other 8 of each class copied to a folder."""
    tagger, encoder = fixture_loaded
    train = [(c, p) for c, paths in cifar_test.items() for p in paths[:12]]
    emb = encoder.embed([decode(p) for _, p in train])
    keys = [str(p) for _, p in train]
    ann = [learn.Annotation(k, "vessel-x", c == "ship") for k, (c, _) in zip(keys, train, strict=True)]
    ann += [learn.Annotation(k, "cat", c == "cat") for k, (c, _) in zip(keys, train, strict=True)]
    t = learn.targets(keys, emb, ann)
    head = learn.train(emb, t, model_sha256=tagger.info.sha256, model=tagger.info.name, name="pets",
                       priors={"cat": learn.prior_of(tagger.scorer, "cat")})
    root = tmp_path_factory.mktemp("batch-head")
    path = learn.save(head, root / "heads" / "pets.npz")
    folder = root / "images"
    folder.mkdir()
    for c, paths in cifar_test.items():
        for p in paths[12:]:
            shutil.copy(p, folder / f"{c}-{p.name}")
    return path, folder


def test_run_rows_carry_the_heads_concepts(capsys, head_and_images, fixture_model, fixture_tagger, cache_dir,
                                           tmp_path):
    path, folder = head_and_images
    margs = model_args(fixture_model, cache_dir)
    out = tmp_path / "run"
    code, summary = batch(capsys, "run", str(folder), "--out", str(out), "--model-head", str(path), *margs)
    assert code == 0, summary
    store = RunStore(out)
    run = store.read_run()
    assert len(run["fingerprint"]["model_head_sha256"]) == 64
    mixed = MixedScorer(fixture_tagger.scorer, learn.load(path))
    rows = [r for m in store.committed(run["shards"]) for r in store.read_shard(m).to_pylist()]
    assert len(rows) == 80 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        values = dict((c["name"], c["value"]) for c in r["concepts"])
        assert "vessel-x" in values and len(values) == len(fixture_tagger.vocab) + 1
        want = mixed.values(np.asarray(r["embedding"], dtype=np.float32)[None])[0]
        for name, v in values.items():
            assert v == pytest.approx(float(want[mixed.vocab.index(name)]), abs=1e-6)
        plain = fixture_tagger.values(np.asarray(r["embedding"], dtype=np.float32)[None])[0]
        assert values["dog"] == pytest.approx(float(plain[fixture_tagger.vocab.index("dog")]), abs=1e-6)
        assert values["cat"] != pytest.approx(float(plain[fixture_tagger.vocab.index("cat")]), abs=1e-3)
    # the learnt concept finds the ships: AP over the 80 held-out photos
    from localtag.core.evaluate import average_precision

    v = np.array([next(c["value"] for c in r["concepts"] if c["name"] == "vessel-x") for r in rows])
    ap = average_precision(v, np.array(["/ship-" in r["uri"] for r in rows]))
    assert ap >= 0.6, ap
    # a run dir holds one fingerprint: the same run without the head is refused
    code, msg = batch(capsys, "run", str(folder), "--out", str(out), *margs)
    assert code != 0


def test_rescore_adds_the_heads_concepts(capsys, head_and_images, fixture_model, cache_dir, tmp_path):
    path, folder = head_and_images
    margs = model_args(fixture_model, cache_dir)
    out = tmp_path / "plain"
    code, _ = batch(capsys, "run", str(folder), "--out", str(out), *margs)
    assert code == 0
    code, res = batch(capsys, "rescore", str(out), "--out", str(tmp_path / "learnt"), "--model-head", str(path),
                      *margs)
    assert code == 0, res
    store = RunStore(tmp_path / "learnt")
    rows = [r for m in store.committed(store.read_run()["shards"]) for r in store.read_shard(m).to_pylist()]
    assert len(rows) == 80 and all("vessel-x" in {c["name"] for c in r["concepts"]} for r in rows)
