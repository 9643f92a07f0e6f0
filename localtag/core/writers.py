"""Writers of the run loop (:mod:`localtag.core.run`): text lines, Clarifai JSON or JSONL on a stream
(stdout by default), written as the results come, so memory stays flat over millions of images. The text form is one line per input,
``<key>\\t<tag value, …>``; a key with a tab, newline or backslash is escaped (``\\t``, ``\\n``,
``\\\\``), so a file name cannot forge a result line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from . import clarifai
from .pipeline import Result
from .run import Scored, run
from .scorer import DEFAULT_PICKING, Picking
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


class LineWriter:
    """Text lines, Clarifai JSON or JSONL on a stream; a failed input is logged (stderr) and written
    with its status. Call :meth:`close` once the loop is done (it ends the JSON document)."""

    def __init__(self, model: dict[str, Any], fmt: str = "text", out: TextIO | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
        self.model, self.fmt, self.out = model, fmt, out or sys.stdout
        self.n = Written()
        if fmt == "json":
            self.out.write('{"outputs": [')

    def write(self, batch: Sequence[Scored]) -> None:
        for s in batch:
            r = s.result
            if not r.ok:
                self.n.failed += 1
                log.error("%s: %s", escape_key(r.job.key), r.error.message)
            if self.fmt == "text":
                text = (", ".join(f"{t.name} {t.value:.3f}" for t in s.tags) if s.tags is not None
                        else f"ERROR {r.error.message}")
                self.out.write(f"{escape_key(r.job.key)}\t{text}\n")
            else:
                line = json.dumps(clarifai_output(r, self.model, s.tags), ensure_ascii=True)
                self.out.write(line + "\n" if self.fmt == "jsonl" else ("" if self.n.total == 0 else ",") + "\n  " + line)
            self.n.total += 1
        self.out.flush()

    def close(self) -> Written:
        if self.fmt == "json":
            status = clarifai.status(clarifai.batch_code(self.n.total, self.n.failed), req_id=clarifai.new_id())
            self.out.write("\n], \"status\": " + json.dumps(status) + "}\n")
        self.out.flush()
        return self.n


class EmbeddingWriter:
    """L2-normalised float32 embeddings ``[N, D]`` in input order to ``path`` (``.npy``), and the key of
    each row to ``<path>.paths.txt``; a failed input is logged and left out."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = path, dim
        self.rows: list[np.ndarray] = []
        self.keys: list[str] = []
        self.failed = 0

    def write(self, batch: Sequence[Scored]) -> None:
        for s in batch:
            if s.ok:
                self.rows.append(np.asarray(s.result.embedding, dtype=np.float32))
                self.keys.append(s.key)
            else:
                self.failed += 1
                log.error("%s: %s", escape_key(s.key), s.result.error.message)

    def close(self) -> dict[str, Any]:
        arr = np.stack(self.rows) if self.rows else np.zeros((0, self.dim), dtype=np.float32)
        np.save(self.path, arr)
        keys = self.path.with_suffix(".paths.txt")
        keys.write_text("".join(escape_key(k) + "\n" for k in self.keys))
        return {"output": str(self.path), "shape": list(arr.shape), "paths": str(keys), "failed": self.failed}


def clarifai_output(r: Result, model: dict[str, Any], tags: Sequence[Tag] | None) -> dict[str, Any]:
    """One input's Clarifai output, as ``tag --json`` and batch exports write it."""
    return clarifai.output_json(r.job.key, {"image": {"url": _url(r)}}, model, tags,
                                clarifai.image_error_status(r.error) if r.error else None)


def write_tags(tagger: Tagger, results: Iterable[Result], *, fmt: str = "text", picking: Picking = DEFAULT_PICKING,
               chunk: int = 512, out: TextIO | None = None) -> Written:
    """Score and write every result (the run loop with a :class:`LineWriter`)."""
    writer = LineWriter(model_json(tagger), fmt, out)
    run(results, writer, scorer=tagger.scorer, picking=picking, chunk=chunk)
    return writer.close()


def model_json(tagger: Tagger) -> dict[str, Any]:
    return clarifai.model_json(tagger.info.name, tagger.info.sha256[:32], name=tagger.info.name,
                               app_id="localtag", user_id="localtag")


def _url(r: Result) -> str:
    """A file input's ``file://`` URI (the Clarifai input's image url), else its key."""
    if isinstance(r.job.source, bytes | bytearray):
        return r.job.key
    try:
        return Path(r.job.key).resolve().as_uri()
    except (ValueError, UnicodeError):  # an undecodable file name
        return escape_key(r.job.key)
