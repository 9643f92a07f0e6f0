#!/usr/bin/env python3
"""Build localtag's default concept vocabulary (vocab.txt) from the lists in sources/.

Usage (from the repository root):
    python tools/vocab/build_vocab.py              # writes ./vocab.txt
    python tools/vocab/build_vocab.py -o -         # writes to stdout
    python tools/vocab/build_vocab.py --check      # validates ./vocab.txt and checks it is up to date

Stdlib only, deterministic: the same sources always give byte-identical output.

Sources (tools/vocab/sources/):
  coco.txt, openimages_boxable.txt, places365.txt, imagenet1k.txt
      raw dataset label lists, one name per line (comments start with '#').
  renames.txt
      per-dataset clean-ups, "SOURCE: raw label -> concept name" (or "-> -" to drop a label).
      SOURCE is coco, openimages, places365, imagenet or * (any dataset).
  curated_*.txt
      hand-written concepts in the vocab.txt line format ("name | syn=a, b | parents=x, y"),
      plus two block directives that apply to the concept lines after them:
          [section=animals]      default section for concepts that no ancestor places elsewhere
          [parents=dog, pet]     parents added to every following line ([parents=] clears)
      A curated line whose name already exists merges into that concept (parents and synonyms
      are added), so curated files are also how dataset labels get their parents.

Merging rules: names are lowercased and whitespace-normalised; a dataset label equal to an
existing name or synonym merges into that concept; a curated synonym that is also a concept
name (or vice versa) is a build error, to be resolved by hand in the sources.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "sources")
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(REPO_ROOT, "localtag", "data", "vocab.txt")

SECTIONS = [
    "objects",
    "animals",
    "plants",
    "food & drink",
    "people & activities",
    "scenes & places",
    "weather & time of day",
    "colours",
    "styles & abstract concepts",
]

# A concept's section is taken from its nearest ancestor (itself included) listed here;
# failing that from its curated file's [section=...]; failing that from its dataset.
ROOT_SECTIONS = {
    "animal": "animals",
    "plant": "plants",
    "fungus": "plants",
    "food": "food & drink",
    "drink": "food & drink",
    "person": "people & activities",
    "people": "people & activities",
    "body part": "people & activities",
    "activity": "people & activities",
    "sport": "people & activities",
    "building": "scenes & places",
    "room": "scenes & places",
    "shop": "scenes & places",
    "landform": "scenes & places",
    "body of water": "scenes & places",
    "weather": "weather & time of day",
    "time of day": "weather & time of day",
    "season": "weather & time of day",
    "color": "colours",
}

# Dataset files: (file, source key, default section).
DATASETS = [
    ("coco.txt", "coco", "objects"),
    ("openimages_boxable.txt", "openimages", "objects"),
    ("places365.txt", "places365", "scenes & places"),
    ("imagenet1k.txt", "imagenet", "objects"),
]

SOURCE_NOTES = {
    "coco": "COCO 2017 detection categories (80). cocodataset.org; annotations CC BY 4.0.",
    "openimages": "Open Images V6/V7 boxable classes (600). Google; annotations CC BY 4.0.",
    "places365": "Places365-Standard scene categories (365). MIT CSAIL; research dataset.",
    "imagenet": "ImageNet-1k class names (1000), cleaned names as in OpenCLIP's zero_shot_metadata.py.",
    "curated": "hand-curated Clarifai-style general concepts, written for localtag (CC0).",
}

# ImageNet-1k animal classes are contiguous by WordNet branch; parents by class-index range
# (inclusive). Checked against the file: it must hold exactly 1000 names.
IMAGENET_RANGES = [
    (0, 1, "fish"), (2, 4, "shark"), (5, 6, "ray"), (7, 8, "chicken"), (9, 24, "bird"),
    (25, 29, "salamander"), (30, 32, "frog"), (33, 37, "turtle"), (38, 48, "lizard"),
    (49, 49, "crocodile"), (50, 50, "alligator"), (51, 51, "dinosaur"), (52, 68, "snake"),
    (69, 69, "invertebrate"), (70, 71, "arachnid"), (72, 77, "spider"), (78, 78, "arachnid"),
    (79, 79, "invertebrate"), (80, 86, "bird"), (87, 90, "parrot"), (91, 97, "bird"),
    (98, 98, "duck"), (99, 99, "bird"), (100, 100, "swan"), (101, 101, "elephant"),
    (102, 103, "mammal"), (104, 106, "marsupial"), (107, 109, "marine invertebrate"),
    (110, 111, "worm"), (112, 117, "mollusc"), (118, 121, "crab"), (122, 123, "lobster"),
    (124, 124, "crustacean"), (125, 125, "crab"), (126, 126, "crustacean"), (127, 146, "bird"),
    (147, 148, "whale"), (149, 150, "marine mammal"), (151, 268, "dog"), (269, 271, "wolf"),
    (272, 275, "canine"), (276, 276, "carnivore"), (277, 280, "fox"), (281, 285, "cat"),
    (286, 293, "big cat"), (294, 297, "bear"), (298, 299, "carnivore"), (300, 307, "beetle"),
    (308, 320, "insect"), (321, 326, "butterfly"), (327, 329, "marine invertebrate"),
    (330, 332, "rabbit"), (333, 338, "rodent"), (339, 339, "horse"), (340, 341, "mammal"),
    (342, 343, "pig"), (344, 344, "mammal"), (345, 345, "cow"), (346, 347, "mammal"),
    (348, 349, "sheep"), (350, 350, "goat"), (351, 353, "antelope"), (354, 354, "camel"),
    (355, 364, "mammal"), (365, 369, "ape"), (370, 382, "monkey"), (383, 384, "lemur"),
    (385, 386, "elephant"), (387, 387, "mammal"), (388, 388, "bear"), (389, 397, "fish"),
]

#: Clarifai's 23 languages: English is the concept name; the others come from sources/lang/<code>.tsv
LANGUAGES = ("ar", "bn", "da", "de", "es", "fi", "fr", "hi", "hu", "it", "ja", "ko", "nl", "no", "pa",
             "pl", "pt", "ru", "sv", "tr", "zh", "zh-TW")
LANG_DIR = os.path.join(SOURCES, "lang")
#: ``--check`` fails when fewer concepts than this have a name in a language
MIN_COVERAGE = 0.99

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9' \-]*[a-z0-9']$|^[a-z0-9]$")
ID_RE = re.compile(r"^ai_[A-Za-z0-9]{8}$")


class BuildError(Exception):
    pass


def norm(text: str) -> str:
    text = text.replace("_", " ").replace("\u2019", "'").strip().lower()
    return re.sub(r"\s+", " ", text)


def split_list(value: str) -> list[str]:
    return [norm(v) for v in value.split(",") if v.strip()]


def read_lines(path: str):
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            yield lineno, line


# Pairs that cannot both hold for one photo: the tagger keeps the stronger of the two.
EXCLUSIVE = {"no person": ("people",), "indoors": ("outdoors",)}


class Concept:
    __slots__ = ("name", "syns", "parents", "sources", "file_section", "default_sections")

    def __init__(self, name: str):
        self.name = name
        self.syns: list[str] = []
        self.parents: list[str] = []
        self.sources: list[str] = []
        self.file_section: str | None = None
        self.default_sections: list[str] = []


class Vocab:
    def __init__(self):
        self.concepts: OrderedDict[str, Concept] = OrderedDict()
        self.alias: dict[str, str] = {}  # name or synonym -> canonical name

    def _check_name(self, name: str, where: str):
        if not NAME_RE.match(name):
            raise BuildError(f"{where}: bad concept name {name!r}")

    def add_curated(self, name, syns, parents, section, where):
        self._check_name(name, where)
        if name in self.alias and self.alias[name] != name:
            raise BuildError(f"{where}: {name!r} is already a synonym of {self.alias[name]!r}")
        c = self.concepts.get(name)
        if c is None:
            c = self.concepts[name] = Concept(name)
            self.alias[name] = name
        for s in syns:
            self._check_name(s, where)
            if s == name:
                continue
            owner = self.alias.get(s)
            if owner is not None and owner != name:
                what = "concept" if owner == s else f"synonym of {owner!r}"
                raise BuildError(f"{where}: synonym {s!r} of {name!r} is already a {what}")
            if s not in c.syns:
                c.syns.append(s)
                self.alias[s] = name
        for p in parents:
            if p != name and p not in c.parents:
                c.parents.append(p)
        if section and c.file_section is None:
            c.file_section = section
        if "curated" not in c.sources:
            c.sources.append("curated")
        return c

    def add_dataset(self, name, source, default_section, where):
        self._check_name(name, where)
        canon = self.alias.get(name)
        if canon is None:
            c = self.concepts[name] = Concept(name)
            self.alias[name] = name
        else:
            c = self.concepts[canon]
        if source not in c.sources:
            c.sources.append(source)
        if default_section not in c.default_sections:
            c.default_sections.append(default_section)
        return c


def parse_concept_line(line: str, where: str):
    fields = [f.strip() for f in line.split("|")]
    if ID_RE.match(fields[0]):
        raise BuildError(f"{where}: explicit ids are not used in the default vocabulary")
    name = norm(fields[0])
    syns: list[str] = []
    parents: list[str] = []
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        key = key.strip()
        if not eq:
            raise BuildError(f"{where}: field {f!r} is not key=value")
        if key == "syn":
            syns += split_list(value)
        elif key == "parents":
            parents += split_list(value)
        else:
            raise BuildError(f"{where}: unknown key {key!r}")
    return name, syns, parents


def load_renames(path):
    renames: dict[tuple[str, str], str | None] = {}
    for lineno, line in read_lines(path):
        where = f"{os.path.basename(path)}:{lineno}"
        head, sep, target = line.partition("->")
        src, colon, raw = head.partition(":")
        if not sep or not colon:
            raise BuildError(f"{where}: expected 'SOURCE: raw -> name'")
        key = (src.strip().lower(), norm(raw))
        if key in renames:
            raise BuildError(f"{where}: duplicate rename for {key}")
        target = norm(target)
        renames[key] = None if target == "-" else target
    return renames


def clean_places(raw: str) -> str:
    # '/b/bakery/shop' -> 'bakery/shop' (renames.txt sees this form), then first component.
    m = re.match(r"^/[a-z]/(.+)$", raw)
    return m.group(1) if m else raw


def build() -> Vocab:
    v = Vocab()
    # 1. curated concept files, in name order.
    curated = sorted(f for f in os.listdir(SOURCES) if f.startswith("curated_") and f.endswith(".txt"))
    errors: list[str] = []
    for fname in curated:
        section = None
        block_parents: list[str] = []
        for lineno, line in read_lines(os.path.join(SOURCES, fname)):
            where = f"{fname}:{lineno}"
            m = re.match(r"^\[(section|parents)=(.*)\]$", line)
            if m:
                if m.group(1) == "section":
                    section = m.group(2).strip()
                    if section not in SECTIONS:
                        raise BuildError(f"{where}: unknown section {section!r}")
                else:
                    block_parents = split_list(m.group(2))
                continue
            try:
                name, syns, parents = parse_concept_line(line, where)
                v.add_curated(name, syns, block_parents + parents, section, where)
            except BuildError as e:
                errors.append(str(e))
    if errors:
        raise BuildError("\n  ".join([f"{len(errors)} problems in curated sources:"] + errors))

    # 2. dataset label lists.
    renames = load_renames(os.path.join(SOURCES, "renames.txt"))
    used_renames = set()
    for fname, source, default_section in DATASETS:
        raw_names = [line for _, line in read_lines(os.path.join(SOURCES, fname))]
        if source == "imagenet" and len(raw_names) != 1000:
            raise BuildError(f"{fname}: expected 1000 class names, got {len(raw_names)}")
        for idx, raw in enumerate(raw_names):
            where = f"{fname}[{idx}] {raw!r}"
            key_raw = norm(clean_places(raw) if source == "places365" else raw)
            name = key_raw
            for key in ((source, key_raw), ("*", key_raw)):
                if key in renames:
                    used_renames.add(key)
                    name = renames[key]
                    break
            if name is None:
                continue
            if source == "places365":
                name = name.split("/")[0]
            c = v.add_dataset(name, source, default_section, where)
            if source == "imagenet":
                for lo, hi, parent in IMAGENET_RANGES:
                    if lo <= idx <= hi and parent != c.name and parent not in c.parents:
                        c.parents.append(parent)
    unused = sorted(set(renames) - used_renames)
    if unused:
        raise BuildError(f"renames.txt: entries that match no dataset label: {unused}")

    # 3. resolve parents given as synonyms; every parent must exist.
    for c in v.concepts.values():
        resolved = []
        for p in c.parents:
            canon = v.alias.get(p)
            if canon is None:
                raise BuildError(f"concept {c.name!r}: unknown parent {p!r}")
            if canon != c.name and canon not in resolved:
                resolved.append(canon)
        c.parents = resolved
    cycle = find_cycle({n: c.parents for n, c in v.concepts.items()})
    if cycle:
        raise BuildError("parent cycle: " + " -> ".join(cycle))

    # 4. drop parents implied by another parent (transitive reduction of each parent list).
    ancestors_cache: dict[str, set[str]] = {}

    def ancestors(n: str) -> set[str]:
        if n not in ancestors_cache:
            acc: set[str] = set()
            for p in v.concepts[n].parents:
                acc.add(p)
                acc |= ancestors(p)
            ancestors_cache[n] = acc
        return ancestors_cache[n]

    for c in v.concepts.values():
        c.parents = [p for p in c.parents if not any(p in ancestors(q) for q in c.parents if q != p)]
    ancestors_cache.clear()
    return v


def find_cycle(graph: dict[str, list[str]]):
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(graph.get(start, ())))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            s = state.get(nxt, 0)
            if s == 1:
                return path[path.index(nxt):] + [nxt]
            if s == 0:
                state[nxt] = 1
                stack.append((nxt, iter(graph.get(nxt, ()))))
                path.append(nxt)
    return None


def section_of(v: Vocab, c: Concept) -> str:
    # breadth-first over ancestors, nearest root wins; ties by parent order.
    seen = {c.name}
    frontier = [c.name]
    while frontier:
        for n in frontier:
            if n in ROOT_SECTIONS:
                return ROOT_SECTIONS[n]
        nxt = []
        for n in frontier:
            for p in v.concepts[n].parents:
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        frontier = nxt
    if c.file_section:
        return c.file_section
    if "scenes & places" in c.default_sections:
        return "scenes & places"
    return c.default_sections[0] if c.default_sections else "objects"


def load_translations(lang_dir: str = LANG_DIR) -> dict[str, dict[str, str]]:
    """{language: {english name: translated name}} from ``lang/<code>.tsv`` (``english<TAB>name``)."""
    out: dict[str, dict[str, str]] = {}
    for code in LANGUAGES:
        path = os.path.join(lang_dir, f"{code}.tsv")
        names: dict[str, str] = {}
        if os.path.exists(path):
            for lineno, line in read_lines(path):
                en, tab, tr = line.partition("\t")
                tr = " ".join(tr.split())
                if not tab or not tr:
                    raise BuildError(f"{code}.tsv:{lineno}: expected 'english<TAB>name'")
                if FORBIDDEN_LANG & set(tr):
                    raise BuildError(f"{code}.tsv:{lineno}: {tr!r} has a character vocab.txt cannot hold")
                names[norm(en)] = tr
        out[code] = names
    return out


def render(v: Vocab, translations: dict[str, dict[str, str]] | None = None) -> str:
    translations = load_translations() if translations is None else translations
    by_section: dict[str, list[Concept]] = {s: [] for s in SECTIONS}
    for c in v.concepts.values():
        by_section[section_of(v, c)].append(c)
    counts = {s: len(cs) for s, cs in by_section.items()}
    src_counts = {k: sum(1 for c in v.concepts.values() if k in c.sources) for k in SOURCE_NOTES}
    out = []
    w = out.append
    w("# localtag default concept vocabulary")
    w("# GENERATED by tools/vocab/build_vocab.py from tools/vocab/sources/ -- edit the sources, then run")
    w("#   python tools/vocab/build_vocab.py && python tools/vocab/build_vocab.py --check")
    w("#")
    w("# Format")
    w("#   Comments start with '#'; blank lines are allowed.")
    w("#   Each concept line: fields separated by ' | '.")
    w("#   Field 1: the concept name (lowercase, single spaces, no '|' or '#' or '='; may contain spaces,")
    w("#     hyphens, apostrophes, digits). Optionally field 1 can be an explicit id ai_XXXXXXXX")
    w("#     (ai_ + 8 chars [A-Za-z0-9]) and then field 2 is the name. Without an id, the id is derived")
    w("#     deterministically from the name, so this default file writes no ids.")
    w("#   Further fields are key=value:")
    w("#     syn=a, b, c      synonyms merged into this concept; also used as prompt variants")
    w("#     parents=x, y     parent concept names (each is itself a concept in this file; no cycles)")
    w("#     exclusive=x      concepts that cannot hold together with this one (the stronger is kept)")
    w("#     threshold=0.9    optional per-concept minimum value (not used in this file)")
    w("#     lang.XX=name     the display name in language XX (from sources/lang/XX.tsv)")
    w("#   No name appears twice, and no name is also another concept's synonym.")
    w("#")
    w(f"# {len(v.concepts)} concepts. Sources (label names only; no images or annotations are used):")
    for k, note in SOURCE_NOTES.items():
        w(f"#   {k:<11} {src_counts[k]:>5} concepts  {note}")
    w("#   Names from different sources were merged case-insensitively and across synonyms, so the")
    w("#   per-source counts overlap. Dataset label names are factual lists; the datasets' own licences")
    w("#   (COCO/Open Images CC BY 4.0, Places365 and ImageNet research terms) cover their images and")
    w("#   annotations, none of which is included here.")
    w("#")
    w("# Sections (a concept's section follows its parents, e.g. everything under 'animal' is in animals):")
    for s in SECTIONS:
        w(f"#   {s:<28} {counts[s]:>5}")
    for s in SECTIONS:
        w("")
        w(f"# == {s} ==")
        for c in sorted(by_section[s], key=lambda c: c.name):
            line = c.name
            if c.syns:
                line += " | syn=" + ", ".join(c.syns)
            if c.parents:
                line += " | parents=" + ", ".join(c.parents)
            if c.name in EXCLUSIVE:
                line += " | exclusive=" + ", ".join(EXCLUSIVE[c.name])
            for code in LANGUAGES:
                name = translations.get(code, {}).get(c.name)
                if name:
                    line += f" | lang.{code}={name}"
            w(line)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# --check: an independent, spec-level validation of a written vocab file.

FORBIDDEN = set("|#=,")
FORBIDDEN_LANG = set("|#=\t\n\r")


def check_file(path: str, fresh: str | None) -> int:
    problems: list[str] = []
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    names: dict[str, int] = {}
    syn_of: dict[str, str] = {}
    parents: dict[str, list[str]] = {}
    exclusive: dict[str, list[str]] = {}
    lang_names: dict[str, dict[str, str]] = {}
    section = None
    section_counts: OrderedDict[str, int] = OrderedDict()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"^# == (.+) ==$", line)
            if m:
                section = m.group(1)
                section_counts[section] = 0
            continue
        fields = line.split(" | ")
        if ID_RE.match(fields[0]):
            fields = fields[1:]
        name = fields[0]
        if section is None:
            problems.append(f"line {lineno}: concept before any section")
        else:
            section_counts[section] += 1
        for item in [name]:
            if item != item.strip() or "  " in item or item != item.lower() or FORBIDDEN & set(item):
                problems.append(f"line {lineno}: bad name {item!r}")
            elif not NAME_RE.match(item):
                problems.append(f"line {lineno}: name has unexpected characters {item!r}")
        if name in names:
            problems.append(f"line {lineno}: duplicate name {name!r} (first on line {names[name]})")
        names[name] = lineno
        parents[name] = []
        seen_keys = set()
        for f in fields[1:]:
            key, eq, value = f.partition("=")
            if key.startswith("lang.") and eq and key not in seen_keys:
                seen_keys.add(key)
                code = key[5:]
                if code not in LANGUAGES or not value.strip() or FORBIDDEN_LANG & set(value):
                    problems.append(f"line {lineno}: bad field {f!r}")
                else:
                    lang_names.setdefault(code, {})[name] = value
                continue
            if not eq or key in seen_keys or key not in ("syn", "parents", "threshold", "exclusive"):
                problems.append(f"line {lineno}: bad field {f!r}")
                continue
            seen_keys.add(key)
            if key == "threshold":
                try:
                    float(value)
                except ValueError:
                    problems.append(f"line {lineno}: bad threshold {value!r}")
                continue
            items = [x.strip() for x in value.split(",")]
            for x in items:
                if not x or x != x.lower() or "  " in x or FORBIDDEN & set(x) or not NAME_RE.match(x):
                    problems.append(f"line {lineno}: bad {key} item {x!r}")
            if key == "syn":
                for x in items:
                    if x == name or x in syn_of:
                        problems.append(f"line {lineno}: synonym {x!r} repeated")
                    syn_of[x] = name
            elif key == "parents":
                parents[name] = items
            else:
                exclusive[name] = items
    for n, others in exclusive.items():
        problems += [f"{n!r}: exclusive partner {o!r} is not a concept" for o in others if o not in names]
    for s, owner in syn_of.items():
        if s in names:
            problems.append(f"synonym {s!r} of {owner!r} is also a concept name")
    for n, ps in parents.items():
        for p in ps:
            if p not in names:
                problems.append(f"{n!r}: parent {p!r} is not a concept")
            if p == n:
                problems.append(f"{n!r}: is its own parent")
    cycle = find_cycle(parents)
    if cycle:
        problems.append("parent cycle: " + " -> ".join(cycle))
    total = len(names)
    if total < 3000:
        problems.append(f"only {total} concepts (need >= 3000)")
    for required in ("no person", "people", "outdoors", "indoors", "travel", "business"):
        if required not in names:
            problems.append(f"required concept {required!r} missing")
    if [s for s in section_counts] != SECTIONS:
        problems.append(f"sections are {list(section_counts)}, expected {SECTIONS}")
    problems += coverage_problems(lang_names, total)
    if fresh is not None and fresh != text:
        problems.append(f"{path} is out of date: re-run tools/vocab/build_vocab.py")

    # warnings only: probable near-duplicates (singular/plural pairs).
    warnings = []
    for n in sorted(names):
        for other in (n + "s", n + "es"):
            if other in names:
                warnings.append(f"{n!r} / {other!r}")
    print(f"{path}: {total} concepts, {len(syn_of)} synonyms, "
          f"{sum(1 for ps in parents.values() if ps)} with parents")
    for s, n in section_counts.items():
        print(f"  {s:<28} {n:>5}")
    if warnings:
        print(f"warning: {len(warnings)} singular/plural name pairs: " + "; ".join(warnings))
    for p in problems:
        print("ERROR:", p)
    print("OK" if not problems else f"FAILED ({len(problems)} problems)")
    return 0 if not problems else 1


def coverage_problems(lang_names: dict[str, dict[str, str]], total: int) -> list[str]:
    """Each of the 22 languages besides English names >= MIN_COVERAGE of the concepts, without two
    concepts sharing a name; prints the coverage per language."""
    problems = []
    print(f"  languages (en is the concept name, {total}/{total}):")
    for code in LANGUAGES:
        names = lang_names.get(code, {})
        share = len(names) / total if total else 0.0
        print(f"    {code:<6} {len(names):>5}/{total} ({100 * share:.1f} %)")
        if share < MIN_COVERAGE:
            problems.append(f"lang.{code}: {len(names)}/{total} concepts named ({100 * share:.1f} % < "
                            f"{100 * MIN_COVERAGE:.0f} %)")
        by_name: dict[str, list[str]] = {}
        for concept, tr in names.items():
            by_name.setdefault(tr.casefold(), []).append(concept)
        problems += [f"lang.{code}: {who} share the name {tr!r}" for tr, who in by_name.items() if len(who) > 1]
    return problems


# ---------------------------------------------------------------------------------------------
# The model family's vocabularies (nsfw, moderation, food, …): sources/family/<name>.txt in the
# vocab.txt line format without translations → localtag/data/<name>.txt with lang.XX columns. A name
# comes from sources/family/lang.tsv (english, then one column per language in LANGUAGES order) first,
# else from vocab.txt's translations of the concept's name or, failing that, of one of its synonyms.

FAMILY_DIR = os.path.join(SOURCES, "family")
DATA_DIR = os.path.dirname(DEFAULT_OUT)


def family_sources() -> list[str]:
    return sorted(f for f in os.listdir(FAMILY_DIR) if f.endswith(".txt"))


def load_family_names() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {code: {} for code in LANGUAGES}
    for lineno, line in read_lines(os.path.join(FAMILY_DIR, "lang.tsv")):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != len(LANGUAGES) + 1 or not all(cols):
            raise BuildError(f"family/lang.tsv:{lineno}: expected english + {len(LANGUAGES)} names")
        for code, name in zip(LANGUAGES, cols[1:], strict=True):
            if FORBIDDEN_LANG & set(name):
                raise BuildError(f"family/lang.tsv:{lineno}: {name!r} has a character vocab files cannot hold")
            out[code][norm(cols[0])] = name
    return out


def render_family(fname: str, translations: dict[str, dict[str, str]], own: dict[str, dict[str, str]]) -> str:
    out = []
    for raw in open(os.path.join(FAMILY_DIR, fname), encoding="utf-8").read().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            out.append(raw)
            continue
        fields = [f.strip() for f in line.split("|")]
        name = norm(fields[0])
        syns = [norm(x) for f in fields[1:] if f.startswith("syn=") for x in f[4:].split(",") if x.strip()]
        for code in LANGUAGES:
            shown = own[code].get(name) or next(
                (translations[code][n] for n in (name, *syns) if n in translations[code]), None)
            if shown:
                line += f" | lang.{code}={shown}"
        out.append(line)
    head = f"# GENERATED by tools/vocab/build_vocab.py from tools/vocab/sources/family/{fname} and the translations."
    return head + "\n" + "\n".join(out) + "\n"


def check_family(fname: str, text: str, fresh: str | None) -> list[str]:
    problems = []
    names: dict[str, dict[str, str]] = {}
    total = 0
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        total += 1
        fields = [f.strip() for f in line.split(" | ")]
        for f in fields[1:]:
            key, _, value = f.partition("=")
            if key.startswith("lang."):
                names.setdefault(key[5:], {})[fields[0]] = value
    for code in LANGUAGES:
        got = names.get(code, {})
        if len(got) < MIN_COVERAGE * total:
            problems.append(f"{fname}: lang.{code} names {len(got)}/{total} concepts")
        shown = [v.casefold() for v in got.values()]
        if len(set(shown)) != len(shown):
            problems.append(f"{fname}: lang.{code}: two concepts share a name")
    if fresh is not None and fresh != text:
        problems.append(f"{fname} is out of date: re-run tools/vocab/build_vocab.py")
    print(f"{fname}: {total} concepts, named in {sum(1 for c in LANGUAGES if len(names.get(c, {})) == total)}"
          f"/{len(LANGUAGES)} languages besides English")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", default=DEFAULT_OUT, help="output file, '-' for stdout (default: localtag/data/vocab.txt)")
    ap.add_argument("--check", action="store_true", help="validate the output file (and that it matches the sources) instead of writing it")
    args = ap.parse_args(argv)
    try:
        text = render(build())
    except BuildError as e:
        print(f"build_vocab: error: {e}", file=sys.stderr)
        return 2
    translations = load_translations()
    family = {f: render_family(f, translations, load_family_names()) for f in family_sources()}
    if args.check:
        if args.output == "-":
            ap.error("--check needs a file")
        code = check_file(args.output, text)
        problems = []
        for fname, fresh in family.items():
            path = os.path.join(DATA_DIR, fname)
            written = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
            problems += check_family(fname, written, fresh)
        for p in problems:
            print("ERROR:", p)
        return code or (1 if problems else 0)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
        for fname, fresh in family.items():
            with open(os.path.join(DATA_DIR, fname), "w", encoding="utf-8", newline="\n") as fh:
                fh.write(fresh)
        print(f"wrote {len(family)} family vocabularies to {DATA_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
