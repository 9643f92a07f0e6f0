"""Sinks: scored results out, as text lines, Clarifai JSON or JSONL on a stream (stdout by default).

:func:`write_tags` scores embedded results ``chunk`` at a time (one matrix product each) and writes
them as they come, so memory stays flat over millions of images. The text form is one line per input,
``<key>\\t<tag value, …>``; a key with a tab, newline or backslash is escaped (``\\t``, ``\\n``,
``\\\\``), so a file name cannot forge a result line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from . import clarifai
from .pipeline import Result, chunks
from .tag import Tag
from .tagger import Tagger

log = logging.getLogger("localtag")

FORMATS = ("text", "json", "jsonl")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


@dataclass
class Written:
    total: int = 0
    failed: int = 0


def escape_key(key: str) -> str:
    """A key fit for one tab-separated line (surrogates from undecodable file names are replaced too)."""
    return key.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")


def scored(tagger: Tagger, results: Iterable[Result], *, max_concepts: int, min_value: float,
           select: np.ndarray | None = None, chunk: int = 512) -> Iterator[tuple[Result, list[Tag] | None]]:
    """``(result, tags or None)`` in order; one matrix product per ``chunk`` results."""
    for buf in chunks(results, chunk):
        ok = [r.embedding for r in buf if r.ok]
        values = iter(tagger.values(np.stack(ok)) if ok else ())
        for r in buf:
            tags = tagger.pick(next(values), max_concepts=max_concepts, min_value=min_value,
                               select=select) if r.ok else None
            yield r, tags


def write_tags(tagger: Tagger, results: Iterable[Result], *, fmt: str = "text", max_concepts: int = 20,
               min_value: float = 0.0, select: np.ndarray | None = None, chunk: int = 512,
               out: TextIO | None = None) -> Written:
    """Score and write every result; a failed input is logged (stderr) and written with its status."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    out = out or sys.stdout
    model = clarifai.model_json(tagger.info.name, tagger.info.sha256[:32], name=tagger.info.name,
                                app_id="localtag", user_id="localtag")
    n = Written()
    if fmt == "json":
        out.write('{"outputs": [')
    for r, tags in scored(tagger, results, max_concepts=max_concepts, min_value=min_value, select=select,
                          chunk=chunk):
        if not r.ok:
            n.failed += 1
            log.error("%s: %s", escape_key(r.job.key), r.error.message)
        if fmt == "text":
            text = ", ".join(f"{t.name} {t.value:.3f}" for t in tags) if tags is not None else f"ERROR {r.error.message}"
            out.write(f"{escape_key(r.job.key)}\t{text}\n")
        else:
            o = clarifai.output_json(r.job.key, {"image": {"url": _url(r)}}, model, tags,
                                     clarifai.image_error_status(r.error) if r.error else None)
            line = json.dumps(o, ensure_ascii=True)
            out.write(line + "\n" if fmt == "jsonl" else ("" if n.total == 0 else ",") + "\n  " + line)
        n.total += 1
        out.flush()
    if fmt == "json":
        code = clarifai.SUCCESS if not n.failed else (clarifai.FAILURE if n.failed == n.total else clarifai.MIXED_STATUS)
        out.write("\n], \"status\": " + json.dumps(clarifai.status(code, req_id=clarifai.new_id())) + "}\n")
    return n


def _url(r: Result) -> str:
    """A file input's ``file://`` URI (the Clarifai input's image url), else its key."""
    if isinstance(r.job.source, bytes | bytearray):
        return r.job.key
    try:
        return Path(r.job.key).resolve().as_uri()
    except (ValueError, UnicodeError):  # an undecodable file name
        return escape_key(r.job.key)
