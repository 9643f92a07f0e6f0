"""The Tagger: the text-embedding cache, per-concept independent values, sorting, devices."""

from __future__ import annotations

import numpy as np
import pytest

from localtag.core import vocab as vocab_mod
from localtag.core.config import Settings
from localtag.core.decode import decode
from localtag.core.loader import Loaded, load
from localtag.core.tagger import Tagger
from localtag.core.text_index import TextIndex


def _loaded(store, cache, text: str, **kw) -> Loaded:
    v = cache / f"v{abs(hash(text))}.txt"
    v.write_text(text)
    return load(Settings(models_dir=store, model="tiny-random", cache_dir=cache, vocab=v, device="cpu", **kw))


def _tagger(store, cache, text: str, **kw) -> Tagger:
    return _loaded(store, cache, text, **kw).tagger


def _values(loaded: Loaded, images) -> np.ndarray:
    tagger, encoder = loaded
    return tagger.values(encoder.embed(images))


def test_text_cache_is_built_once_and_rebuilt_on_change(random_store, tmp_path, monkeypatch):
    calls = []
    real = TextIndex.build

    def counting(self):
        calls.append(len(self.vocab))
        return real(self)

    monkeypatch.setattr(TextIndex, "build", counting)
    a = _tagger(random_store, tmp_path, "cat\ndog\n")
    first = a.text_embeddings.clone()
    assert calls == [2] and len(list((tmp_path / "text").glob("*.npz"))) == 1
    b = _tagger(random_store, tmp_path, "cat\ndog\n")  # same model + vocabulary + templates: from disk
    assert np.array_equal(b.text_embeddings.numpy(), first.numpy()) and calls == [2]
    assert len(_tagger(random_store, tmp_path, "cat\ndog\nbird\n").text_embeddings) == 3  # vocabulary changed
    assert calls == [2, 3]
    c = _tagger(random_store, tmp_path, "cat\ndog\n")
    c.text.templates = ("a drawing of a {}.",)  # templates changed (before anything was scored)
    assert len(c.text_embeddings) == 2
    assert calls == [2, 3, 2] and len(list((tmp_path / "text").glob("*.npz"))) == 3


def test_binary_values_do_not_depend_on_the_rest_of_the_vocabulary(random_store, tmp_path, coco_images):
    imgs = [decode(p) for p in coco_images[:3]]
    small = _loaded(random_store, tmp_path, "cat\ndog\n")
    big = _loaded(random_store, tmp_path, "cat\ndog\n" + "".join(f"thing {i}\n" for i in range(200)))
    vs, vb = _values(small, imgs), _values(big, imgs)
    assert np.allclose(vs, vb[:, :2], atol=1e-6)
    assert ((vb >= 0) & (vb <= 1)).all()
    # a softmax share, by contrast, shrinks as the vocabulary grows
    ss = _loaded(random_store, tmp_path, "cat\ndog\n", scoring="softmax")
    sb = _loaded(random_store, tmp_path, "cat\ndog\n" + "".join(f"thing {i}\n" for i in range(200)),
                 scoring="softmax")
    assert (_values(sb, imgs)[:, :2] < _values(ss, imgs)).all()


def test_tag_sorts_limits_and_selects(random_store, tmp_path, coco_images):
    loaded = _loaded(random_store, tmp_path, "".join(f"concept {i}\n" for i in range(30)))
    t = loaded.tagger
    values = _values(loaded, [decode(p) for p in coco_images[:2]])
    out = [t.pick(row, max_concepts=7) for row in values]
    for tags, row in zip(out, values, strict=True):
        assert len(tags) == 7
        assert [x.value for x in tags] == sorted((x.value for x in tags), reverse=True)
        assert [x.value for x in tags] == pytest.approx(sorted(row, reverse=True)[:7])  # the 7 best, none skipped
    select = t.select_indices(["concept 3", vocab_mod.concept_id("concept 5")])
    sel = t.pick(values[0], select=select)
    assert {x.name for x in sel} == {"concept 3", "concept 5"}


def test_sigmoid_scoring_needs_a_learned_bias(random_store, tmp_path):
    with pytest.raises(ValueError, match="logit_bias"):
        _tagger(random_store, tmp_path, "cat\n", scoring="sigmoid")
