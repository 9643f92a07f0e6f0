"""The concept vocabulary (``vocab.txt``).

One concept per line, fields separated by `` | ``::

    # comment
    cat | syn=house cat, kitty | parents=mammal, pet | threshold=0.9 | lang.de=Katze
    ai_Ab12Cd34 | dog            # an explicit id keeps a renamed concept's id

Field 1 is the name, or an explicit id ``ai_XXXXXXXX`` followed by the name. Without an id the id
is derived from the name (sha256, base62), so re-ordering or extending the file keeps every id.
Optional ``key=value`` fields:

- ``syn``: synonyms merged into the concept: each is also a prompt variant, and labels,
  ``select_concepts`` and ``parents=`` may name the concept by any of them;
- ``parents``: parent concept names; a parent's value is never below its child's (``cat`` with
  ``parents=mammal, pet`` lifts ``mammal`` and ``pet`` to at least the value of ``cat``);
- ``threshold``: a per-concept minimum value, on top of the request's ``min_value``;
- ``prompts``: custom templates with ``{}`` for this concept, replacing the model's templates;
- ``exclusive``: concepts that cannot hold together with this one (``people | exclusive=no person``):
  of the concepts that pass their thresholds, the stronger is kept and the other dropped;
- ``priority``: an integer (default 0). When more concepts pass than ``max_concepts`` allows, higher
  priorities take the places first; a negative priority demotes a generic concept so that it only
  fills places the others leave free. Reported tags stay sorted by value;
- ``hidden``: ``1`` scores the concept (for parents and exclusions) but never reports it;
- ``lang.XX``: a display name in language XX (served through Clarifai's ``language`` output config;
  ``de-AT`` falls back to ``de``, and a concept without a name in that language keeps its own).

``localtag vocab check`` lists every problem of a file (:func:`check_text`); loading raises
:class:`VocabError` carrying all of them.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import labels as labels_file

_ID_RE = re.compile(r"^ai_[A-Za-z0-9]{8}$")
_BAD_NAME = re.compile(r"[|#=\t]")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LIST_KEYS = {"syn", "parents", "prompts", "exclusive"}
_MAX_MESSAGE_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One problem of a vocabulary, at a line of its source."""

    source: str
    line: int
    kind: str  # syntax, duplicate-name, id-collision, unknown-concept, cycle, empty-prompt, exclusive
    message: str
    error: bool = True

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {'' if self.error else 'warning: '}{self.message}"


class VocabError(ValueError):
    """A malformed vocabulary: the message names the file and line; ``problems`` lists them all."""

    def __init__(self, message: str, problems: Iterable[Problem] = ()):
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def of(cls, problems: list[Problem]) -> VocabError:
        errors = [p for p in problems if p.error]
        lines = [str(p) for p in errors[:_MAX_MESSAGE_PROBLEMS]]
        if len(errors) > _MAX_MESSAGE_PROBLEMS:
            lines.append(f"… and {len(errors) - _MAX_MESSAGE_PROBLEMS} more problems (run `localtag vocab check`)")
        return cls("\n".join(lines), problems)


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


def _lang_key(language: str) -> str:
    return language.strip().lower().replace("_", "-")


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
    explicit_id: bool = field(default=False, compare=False)

    def display(self, language: str | None = None) -> str:
        """The name in ``language`` (``de``, ``zh-CN``, …; ``de-AT`` falls back to ``de``), else the name."""
        if language and self.names:
            wanted = _lang_key(language)
            keyed = {_lang_key(k): v for k, v in self.names.items()}
            for key in (wanted, wanted.split("-")[0]):
                if key in keyed:
                    return keyed[key]
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
            self.by_id.setdefault(c.id, i)
            for n in (c.name, *c.synonyms):
                self.by_name.setdefault(normalize_name(n), i)
        problems = structure_problems(self.concepts, source)
        if any(p.error for p in problems):
            raise VocabError.of(problems)
        self.warnings = problems

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

    @property
    def path(self) -> Path | None:
        """The file the vocabulary was read from, if any."""
        p = Path(self.source)
        return p if not self.source.startswith("<") and p.is_file() else None

    def index(self, key: str) -> int | None:
        """Index of a concept by id (exact) or name/synonym (case-insensitive)."""
        if key in self.by_id:
            return self.by_id[key]
        return self.by_name.get(normalize_name(key))

    def parent_indices(self, i: int) -> list[int]:
        return [self.by_name[normalize_name(p)] for p in self.concepts[i].parents]

    def ancestors(self, i: int) -> list[int]:
        """All ancestors of concept ``i`` (parents, their parents, …), nearest first."""
        out: list[int] = []
        frontier = self.parent_indices(i)
        while frontier:
            nxt = []
            for p in frontier:
                if p not in out and p != i:
                    out.append(p)
                    nxt.extend(self.parent_indices(p))
            frontier = nxt
        return out


