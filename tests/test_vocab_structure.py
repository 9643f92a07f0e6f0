"""Vocabulary structure: parents, synonyms, exclusions, thresholds, priorities, hidden concepts,
display languages; `localtag vocab check` and `localtag vocab build`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from localtag import cli
from localtag.core import vocab as vocab_mod
from localtag.core.models import ModelStore
from localtag.core.tagger import Tagger
from localtag.core.vocab import VocabError

STRUCTURED = """\
# a small structured vocabulary
animal | lang.de=Tier
mammal | parents=animal
pet | lang.de=Haustier | lang.zh=宠物
cat | syn=kitty, house cat | parents=mammal, pet | lang.de=Katze | lang.zh-CN=猫
dog | parents=mammal, pet | lang.de=Hund
people | exclusive=no person
no person | hidden=1
object | priority=-1
car | threshold=0.99
"""


@pytest.fixture(scope="module")
def random_info(random_store):
    return ModelStore(random_store).resolve("tiny-random")


@pytest.fixture(scope="module")
def tagger(random_info, cache_dir):
    return Tagger(random_info, vocab_mod.parse(STRUCTURED), device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def encoder(tagger):
    from localtag.core.encoder import ImageEncoder
    from localtag.core.models import preprocess_for

    return ImageEncoder(tagger.model, preprocess_for(tagger.info), image_size=tagger.info.preprocess["size"])


def test_fields_parse():
    v = vocab_mod.parse(STRUCTURED)
    cat = v[v.index("kitty")]
    assert cat.name == "cat" and v.index("House Cat") == v.index("cat")
    assert [v[i].name for i in v.ancestors(v.index("cat"))] == ["mammal", "pet", "animal"]
    assert v[v.index("no person")].hidden and v[v.index("object")].priority == -1
    assert v[v.index("car")].threshold == 0.99
    assert cat.display("de") == "Katze" and cat.display("de-AT") == "Katze" and cat.display("DE") == "Katze"
    assert cat.display("zh_cn") == "猫" and cat.display("zh") == "cat"  # zh-CN is not plain zh
    assert cat.display("fr") == "cat" and cat.display(None) == "cat"
    line = vocab_mod.format_line(cat)
    again = vocab_mod.parse_line(line, "x", cat.line)
    assert again == cat and again.names == cat.names


def test_check_reports_every_problem(tmp_path):
    text = """\
