"""What the command modules share: model and output flags, settings from flags, the progress bar.

Light on purpose: every ``cli_*`` module imports it at start-up, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# flags shared by every command that loads a model: dest -> (flag, kwargs)
MODEL_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "model": ("--model", {"help": "model name in the store, or a model folder (env LOCALTAG_MODEL)"}),
    "models_dir": ("--models-dir", {"type": Path, "help": "model store folder (env LOCALTAG_MODELS_DIR)"}),
    "vocab": ("--vocab", {"type": Path, "help": "vocabulary file (default: the model's own, else vocab.txt)"}),
    "device": ("--device", {"help": "auto, cpu, cuda, cuda:N (env LOCALTAG_DEVICE)"}),
    "precision": ("--precision", {"choices": ["auto", "fp32", "bf16", "fp16", "int8"],
                                  "help": "image tower precision (env LOCALTAG_PRECISION; see docs/speed.md)"}),
    "cache_dir": ("--cache-dir", {"type": Path, "help": "cache folder (env LOCALTAG_CACHE_DIR)"}),
    "scoring": ("--scoring", {"choices": ["binary", "softmax", "sigmoid"], "help": "value mapping (see docs/tagging.md)"}),
    "batch_size": ("--batch-size", {"type": int, "help": "images per model batch (env LOCALTAG_BATCH_SIZE)"}),
    "workers": ("--workers", {"type": int, "help": "decode threads (env LOCALTAG_WORKERS)"}),
    "max_pixels": ("--max-pixels", {"type": int, "help": "refuse larger images (default 85 MP)"}),
    "fast_decode": ("--fast", {"action": "store_true", "default": None,
                               "help": "JPEG draft-mode decoding at reduced scale (see docs/speed.md)"}),
}


def add_model_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The shared model flags (``only``: a subset of :data:`MODEL_FLAGS` by dest, for commands that
    give the others another meaning)."""
    for dest, (flag, kwargs) in MODEL_FLAGS.items():
        if only is None or dest in only:
            p.add_argument(flag, dest=dest, **{"default": None, **kwargs})


def add_head_flags(p: argparse.ArgumentParser) -> None:
    """A learnt head (``localtag learn``) to score with instead of the vocabulary (docs/learn.md)."""
    p.add_argument("--model-head", dest="model_head", metavar="NAME",
                   help="score with a learnt head: its name in --heads-dir, or a .npz file (env LOCALTAG_MODEL_HEAD)")
    p.add_argument("--heads-dir", dest="heads_dir", type=Path,
                   help="folder of learnt heads (env LOCALTAG_HEADS_DIR; default ~/.local/share/localtag/heads)")


def add_directus_flags(p: argparse.ArgumentParser) -> None:
    """Where Directus is, and its static token (better from the environment, out of `ps`)."""
    p.add_argument("--directus-url", dest="directus_url", help="Directus base URL (env LOCALTAG_DIRECTUS_URL)")
    p.add_argument("--token", dest="directus_token",
                   help="Directus static token (better: env LOCALTAG_DIRECTUS_TOKEN, kept out of `ps`)")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Output format and concept selection of ``tag`` and ``retag``."""
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="Clarifai JSON ({outputs: [...], status})")
    fmt.add_argument("--jsonl", action="store_true", help="one Clarifai output per line")
    p.add_argument("--max-concepts", dest="max_concepts", type=int)
    p.add_argument("--min-value", dest="min_value", type=float)
    p.add_argument("--select", nargs="+", help="report only these concept names or ids")
    p.add_argument("--language", help="concept names in this language: one of Clarifai's 23 codes (de, fr, "
                   "zh-TW, …; env LOCALTAG_LANGUAGE; default English)")
    add_progress_flag(p)


def add_progress_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=help or "progress bar on stderr (default: only on a TTY)")


def settings_from(args: argparse.Namespace, **extra: Any):
    """CLI flags (those given) > env ``LOCALTAG_*`` > defaults."""
    from ..core.config import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    given.update({k: v for k, v in extra.items() if v is not None})
    from pydantic import ValidationError

    try:
        return Settings(**given)
    except ValidationError as e:  # one line per setting, never the value (it may be a key)
        raise ValueError("; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                                   for err in e.errors())) from None


def progress(iterable: Iterable | None, total: int | None, enabled: bool | None, desc: str, unit: str = "img"):
    """A tqdm bar on stderr, shown on a TTY or when asked (``--progress``)."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, total=total, disable=not show, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
