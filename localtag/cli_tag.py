"""``localtag tag``, ``embed`` and ``retag``: files and folders in, tags or embeddings out."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .cli_common import add_model_flags, add_output_flags, add_progress_flag, progress, settings_from

log = logging.getLogger("localtag")


def _format(args: argparse.Namespace) -> str:
    return "json" if args.json else "jsonl" if args.jsonl else "text"


def _write(args: argparse.Namespace, settings, tagger, results, total: int, desc: str, chunk: int) -> int:
    """Write scored results; exit status 1 when any input failed (or there were none)."""
    from .sinks import write_tags

    select = tagger.select_indices(args.select) if args.select else None
    n = write_tags(tagger, progress(results, total, args.progress, desc), fmt=_format(args),
                   max_concepts=settings.max_concepts, min_value=settings.min_value, select=select, chunk=chunk)
    if n.failed:
        log.error("%d of %d inputs failed", n.failed, n.total)
    return 1 if n.failed or not n.total else 0


def cmd_tag(args: argparse.Namespace) -> int:
    from .cache import open_embedding_cache
    from .loader import load
    from .pipeline import Pipeline
    from .sources import walk

    settings = settings_from(args)
    tagger, encoder = load(settings)
    tagger.text_progress = args.progress  # a bar while a new vocabulary's prompts are encoded
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    total = sum(1 for _ in walk(args.paths))  # jobs are walked lazily: memory stays flat on huge folders
    results = Pipeline.from_settings(encoder, settings, cache=cache).run(walk(args.paths))
    return _write(args, settings, tagger, results, total, "tagging", chunk=max(1, encoder.batch_size))


def cmd_retag(args: argparse.Namespace) -> int:
    from .cache import cached_results, embed_missing, open_embedding_cache
    from .loader import load
    from .pipeline import Pipeline
    from .sources import walk

    settings = settings_from(args)
    tagger, encoder = load(settings)
    # the same key as `tag` (exact, or --fast's draft-decoded entries): never a mix of the two
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder, required=True)
    total = sum(1 for _ in walk(args.paths))
    results = cached_results(cache, walk(args.paths), workers=settings.workers, max_bytes=settings.max_bytes)
    if args.embed_missing:
        results = embed_missing(results, Pipeline.from_settings(encoder, settings, cache=cache))
    return _write(args, settings, tagger, results, total, "retagging", chunk=512)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .cache import open_embedding_cache
    from .loader import load
    from .pipeline import Pipeline
    from .sinks import escape_key
    from .sources import walk

    settings = settings_from(args)
    tagger, encoder = load(settings)
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    jobs = list(walk(args.paths))
    rows, keys, failed = [], [], 0
    pipe = Pipeline.from_settings(encoder, settings, cache=cache)
    for r in progress(pipe.run(jobs), len(jobs), args.progress, "embedding"):
        if r.ok:
            rows.append(r.embedding.astype(np.float32))
            keys.append(r.job.key)
        else:
            failed += 1
            log.error("%s: %s", escape_key(r.job.key), r.error.message)
    arr = np.stack(rows) if rows else np.zeros((0, tagger.info.model_cfg["embed_dim"]), dtype=np.float32)
    out = Path(args.output)
    np.save(out, arr)
    keys_path = out.with_suffix(".paths.txt")
    keys_path.write_text("".join(escape_key(k) + "\n" for k in keys))
    print(json.dumps({"output": str(out), "shape": list(arr.shape), "paths": str(keys_path), "failed": failed}))
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tag", help="tag image files and folders")
    t.add_argument("paths", nargs="+")
    add_output_flags(t)
    t.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep image embeddings in the cache folder for `retag` (default on)")
    add_model_flags(t)
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
    r.set_defaults(func=cmd_retag)
