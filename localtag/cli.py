"""``localtag`` command line. JSON goes to stdout; logs and progress bars go to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("localtag")

# flags shared by every command that loads a model: dest -> (flag, kwargs)
_MODEL_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "model": ("--model", {"help": "model name in the store, or a model folder (env LOCALTAG_MODEL)"}),
    "models_dir": ("--models-dir", {"type": Path, "help": "model store folder (env LOCALTAG_MODELS_DIR)"}),
    "vocab": ("--vocab", {"type": Path, "help": "vocabulary file (default: the model's own, else vocab.txt)"}),
    "device": ("--device", {"help": "auto, cpu, cuda, cuda:N (env LOCALTAG_DEVICE)"}),
    "cache_dir": ("--cache-dir", {"type": Path, "help": "cache folder (env LOCALTAG_CACHE_DIR)"}),
    "scoring": ("--scoring", {"choices": ["binary", "softmax", "sigmoid"], "help": "value mapping (see README)"}),
    "batch_size": ("--batch-size", {"type": int, "help": "images per model batch (env LOCALTAG_BATCH_SIZE)"}),
    "workers": ("--workers", {"type": int, "help": "decode threads (env LOCALTAG_WORKERS)"}),
    "max_pixels": ("--max-pixels", {"type": int, "help": "refuse larger images (default 85 MP)"}),
    "fast_decode": ("--fast", {"action": "store_true", "default": None,
                               "help": "JPEG draft-mode decoding at reduced scale (see README)"}),
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    for dest, (flag, kwargs) in _MODEL_FLAGS.items():
        p.add_argument(flag, dest=dest, **{"default": None, **kwargs})


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Output format and concept selection of ``tag`` and ``retag``."""
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="Clarifai JSON ({outputs: [...], status})")
    fmt.add_argument("--jsonl", action="store_true", help="one Clarifai output per line")
    p.add_argument("--max-concepts", dest="max_concepts", type=int)
    p.add_argument("--min-value", dest="min_value", type=float)
    p.add_argument("--select", nargs="+", help="report only these concept names or ids")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def settings_from(args: argparse.Namespace, **extra: Any):
    """CLI flags (those given) > env ``LOCALTAG_*`` > defaults."""
    from .config import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    given.update({k: v for k, v in extra.items() if v is not None})
    return Settings(**given)


