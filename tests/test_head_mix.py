"""A learnt head next to the vocabulary (core.head_mix) and the provenance record of its tags (tag_merge).

Real parts: the trained CIFAR fixture model and real CIFAR-10 JPEGs; the head is trained by core.learn.
"""

from __future__ import annotations

import numpy as np
import pytest

from localtag.core import learn
from localtag.core.decode import decode
from localtag.core.head_mix import LEARNT_PRIORITY, MixedScorer, head_record
from localtag.core.scorer import Picking
from localtag.directus.tag_merge import person_tags, plan_tags, provenance_stamp


@pytest.fixture(scope="module")
def data(cifar_test, fixture_loaded, tmp_path_factory):
    tagger, encoder = fixture_loaded
    train = [(c, p) for c, paths in cifar_test.items() for p in paths[:10]]
    emb = encoder.embed([decode(p) for _, p in train])
    keys = [str(p) for _, p in train]
    ann = [learn.Annotation(k, "vessel-x", c == "ship") for k, (c, _) in zip(keys, train, strict=True)]
    ann += [learn.Annotation(k, "Cat", c == "cat") for k, (c, _) in zip(keys, train, strict=True)]
    head = learn.train(emb, learn.targets(keys, emb, ann), model_sha256=tagger.info.sha256, name="pets",
                       priors={"cat": learn.prior_of(tagger.scorer, "cat")})
    learn.save(head, tmp_path_factory.mktemp("heads") / "pets.npz")
    held = encoder.embed([decode(p) for paths in cifar_test.values() for p in paths[10:]])
    return tagger, head, held


def test_the_head_replaces_known_concepts_and_adds_new_ones(data):
    tagger, head, emb = data
    mixed = MixedScorer(tagger.scorer, head)
    n = len(tagger.vocab)
    assert len(mixed.vocab) == n + 1 and mixed.vocab[n].name == "vessel-x"
    assert mixed.vocab[n].priority == LEARNT_PRIORITY
    cat, dog = tagger.vocab.index("cat"), tagger.vocab.index("dog")
    assert mixed.vocab[cat] is tagger.vocab[cat]  # the vocabulary's concept: id, translations kept
    assert mixed.learnt_ids == {tagger.vocab[cat].id, "vessel-x"}
    v, plain, h = mixed.values(emb), tagger.values(emb), head.values(emb)
    assert np.allclose(v[:, n], h[:, head.names.index("vessel-x")], atol=1e-6)
    assert np.allclose(v[:, cat], h[:, head.names.index("cat")], atol=1e-6)
    assert np.array_equal(v[:, dog], plain[:, dog])  # the others are untouched
    assert not np.allclose(v[:, cat], plain[:, cat], atol=1e-3)


def test_learnt_concepts_take_places_first(data):
    tagger, head, emb = data
    mixed = MixedScorer(tagger.scorer, head)
    tags = mixed.tags(emb, Picking(max_concepts=1))
    assert all(t[0].name == "vessel-x" for t in tags)  # min_value 0: the learnt concept always passes


def test_softmax_is_refused(data, fixture_loaded):
    tagger, head, _ = data
    from localtag.core.scorer import Scorer

    soft = Scorer(tagger.vocab, tagger.scorer.text, scoring="softmax")
    with pytest.raises(ValueError, match="softmax"):
        MixedScorer(soft, head)


def test_provenance_marks_learnt_tags_and_old_records_stay_readable(data):
    tagger, head, emb = data
    mixed = MixedScorer(tagger.scorer, head)

    class WithHead:  # what Tagger.add_head leaves: the tagger's head and its mixed scorer
        pass

    t = WithHead()
    t.head, t.scorer, t.vocab = head, mixed, mixed.vocab
    record, ids = head_record(t)
    assert record["name"] == "pets" and record["concepts"] == head.names and len(record["sha256"]) == 64
    stamp = provenance_stamp("m", "a" * 64, "b" * 64, "r", record)
    new = mixed.tags(emb[:1], Picking(max_concepts=3))[0]
    old = {"v": 1, "tags": ["dog"], "values": {"dog": 0.9}, "model": "m", "run": "r0"}  # a record before heads
    plan = plan_tags(["mine", "dog"], old, new, stamp, ids)
    assert plan.tags[0] == "mine" and plan.provenance["head"] == record
    assert plan.provenance["learnt"] == [x.name for x in new if x.id in ids] and plan.provenance["learnt"]
    assert person_tags(plan.tags, plan.provenance) == ["mine"]
    assert "learnt" not in plan_tags(["mine"], None, ["dog"], stamp).provenance
