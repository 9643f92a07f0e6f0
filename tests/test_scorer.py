"""The scorer alone: pure numpy over hand-made text embeddings, no model weights (milliseconds).

Each test builds unit vectors so that the cosines, and so the values, are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from localtag.core.pipeline import Job, Result
from localtag.core.run import run
from localtag.core.scorer import Picking, Scorer, SelectError
from localtag.core.vocab import parse

STRUCTURED = """\
animal | lang.de=Tier
mammal | parents=animal
pet | lang.de=Haustier
cat | syn=kitty | parents=mammal, pet | lang.de=Katze
dog | parents=mammal, pet | lang.de=Hund
people | exclusive=no person
no person | hidden=1
object | priority=-1
car | threshold=0.99
"""
DIM = 16


def _axes(n: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[:n]


def _scorer(text: str = STRUCTURED, **kw) -> Scorer:
    vocab = parse(text)
    concepts = _axes(len(vocab))
    neutral = np.eye(DIM, dtype=np.float32)[DIM - 1]
    return Scorer(vocab, (concepts, neutral), **kw)


def _image(weights: dict[int, float], neutral: float = 0.0) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for i, w in weights.items():
        v[i] = w
    v[DIM - 1] = neutral
    return v


def test_binary_value_is_the_two_way_softmax_against_the_neutral_prompt():
    s = _scorer(logit_scale=10.0)
    img = _image({3: 0.6}, neutral=0.4)  # cat: cos 0.6; neutral 0.4
    v = s.values(img[None])[0]
    assert v[3] == pytest.approx(1 / (1 + math.exp(-10 * (0.6 - 0.4))), rel=1e-6)
    assert v[4] == pytest.approx(1 / (1 + math.exp(-10 * (0.0 - 0.4))), rel=1e-6)  # dog: not in the image


def test_a_value_does_not_depend_on_the_rest_of_the_vocabulary():
    small = _scorer("cat\n", logit_scale=10.0)
    big = _scorer(STRUCTURED, logit_scale=10.0)
    one = np.zeros(DIM, dtype=np.float32)
    one[0] = 0.7  # "cat" is row 0 of the small vocabulary, row 3 of the big one
    img_big = np.zeros(DIM, dtype=np.float32)
    img_big[3] = 0.7
    assert small.values(one[None])[0, 0] == pytest.approx(big.values(img_big[None])[0, 3])


def test_softmax_values_sum_to_one():
    s = _scorer("sfw\nnsfw\n", scoring="softmax", logit_scale=10.0)
    v = s.values(np.stack([_image({0: 0.5, 1: 0.2}), _image({1: 0.9})]))
    assert v.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert v[0, 0] == pytest.approx(1 / (1 + math.exp(-10 * 0.3)), rel=1e-5)


def test_parents_are_never_below_their_children():
    s = _scorer(logit_scale=10.0)
    v = s.values(_image({3: 0.9})[None])[0]  # a cat, nothing else
    vocab = s.vocab
    for name in ("mammal", "pet", "animal"):
        assert v[vocab.index(name)] == pytest.approx(v[vocab.index("cat")])


def test_exclusive_pair_keeps_the_stronger_and_hidden_is_never_reported():
    s = _scorer(logit_scale=10.0)
    people, no_person = s.vocab.index("people"), s.vocab.index("no person")
    tags = s.tags(_image({people: 0.2, no_person: 0.9})[None], Picking(max_concepts=0))[0]
    names = [t.name for t in tags]
    assert "no person" not in names  # hidden, yet it wins the exclusion
    assert "people" not in names
    tags = s.tags(_image({people: 0.9, no_person: 0.2})[None], Picking(max_concepts=0))[0]
    assert "people" in [t.name for t in tags]


def test_thresholds_min_value_select_and_max_concepts():
    s = _scorer(logit_scale=10.0)
    car = s.vocab.index("car")
    img = _image({car: 0.3, 3: 0.5})
    names = [t.name for t in s.tags(img[None], Picking(max_concepts=0))[0]]
    assert "car" not in names  # 0.95 < its own threshold 0.99
    picked = s.tags(img[None], Picking(max_concepts=0, select=s.select_indices(["car"])))[0]
    assert [t.name for t in picked] == ["car"]  # select reports it whatever its threshold
    assert len(s.tags(img[None], Picking(max_concepts=2))[0]) == 2
    high = s.tags(img[None], Picking(max_concepts=0, min_value=0.99))[0]
    assert {t.name for t in high} == {"cat", "mammal", "pet", "animal"}
    with pytest.raises(SelectError):
        s.select_indices(["no such concept"])


def test_demoted_concepts_only_fill_free_places():
    s = _scorer("dog\nobject | priority=-1\n", logit_scale=10.0)
    tags = s.tags(_image({1: 0.99, 0: 0.5})[None], Picking(max_concepts=1))[0]
    assert [t.name for t in tags] == ["dog"]  # object scores higher but has priority -1
    assert [t.name for t in s.tags(_image({1: 0.99, 0: 0.5})[None], Picking(max_concepts=2))[0]] == ["object", "dog"]


def test_language_names_and_synonyms():
    s = _scorer(logit_scale=10.0)
    tags = s.tags(_image({3: 0.9})[None], Picking(max_concepts=0, language="de"))[0]
    by_id = {t.id: t.name for t in tags}
    assert by_id[s.vocab[3].id] == "Katze" and by_id[s.vocab[0].id] == "Tier"
    assert by_id[s.vocab[1].id] == "mammal"  # no German name: the concept's own
    assert list(s.select_indices(["kitty"])) == [3]


def test_calibration_replaces_the_default_mapping():
    class Shift:
        scoring = "binary"
        path = None

        def apply(self, z):
            return z - 100.0  # everything far below 0.5

    s = _scorer(logit_scale=10.0, calibration=Shift())
    assert s.values(_image({3: 0.9})[None]).max() < 1e-30 + 1e-6
    assert s.logits_to_values(s.logits(_image({3: 0.9})[None]), None)[0, 3] > 0.99


def test_the_run_loop_scores_in_chunks_and_keeps_failures_in_order():
    s = _scorer(logit_scale=10.0)
    from localtag.core.errors import ImageError

    results = [Result(Job(str(i), None), embedding=_image({i % 5: 0.9})) for i in range(7)]
    results.insert(3, Result(Job("bad", None), error=ImageError("corrupt", "not an image")))

    class Collect:
        def __init__(self):
            self.batches = []

        def write(self, batch):
            self.batches.append(list(batch))

    out = Collect()
    tally = run(results, out, scorer=s, picking=Picking(max_concepts=1), chunk=3)
    flat = [x for b in out.batches for x in b]
    assert [len(b) for b in out.batches] == [3, 3, 2]
    assert [x.key for x in flat] == [r.job.key for r in results]
    assert (tally.total, tally.failed) == (8, 1)
    assert flat[3].tags is None and not flat[3].ok
    assert flat[0].tags[0].name == s.vocab[0].display() or flat[0].tags[0].value > 0.9
    # the same tags one by one as in a batch: chunking changes nothing
    one = [s.tags(r.embedding[None], Picking(max_concepts=1))[0] for r in results if r.ok]
    assert [x.tags for x in flat if x.ok] == one


def test_the_lazy_text_side_is_built_once():
    calls = []

    def text():
        calls.append(1)
        return _axes(9), np.eye(DIM, dtype=np.float32)[DIM - 1]

    s = Scorer(parse(STRUCTURED), text, logit_scale=10.0)
    assert not calls
    s.values(_image({1: 1.0})[None])
    s.values(_image({2: 1.0})[None])
    assert calls == [1]
