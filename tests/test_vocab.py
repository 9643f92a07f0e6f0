"""vocab.txt format: stable ids, comments, errors that name file and line, and the shipped vocabulary."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localtag.core import vocab
from localtag.core.vocab import VocabError

REPO = Path(__file__).resolve().parent.parent


def test_ids_are_stable_under_reordering_and_extension():
    a = vocab.parse("cat\ndog\n# a comment\n\nbird | syn=birdie\n")
    b = vocab.parse("zebra\nbird | syn=birdie\n\ndog\ncat\n")
    ids_a = {c.name: c.id for c in a}
    ids_b = {c.name: c.id for c in b}
    assert all(ids_b[n] == i for n, i in ids_a.items())
    assert all(re.fullmatch(r"ai_[A-Za-z0-9]{8}", i) for i in ids_b.values())
    assert vocab.concept_id("Cat") == vocab.concept_id(" cat ") == ids_a["cat"]
    assert len(set(ids_b.values())) == 4


def test_explicit_id_wins_and_fields_parse():
    v = vocab.parse("ai_Ab12Cd34 | kitty cat | syn=cat, kitty | parents=animal | threshold=0.8\nanimal\n")
    c = v[0]
    assert (c.id, c.name, c.synonyms, c.parents, c.threshold) == (
        "ai_Ab12Cd34", "kitty cat", ("cat", "kitty"), ("animal",), 0.8)
    assert v.index("KITTY") == 0 and v.index("ai_Ab12Cd34") == 0


@pytest.mark.parametrize(
    "text,message",
    [
        ("cat\ndog | threshold=1.5\n", r"v\.txt:2: .*threshold"),
        ("cat\ndog | colour=red\n", r"v\.txt:2: .*unknown field"),
        ("cat\nai_123 | dog\n", r"v\.txt:2: .*id"),
        ("cat\ndog | parents=wolf\n", r"v\.txt:2: .*wolf"),
        ("cat\ncat\n", r"v\.txt:2: .*cat"),
        ("cat | parents=dog\ndog | parents=cat\n", r"v\.txt:\d: .*cycle"),
        ("dog | just words\n", r"v\.txt:1: "),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, text, message):
    p = tmp_path / "v.txt"
    p.write_text(text)
    with pytest.raises(VocabError, match=message):
        vocab.load(p)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(VocabError, match="not found"):
        vocab.load(tmp_path / "nope.txt")


def test_shipped_vocabulary():
    v = vocab.load(REPO / "localtag" / "data" / "vocab.txt")
    assert len(v) >= 3000
    names = {c.name for c in v}
    for must in ("no person", "people", "outdoors", "indoors", "travel", "business", "cat", "dog", "car",
                 "beach", "sunset", "snow", "red", "food"):
        assert must in names, must
    header = (REPO / "localtag" / "data" / "vocab.txt").read_text().splitlines()[:40]
    text = "\n".join(header).lower()
    for source in ("coco", "open images", "places365", "imagenet"):
        assert source in text, source
    # the hierarchy is real: a cat is a pet and, through feline and carnivore, a mammal and an animal
    for name, direct in (("cat", {"feline", "pet"}), ("dog", {"canine", "pet"})):
        i = v.index(name)
        assert set(v[i].parents) == direct
        assert {"carnivore", "mammal", "animal"} <= {v[a].name for a in v.ancestors(i)}


def test_cli_vocab_check_reports_counts():
    from cli_run import run_cli

    r = run_cli("vocab", "check", str(REPO / "localtag" / "data" / "vocab.txt"))
    assert r.returncode == 0, r.stderr
    assert re.search(r"\d{4} concepts", r.stdout)
