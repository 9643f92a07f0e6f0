"""``localtag app add``, ``localtag search``, ``localtag duplicates``: the offline app on the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_flags, settings_from


def _loaded(args: argparse.Namespace):
    from ..core.loader import load

    settings = settings_from(args)
    return settings, load(settings)


def _app(name: str) -> str:
    from ..app.store import app_key

    user, _, app = name.rpartition("/")
    return app_key(user or None, app)


def cmd_app_add(args: argparse.Namespace) -> int:
    from ..app import local

    settings, loaded = _loaded(args)
    concepts = {c: 1 for c in args.concepts or []} | {c: 0 for c in args.not_concepts or []}
    out = local.add(loaded, settings, _app(args.app), args.sources, concepts)
    print(json.dumps(out, indent=1))
    return 1 if out["errors"] and not out["added"] else 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..app import local

    if args.image and args.text:  # `search --image photo.jpg DIR`: the first word is a place
        args.where, args.text = [args.text, *args.where], None
    if bool(args.text) == bool(args.image):
        print("give a text query or --image", file=sys.stderr)
        return 2
    settings, loaded = _loaded(args)
    if args.run:
        keys, matrix = local.run_matrix(Path(args.run), loaded.tagger.info.sha256)
    elif args.where:
        got = local.embed(loaded, settings, args.where)
        keys, matrix = got.keys, got.matrix
    else:
        store = local.store_of(settings)
        keys, matrix = store.matrix(_app(args.app), local.embedding_key(loaded, settings))
    q = local.query_vector(loaded, settings, args.text, args.image)
    hits = local.search(keys, matrix, q, args.top) if len(keys) else []
    if args.json:
        print(json.dumps({"query": args.text or args.image, "hits": hits}, indent=1))
    else:
        for h in hits:
            print(f"{h['score']:.4f}\t{h['id']}")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from ..app import local

    settings, loaded = _loaded(args)
    if args.app:
        store = local.store_of(settings)
        app = _app(args.app)
        keys, matrix = store.matrix(app, local.embedding_key(loaded, settings))

        def read(key: str) -> bytes | None:
            rec = store.get(app, key)
            return store.read_blob(rec["blob"]) if rec and rec["blob"] else None
    else:
        got = local.embed(loaded, settings, args.where)
        keys, matrix, read = got.keys, got.matrix, local.read_file
    out = local.duplicates(keys, matrix, args.threshold, read=read,
                           min_corr=args.min_correlation if args.min_correlation > 0 else None)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for g in out["groups"]:
            print(f"{g['min_similarity']:.4f}\t" + "\t".join(g["items"]))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("app", help="the offline Clarifai app store").add_subparsers(dest="app_cmd", required=True)
    add = a.add_parser("add", help="add images (files, folders, URLs) to an app, with their embeddings")
    add.add_argument("sources", nargs="+")
    add.add_argument("--app", default="main", help="app name, or USER/APP (default: main, user me)")
    add.add_argument("--concepts", nargs="*", help="concepts to annotate as present (value 1)")
    add.add_argument("--not-concepts", nargs="*", help="concepts to annotate as absent (value 0)")
    add_model_flags(add)
    add.set_defaults(func=cmd_app_add)

    s = sub.add_parser("search", help="rank images by a text or an image: an app, a batch run or folders")
    s.add_argument("text", nargs="?", help="what to look for, in words")
    s.add_argument("where", nargs="*", help="folders/files to search (their embedding cache is reused)")
    s.add_argument("--image", help="a photo to search by")
    s.add_argument("--app", default="main")
    s.add_argument("--run", help="a batch run directory (its Parquet embeddings)")
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--json", action="store_true")
    add_model_flags(s)
    s.set_defaults(func=cmd_search)

    d = sub.add_parser("duplicates", help="groups of near-duplicate images (resized, recompressed, cropped)")
    d.add_argument("where", nargs="*", help="folders/files")
    d.add_argument("--app", help="an app instead of folders")
    d.add_argument("--threshold", type=float, default=0.8,
                   help="cosine similarity of the embeddings for two images to be candidates (default 0.8)")
    d.add_argument("--min-correlation", type=float, default=0.9,
                   help="candidates are confirmed when their 32x32 grey thumbnails correlate this well, as they "
                        "are or one centre-cropped by 10/20%% (default 0.9; 0: embeddings alone)")
    d.add_argument("--json", action="store_true")
    add_model_flags(d)
    d.set_defaults(func=cmd_duplicates)
