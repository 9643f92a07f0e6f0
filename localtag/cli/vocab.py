"""``localtag vocab check | build``: vocabulary tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("localtag")


def cmd_vocab_check(args: argparse.Namespace) -> int:
    from ..core import vocab as vocab_mod
    from ..core.config import shipped

    path = args.file or shipped("vocab.txt")
    concepts, problems = vocab_mod.check(path)
    errors = [p for p in problems if p.error]
    if args.json:
        print(json.dumps({"file": str(path), "concepts": len(concepts), "ok": not errors,
                          "problems": [{"line": p.line, "kind": p.kind, "message": p.message, "error": p.error}
                                       for p in problems]}, indent=1))
        return 1 if errors else 0
    for p in problems:
        print(p)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(_count(p.kind for p in errors).items()))
    print(f"{path}: {len(concepts)} concepts, {sum(len(c.synonyms) for c in concepts)} synonyms, "
          f"{sum(bool(c.parents) for c in concepts)} with parents, "
          f"{sum(c.threshold is not None for c in concepts)} with thresholds, "
          f"{sum(bool(c.exclusive) for c in concepts)} with exclusions, {sum(c.hidden for c in concepts)} hidden, "
          f"languages {sorted({k for c in concepts for k in c.names}) or 'none'}: "
          + (f"{len(errors)} errors ({kinds})" if errors else "ok")
          + (f", {len(problems) - len(errors)} warnings" if len(problems) > len(errors) else ""))
    return 1 if errors else 0


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return out


def cmd_vocab_build(args: argparse.Namespace) -> int:
    from ..core import vocab as vocab_mod

    base = vocab_mod.load(args.base) if args.base else None
    parents = {}
    for f in args.parents or []:
        for child, ps in vocab_mod.read_parents(f).items():
            parents.setdefault(child, []).extend(ps)
    sources = [vocab_mod.read_label_list(f) for f in args.inputs]
    concepts = vocab_mod.compose(sources, parents=parents, base=base)
    header = [f"# built by `localtag vocab build` from {', '.join(str(f) for f in args.inputs)}"
              + (f" and parents {', '.join(str(f) for f in args.parents)}" if args.parents else ""),
              f"# {len(concepts)} concepts"]
    text = "\n".join([*header, *(vocab_mod.format_line(c) for c in concepts)]) + "\n"
    _, problems = vocab_mod.check_text(text, str(args.output or "<output>"))
    for p in problems:
        print(p, file=sys.stderr)
    if any(p.error for p in problems):
        log.error("the composed vocabulary has problems (above); nothing written")
        return 1
    if args.output is None or str(args.output) == "-":
        sys.stdout.write(text)
    else:
        if args.output.exists() and not args.force:
            raise ValueError(f"{args.output} exists; pass --force to overwrite")
        args.output.write_text(text, encoding="utf-8")
        log.info("wrote %d concepts to %s", len(concepts), args.output)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("vocab", help="vocabulary tools").add_subparsers(dest="vocab_cmd", required=True)
    vc = v.add_parser("check", help="report every problem of a vocabulary (duplicates, id collisions, "
                      "parent cycles, unknown references, empty prompts)")
    vc.add_argument("file", nargs="?", type=Path)
    vc.add_argument("--json", action="store_true")
    vc.set_defaults(func=cmd_vocab_check)
    vb = v.add_parser("build", help="compose a vocabulary from label lists",
                      description="Merge label lists into a vocabulary: text files (one name, or one vocab.txt "
                      "line, per line) or CSV files (a name/label column, optional synonyms, parents and lang.XX "
                      "columns; an eval labels file gives its labels). Names are deduplicated case-insensitively "
                      "and across synonyms; parents named but missing become concepts.")
    vb.add_argument("inputs", nargs="+", type=Path, help="label lists (.txt or .csv)")
    vb.add_argument("--parents", action="append", type=Path,
                    help="'child: parent, parent' per line (or CSV child,parent); repeatable")
    vb.add_argument("--base", type=Path, help="an existing vocabulary to extend (its lines and ids come first)")
    vb.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    vb.add_argument("--force", action="store_true", help="overwrite --output")
    vb.set_defaults(func=cmd_vocab_build)
