"""Shared by the app benches and tests: COCO photos with planted near-duplicates."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def plant_copies(photos: list[Path], dest: Path, n: int = 10) -> dict[str, str]:
    """Copy ``photos`` to ``dest`` and add ``n`` altered copies of evenly spaced ones (resized to half,
    recompressed at JPEG quality 60, or cropped by 10 % on each side, in turn). Returns copy → original."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in photos:
        (dest / p.name).write_bytes(p.read_bytes())
    planted = {}
    step = max(1, len(photos) // n)
    for i in range(n):
        src = photos[i * step]
        im = Image.open(src).convert("RGB")
        kind = ("resized", "q60", "cropped")[i % 3]
        if kind == "resized":
            im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
        elif kind == "cropped":
            dx, dy = im.width // 10, im.height // 10
            im = im.crop((dx, dy, im.width - dx, im.height - dy))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=60 if kind == "q60" else 90)
        name = f"copy-{kind}-{src.stem}.jpg"
        (dest / name).write_bytes(buf.getvalue())
        planted[str(dest / name)] = str(dest / src.name)
    return planted


def score_groups(groups: list[list[str]], planted: dict[str, str]) -> dict[str, float]:
    """Found copies (copy and original in one group), false groups (groups holding no planted pair)."""
    found = sum(any(c in g and o in g for g in groups) for c, o in planted.items())
    pairs = set(planted.items())
    false = sum(not any((a, b) in pairs or (b, a) in pairs for a in g for b in g) for g in groups)
    linked = sum(len(g) * (len(g) - 1) // 2 for g in groups)  # pairs the groups put together
    return {"found": found, "planted": len(planted), "groups": len(groups), "false_groups": false,
            "pair_precision": found / linked if linked else 1.0}
