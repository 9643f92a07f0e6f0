"""Labels files (a leaf module): ``path,labels`` CSV rows, as ``localtag eval`` / ``calibrate`` read them
and ``localtag vocab build`` takes their label names.

- ``path`` is a file path, relative to the folder given unless absolute; ``labels`` holds concept
  names separated by ``;`` (an empty cell: none of the evaluated concepts is in the image).
- The header row (``path,labels``) is optional; rows whose path starts with ``#`` are skipped; a path
  listed twice gets the union of its labels; more than two columns is an error (quote paths with commas).
"""

from __future__ import annotations

import csv
from pathlib import Path

_HEADERS = (["path", "labels"], ["path", "label"], ["path"])


def is_header(row: list[str]) -> bool:
    return [c.strip().lower() for c in row[:2]] in _HEADERS


def parse(text: str, source: str = "<labels>") -> list[tuple[str, list[str]]]:
    """``(path as written, labels)`` rows, in first-seen order."""
    rows: dict[str, list[str]] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        if lineno == 1 and is_header(row):
            continue
        if len(row) > 2:
            raise ValueError(f"{source}:{lineno}: expected 'path,labels' (labels separated by ';'), got {len(row)} "
                             "columns; quote paths that contain commas")
        labels = [" ".join(x.split()) for x in (row[1] if len(row) > 1 else "").split(";") if x.strip()]
        have = rows.setdefault(row[0].strip(), [])
        have.extend(x for x in labels if x not in have)
    return list(rows.items())


def read(path: str | Path, root: str | Path) -> list[tuple[Path, list[str]]]:
    """``(image path, labels)`` rows of a labels CSV, paths resolved against ``root``."""
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: labels file not found") from None
    out: dict[Path, list[str]] = {}
    for name, labels in parse(text, str(path)):
        p = Path(name)
        have = out.setdefault(p if p.is_absolute() else root / p, [])
        have.extend(x for x in labels if x not in have)
    if not out:
        raise ValueError(f"{path}: no rows")
    return list(out.items())


def names(text: str, source: str = "<labels>") -> list[str]:
    """The distinct label names of a labels file, in first-seen order."""
    seen: dict[str, None] = {}
    for _, labels in parse(text, source):
        for lab in labels:
            seen.setdefault(lab, None)
    return list(seen)