def progress(iterable: Iterable, total: int | None, enabled: bool | None, desc: str, unit: str = "img"):
    """A tqdm bar on stderr, shown on a TTY or when asked (``--progress``)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, total=total, disable=not show, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def _load_tagger(settings):
    from .tagger import Tagger

    return Tagger.load(settings)


# -- tag -------------------------------------------------------------------------------------------
def cmd_tag(args: argparse.Namespace) -> int:
    from .cache import open_for
    from .pipeline import Pipeline, walk

    settings = settings_from(args)
    tagger = _load_tagger(settings)
    total = sum(1 for _ in walk(args.paths))  # jobs are walked lazily: memory stays flat on huge folders
    results = Pipeline.from_settings(tagger, settings, cache=open_for(settings, tagger)).run(walk(args.paths))
    return write_tags(args, settings, tagger, results, total, chunk=max(1, settings.batch_size))


def write_tags(args: argparse.Namespace, settings, tagger, results: Iterable, total: int,
               desc: str = "tagging", chunk: int = 512) -> int:
    """Score embedded results (``chunk`` at a time) and write them as text, Clarifai JSON or JSONL.

    ``tag`` and ``retag`` share it; exit status 1 when any input failed (or there were none).
    """
    from . import clarifai

    select = tagger.select_indices(args.select) if args.select else None
    model = clarifai.model_json(tagger.info.name, tagger.info.sha256[:32], name=tagger.info.name,
                                app_id="localtag", user_id="localtag")
    failed = 0
    out = sys.stdout
    first = True
    if args.json:
        out.write('{"outputs": [')
    for r, tags in _scored(tagger, progress(results, total, args.progress, desc), settings, select, chunk):
        if not r.ok:
            failed += 1
            log.error("%s: %s", r.job.key, r.error.message)
        if args.json or args.jsonl:
            url = Path(r.job.key).resolve().as_uri() if not isinstance(r.job.source, bytes) else r.job.key
            error = clarifai.image_error_status(r.error) if r.error else None
            o = clarifai.output_json(r.job.key, {"image": {"url": url}}, model, tags, error)
            if args.jsonl:
                out.write(json.dumps(o) + "\n")
            else:
                out.write(("" if first else ",") + "\n  " + json.dumps(o))
            first = False
        else:
            text = ", ".join(f"{t.name} {t.value:.3f}" for t in tags) if tags is not None else f"ERROR {r.error.message}"
            out.write(f"{r.job.key}\t{text}\n")
        out.flush()
    if args.json:
        code = clarifai.SUCCESS if not failed else (clarifai.FAILURE if failed == total else clarifai.MIXED_STATUS)
        out.write("\n], \"status\": " + json.dumps(clarifai.status(code, req_id=clarifai.new_id())) + "}\n")
    if failed:
        log.error("%d of %d inputs failed", failed, total)
    return 1 if failed or not total else 0


def _scored(tagger, results: Iterable, settings, select, chunk: int):
    """``(result, tags or None)`` in order; one matrix product per ``chunk`` results."""
    import numpy as np

    from .pipeline import chunks

    for buf in chunks(results, chunk):
        ok = [r.embedding for r in buf if r.ok]
        values = iter(tagger.scores(np.stack(ok)) if ok else ())
        for r in buf:
            tags = tagger.pick(next(values), max_concepts=settings.max_concepts, min_value=settings.min_value,
                               select=select) if r.ok else None
            yield r, tags


# -- embed -----------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .cache import open_for
    from .pipeline import Pipeline, walk

    settings = settings_from(args)
    tagger = _load_tagger(settings)
    jobs = list(walk(args.paths))
    rows, keys, failed = [], [], 0
    pipe = Pipeline.from_settings(tagger, settings, cache=open_for(settings, tagger))
    for r in progress(pipe.run(jobs), len(jobs), args.progress, "embedding"):
        if r.ok:
            rows.append(r.embedding.astype(np.float32))
            keys.append(r.job.key)
        else:
            failed += 1
            log.error("%s: %s", r.job.key, r.error.message)
    arr = np.stack(rows) if rows else np.zeros((0, tagger.info.model_cfg["embed_dim"]), dtype=np.float32)
    out = Path(args.output)
    np.save(out, arr)
    keys_path = out.with_suffix(".paths.txt")
    keys_path.write_text("".join(k + "\n" for k in keys))
    print(json.dumps({"output": str(out), "shape": list(arr.shape), "paths": str(keys_path), "failed": failed}))
    return 1 if failed else 0


# -- models ----------------------------------------------------------------------------------------
def _store(args: argparse.Namespace):
    from .models import ModelStore

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
    print(json.dumps({"name": info.name, "path": str(info.path), "sha256": info.sha256}))
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    info = _store(args).pull(args.arch, args.pretrained, args.name, overwrite=args.overwrite)
    print(json.dumps({"name": info.name, "path": str(info.path), "sha256": info.sha256, "source": info.source}))
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from .models import ModelError

    store = _store(args)
    models = [store.resolve(n) for n in args.names] if args.names else store.list()
    bad = 0
    for m in models:
        try:
            store.verify(m)
            print(f"ok      {m.name}  {m.sha256[:12]}")
        except ModelError as e:
            bad += 1
            print(f"FAILED  {m.name}: {e}")
    return 1 if bad else 0


# -- vocab -----------------------------------------------------------------------------------------
def cmd_vocab_check(args: argparse.Namespace) -> int:
    from . import vocab as vocab_mod
    from .config import REPO_ROOT

    path = args.file or REPO_ROOT / "vocab.txt"
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
    from . import vocab as vocab_mod

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


# -- parser ----------------------------------------------------------------------------------------
Command = Callable[[argparse.Namespace], int]
_EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []


def extension(fn: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:
    """Adapters (server, Directus, eval) register their subcommands here."""
    _EXTENSIONS.append(fn)
    return fn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localtag", description="Offline image tagging with CLIP.")
    p.add_argument("--log-level", default=os.environ.get("LOCALTAG_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

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
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use and fill the embedding cache (default on)")
    add_model_flags(e)
    e.set_defaults(func=cmd_embed)

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
    mv = m.add_parser("verify", help="check weights against their sha256")
    mv.add_argument("names", nargs="*")
    for sp, fn in ((ml, cmd_models_list), (mi, cmd_models_import), (mp, cmd_models_pull), (mv, cmd_models_verify)):
        sp.add_argument("--models-dir", dest="models_dir", type=Path, default=None)
        sp.set_defaults(func=fn)

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

    for ext in _EXTENSIONS:
        ext(sub)
    __import__("localtag.cli_batch", fromlist=["add_parser"]).add_parser(sub)  # batch (issue 12)
    return p


def _load_extensions() -> None:
    import importlib

    for mod in ("server", "directus_cli", "evaluate", "cache"):
        try:
            importlib.import_module(f"localtag.{mod}")
        except ImportError as e:
            if e.name != f"localtag.{mod}":
                raise


def main(argv: Sequence[str] | None = None) -> int:
    from .images import ImageError
    from .models import ModelError
    from .tagger import SelectError
    from .vocab import VocabError

    _load_extensions()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelError, VocabError, SelectError, ImageError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