cat | syn=kitty | parents=mammal
mammal | parents=animal
animal | parents=cat
kitty
ai_AAAAAAAA | foo
ai_AAAAAAAA | bar | parents=nothing
loop | parents=loop
dog | prompts=
fish | prompts=a photo of {}, , a {}
bird | exclusive=bird
Cat
"""
    concepts, problems = vocab_mod.check_text(text, "v.txt")
    errors = [p for p in problems if p.error]
    by_kind = {}
    for p in errors:
        by_kind.setdefault(p.kind, []).append(p.line)
    assert by_kind == {
        "cycle": [1, 7],
        "duplicate-name": [4, 11],
        "id-collision": [6],
        "unknown-concept": [6],
        "empty-prompt": [8, 9],
        "exclusive": [10],
    }
    cycle = next(p for p in errors if p.kind == "cycle" and p.line == 1)
    assert cycle.message == "parent cycle cat -> mammal -> animal -> cat"
    with pytest.raises(VocabError) as e:
        vocab_mod.parse(text, "v.txt")
    assert len([p for p in e.value.problems if p.error]) == len(errors) == 9
    assert "v.txt:1: parent cycle" in str(e.value) and "v.txt:9: empty prompt" in str(e.value)

    f = tmp_path / "v.txt"
    f.write_text(text)
    assert cli.main(["vocab", "check", str(f)]) == 1
    ok = tmp_path / "ok.txt"
    ok.write_text(STRUCTURED)
    assert cli.main(["vocab", "check", str(ok)]) == 0


def test_check_json(tmp_path, capsys):
    f = tmp_path / "v.txt"
    f.write_text("a | parents=b\nb | parents=a\na\n")
    assert cli.main(["vocab", "check", str(f), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and {p["kind"] for p in out["problems"]} == {"cycle", "duplicate-name"}


def test_exclusive_with_ancestor_is_a_warning():
    v = vocab_mod.parse("animal\ncat | parents=animal | exclusive=animal\n")
    assert [p.kind for p in v.warnings] == ["exclusive"]


def test_vocab_build(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Cat\ndog\n# a comment\nkitty\nsurfboard | parents=sports equipment\n")
    (tmp_path / "b.csv").write_text("name,synonyms,parents,lang.de\ncat,kitty;house cat,pet,Katze\n"
                                    "Dog,,pet,Hund\n  DOG ,hound,,\n")
    (tmp_path / "labels.csv").write_text("path,labels\na.jpg,bird;cat\nb.jpg,horse\n")
    (tmp_path / "parents.txt").write_text("pet: animal\nbird -> animal\n")
    out = tmp_path / "vocab.txt"
    assert cli.main(["vocab", "build", str(tmp_path / "a.txt"), str(tmp_path / "b.csv"),
                     str(tmp_path / "labels.csv"), "--parents", str(tmp_path / "parents.txt"), "-o", str(out)]) == 0
    v = vocab_mod.load(out)
    assert [c.name for c in v] == ["Cat", "dog", "surfboard", "bird", "horse", "pet", "sports equipment", "animal"]
    cat = v[v.index("cat")]
    assert cat.synonyms == ("kitty", "house cat")  # the separate "kitty" line merged into cat
    assert cat.parents == ("pet",) and cat.display("de") == "Katze"
    dog = v[v.index("dog")]
    assert dog.synonyms == ("hound",) and dog.display("de") == "Hund"
    assert v[v.index("bird")].parents == ("animal",)
    # an existing file is not overwritten without --force; a broken composition writes nothing
    assert cli.main(["vocab", "build", str(tmp_path / "a.txt"), "-o", str(out)]) == 2
    (tmp_path / "cyc.txt").write_text("x: y\ny: x\n")
    assert cli.main(["vocab", "build", str(tmp_path / "a.txt"), "--parents", str(tmp_path / "cyc.txt")]) == 1
    assert "parent cycle" in capsys.readouterr().err
    # --base keeps the base's lines (and explicit ids) first
    base = tmp_path / "base.txt"
    base.write_text("ai_Ab12Cd34 | tiger\n")
    assert cli.main(["vocab", "build", str(tmp_path / "labels.csv"), "--base", str(base)]) == 0
    built = vocab_mod.parse(capsys.readouterr().out)
    assert [c.name for c in built] == ["tiger", "bird", "cat", "horse"] and built[0].id == "ai_Ab12Cd34"


def test_synonyms_are_one_concept_with_a_merged_prompt_ensemble(tagger):
    cat = tagger.vocab.index("cat")
    texts = [t.format(n) for n in ("cat", "kitty", "house cat") for t in tagger.templates]
    expected = torch.nn.functional.normalize(tagger.encode_texts(texts).mean(0), dim=-1)
    assert torch.allclose(tagger.text_embeddings[cat], expected, atol=1e-5)
    assert len(tagger.vocab) == 9
    assert list(tagger.select_indices(["kitty"])) == [cat]  # select_concepts by a synonym
    assert list(tagger.select_indices([tagger.vocab[cat].id])) == [cat]


def test_parents_never_below_children(tagger, encoder, coco_images):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in coco_images[:16]]
    embeddings = encoder.embed(images)
    values = tagger.values(embeddings)
    raw = 1 / (1 + np.exp(-tagger.logits(embeddings)))
    v = tagger.vocab
    for child in range(len(v)):
        for anc in v.ancestors(child):
            assert (values[:, anc] >= values[:, child]).all(), (v[child].name, v[anc].name)
    # the ancestor's value is exactly the max of its own raw value and its descendants'
    animal, descendants = v.index("animal"), [v.index(n) for n in ("mammal", "cat", "dog")]
    assert np.allclose(values[:, animal], raw[:, [animal, *descendants]].max(1), atol=1e-6)
    pet = v.index("pet")
    assert np.allclose(values[:, pet], raw[:, [pet, v.index("cat"), v.index("dog")]].max(1), atol=1e-6)
    # concepts outside the hierarchy are untouched
    car = v.index("car")
    assert np.allclose(values[:, car], raw[:, car], atol=1e-6)


def _values(tagger, **named):
    v = np.zeros(len(tagger.vocab), dtype=np.float32)
    for name, value in named.items():
        v[tagger.vocab.index(name.replace("_", " "))] = value
    return v


def test_hidden_never_reported(tagger):
    v = _values(tagger, no_person=0.99, cat=0.5)
    names = [t.name for t in tagger.pick(v, min_value=0.0)]
    assert "no person" not in names and "cat" in names
    sel = tagger.select_indices(["no person", "cat"])
    assert [t.name for t in tagger.pick(v, select=sel)] == ["cat"]


def test_exclusive_pairs_resolved(tagger):
    # the hidden "no person" still wins its exclusion against a weaker "people"
    v = _values(tagger, people=0.6, no_person=0.8, cat=0.3)
    assert "people" not in [t.name for t in tagger.pick(v)]
    v = _values(tagger, people=0.8, no_person=0.6)
    assert [t.name for t in tagger.pick(v, min_value=0.5)] == ["people"]
    # a partner that does not pass the thresholds excludes nothing
    v = _values(tagger, people=0.4, no_person=0.6)
    assert [t.name for t in tagger.pick(v, min_value=0.5)] == []
    v = _values(tagger, people=0.6, no_person=0.4)
    assert [t.name for t in tagger.pick(v, min_value=0.5)] == ["people"]


def test_exclusion_chain_is_greedy(random_info, cache_dir):
    t = Tagger(random_info, vocab_mod.parse("a | exclusive=b\nb | exclusive=c\nc\n"), device="cpu",
               cache_dir=cache_dir)
    v = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    # b loses to a; c is not excluded by the dropped b
    assert [x.name for x in t.pick(v)] == ["a", "c"]


def test_thresholds_respected(tagger):
    v = _values(tagger, car=0.98, cat=0.7, dog=0.2)
    assert [t.name for t in tagger.pick(v, min_value=0.5)] == ["cat"]  # car is below its own 0.99
    v = _values(tagger, car=0.995, cat=0.7, dog=0.2)
    assert [t.name for t in tagger.pick(v, min_value=0.5)] == ["car", "cat"]
    assert [t.name for t in tagger.pick(v, min_value=0.8)] == ["car"]
    # an explicit select_concepts reports the value whatever the concept's own threshold
    v = _values(tagger, car=0.5)
    assert [t.name for t in tagger.pick(v, select=tagger.select_indices(["car"]))] == ["car"]


def test_priority_demotes_generic_concepts(tagger):
    v = _values(tagger, object=0.9, cat=0.5, dog=0.4, car=0.995)
    # "object" (priority -1) only fills places the others leave free; the output stays sorted by value
    assert [t.name for t in tagger.pick(v, max_concepts=2, min_value=0.3)] == ["car", "cat"]
    assert [t.name for t in tagger.pick(v, max_concepts=4, min_value=0.3)] == ["car", "object", "cat", "dog"]


def test_language_column_served(tagger, encoder, coco_images):
    from PIL import Image

    cat = tagger.vocab.index("cat")
    sel = tagger.select_indices(["cat", "animal", "mammal"])
    row = tagger.values(encoder.embed([Image.open(coco_images[0]).convert("RGB")]))[0]
    de = tagger.pick(row, select=sel, language="de")
    en = tagger.pick(row, select=sel)
    assert {t.name for t in de} == {"Katze", "Tier", "mammal"}  # mammal has no German name
    assert [t.id for t in de] == [t.id for t in en] and [t.value for t in de] == [t.value for t in en]
    v = _values(tagger, cat=0.9)
    assert tagger.pick(v, select=sel, language="zh-CN")[0].name == "猫"
    assert tagger.pick(v, select=sel, language="zh-CN")[0].id == tagger.vocab[cat].id
