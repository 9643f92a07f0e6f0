"""The tag-merge rules: which tags are localtag's, and what one write sets (pure: no I/O).

Which tags localtag wrote lives in Directus itself, in a json field `localtag` on directus_files that
`install-flow` and `sync` create. Every write is ONE PATCH carrying the new `tags` and the new `localtag`
record together: Directus stores both in one transaction or neither, so a crash or Ctrl-C at any moment
leaves each file either as it was or fully tagged, never with tags it cannot account for; and a PATCH
sets whole values, so a retried PATCH changes nothing more. The record travels with the file, so the
flow endpoint and any machine running `sync` share it, and people see in Directus which tags are
machine tags.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..core.tag import Tag

PROVENANCE_FIELD = "localtag"
PROVENANCE_VERSION = 1


class TagsFieldError(ValueError):
    """The file's `tags` hold something other than a list: a person's data, left alone."""


def machine_tags(provenance: Any) -> tuple[list[str], list[str]]:
    """(tags localtag wrote, machine tags a person removed) from a `localtag` record; ([], []) if unusable."""
    if not isinstance(provenance, dict):
        return [], []

    def strings(key: str) -> list[str]:
        value = provenance.get(key)
        return [t for t in value if isinstance(t, str)] if isinstance(value, list) else []

    return strings("tags"), strings("rejected")


@dataclass
class TagPlan:
    """The values one write sets: `tags` (the person's, in their order, then the machine's) and the
    `provenance` record; `added` / `removed` are machine tags, for logs and dry runs."""

    tags: list[Any]
    provenance: dict[str, Any]
    added: list[str]
    removed: list[str]


def person_tags(current: Any, provenance: Any) -> list[str]:
    """A person's own tags on a file: its string tags less localtag's recorded machine tags (each once, as
    :func:`plan_tags` removes them)."""
    person = [t for t in current if isinstance(t, str)] if isinstance(current, list) else []
    for tag in machine_tags(provenance)[0]:
        idx = next((i for i in range(len(person) - 1, -1, -1) if person[i] == tag), None)
        if idx is not None:
            del person[idx]
    return person


def plan_tags(current: Any, provenance: Any, new: Sequence[Tag | str], stamp: dict[str, Any],
              learnt: Collection[str] = ()) -> TagPlan:
    """(current tags − localtag's previous tags) ∪ new machine tags, never touching a person's tags.

    - A previous machine tag still present is removed once (its last occurrence: a person may have
      added the same tag too, and that one stays theirs).
    - A previous machine tag that is gone was removed by a person: it is remembered (`rejected`) and
      never written again.
    - A new machine tag equal (case-insensitively) to a person's tag is not added and not claimed.
    - `current` None is no tags; anything else but a list raises TagsFieldError.
    `new`: tagger Tags (or plain names), best first. `stamp`: model, vocabulary and run for the record.
    `learnt`: ids of the concepts a learnt head scored; the record's `learnt` lists the machine tags among them.
    """
    if current is None:
        current = []
    if not isinstance(current, list):
        raise TagsFieldError(f"the tags field holds a JSON {type(current).__name__}, not a list: left as it is")
    previous, rejected = machine_tags(provenance)
    person = list(current)
    removed = []
    for tag in previous:
        idx = next((i for i in range(len(person) - 1, -1, -1) if person[i] == tag), None)
        if idx is None:
            if tag not in rejected:
                rejected.append(tag)
        else:
            del person[idx]
            removed.append(tag)
    taken = {t.casefold() for t in [*person, *rejected] if isinstance(t, str)}
    machine, values, learnt_tags = [], {}, []
    for t in new:
        name = t.name if isinstance(t, Tag) else t
        if not isinstance(name, str) or not name or name.casefold() in taken:
            continue
        taken.add(name.casefold())
        machine.append(name)
        if isinstance(t, Tag):
            values[name] = round(float(t.value), 4)
            if t.id in learnt:
                learnt_tags.append(name)
    record = {"v": PROVENANCE_VERSION, "tags": machine, "values": values, **stamp}
    if learnt_tags:
        record["learnt"] = learnt_tags
    if rejected:
        record["rejected"] = rejected
    added = [t for t in machine if t not in removed]
    return TagPlan(person + machine, record, added, [t for t in removed if t not in machine])


def provenance_stamp(model: str, model_sha256: str, vocab_sha256: str, run: str,
                     head: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a provenance record says about the tagger and the write: model, weights and vocabulary hashes,
    and the learnt head that joined the vocabulary (``{"name", "sha256", "concepts"}``), if any."""
    stamp = {
        "model": model,
        "model_sha256": model_sha256,
        "vocab_sha256": vocab_sha256,
        "run": run,
        "tagged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if head:
        stamp["head"] = head
    return stamp

