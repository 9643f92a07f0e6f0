"""``localtag directus install-flow | uninstall-flow | sync``.

The Directus URL and token come from ``--directus-url`` / ``--token`` or ``LOCALTAG_DIRECTUS_URL`` /
``LOCALTAG_DIRECTUS_TOKEN`` (the environment keeps the token out of ``ps``). The flow secret is never
given to install-flow: the flow reads it from Directus's own environment (``--secret-env``), and
``localtag serve`` from ``LOCALTAG_FLOW_SECRET``. No secret is ever logged or printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .common import add_directus_flags, add_model_flags, progress, settings_from

log = logging.getLogger(__name__)

DEFAULT_FLOW_NAME = "localtag: tag uploaded images"


def _connect(args: argparse.Namespace):
    from ..directus.client import DirectusClient

    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line per request
    settings = settings_from(args)
    if not settings.directus_url:
        raise ValueError("give --directus-url or set LOCALTAG_DIRECTUS_URL")
    if settings.directus_token is None:
        raise ValueError("give --token or set LOCALTAG_DIRECTUS_TOKEN (a Directus static token)")
    return settings, DirectusClient(settings.directus_url, settings.directus_token.get_secret_value())


def flow_url(localtag_url: str) -> str:
    """localtag's base URL gets the flow path; a URL with a path is used as it is."""
    from ..directus.client import FLOW_PATH

    parts = urlsplit(localtag_url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"--localtag-url must be an http(s) URL, not {localtag_url!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=FLOW_PATH)
    return urlunsplit(parts)


def cmd_install_flow(args: argparse.Namespace) -> int:
    from ..directus.client import DirectusError, ensure_provenance_field

    settings, client = _connect(args)
    url = flow_url(args.localtag_url)
    with client:
        try:
            had_field = ensure_provenance_field(client, create=False)
            if not had_field:
                ensure_provenance_field(client)
            flow_id = client.install_flow(args.name, url, args.secret_env)
        except DirectusError as e:
            log.error("%s", e)
            return 2
    print(json.dumps({"flow": flow_id, "name": args.name, "url": url,
                      "provenance_field": "exists" if had_field else "created"}))
    from ..core.addresses import resolves_local

    if resolves_local(urlsplit(url).hostname or ""):
        log.warning("%s is a local address: Directus's flows refuse it unless its IMPORT_IP_DENY_LIST leaves it "
                    "out (e.g. IMPORT_IP_DENY_LIST=169.254.169.254; the default 0.0.0.0 means every local "
                    "interface)", urlsplit(url).hostname)
    log.warning("flow %r sends every upload to %s with the secret from Directus's own environment: Directus "
                "needs %s=<the secret> and FLOWS_ENV_ALLOW_LIST=%s (then restart it); `localtag serve` needs "
                "LOCALTAG_DIRECTUS_URL, LOCALTAG_DIRECTUS_TOKEN and LOCALTAG_FLOW_SECRET=<the same secret>",
                args.name, url, args.secret_env, args.secret_env)
    return 0


def cmd_uninstall_flow(args: argparse.Namespace) -> int:
    from ..directus.client import DirectusError

    _, client = _connect(args)
    with client:
        try:
            removed = client.uninstall_flow(args.name)
        except DirectusError as e:
            log.error("%s", e)
            return 2
    print(json.dumps({"name": args.name, "removed": removed}))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ..core.cache import open_embedding_cache
    from ..core.loader import load
    from ..directus.sync import SyncOptions, run_sync

    settings, client = _connect(args)
    filt = _filter(args.filter)
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if args.run is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", args.run):
        raise ValueError("--run takes a run id as a summary prints it (letters, digits, - and _)")
    window = settings.directus_retry_window if args.retry_window is None else args.retry_window
    options = SyncOptions(filter=filt, retag=args.retag, dry_run=args.dry_run, concurrency=args.concurrency,
                          rendition=args.rendition, max_concepts=args.max_concepts, min_value=args.min_value,
                          retry_window=window, retry_failed=args.retry_failed, run=args.run)
    tagger, encoder = load(settings, head="add")  # a learnt head (--model-head) joins the vocabulary
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    fill = _app_fill(settings, client, tagger, encoder) if settings.directus_app and not args.dry_run else None
    bar = progress(None, None, args.progress, "directus sync", unit="file")
    with client, bar:
        summary = run_sync(client, tagger, encoder, settings, options, progress=bar, cache=cache, app=fill)
        if fill is not None:
            fill.close()
    out = summary.to_json()
    if fill is not None:
        out["app"] = {"app": _app_name(settings.directus_app), **fill.stats}
    print(json.dumps(out))
    print(summary.text(), file=sys.stderr)
    if summary.interrupted:
        return 130
    if summary.stopped:
        return 2
    return 1 if summary.failed else 0


def _app_name(name: str) -> str:
    from .app import _app

    return _app(name)


def _app_fill(settings, client, tagger, encoder):
    """The sync's second writer: the app ``settings.directus_app`` of the app store (docs/directus.md)."""
    from ..app.local import store_of
    from ..app.store import NewInput
    from ..core.cache import cache_key
    from ..directus.app_fill import AppFill

    store, app = store_of(settings), _app_name(settings.directus_app)
    key = cache_key(tagger.info.sha256, **encoder.variant(settings.fast_decode))

    def put(entries) -> tuple[int, int]:
        return store.upsert(app, [NewInput(e.id, url=e.url, concepts=e.concepts, metadata=e.metadata,
                                           embedding=e.embedding) for e in entries], key)

    return AppFill(client, put, held=store.embedded_ids(app, key))


def cmd_search(args: argparse.Namespace) -> int:
    """Directus file ids and titles ranked by a text or a photo, through the app ``sync --app`` filled."""
    from ..app import local
    from ..core.loader import load

    settings = settings_from(args)
    if not settings.directus_app:
        raise ValueError("give --app or set LOCALTAG_DIRECTUS_APP (the app `directus sync --app` filled)")
    if bool(args.text) == bool(args.image):
        raise ValueError("give a text query or --image PATH")
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    loaded = load(settings)
    store, app = local.store_of(settings), _app_name(settings.directus_app)
    keys, matrix = store.matrix(app, local.embedding_key(loaded, settings))
    if not keys:
        log.warning("app %s holds no embeddings of this model: run `localtag directus sync --app %s` first",
                    app, settings.directus_app)
    hits = local.search(keys, matrix, local.query_vector(loaded, settings, args.text, args.image), args.limit) \
        if keys else []
    records = store.records(app, [h["id"] for h in hits])
    for h in hits:
        meta = records.get(h["id"], {}).get("metadata", {})
        h.update(title=meta.get("title"), filename=meta.get("filename"))
    if args.json:
        print(json.dumps({"query": args.text or args.image, "app": app, "hits": hits}, indent=1))
    else:
        for h in hits:
            print(f"{h['score']:.4f}\t{h['id']}\t{h['title'] or h['filename'] or ''}")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from ..core import learn as core_learn
    from ..core.cache import open_embedding_cache
    from ..core.evaluate import jsonable
    from ..core.loader import load
    from ..directus.learn import learn_library, report_text

    settings, client = _connect(args)
    target = core_learn.head_path(settings.heads_dir, core_learn.check_name(args.name))
    filt = _filter(args.filter)
    tagger, encoder = load(settings.model_copy(update={"model_head": None}))  # the priors: the vocabulary alone
    cache = open_embedding_cache(settings, tagger.model_sha256, encoder) if settings.embedding_cache else None
    bar = progress(None, None, args.progress, "directus learn", unit="file")
    with client, bar:
        head, out = learn_library(client, tagger, encoder, settings, name=args.name, filter=filt,
                                  min_count=args.min_count, concepts=args.concepts, holdout=args.holdout,
                                  cache=cache, progress=bar)
    core_learn.save(head, target)
    out["head"] = str(target)
    print(json.dumps(jsonable(out)) if args.json else report_text(out))
    return 0


def _filter(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        filt = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--filter is not JSON: {e}") from None
    if not isinstance(filt, dict):
        raise ValueError("--filter must be a JSON object (a Directus filter on directus_files)")
    return filt


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..core.config import Settings

    d = sub.add_parser("directus", help="tag Directus files: a flow for uploads, a sync for the whole library")
    ds = d.add_subparsers(dest="directus_cmd", required=True)

    i = ds.add_parser("install-flow", help="create (or update in place) the flow that sends uploads to localtag")
    add_directus_flags(i)
    i.add_argument("--localtag-url", required=True,
                   help="localtag's URL as Directus reaches it, e.g. http://127.0.0.1:8080 (the flow posts to "
                   "/directus/flow there)")
    i.add_argument("--secret-env", dest="secret_env", default="LOCALTAG_FLOW_SECRET", metavar="NAME",
                   help="the variable in DIRECTUS's environment holding the shared secret for the "
                   "X-Localtag-Secret header (default LOCALTAG_FLOW_SECRET; Directus also needs "
                   "FLOWS_ENV_ALLOW_LIST=NAME). The secret itself is never sent to or stored in Directus, so "
                   "its flow log can't show it; `localtag serve` needs the same value in LOCALTAG_FLOW_SECRET")
    i.add_argument("--name", default=DEFAULT_FLOW_NAME, help=f"flow name (default {DEFAULT_FLOW_NAME!r})")
    i.set_defaults(func=cmd_install_flow)

    u = ds.add_parser("uninstall-flow", help="delete the flow and its operations")
    add_directus_flags(u)
    u.add_argument("--name", default=DEFAULT_FLOW_NAME)
    u.set_defaults(func=cmd_uninstall_flow)

    s = ds.add_parser("sync", help="tag every image in directus_files (resumable; a person's tags stay)",
                      description="Walk the images of directus_files, tag those localtag has not tagged yet "
                      "(all of them with --retag) and write the tags back. A person's tags are never removed; "
                      "localtag's own are recorded in the directus_files.localtag field, which this command "
                      "creates. Stop it at any time: running it again continues. Prints a JSON summary on "
                      "stdout; exit status 0, 1 when a file failed, 2 when the run was stopped (token refused, "
                      "Directus unreachable), 130 on Ctrl-C.")
    add_directus_flags(s)
    s.add_argument("--filter", help='a Directus filter (JSON) on directus_files, e.g. \'{"folder":{"_eq":"…"}}\'')
    s.add_argument("--retag", action="store_true", help="also re-tag files localtag tagged before, replacing "
                   "only localtag's own tags")
    s.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="download and tag, log what would change, write nothing")
    s.add_argument("--concurrency", type=int, default=8, help="downloads at once (default 8)")
    s.add_argument("--rendition", type=int, metavar="PIXELS",
                   help="download Directus's JPEG rendition with this short side instead of the original "
                   "(e.g. 448; see docs/directus.md for when it pays)")
    s.add_argument("--run", metavar="ID", help="the run id; give an interrupted --retag run's id (its summary "
                   "prints it) to resume it: files that run retagged are skipped without a download")
    s.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                   help="also try files whose earlier failure is recorded (directus_files.localtag_failed) and "
                   "that have not changed since (by default they are skipped: 'failed before')")
    s.add_argument("--retry-window", dest="retry_window", type=float, metavar="SECONDS",
                   help="how long to wait for an unreachable Directus (a restart) before stopping, pinging "
                   f"with backoff (default {Settings.model_fields['directus_retry_window'].default:g}, env "
                   "LOCALTAG_DIRECTUS_RETRY_WINDOW; 0: stop at once)")
    s.add_argument("--language", dest="directus_language",
                   help="write tags in this language, one of Clarifai's 23 codes (de, fr, zh-TW, …; env "
                   "LOCALTAG_DIRECTUS_LANGUAGE; default English)")
    s.add_argument("--max-concepts", dest="max_concepts", type=int, help="most tags per image (default "
                   f"{Settings.model_fields['directus_max_concepts'].default}, env LOCALTAG_DIRECTUS_MAX_CONCEPTS)")
    s.add_argument("--min-value", dest="min_value", type=float, help="lowest value a tag needs (default "
                   f"{Settings.model_fields['directus_min_value'].default:g}, env LOCALTAG_DIRECTUS_MIN_VALUE; "
                   "a calibrated probability when the model has a calibration from `localtag calibrate`, and "
                   "the vocabulary's per-concept thresholds apply too). The flow uses the same defaults")
    s.add_argument("--app", dest="directus_app", metavar="NAME",
                   help="also fill this app of the app store (NAME or USER/APP; env LOCALTAG_DIRECTUS_APP): the "
                   "embeddings the sync computes, person tags as positive annotations, tags a person deleted as "
                   "negative ones; input ids are the Directus file ids. Files tagged before that the app lacks "
                   "are downloaded and embedded (not tagged again); a rerun updates, never duplicates")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on a TTY)")
    s.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use the embedding cache, so --retag after a vocabulary change skips the image model")
    add_model_flags(s)
    s.add_argument("--model-head", dest="model_head", metavar="NAME", help="a learnt head (`directus learn`, "
                   "`learn`) whose concepts join the vocabulary's; its tags are listed as `learnt` in the provenance "
                   "record (env LOCALTAG_MODEL_HEAD; the server's flow uses the same setting)")
    s.add_argument("--heads-dir", dest="heads_dir", type=Path, help="folder of learnt heads (env LOCALTAG_HEADS_DIR)")
    s.set_defaults(func=cmd_sync)

    q = ds.add_parser("search", help="Directus file ids and titles ranked by a text or a photo (the app "
                      "`sync --app` filled; no Directus needed)")
    q.add_argument("text", nargs="?", help="what to look for, in words")
    q.add_argument("--image", help="a photo to search by instead")
    q.add_argument("--app", dest="directus_app", metavar="NAME",
                   help="the app `directus sync --app NAME` filled (env LOCALTAG_DIRECTUS_APP)")
    q.add_argument("--limit", type=int, default=10, help="hits (default 10)")
    q.add_argument("--json", action="store_true", help='JSON: {"query", "app", "hits": [{"id", "score", "title", '
                   '"filename"}]}')
    add_model_flags(q)
    q.set_defaults(func=cmd_search)
    n = ds.add_parser("learn", help="learn concepts from people's tags and the machine tags they deleted",
                      description="Learn a head from the library: positives are a person's own tags, negatives "
                      "the machine tags people deleted (`rejected` in directus_files.localtag) and files without "
                      "the tag. Concepts people use on at least --min-count files are learnt: new ones from "
                      "scratch, the vocabulary's as corrections of their zero-shot scorer. Prints, per concept, "
                      "its examples and the held-out AP before → after; `directus sync --retag --model-head NAME` "
                      "then tags with it.")
    add_directus_flags(n)
    n.add_argument("--name", default="directus", help="the head's name (default 'directus'), stored as NAME.npz in "
                   "--heads-dir")
    n.add_argument("--min-count", dest="min_count", type=int, default=5,
                   help="files a person's tag must be on to be learnt (default 5)")
    n.add_argument("--concepts", nargs="+", metavar="TAG", help="learn these tags only (whatever their count)")
    n.add_argument("--filter", help="a Directus filter (JSON) on directus_files: learn from these files only")
    n.add_argument("--holdout", type=float, default=0.3, help="share of files held out for the AP report (0: none)")
    n.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    n.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: on a TTY)")
    n.add_argument("--cache", dest="embedding_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="use the embedding cache (default on)")
    add_model_flags(n)
    n.add_argument("--heads-dir", dest="heads_dir", type=Path, help="folder of learnt heads (env LOCALTAG_HEADS_DIR)")
    n.set_defaults(func=cmd_learn)
