"""A pixel check for near-duplicate candidates: CLIP embeddings say two photos show the same kind of
scene; small grey thumbnails say whether they are the same photo (resized, recompressed, or cropped by
up to ~10 % a side). The best normalised correlation of 32×32 thumbnails over the pair as it is and
with either one centre-cropped by 10 % or 20 %."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

SIDE = 32
CROPS = (0.0, 0.1, 0.2)  # centre crops tried, as a fraction of each side


def thumbs(data: bytes) -> list[np.ndarray]:
    """Zero-mean unit-norm grey thumbnails of the photo and of its centre crops."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    im.draft("L", (SIDE * 8, SIDE * 8))
    im = im.convert("L")
    out = []
    for c in CROPS:
        dx, dy = int(im.width * c / 2), int(im.height * c / 2)
        t = np.asarray(im.crop((dx, dy, im.width - dx, im.height - dy)).resize((SIDE, SIDE), Image.Resampling.BOX),
                       np.float32).ravel()
        t = t - t.mean()
        out.append(t / max(float(np.linalg.norm(t)), 1e-6))
    return out


def same_photo(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The best correlation of ``a`` and ``b`` with at most one of them cropped."""
    return max(max(float(a[0] @ t) for t in b), max(float(t @ b[0]) for t in a))


def checker(read: Callable[[int], bytes | None], min_corr: float = 0.9) -> Callable[[int, int], bool]:
    """``keep(i, j)`` for :func:`localtag.app.search.groups`: True when rows ``i`` and ``j`` are the same photo;
    ``read(i)``: row ``i``'s bytes (None: unreadable, then the embedding alone decides)."""

    @lru_cache(maxsize=4096)
    def get(i: int) -> list[np.ndarray] | None:
        data = read(i)
        if data is None:
            return None
        try:
            return thumbs(data)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None

    def keep(i: int, j: int) -> bool:
        a, b = get(i), get(j)
        if a is None or b is None:
            return True
        return same_photo(a, b) >= min_corr

    return keep
