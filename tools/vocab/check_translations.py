#!/usr/bin/env python3
"""Check the translations in tools/vocab/sources/lang/<code>.tsv against vocab.txt.

Each file has one line per concept: ``english name<TAB>translated name``, in any order. A concept
may be left out only when ``<code>.missing.tsv`` lists it with a reason (``name<TAB>reason``).

    python tools/vocab/check_translations.py            # every language file
    python tools/vocab/check_translations.py de fr      # only these

Exits 1 when a concept is missing without a reason, a translated name is empty, has a character
vocab.txt cannot hold (``|``, ``#``, ``=``, a tab or newline), or two concepts share one name
within a language. Standard library only.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LANG_DIR = Path(__file__).resolve().parent / "sources" / "lang"
LANGUAGES = ("ar", "bn", "da", "de", "es", "fi", "fr", "hi", "hu", "it", "ja", "ko", "nl", "no", "pa",
             "pl", "pt", "ru", "sv", "tr", "zh", "zh-TW")
FORBIDDEN = set("|#=\t\n\r")


def concept_names(vocab: Path = ROOT / "localtag" / "data" / "vocab.txt") -> list[str]:
    names = []
    for line in vocab.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(" | ")]
        names.append(fields[1] if fields[0].startswith("ai_") and len(fields) > 1 and "=" not in fields[1] else fields[0])
    return names


def read_tsv(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise SystemExit(f"{path}:{n}: no tab in {line!r}")
        en, _, tr = line.partition("\t")
        rows.append((en.strip(), tr.strip()))
    return rows


def check(code: str, names: list[str]) -> list[str]:
    path = LANG_DIR / f"{code}.tsv"
    if not path.exists():
        return [f"{code}: {path} does not exist"]
    problems = []
    rows = read_tsv(path)
    known = set(names)
    seen: dict[str, str] = {}
    for en, tr in rows:
        if en not in known:
            problems.append(f"{code}: {en!r} is not a concept of vocab.txt")
        elif en in seen:
            problems.append(f"{code}: {en!r} is translated twice")
        elif not tr:
            problems.append(f"{code}: {en!r} has an empty name")
        elif FORBIDDEN & set(tr):
            problems.append(f"{code}: {en!r} -> {tr!r} has a forbidden character")
        seen[en] = tr
    missing_path = LANG_DIR / f"{code}.missing.tsv"
    excused = {en for en, _ in read_tsv(missing_path)} if missing_path.exists() else set()
    missing = [n for n in names if n not in seen and n not in excused]
    if missing:
        problems.append(f"{code}: {len(missing)} concepts missing, e.g. {missing[:5]}")
    dupes = [(t, c) for t, c in Counter(t.casefold() for t in seen.values() if t).items() if c > 1]
    for t, c in dupes:
        who = [en for en, tr in seen.items() if tr.casefold() == t]
        problems.append(f"{code}: {c} concepts share the name {t!r}: {who}")
    covered = sum(1 for n in names if seen.get(n))
    print(f"{code}: {covered}/{len(names)} concepts ({100 * covered / len(names):.1f} %), "
          f"{len(excused)} excused, {len(problems)} problems", file=sys.stderr)
    return problems


def main(argv: list[str]) -> int:
    names = concept_names()
    codes = argv or list(LANGUAGES)
    problems = [p for code in codes for p in check(code, names)]
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