def structure_problems(concepts: list[Concept], source: str) -> list[Problem]:
    """Every cross-line problem: duplicate names, id collisions, unknown references, parent cycles."""
    problems: list[Problem] = []
    by_id: dict[str, Concept] = {}
    by_name: dict[str, Concept] = {}
    for c in concepts:
        other = by_id.get(c.id)
        same_name = other is not None and normalize_name(other.name) == normalize_name(c.name)
        if other is not None and not (same_name and not c.explicit_id):  # a repeated name is reported below
            why = "explicit id reused" if c.explicit_id or other.explicit_id else "hash collision; give one an explicit id"
            problems.append(Problem(source, c.line, "id-collision",
                                    f"id {c.id} of {c.name!r} collides with {other.name!r} (line {other.line}; {why})"))
        else:
            by_id[c.id] = c
        seen_here: set[str] = set()
        for n in (c.name, *c.synonyms):
            key = normalize_name(n)
            if key in seen_here:
                problems.append(Problem(source, c.line, "duplicate-name",
                                        f"{c.name!r} lists {n!r} twice (as its name or synonym)", error=False))
                continue
            seen_here.add(key)
            other = by_name.get(key)
            if other is not None:
                role = "name" if normalize_name(other.name) == key else "synonym"
                problems.append(Problem(source, c.line, "duplicate-name",
                                        f"name {n!r} of {c.name!r} is already the {role} of {other.name!r} "
                                        f"(line {other.line})"))
            else:
                by_name[key] = c
    index = {normalize_name(n): i for i, c in reversed(list(enumerate(concepts))) for n in (c.name, *c.synonyms)}
    edges: list[list[int]] = [[] for _ in concepts]
    for i, c in enumerate(concepts):
        for kind, refs in (("parent", c.parents), ("exclusive", c.exclusive)):
            for ref in refs:
                j = index.get(normalize_name(ref))
                if j is None:
                    problems.append(Problem(source, c.line, "unknown-concept",
                                            f"{c.name!r} names unknown {kind} concept {ref!r}"))
                elif kind == "parent":
                    edges[i].append(j)
                elif j == i:
                    problems.append(Problem(source, c.line, "exclusive", f"{c.name!r} is exclusive with itself"))
    problems.extend(_cycle_problems(concepts, edges, source))
    ancestry = _ancestry(edges)
    for i, c in enumerate(concepts):
        for ref in c.exclusive:
            j = index.get(normalize_name(ref))
            if j is not None and j != i and (j in ancestry[i] or i in ancestry[j]):
                problems.append(Problem(source, c.line, "exclusive",
                                        f"{c.name!r} is exclusive with its own ancestor or descendant {ref!r} "
                                        "(a parent is never below its child, so the child always loses)",
                                        error=False))
    return problems


def _cycle_problems(concepts: list[Concept], edges: list[list[int]], source: str) -> list[Problem]:
    """One problem per distinct parent cycle (found as back edges of a depth-first walk)."""
    state = [0] * len(concepts)  # 0 new, 1 on the stack, 2 done
    found: dict[tuple[int, ...], Problem] = {}
    for start in range(len(concepts)):
        if state[start]:
            continue
        stack: list[tuple[int, int]] = [(start, 0)]
        path: list[int] = [start]
        state[start] = 1
        while stack:
            node, k = stack[-1]
            if k < len(edges[node]):
                stack[-1] = (node, k + 1)
                nxt = edges[node][k]
                if state[nxt] == 1:
                    cycle = path[path.index(nxt):]
                    r = cycle.index(min(cycle))
                    key = tuple(cycle[r:] + cycle[:r])
                    if key not in found:
                        names = " -> ".join(concepts[j].name for j in [*key, key[0]])
                        found[key] = Problem(source, concepts[key[0]].line, "cycle", f"parent cycle {names}")
                elif state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return list(found.values())


