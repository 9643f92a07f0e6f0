"""``localtag tag``, ``embed`` and ``retag``: files and folders in, tags or embeddings out."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .common import (
    add_head_flags,
    add_model_flags,
    add_output_flags,
    add_progress_flag,
    progress,
    settings_from,
)

log = logging.getLogger("localtag")


def _format(args: argparse.Namespace) -> str:
    return "json" if args.json else "jsonl" if args.jsonl else "text"


def _write(args: argparse.Namespace, settings, tagger, results, total: int, desc: str, chunk: int) -> int:
    """Write scored results; exit status 1 when any input failed (or there were none)."""
    from ..core.scorer import Picking
    from ..core.writers import write_tags

    select = tagger.scorer.select_indices(args.select) if args.select else None
    picking = Picking(settings.max_concepts, settings.min_value, select, settings.language)
    n = write_tags(tagger, progress(results, total, args.progress, desc), fmt=_format(args), picking=picking,
                   chunk=chunk)
    if n.failed:
        log.error("%d of %d inputs failed", n.failed, n.total)
    return 1 if n.failed or not n.total else 0


def _count(args: argparse.Namespace) -> int | None:
    """How many inputs, for the progress bar only: jobs are walked lazily (memory stays flat on huge
    folders), so the tree is walked a second time only when a bar is shown."""
    import sys

    from ..core.sources import inputs

    if not (sys.stderr.isatty() if args.progress is None else args.progress):
        return None
    return sum(1 for _ in inputs(args.paths))


def cmd_tag(args: argparse.Namespace) -> int:
    from ..core.cache import open_embedding_cache
    from ..core.loader import load
    from ..core.pipeline import Pipeline
    from ..core.sources import inputs

    settings = settings_from(args)
    tagger, encoder = load(settings)
    tagger.text_progress = args.progress  # a bar while a new vocabulary's prompts are encoded
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    total = _count(args)
    results = Pipeline.from_settings(encoder, settings, cache=cache).run(inputs(args.paths, settings))
    return _write(args, settings, tagger, results, total, "tagging", chunk=max(1, encoder.batch_size))


def cmd_retag(args: argparse.Namespace) -> int:
    from ..core.cache import cached_results, embed_missing, open_embedding_cache
    from ..core.loader import load
    from ..core.pipeline import Pipeline
    from ..core.sources import walk

    settings = settings_from(args)
    tagger, encoder = load(settings)
    # the same key as `tag` (exact, or --fast's draft-decoded entries): never a mix of the two
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder, required=True)
    total = _count(args)
    results = cached_results(cache, walk(args.paths), workers=settings.workers, max_bytes=settings.max_bytes)
    if args.embed_missing:
        results = embed_missing(results, Pipeline.from_settings(encoder, settings, cache=cache))
    return _write(args, settings, tagger, results, total, "retagging", chunk=512)


def cmd_embed(args: argparse.Namespace) -> int:
    from ..core.cache import open_embedding_cache
    from ..core.loader import load
    from ..core.pipeline import Pipeline
    from ..core.run import run
    from ..core.sources import inputs
    from ..core.writers import EmbeddingWriter

    settings = settings_from(args)
    tagger, encoder = load(settings)
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    pipe = Pipeline.from_settings(encoder, settings, cache=cache)
    writer = EmbeddingWriter(Path(args.output), int(tagger.info.model_cfg["embed_dim"]))
    tally = run(progress(pipe.run(inputs(args.paths, settings)), _count(args), args.progress, "embedding"), writer)
    print(json.dumps(writer.close()))
    return 1 if tally.failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tag", help="tag image files and folders")
    t.add_argument("paths", nargs="+")
    add_output_flags(t)
    t.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep image embeddings in the cache folder for `retag` (default on)")
    add_model_flags(t)
    add_head_flags(t)
    t.set_defaults(func=cmd_tag)

    e = sub.add_parser("embed", help="write L2-normalised image embeddings to a .npy file")
    e.add_argument("paths", nargs="+")
    e.add_argument("--output", "-o", required=True)
    add_progress_flag(e)
    e.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use and fill the embedding cache (default on)")
    add_model_flags(e)
    e.set_defaults(func=cmd_embed)

    r = sub.add_parser("retag", help="re-tag files from cached embeddings (new vocabulary, thresholds, scoring) "
                                     "without running the image model")
    r.add_argument("paths", nargs="+")
    add_output_flags(r)
    r.add_argument("--embed-missing", action="store_true",
                   help="run the image model on files that are not cached (default: report them as errors)")
    add_model_flags(r)
    add_head_flags(r)
    r.set_defaults(func=cmd_retag)
