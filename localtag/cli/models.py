"""``localtag models list | import | pull | verify``: the model store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_progress_flag, settings_from


def _store(args: argparse.Namespace):
    from ..core.models import ModelStore

    return ModelStore(settings_from(args).models_dir)


def cmd_models_list(args: argparse.Namespace) -> int:
    models = _store(args).list()
    if args.json:
        print(json.dumps([m.manifest() | {"path": str(m.path)} for m in models], indent=2))
        return 0
    if not models:
        print("no models; see `localtag models pull --help` and `localtag models import --help`")
    for m in models:
        mb = m.size / 1e6
        print(f"{m.name:40s} {m.arch:22s} {m.preprocess['size']!s:>4}px {mb:8.1f} MB  {m.sha256[:12]}  {m.license}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    info = _store(args).import_checkpoint(
        args.path, args.arch, args.name, pretrained=args.pretrained or "", source=args.source or "",
        license=args.license or "", config=args.config, quick_gelu=args.quick_gelu or None, overwrite=args.overwrite,
    )
    texts = _store_text_embeddings(args, info)
    print(json.dumps({"name": info.name, "path": str(info.path), "sha256": info.sha256, "text_embeddings": texts}))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    info = _store(args).pull(args.arch, args.pretrained, args.name, overwrite=args.overwrite)
    texts = _store_text_embeddings(args, info)
    print(json.dumps({"name": info.name, "path": str(info.path), "sha256": info.sha256, "source": info.source,
                      "text_embeddings": texts}))
    return 0


def _store_text_embeddings(args: argparse.Namespace, info) -> list[str]:
    """Text embeddings of the shipped vocabularies (vocab.txt and the family's: nsfw, moderation, food, …)
    and the model's own, into the model folder."""
    from ..core import text_store
    from ..core.config import shipped
    from ..core.family import shipped_vocabularies
    from ..core.loader import precompute_text

    if not args.text:
        return []
    vocabs = [shipped(name) for name in ("vocab.txt", *shipped_vocabularies())]
    vocabs += [info.vocab_path] if info.vocab_path else []
    precompute_text(info, [v for v in vocabs if v.is_file()], progress=args.progress)
    return [e["file"] for e in text_store.entries(info)]


def cmd_models_verify(args: argparse.Namespace) -> int:
    from ..core import text_store
    from ..core.models import ModelError

    store = _store(args)
    models, broken = ([store.resolve(n) for n in args.names], []) if args.names else store.scan()
    bad = len(broken)
    for e in broken:
        print(f"FAILED  {e}")
    for m in models:
        try:
            store.verify(m)
            problems = text_store.verify(m)
            if problems:
                raise ModelError(f"{m.name}: stored text embeddings: {'; '.join(problems)}")
            print(f"ok      {m.name}  {m.sha256[:12]}  text embeddings: {len(text_store.entries(m))}")
        except ModelError as e:
            bad += 1
            print(f"FAILED  {m.name}: {e}")
    return 1 if bad else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="the model store").add_subparsers(dest="models_cmd", required=True)
    ml = m.add_parser("list")
    ml.add_argument("--json", action="store_true")
    mi = m.add_parser("import", help="copy a local checkpoint into the store")
    mi.add_argument("path")
    mi.add_argument("--arch", help="open_clip architecture, e.g. ViT-B-32")
    mi.add_argument("--name")
    mi.add_argument("--config", help="open_clip_config.json for a custom architecture")
    mi.add_argument("--pretrained", help="the pretrained tag or a description, for the manifest")
    mi.add_argument("--source", help="where the weights came from")
    mi.add_argument("--license", help="the weights' licence")
    mi.add_argument("--quick-gelu", action="store_true", help="the weights were trained with QuickGELU")
    mi.add_argument("--overwrite", action="store_true")
    mp = m.add_parser("pull", help="download published weights (connected machine only)")
    mp.add_argument("arch", help="open_clip architecture, or hf-hub:ORG/REPO")
    mp.add_argument("--pretrained", help="open_clip pretrained tag, e.g. datacomp_s34b_b86k")
    mp.add_argument("--name")
    mp.add_argument("--overwrite", action="store_true")
    mv = m.add_parser("verify", help="check weights (and stored text embeddings) against their sha256")
    mv.add_argument("names", nargs="*")
    for sp in (mi, mp):
        sp.add_argument("--text", action=argparse.BooleanOptionalAction, default=True,
                        help="store the text embeddings of the shipped vocabularies (general and the model family) "
                        "and the model's own (default on)")
        add_progress_flag(sp)
    for sp, fn in ((ml, cmd_models_list), (mi, cmd_models_import), (mp, cmd_models_pull), (mv, cmd_models_verify)):
        sp.add_argument("--models-dir", dest="models_dir", type=Path, default=None)
        sp.set_defaults(func=fn)