def _ancestry(edges: list[list[int]]) -> list[set[int]]:
    out: list[set[int]] = []
    for i in range(len(edges)):
        seen: set[int] = set()
        frontier = list(edges[i])
        while frontier:
            j = frontier.pop()
            if j not in seen:
                seen.add(j)
                frontier.extend(edges[j])
        out.append(seen)
    return out


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
    seen: set[str] = set()
    for f in fields:
        if "=" not in f:
            raise VocabError(f"{source}:{lineno}: expected key=value, got {f!r}")
        key, value = (s.strip() for s in f.split("=", 1))
        if key in seen:
            raise VocabError(f"{source}:{lineno}: field {key!r} given twice")
        seen.add(key)
        if key in _LIST_KEYS:
            items = tuple(v.strip() for v in value.split(",") if v.strip())
            if key == "prompts":
                if not items:
                    raise VocabError(f"{source}:{lineno}: empty prompts= for {name!r} (drop the field to use "
                                     "the model's templates)")
                if len(items) != len(value.split(",")):
                    raise VocabError(f"{source}:{lineno}: empty prompt in prompts={value!r} (a stray comma?)")
                bad = [p for p in items if "{}" not in p]
                if bad:
                    raise VocabError(f"{source}:{lineno}: prompt {bad[0]!r} has no {{}} placeholder")
            bad_names = [v for v in items if _BAD_NAME.search(v)] if key != "prompts" else []
            if bad_names:
                raise VocabError(f"{source}:{lineno}: bad name {bad_names[0]!r} in {key}=")
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
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise VocabError(f"{source}:{lineno}: hidden={value!r} (use 1 or 0)")
            opts["hidden"] = value.lower() in ("1", "true", "yes")
        elif key.startswith("lang.") and len(key) > 5:
            if not value:
                raise VocabError(f"{source}:{lineno}: empty display name for {key}")
            opts["names"][key[5:]] = value
        else:
            raise VocabError(f"{source}:{lineno}: unknown field {key!r}")
    return Concept(id=cid or concept_id(name), name=name, line=lineno, explicit_id=cid is not None, **opts)


def format_line(c: Concept, *, with_id: bool | None = None) -> str:
    """A concept as one ``vocab.txt`` line (the inverse of :func:`parse_line`)."""
    parts = [c.id, c.name] if (c.explicit_id if with_id is None else with_id) else [c.name]
    for key, items in (("syn", c.synonyms), ("parents", c.parents), ("exclusive", c.exclusive),
                       ("prompts", c.prompts)):
        if items:
            parts.append(f"{key}={', '.join(items)}")
    if c.threshold is not None:
        parts.append(f"threshold={c.threshold:g}")
    if c.priority:
        parts.append(f"priority={c.priority}")
    if c.hidden:
        parts.append("hidden=1")
    parts.extend(f"lang.{k}={v}" for k, v in c.names.items())
    return " | ".join(parts)


def check_text(text: str, source: str = "<string>") -> tuple[list[Concept], list[Problem]]:
    """Parse leniently: the concepts that parse, and every problem (syntax and structure)."""
    concepts: list[Concept] = []
    problems: list[Problem] = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            c = parse_line(line, source, n)
        except VocabError as e:
            problems.append(Problem(source, n, "empty-prompt" if "empty prompt" in str(e) else "syntax",
                                    str(e).split(": ", 1)[-1]))
            continue
        if c is not None:
            concepts.append(c)
    if not concepts and not problems:
        problems.append(Problem(source, 0, "syntax", "no concepts"))
    problems.extend(structure_problems(concepts, source))
    problems.sort(key=lambda p: p.line)
    return concepts, problems


def check(path: str | Path) -> tuple[list[Concept], list[Problem]]:
    path = Path(path)
    return check_text(_read(path), source=str(path))


def parse(text: str, source: str = "<string>") -> Vocab:
    concepts, problems = check_text(text, source)
    if any(p.error for p in problems):
        raise VocabError.of(problems)
    return Vocab(concepts, source=source)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabError(f"{path}: vocabulary file not found") from None
    except IsADirectoryError:
        raise VocabError(f"{path}: is a folder, not a vocabulary file") from None
    except UnicodeDecodeError as e:
        raise VocabError(f"{path}: not UTF-8 text ({e})") from None


def load(path: str | Path) -> Vocab:
    path = Path(path)
    return parse(_read(path), source=str(path))


