"""``localtag serve``: load the model once and serve Clarifai's REST (and gRPC) API."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_flags, settings_from


def check_bind(settings) -> None:
    """Refuse an open (keyless) server on a non-loopback address unless explicitly allowed."""
    from ..core.addresses import is_loopback
    from ..serve.auth import load_keys

    if not is_loopback(settings.host) and not settings.allow_public_bind and not load_keys(settings):
        raise ValueError(f"refusing to serve on {settings.host} without API keys: set LOCALTAG_API_KEYS or "
                         "--api-keys-file, or pass --allow-public-bind")


def check_models(settings) -> None:
    """The default model is in the store with its weights intact, and every extra model id's model is
    there: a missing or corrupt model is one line and exit 2, before anything binds. The server's
    lifespan then loads them (and owns them until shutdown)."""
    from ..core.models import ModelStore

    store = ModelStore(settings.models_dir)
    store.verify(store.resolve(settings.model), stamp_dir=settings.cache_dir)
    for model, _vocab in settings.model_ids.values():
        store.resolve(model)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.http_config import uvicorn_config
    from ..serve.server import create_app

    settings = settings_from(args)
    check_bind(settings)
    check_models(settings)
    app = create_app(settings)  # its lifespan loads the models, serves, and drains them on shutdown
    server = uvicorn.Server(uvicorn_config(app, settings, log_level=args.log_level))
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn has logged why
        return 2
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a Clarifai-compatible REST (and gRPC) endpoint")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="HTTP port (default 8080)")
    s.add_argument("--grpc-port", dest="grpc_port", type=int, help="also serve Clarifai's gRPC API on this port")
    s.add_argument("--api-keys-file", dest="api_keys_file", type=Path,
                   help="file with one accepted API key per line (or env LOCALTAG_API_KEYS, a JSON list)")
    s.add_argument("--allow-public-bind", dest="allow_public_bind", action="store_true", default=None,
                   help="allow a non-loopback --host without API keys")
    s.add_argument("--allow-host", dest="allow_hosts", action="append",
                   help="a host (or host:port) image URLs may reach although it is local, e.g. 127.0.0.1:8055")
    s.add_argument("--max-queue", dest="max_queue", type=int, help="images admitted at once before 503 (default 512)")
    s.add_argument("--batch-window-ms", dest="batch_window_ms", type=float, help="batching window (default 5 ms)")
    add_model_flags(s)
    s.set_defaults(func=cmd_serve)
