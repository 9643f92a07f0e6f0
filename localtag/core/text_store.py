"""Text embeddings stored in the model folder, so a host never runs the text tower for a shipped vocabulary.

``localtag models pull`` and ``models import`` call :func:`localtag.core.loader.precompute_text` for the shipped ``vocab.txt`` and
the model's own ``vocab.txt``: the prompt-ensembled concept embeddings and the neutral embedding go
to ``<model>/text/<key>.npz``, where ``key`` is the tagger's text key (model sha256, vocabulary
sha256, templates, neutral prompts, format version). The manifest lists each file with its sha256::

    "text_embeddings": [{"file": "text/<key>.npz", "sha256": "…", "key": "<key>",
                         "vocab_sha256": "…", "concepts": 3604, "dim": 512}]

:func:`load` (called by the tagger before its own cache) serves a file only when its key, its sha256
and its concept count all match; anything else is ignored with a warning and the tagger falls back
to its cache or the text tower.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models as model_store

log = logging.getLogger(__name__)

MANIFEST_KEY = "text_embeddings"
FOLDER = "text"


def progress_range(total: int, step: int, enabled: bool | None, desc: str):
    """``range(0, total, step)`` with a tqdm bar on stderr counting items (None: only on a TTY)."""
    import sys

    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield from range(0, total, step)
        return
    with tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        for i in range(0, total, step):
            yield i
            bar.update(min(step, total - i))


def entries(info: model_store.ModelInfo) -> list[dict[str, Any]]:
    value = info.extra.get(MANIFEST_KEY)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def load(info: model_store.ModelInfo, key: str, concepts: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored (concept embeddings, neutral embedding) for ``key``, verified, or None."""
    entry = next((e for e in entries(info) if e.get("key") == key), None)
    if entry is None:
        return None
    path = info.path / str(entry.get("file", ""))
    try:
        digest = model_store.sha256_file(path)
        if digest != entry.get("sha256"):
            log.warning("%s: sha256 %s… does not match the manifest's %s…; not used (re-import or re-pull "
                        "the model)", path, digest[:12], str(entry.get("sha256"))[:12])
            return None
        with np.load(path) as z:
            text, neutral = torch.from_numpy(z["concepts"]), torch.from_numpy(z["neutral"])
    except (OSError, ValueError, KeyError) as e:
        log.warning("stored text embeddings %s unreadable (%s); not used", path, e)
        return None
    if text.shape[0] != concepts:
        log.warning("%s holds %d concepts, the vocabulary %d; not used", path, text.shape[0], concepts)
        return None
    return text, neutral


def verify(info: model_store.ModelInfo) -> list[str]:
    """Problems of the stored text embeddings (missing file, sha256 mismatch); empty when all are sound."""
    problems = []
    for e in entries(info):
        path = info.path / str(e.get("file", ""))
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif model_store.sha256_file(path) != e.get("sha256"):
            problems.append(f"{path}: sha256 does not match the manifest")
    return problems


def store(info: model_store.ModelInfo, entries_known: dict[str, dict[str, Any]], key: str, vocab_path: Path,
          vocab: Any, concepts: torch.Tensor, neutral: torch.Tensor, templates: list[str]) -> dict[str, Any]:
    """Write one vocabulary's embeddings to ``<model>/text/<key>.npz``; return its manifest entry."""
    folder = info.path / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{key}.npz"
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, concepts=concepts.numpy(), neutral=neutral.numpy())
    os.replace(tmp, dest)
    dest.chmod(0o644)
    entry = {"file": f"{FOLDER}/{dest.name}", "sha256": model_store.sha256_file(dest), "key": key,
             "vocab": vocab_path.name, "vocab_sha256": vocab.sha256, "concepts": len(vocab),
             "dim": int(concepts.shape[1]), "templates": list(templates)}
    entries_known[key] = entry
    return entry


def record(info: model_store.ModelInfo, entries_known: dict[str, dict[str, Any]]) -> None:
    """List the stored files in the model's manifest."""
    info.extra[MANIFEST_KEY] = list(entries_known.values())
    _write_manifest(info)


def _write_manifest(info: model_store.ModelInfo) -> None:
    path = info.path / model_store.MANIFEST
    fd, tmp = tempfile.mkstemp(dir=info.path, suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info.manifest(), indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