# -- composing a vocabulary from label lists (``localtag vocab build``) ------------------------------
def read_label_list(path: str | Path) -> list[Concept]:
    """Concepts from a label list.

    - ``.csv``: a header row; the name column is ``name``, ``label``, ``concept`` or ``class`` (else the
      first); optional columns ``synonyms`` and ``parents`` (``;``- or ``,``-separated) and ``lang.XX``.
      An evaluation labels file (``path,labels``) gives its distinct ``;``-separated labels.
    - anything else: one concept per line in the ``vocab.txt`` format (a plain name is a valid line).
    """
    path = Path(path)
    text = _read(path)
    if path.suffix.lower() != ".csv":
        concepts, problems = check_text(text, str(path))
        errors = [p for p in problems if p.error and p.kind not in ("duplicate-name", "unknown-concept",
                                                                      "id-collision")]
        if errors:
            raise VocabError.of(errors)
        return concepts
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    out: list[Concept] = []

    def split(cell: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in re.split(r"[;,]", cell) if s.strip())

    if labels_file.is_header(rows[0]):  # an evaluation labels file
        return [Concept(id=concept_id(n), name=n, line=k) for k, n in enumerate(labels_file.names(text, str(path)), 2)]
    col = next((header.index(k) for k in ("name", "label", "concept", "class") if k in header), 0)
    for lineno, row in enumerate(rows[1:], 2):
        if not row or col >= len(row) or not row[col].strip() or row[col].lstrip().startswith("#"):
            continue
        cells = dict(zip(header, row, strict=False))
        name = " ".join(row[col].split())
        if _BAD_NAME.search(name):
            raise VocabError(f"{path}:{lineno}: bad concept name {name!r}")
        out.append(Concept(
            id=concept_id(name), name=name, line=lineno,
            synonyms=split(cells.get("synonyms", cells.get("syn", ""))),
            parents=split(cells.get("parents", "")),
            names={k[5:]: v.strip() for k, v in cells.items() if k.startswith("lang.") and v and v.strip()},
        ))
    return out


def compose(sources: Iterable[Iterable[Concept]], parents: dict[str, list[str]] | None = None,
            base: Vocab | None = None) -> list[Concept]:
    """Merge concept lists into one vocabulary. Names are deduplicated case-insensitively: a concept whose
    name or synonym is already known merges into that concept (synonyms, parents, exclusions and display
    names are added), and two known concepts that a later line says are synonyms become one. ``parents``
    (``child -> parents``) adds parents; a parent that is not a concept yet becomes one. ``base``
    concepts come first and keep their ids."""
    merged: list[Concept | None] = list(base) if base is not None else []
    index: dict[str, int] = {}
    for i, c in enumerate(merged):
        for n in (c.name, *c.synonyms):
            index.setdefault(normalize_name(n), i)

    def union(old: Concept, new: Concept) -> Concept:
        known = {normalize_name(old.name)}
        syns = []
        for n in (*old.synonyms, new.name, *new.synonyms):
            if normalize_name(n) not in known:
                known.add(normalize_name(n))
                syns.append(n)
        return replace(old, synonyms=tuple(syns), parents=tuple(dict.fromkeys(old.parents + new.parents)),
                       exclusive=tuple(dict.fromkeys(old.exclusive + new.exclusive)),
                       names={**new.names, **old.names},
                       threshold=old.threshold if old.threshold is not None else new.threshold)

    def add(c: Concept) -> None:
        hits = list(dict.fromkeys(index[k] for k in (normalize_name(n) for n in (c.name, *c.synonyms)) if k in index))
        if not hits:
            merged.append(replace(c, line=len(merged) + 1))
            target = len(merged) - 1
            merged[target] = union(replace(c, synonyms=(), parents=(), exclusive=()), c)
        else:
            target = hits[0]
            merged[target] = union(merged[target], c)
            for other in hits[1:]:  # this line says two known concepts are one
                merged[target] = union(merged[target], merged[other])
                merged[other] = None
        for n in (merged[target].name, *merged[target].synonyms):
            index[normalize_name(n)] = target

    for concepts in sources:
        for c in concepts:
            add(c)
    for child, ps in (parents or {}).items():
        add(Concept(id=concept_id(child), name=child, parents=tuple(ps)))
    for c in list(merged):
        for p in c.parents if c is not None else ():
            if normalize_name(p) not in index:
                add(Concept(id=concept_id(p), name=p))
    return [c for c in merged if c is not None]


def read_parents(path: str | Path) -> dict[str, list[str]]:
    """``child: parent, parent`` (or ``child -> parent``) per line, or a CSV ``child,parent`` per row."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    text = _read(path)
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if len(r) >= 2 and r[0].strip()]
        if rows and [h.strip().lower() for h in rows[0][:2]] == ["child", "parent"]:
            rows = rows[1:]
        for r in rows:
            out.setdefault(r[0].strip(), []).extend(p.strip() for p in r[1:] if p.strip())
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(.+?)\s*(?:->|:)\s*(.+)$", line)
        if not m:
            raise VocabError(f"{path}:{lineno}: expected 'child: parent, parent', got {line!r}")
        out.setdefault(m.group(1).strip(), []).extend(p.strip() for p in m.group(2).split(",") if p.strip())
    return out
