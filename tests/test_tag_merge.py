"""The pure tag-merge rules (localtag.directus.tag_merge): a person's tags are never removed or claimed."""

from __future__ import annotations

import pytest

from localtag.core.tag import Tag
from localtag.directus.tag_merge import (
    PROVENANCE_VERSION,
    TagsFieldError,
    machine_tags,
    plan_tags,
    provenance_stamp,
)

STAMP = {"model": "m", "model_sha256": "a" * 64, "vocab_sha256": "b" * 64, "run": "r1", "tagged_at": "t"}


def tags(*pairs: tuple[str, float]) -> list[Tag]:
    return [Tag(f"ai_{i:08d}", n, v) for i, (n, v) in enumerate(pairs)]


def test_first_write_appends_machine_tags_after_the_persons():
    plan = plan_tags(["holiday"], None, tags(("cat", 0.97), ("animal", 0.9)), STAMP)
    assert plan.tags == ["holiday", "cat", "animal"]
    assert plan.provenance == {"v": PROVENANCE_VERSION, "tags": ["cat", "animal"],
                               "values": {"cat": 0.97, "animal": 0.9}, **STAMP}
    assert plan.added == ["cat", "animal"] and plan.removed == []


def test_none_is_no_tags_and_plain_names_have_no_values():
    plan = plan_tags(None, None, ["cat", "dog"], STAMP)
    assert plan.tags == ["cat", "dog"] and plan.provenance["values"] == {}


def test_retag_replaces_only_machine_tags():
    first = plan_tags(["mine"], None, tags(("cat", 0.9), ("pet", 0.8)), STAMP)
    second = plan_tags(first.tags, first.provenance, tags(("dog", 0.95)), {**STAMP, "run": "r2"})
    assert second.tags == ["mine", "dog"]
    assert second.removed == ["cat", "pet"] and second.added == ["dog"]
    assert second.provenance["run"] == "r2" and "rejected" not in second.provenance


def test_a_machine_tag_the_person_removed_is_remembered_and_never_written_again():
    first = plan_tags([], None, tags(("cat", 0.9), ("pet", 0.8)), STAMP)
    edited = [t for t in first.tags if t != "cat"]  # a person deletes "cat"
    second = plan_tags(edited, first.provenance, tags(("cat", 0.99), ("pet", 0.8)), STAMP)
    assert second.tags == ["pet"] and second.provenance["rejected"] == ["cat"]
    third = plan_tags(second.tags, second.provenance, tags(("cat", 0.99)), STAMP)
    assert third.tags == [] and third.provenance["rejected"] == ["cat"]


def test_a_persons_copy_of_a_machine_tag_stays_theirs():
    first = plan_tags([], None, tags(("cat", 0.9)), STAMP)
    both = [*first.tags, "cat"]  # a person adds the same tag too
    second = plan_tags(both, first.provenance, tags(("cat", 0.9), ("pet", 0.7)), STAMP)
    assert second.tags == ["cat", "pet"]  # one "cat": the person's (removed once, not re-added)
    assert second.provenance["tags"] == ["pet"]


def test_a_persons_tag_in_another_case_is_not_added_or_claimed():
    plan = plan_tags(["Dog"], None, tags(("dog", 0.9), ("cat", 0.5)), STAMP)
    assert plan.tags == ["Dog", "cat"] and plan.provenance["tags"] == ["cat"]


def test_tags_that_are_not_a_list_are_left_alone():
    with pytest.raises(TagsFieldError, match="not a list"):
        plan_tags({"note": "mine"}, None, tags(("cat", 0.9)), STAMP)


def test_machine_tags_reads_only_usable_records():
    assert machine_tags(None) == ([], [])
    assert machine_tags("garbage") == ([], [])
    assert machine_tags({"tags": ["a", 3, None], "rejected": "b"}) == (["a"], [])


def test_plan_twice_is_the_plan_once():
    first = plan_tags(["mine"], None, tags(("cat", 0.9)), STAMP)
    again = plan_tags(first.tags, first.provenance, tags(("cat", 0.9)), STAMP)
    assert again.tags == first.tags and again.provenance == first.provenance


def test_provenance_stamp_names_model_vocab_and_run(fixture_tagger):
    stamp = provenance_stamp(fixture_tagger.info.name, fixture_tagger.info.sha256, fixture_tagger.vocab.sha256, "run-1")
    assert stamp["model"] == fixture_tagger.info.name and stamp["model_sha256"] == fixture_tagger.info.sha256
    assert stamp["vocab_sha256"] == fixture_tagger.vocab.sha256 and stamp["run"] == "run-1"
