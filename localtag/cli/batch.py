"""``localtag batch run | status | export | rescore | push``: resumable sharded batch jobs.

``run`` plans SOURCE... into deterministic shards (see :mod:`localtag.batch.plan`), runs the pending
ones on the local engine or on Ray Data (``--engine ray``, the ``ray`` extra), and commits each shard
atomically in RUN_DIR (see :mod:`localtag.batch.store`). Running it again resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import add_directus_flags, add_model_flags

log = logging.getLogger("localtag.batch")

MISSING_PYARROW = "the batch commands need pyarrow: pip install 'localtag[batch]'"
MISSING_RAY = "--engine ray needs Ray Data: pip install 'localtag[ray]' (ray[data]>=2.60,<2.64)"


def _settings(args: argparse.Namespace) -> Any:
    from .common import settings_from

    return settings_from(args)


def _store(path: Path) -> Any:
    try:
        from ..batch.store import RunStore
    except ImportError as e:
        if e.name == "pyarrow" or (e.name or "").startswith("pyarrow"):
            raise ValueError(MISSING_PYARROW) from None
        raise
    return RunStore(path)


def _ray_token_mode(address: str | None) -> None:
    """Ray (>= 2.60) sends the cluster token only for address None or "auto": for an explicit
    HOST:PORT, turn token mode on when this host has the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token). A token-mode client also joins an open cluster. Ray reads the mode when it is
    imported, so this runs first (docs/batch.md)."""
    if address in (None, "auto") or "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def cmd_run(args: argparse.Namespace) -> int:
    store = _store(args.out)
    from ..batch import ops as batch_ops
    from ..batch.plan import plan
    from ..core.loader import fingerprint

    settings = _settings(args)
    if args.engine == "ray":
        _ray_token_mode(args.ray_address)
        try:
            from ..batch import ray_engine as batch_ray
        except ImportError as e:
            if (e.name or "").split(".")[0] == "ray":
                raise ValueError(MISSING_RAY) from None
            raise
    fp = fingerprint(settings)  # from the manifest, vocabulary and calibration: the driver loads no model
    t0 = time.monotonic()
    run = plan(store, args.sources, settings, fp, args.shard_size)
    removed = store.clean()
    log.info("%s: %d items in %d shards (%d of them committed before)%s", store.root, run["items"], run["shards"],
             sum(1 for _ in store.committed(run["shards"])), f"; removed {removed} stale files" if removed else "")
    if args.engine == "ray":
        stats = batch_ray.run(store.root, settings, run["shards"], address=args.ray_address, workers=args.ray_workers,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                              threads=args.threads, progress=bool(args.progress))
    else:
        from ..batch import local as batch_local

        stats = batch_local.run(store.root, settings, run["shards"], args.threads)
    n_new = items = 0
    for s in stats:
        if s.get("committed"):
            n_new += 1
            items += s["items"]
            log.info("shard %d committed: %d ok, %d failed, %.1f items/s", s["shard"], s["ok"], s["failed"],
                     s["items"] / s["seconds"] if s["seconds"] else 0.0)
    wall = time.monotonic() - t0
    summary = batch_ops.status(store)
    summary["this_run"] = {"shards_committed": n_new, "items": items, "seconds": round(wall, 2),
                           "items_per_s": round(items / wall, 2) if wall else None, "engine": args.engine}
    print(json.dumps(summary))
    if not summary["complete"]:
        return 2
    return 1 if summary["items"]["failed"] else 0


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args.run_dir)  # first: says what to install when pyarrow is missing
    from ..batch import ops as batch_ops

    s = batch_ops.status(store)
    print(json.dumps(s, indent=1) if args.json else batch_ops.status_text(s))
    return 0 if s["complete"] else 2


def cmd_export(args: argparse.Namespace) -> int:
    store = _store(args.run_dir)
    from ..batch import ops as batch_ops

    if args.format == "parquet":
        n = batch_ops.export(store, "parquet", None, args.output)
    elif args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            n = batch_ops.export(store, args.format, f)
    else:
        n = batch_ops.export(store, args.format, sys.stdout)
    log.info("exported %d items", n)
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    store = _store(args.run_dir)
    from ..batch import ops as batch_ops

    run = store.read_run()
    settings = _settings(args)
    if args.model is None:  # the run's own model
        settings = settings.model_copy(update={"model": run["fingerprint"]["model"]})
    out = args.out or args.run_dir.with_name(f"{args.run_dir.name}-rescored")
    result = batch_ops.rescore(store, settings, _store(out))
    print(json.dumps({**result, **batch_ops.status(_store(out))["items"]}))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    store = _store(args.run_dir)
    from ..batch import ops as batch_ops
    from ..directus.client import DirectusClient

    settings = _settings(args)
    if not settings.directus_url:
        raise ValueError("give --directus-url or set LOCALTAG_DIRECTUS_URL")
    if settings.directus_token is None:
        raise ValueError("give --token or set LOCALTAG_DIRECTUS_TOKEN (a Directus static token)")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request, URLs with no secrets, still noise
    client = DirectusClient(settings.directus_url, settings.directus_token.get_secret_value())
    with client:
        counts = batch_ops.push(store, client, dry_run=args.dry_run)
    print(json.dumps(counts))
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The shared model flags, less those `batch run` gives its own meaning (--workers, --batch-size, …)."""
    add_model_flags(p, only=("model", "models_dir", "vocab", "device", "precision", "cache_dir", "scoring"))
    p.add_argument("--max-concepts", dest="max_concepts", type=int, help="most tags per image (default 20)")
    p.add_argument("--min-value", dest="min_value", type=float, help="lowest value a tag needs")
    p.add_argument("--model-head", dest="model_head", metavar="NAME", help="a learnt head (`localtag learn`, "
                   "`directus learn`) whose concepts join the vocabulary's: its name in --heads-dir or a .npz file "
                   "(env LOCALTAG_MODEL_HEAD)")
    p.add_argument("--heads-dir", dest="heads_dir", type=Path, help="folder of learnt heads (env LOCALTAG_HEADS_DIR)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("batch", help="resumable sharded batch jobs (local, or on a Ray cluster)")
    bs = b.add_subparsers(dest="batch_cmd", required=True)

    r = bs.add_parser("run", help="plan, run and commit a sharded job; the same command again resumes it",
                      description="Tag SOURCE... (folders, images, .txt/.csv/.parquet lists of paths or URLs, "
                      "WebDataset .tar shards, s3://bucket/prefix, directus://) into RUN_DIR: one Parquet file "
                      "per shard with ids, content sha256, status/error, concepts and L2-normalised float32 "
                      "embeddings. Prints a JSON summary; exit 0 when every item succeeded, 1 when some failed "
                      "(error rows), 2 when shards are left.")
    r.add_argument("sources", nargs="+", metavar="SOURCE")
    r.add_argument("--out", required=True, type=Path, metavar="RUN_DIR")
    r.add_argument("--engine", choices=["local", "ray"], default="local")
    r.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (host:port, or 'auto' for the "
                   "cluster `ray start` made on this machine); default: a local Ray in this process")
    r.add_argument("--shard-size", dest="shard_size", type=int, default=1000, help="items per shard (default 1000)")
    r.add_argument("--workers", dest="ray_workers", type=int, default=1, help="Ray actors, each with its own model (default 1)")
    r.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=float, default=0.0,
                   help="GPUs per Ray actor (1: one actor per GPU)")
    r.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=0.5,
                   help="CPUs per Ray actor (default 0.5: leaves CPUs for Ray's read tasks)")
    r.add_argument("--decode-threads", dest="workers", type=int,
                   help="decode threads per worker (env LOCALTAG_WORKERS)")
    r.add_argument("--threads", type=int, help="torch threads per worker (default: the machine's cores, also in "
                   "Ray actors; answers are bit-identical between workers with the same number)")
    r.add_argument("--batch-size", dest="batch_size", type=int, help="images per model batch")
    r.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse larger images (default 85 MP)")
    r.add_argument("--fast", dest="fast_decode", action="store_true", default=None, help="JPEG draft decoding")
    r.add_argument("--progress", action="store_true", help="Ray's progress bars on stderr")
    _model_flags(r)
    add_directus_flags(r)
    r.set_defaults(func=cmd_run)

    s = bs.add_parser("status", help="shards planned / committed, items ok / failed with reasons, throughput")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    e = bs.add_parser("export", help="the committed results, in plan order")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--format", choices=["jsonl", "clarifai", "parquet"], default="jsonl",
                   help="jsonl: Clarifai outputs a line (as `tag --jsonl`); clarifai: {outputs, status}; "
                   "parquet: every row with its embedding (needs --output)")
    e.add_argument("--output", "-o", type=Path, help="file to write (default stdout)")
    e.set_defaults(func=cmd_export)

    rs = bs.add_parser("rescore", help="new tags from the stored embeddings (new vocabulary, thresholds, "
                       "calibration); no image model, no fetching")
    rs.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rs.add_argument("--out", type=Path, metavar="RUN_DIR2", help="default RUN_DIR-rescored")
    _model_flags(rs)
    rs.set_defaults(func=cmd_rescore)

    p = bs.add_parser("push", help="write the run's tags to Directus (directus sync's rules; idempotent)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="count what would change, write nothing")
    add_directus_flags(p)
    p.set_defaults(func=cmd_push)
