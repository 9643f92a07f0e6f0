"""``localtag``: the command line's composition root.

Each command module exposes ``add_parser(sub)`` (its flags and handler) and is registered here,
explicitly; handlers import what they need when they run, so ``localtag --help`` loads neither torch
nor FastAPI, and only ``serve`` loads the web and gRPC stacks. JSON goes to stdout; logs and progress
bars go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from . import app as cli_app
from . import batch as cli_batch
from . import directus as cli_directus
from . import eval as cli_eval
from . import learn as cli_learn
from . import models as cli_models
from . import serve as cli_serve
from . import tag as cli_tag
from . import vocab as cli_vocab

log = logging.getLogger("localtag")

#: the command modules, in the order ``--help`` lists them
COMMANDS = (cli_tag, cli_models, cli_vocab, cli_serve, cli_directus, cli_eval, cli_learn, cli_batch, cli_app)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localtag", description="Offline image tagging with CLIP.")
    p.add_argument("--version", action=_Version, nargs=0, help="print localtag's version and exit")
    p.add_argument("--log-level", default=os.environ.get("LOCALTAG_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


class _Version(argparse.Action):
    """``--version``, looked up only when asked (the package metadata costs ~40 ms to read)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"localtag {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("localtag")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the hub libraries stay offline for everything but `models pull` (models.online), from here on
    os.environ.update({v: "1" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")})
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..core.errors import ImageError
    from ..core.models import ModelError
    from ..core.tagger import SelectError
    from ..core.vocab import VocabError

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
