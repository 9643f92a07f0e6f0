"""The Tagger: the text-embedding cache, per-concept independent values, sorting, devices."""

from __future__ import annotations

import numpy as np
import pytest

from localtag import vocab as vocab_mod
from localtag.config import Settings
from localtag.images import decode
from localtag.tagger import Tagger


def _tagger(store, cache, text: str, **kw) -> Tagger:
    v = cache / f"v{abs(hash(text))}.txt"
    v.write_text(text)
    return Tagger.load(Settings(models_dir=store, model="tiny-random", cache_dir=cache, vocab=v, device="cpu", **kw))


def test_text_cache_is_built_once_and_rebuilt_on_change(random_store, tmp_path, monkeypatch):
    calls = []
    real = Tagger._build_text

    def counting(self):
        calls.append(len(self.vocab))
        return real(self)

    monkeypatch.setattr(Tagger, "_build_text", counting)
    a = _tagger(random_store, tmp_path, "cat\ndog\n")
    first = a.text_embeddings.clone()
    assert calls == [2] and len(list((tmp_path / "text").glob("*.npz"))) == 1
    b = _tagger(random_store, tmp_path, "cat\ndog\n")  # same model + vocabulary + templates: from disk
    assert np.array_equal(b.text_embeddings.numpy(), first.numpy()) and calls == [2]
    assert len(_tagger(random_store, tmp_path, "cat\ndog\nbird\n").text_embeddings) == 3  # vocabulary changed
    assert calls == [2, 3]
    c = _tagger(random_store, tmp_path, "cat\ndog\n")
    c.templates = ("a drawing of a {}.",)  # templates changed
    c._text = None
    assert len(c.text_embeddings) == 2
    assert calls == [2, 3, 2] and len(list((tmp_path / "text").glob("*.npz"))) == 3


def test_binary_values_do_not_depend_on_the_rest_of_the_vocabulary(random_store, tmp_path, coco_images):
    imgs = [decode(p) for p in coco_images[:3]]
    small = _tagger(random_store, tmp_path, "cat\ndog\n")
    big = _tagger(random_store, tmp_path, "cat\ndog\n" + "".join(f"thing {i}\n" for i in range(200)))
    vs, vb = small.scores(small.embed(imgs)), big.scores(big.embed(imgs))
    assert np.allclose(vs, vb[:, :2], atol=1e-6)
    assert ((vb >= 0) & (vb <= 1)).all()
    # a softmax share, by contrast, shrinks as the vocabulary grows
    ss = _tagger(random_store, tmp_path, "cat\ndog\n", scoring="softmax")
    sb = _tagger(random_store, tmp_path, "cat\ndog\n" + "".join(f"thing {i}\n" for i in range(200)),
                 scoring="softmax")
    assert (sb.scores(sb.embed(imgs))[:, :2] < ss.scores(ss.embed(imgs))).all()


def test_tag_sorts_limits_and_selects(random_store, tmp_path, coco_images):
    t = _tagger(random_store, tmp_path, "".join(f"concept {i}\n" for i in range(30)))
    out = t.tag([decode(p) for p in coco_images[:2]], max_concepts=7)
    for tags in out:
        assert len(tags) == 7
        assert [x.value for x in tags] == sorted((x.value for x in tags), reverse=True)
    full = t.scores(t.embed([decode(coco_images[0])]))[0]
    assert out[0][0].value == pytest.approx(full.max())
    sel = t.tag([decode(coco_images[0])], select_concepts=["concept 3", vocab_mod.concept_id("concept 5")])
    assert {x.name for x in sel[0]} == {"concept 3", "concept 5"}


def test_sigmoid_scoring_needs_a_learned_bias(random_store, tmp_path):
    with pytest.raises(ValueError, match="logit_bias"):
        _tagger(random_store, tmp_path, "cat\n", scoring="sigmoid")
