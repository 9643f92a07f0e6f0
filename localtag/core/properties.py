"""Image properties (Rekognition's extras, as localtag's ``image-properties`` model): brightness,
sharpness and contrast, and the dominant colours folded into 12 simplified colour names.

All three measures are in [0, 1] and computed on the image shrunk to at most ``SIDE`` pixels a side:
- brightness: mean CIE L* / 100;
- contrast: standard deviation of L* / 50 (clipped to 1; a half-black, half-white image is 1.0);
- sharpness: mean absolute Laplacian of the 8-bit luminance / 64 (clipped to 1), a relative measure
  of edge strength: it depends on the picture's content as much as on its focus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .colors import Color, dominant_colors, lab

SIDE = 256
#: Rekognition's 12 simplified colours and a reference sRGB for each
SIMPLE = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (220, 30, 30),
          "orange": (255, 140, 0), "yellow": (250, 220, 30), "green": (40, 160, 40), "teal": (0, 128, 128),
          "blue": (30, 60, 220), "purple": (128, 40, 160), "pink": (255, 150, 190), "brown": (130, 80, 30)}
_LAPLACE = ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), scale=1, offset=128)


@dataclass(frozen=True)
class Properties:
    brightness: float
    sharpness: float
    contrast: float
    colors: list[tuple[str, float]]  # (simplified name, pixel share), largest first, summing to 1

    def to_json(self) -> dict:
        return {"brightness": round(self.brightness, 4), "sharpness": round(self.sharpness, 4),
                "contrast": round(self.contrast, 4),
                "simplified_colors": [{"name": n, "value": round(v, 7)} for n, v in self.colors]}


def simplified(colors: list[Color]) -> list[tuple[str, float]]:
    """Dominant colours folded into the 12 names (nearest in Lab), shares added up."""
    names = list(SIMPLE)
    ref = lab(np.array(list(SIMPLE.values()), dtype=np.uint8))
    rgb = np.array([[int(c.raw_hex[i:i + 2], 16) for i in (1, 3, 5)] for c in colors], dtype=np.uint8)
    nearest = ((lab(rgb)[:, None, :] - ref[None]) ** 2).sum(-1).argmin(1) if len(colors) else []
    shares: dict[str, float] = {}
    for c, i in zip(colors, nearest, strict=True):
        shares[names[i]] = shares.get(names[i], 0.0) + c.value
    return sorted(shares.items(), key=lambda kv: -kv[1])


def properties(img: Image.Image, colors: list[Color] | None = None) -> Properties:
    """The properties of an upright RGB image (``colors``: its dominant colours, if already found)."""
    small = img.convert("RGB")
    if max(small.size) > SIDE:
        small = small.copy()
        small.thumbnail((SIDE, SIDE), Image.Resampling.BOX)
    light = lab(np.asarray(small))[..., 0]
    grey = small.convert("L")
    edges = np.asarray(grey.filter(_LAPLACE), dtype=np.float32) - 128.0
    edges = edges[1:-1, 1:-1] if min(edges.shape) > 2 else edges
    return Properties(brightness=float(light.mean() / 100.0),
                      sharpness=float(min(1.0, np.abs(edges).mean() / 64.0)),
                      contrast=float(min(1.0, light.std() / 50.0)),
                      colors=simplified(colors if colors is not None else dominant_colors(small)))
