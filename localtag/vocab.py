"""The concept vocabulary (``vocab.txt``).

One concept per line, fields separated by `` | ``::

    # comment
    cat | syn=house cat, kitty | parents=mammal, pet | threshold=0.9
    ai_Ab12Cd34 | dog            # an explicit id keeps a renamed concept's id

Field 1 is the name, or an explicit id ``ai_XXXXXXXX`` followed by the name. Without an id the id
is derived from the name (sha256, base62), so re-ordering or extending the file keeps every id.
Optional ``key=value`` fields:

- ``syn``: synonyms merged into the concept; each is also a prompt variant;
- ``parents``: parent concept names (a parent's value is never below its child's);
- ``threshold``: per-concept minimum value;
- ``prompts``: custom templates with ``{}`` for this concept, replacing the model's templates;
- ``exclusive``: names of concepts that cannot hold together with this one (the weaker is dropped);
- ``priority``: an integer; negative values sort a concept after others of equal standing;
- ``hidden``: ``1`` scores the concept (for parents and exclusions) but never reports it;
- ``lang.XX``: a display name in language XX (served through Clarifai's ``language`` option).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_ID_RE = re.compile(r"^ai_[A-Za-z0-9]{8}$")
_BAD_NAME = re.compile(r"[|#=\t]")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LIST_KEYS = {"syn", "parents", "prompts", "exclusive"}


class VocabError(ValueError):
    """A malformed vocabulary: the message names the file and line."""


def normalize_name(name: str) -> str:
    return " ".join(name.strip().split()).lower()


def concept_id(name: str) -> str:
    """The stable Clarifai-style id of a concept name: ``ai_`` + 8 base62 characters."""
    digest = int.from_bytes(hashlib.sha256(("localtag:" + normalize_name(name)).encode()).digest()[:8], "big")
    chars = []
    for _ in range(8):
        digest, r = divmod(digest, 62)
        chars.append(_B62[r])
    return "ai_" + "".join(chars)


@dataclass(frozen=True)
class Concept:
    id: str
    name: str
    synonyms: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    threshold: float | None = None
    prompts: tuple[str, ...] = ()
    exclusive: tuple[str, ...] = ()
    priority: int = 0
    hidden: bool = False
    names: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    line: int = 0

    def display(self, language: str | None = None) -> str:
        if language and language in self.names:
            return self.names[language]
        return self.name


class Vocab:
    """An ordered list of concepts with lookup by id and by name (synonyms included)."""

    def __init__(self, concepts: Iterable[Concept], source: str = "<memory>", text: str | None = None):
        self.concepts: list[Concept] = list(concepts)
        self.source = source
        self._text = text
        self.by_id: dict[str, int] = {}
        self.by_name: dict[str, int] = {}
        for i, c in enumerate(self.concepts):
            if c.id in self.by_id:
                other = self.concepts[self.by_id[c.id]]
                raise VocabError(f"{source}:{c.line}: id {c.id} of {c.name!r} collides with {other.name!r} (line {other.line})")
            self.by_id[c.id] = i
            for n in (c.name, *c.synonyms):
                key = normalize_name(n)
                if key in self.by_name:
                    other = self.concepts[self.by_name[key]]
                    raise VocabError(f"{source}:{c.line}: name {n!r} already used by {other.name!r} (line {other.line})")
                self.by_name[key] = i
        for c in self.concepts:
            for p in (*c.parents, *c.exclusive):
                if normalize_name(p) not in self.by_name:
                    raise VocabError(f"{source}:{c.line}: {c.name!r} refers to unknown concept {p!r}")
        self._check_cycles()

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self):
        return iter(self.concepts)

    def __getitem__(self, i: int) -> Concept:
        return self.concepts[i]

    @property
    def text(self) -> str:
        """A canonical text of the vocabulary; its hash keys the text-embedding cache."""
        if self._text is None:
            self._text = "\n".join(
                f"{c.id}|{c.name}|{','.join(c.synonyms)}|{','.join(c.prompts)}" for c in self.concepts
            )
        return self._text

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def index(self, key: str) -> int | None:
        """Index of a concept by id (exact) or name/synonym (case-insensitive)."""
        if key in self.by_id:
            return self.by_id[key]
        return self.by_name.get(normalize_name(key))

    def parent_indices(self, i: int) -> list[int]:
        return [self.by_name[normalize_name(p)] for p in self.concepts[i].parents]

    def _check_cycles(self) -> None:
        state: dict[int, int] = {}  # 1 visiting, 2 done

        def visit(i: int, path: list[int]) -> None:
            state[i] = 1
            for p in self.parent_indices(i):
                if state.get(p) == 1:
                    names = " -> ".join(self.concepts[j].name for j in [*path, i, p])
                    raise VocabError(f"{self.source}:{self.concepts[i].line}: parent cycle {names}")
                if state.get(p) is None:
                    visit(p, [*path, i])
            state[i] = 2

        for i in range(len(self.concepts)):
            if i not in state:
                visit(i, [])


def parse_line(line: str, source: str, lineno: int) -> Concept | None:
    body = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
    if not body:
        return None
    fields = [f.strip() for f in body.split("|")]
    cid = None
    if _ID_RE.match(fields[0]):
        cid = fields.pop(0)
        if not fields:
            raise VocabError(f"{source}:{lineno}: id {cid} without a name")
    elif fields[0].startswith("ai_") and " " not in fields[0] and len(fields) > 1 and "=" not in fields[1]:
        raise VocabError(f"{source}:{lineno}: malformed id {fields[0]!r} (expected ai_ + 8 letters or digits)")
    name = fields.pop(0)
    if not name or "=" in name or _BAD_NAME.search(name):
        raise VocabError(f"{source}:{lineno}: bad concept name {name!r}")
    opts: dict = {"names": {}}
    for f in fields:
        if "=" not in f:
            raise VocabError(f"{source}:{lineno}: expected key=value, got {f!r}")
        key, value = (s.strip() for s in f.split("=", 1))
        if key in _LIST_KEYS:
            items = tuple(v.strip() for v in value.split(",") if v.strip())
            if key == "prompts":
                bad = [p for p in items if "{}" not in p]
                if bad:
                    raise VocabError(f"{source}:{lineno}: prompt {bad[0]!r} has no {{}} placeholder")
            opts["synonyms" if key == "syn" else key] = items
        elif key == "threshold":
            try:
                t = float(value)
            except ValueError:
                raise VocabError(f"{source}:{lineno}: threshold {value!r} is not a number") from None
            if not 0.0 <= t <= 1.0:
                raise VocabError(f"{source}:{lineno}: threshold {t} is outside [0, 1]")
            opts["threshold"] = t
        elif key == "priority":
            try:
                opts["priority"] = int(value)
            except ValueError:
                raise VocabError(f"{source}:{lineno}: priority {value!r} is not an integer") from None
        elif key == "hidden":
            opts["hidden"] = value.lower() in ("1", "true", "yes")
        elif key.startswith("lang."):
            opts["names"][key[5:]] = value
        else:
            raise VocabError(f"{source}:{lineno}: unknown field {key!r}")
    return Concept(id=cid or concept_id(name), name=name, line=lineno, **opts)


def parse(text: str, source: str = "<string>") -> Vocab:
    concepts = [c for n, line in enumerate(text.splitlines(), 1) if (c := parse_line(line, source, n))]
    if not concepts:
        raise VocabError(f"{source}: no concepts")
    return Vocab(concepts, source=source)


def load(path: str | Path) -> Vocab:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabError(f"{path}: vocabulary file not found") from None
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}: not UTF-8 text ({e})") from None
    return parse(text, source=str(path))


def from_names(names: Iterable[str]) -> Vocab:
    """A flat vocabulary from plain names (tests, ``select_concepts``)."""
    return Vocab([Concept(id=concept_id(n), name=n, line=i) for i, n in enumerate(names, 1)])
