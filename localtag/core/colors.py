"""Dominant colours of an image, from its pixels: the ``color-recognition`` model.

The image (already upright RGB: :func:`localtag.core.decode.decode` handles EXIF orientation, alpha,
greyscale, CMYK and 16-bit) is shrunk to at most ``SIDE`` pixels a side, converted to CIE L*a*b* with
Pillow's LittleCMS binding (``ImageCms``), and clustered there by Pillow's own quantizer (median cut
(optionally refined by k-means passes: off, see KMEANS_PASSES). Why Pillow: it is already a dependency, well kept, its quantizer is C and
takes ~1 ms on 4,096 pixels, and running it on Lab bytes makes the clusters perceptual (distances in
Lab follow what the eye sees, where RGB over-splits greens and merges dark shades). scikit-learn or
scikit-image would add a large dependency for the same k-means.

Each cluster's colour is the mean sRGB of its own pixels (``raw_hex``), named by the nearest CSS/W3C
colour in Lab (ΔE*76); ``value`` is the cluster's share of the pixels, so the values sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

#: the image is shrunk to at most this many pixels a side before clustering
SIDE = 64
#: clusters asked of the quantizer (empty ones are dropped)
CLUSTERS = 8
#: Pillow's k-means refinement passes after the median cut: 0, as each pass costs ~5 ms on 4,096
#: pixels for no visible change in the leading colours (bench/colors.py measures)
KMEANS_PASSES = 0

# CSS Color Module Level 4 named colours, written as Clarifai writes W3C names (CamelCase)
W3C_NAMES = (
    "AliceBlue AntiqueWhite Aqua Aquamarine Azure Beige Bisque Black BlanchedAlmond Blue BlueViolet Brown "
    "BurlyWood CadetBlue Chartreuse Chocolate Coral CornflowerBlue Cornsilk Crimson Cyan DarkBlue DarkCyan "
    "DarkGoldenRod DarkGray DarkGreen DarkKhaki DarkMagenta DarkOliveGreen DarkOrange DarkOrchid DarkRed "
    "DarkSalmon DarkSeaGreen DarkSlateBlue DarkSlateGray DarkTurquoise DarkViolet DeepPink DeepSkyBlue DimGray "
    "DodgerBlue FireBrick FloralWhite ForestGreen Fuchsia Gainsboro GhostWhite Gold GoldenRod Gray Green "
    "GreenYellow HoneyDew HotPink IndianRed Indigo Ivory Khaki Lavender LavenderBlush LawnGreen LemonChiffon "
    "LightBlue LightCoral LightCyan LightGoldenRodYellow LightGray LightGreen LightPink LightSalmon "
    "LightSeaGreen LightSkyBlue LightSlateGray LightSteelBlue LightYellow Lime LimeGreen Linen Magenta Maroon "
    "MediumAquaMarine MediumBlue MediumOrchid MediumPurple MediumSeaGreen MediumSlateBlue MediumSpringGreen "
    "MediumTurquoise MediumVioletRed MidnightBlue MintCream MistyRose Moccasin NavajoWhite Navy OldLace Olive "
    "OliveDrab Orange OrangeRed Orchid PaleGoldenRod PaleGreen PaleTurquoise PaleVioletRed PapayaWhip "
    "PeachPuff Peru Pink Plum PowderBlue Purple RebeccaPurple Red RosyBrown RoyalBlue SaddleBrown Salmon "
    "SandyBrown SeaGreen SeaShell Sienna Silver SkyBlue SlateBlue SlateGray Snow SpringGreen SteelBlue Tan "
    "Teal Thistle Tomato Turquoise Violet Wheat White WhiteSmoke Yellow YellowGreen"
).split()


@dataclass(frozen=True)
class Color:
    raw_hex: str  # the cluster's mean colour, "#rrggbb"
    w3c_hex: str
    w3c_name: str
    value: float  # share of the pixels

    def to_json(self) -> dict:
        return {"raw_hex": self.raw_hex, "w3c": {"hex": self.w3c_hex, "name": self.w3c_name},
                "value": round(self.value, 7)}


@lru_cache(maxsize=1)
def _to_lab() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 [..., 3] → L*a*b* float [..., 3] (L 0..100, a/b about -128..127), through LittleCMS."""
    flat = np.ascontiguousarray(rgb.reshape(-1, 1, 3).astype(np.uint8))
    out = ImageCms.applyTransform(Image.fromarray(flat, "RGB"), _to_lab())
    raw = _offset_lab(np.asarray(out)).reshape(-1, 3).astype(np.float32)
    raw = np.stack([raw[:, 0] * (100.0 / 255.0), raw[:, 1] - 128.0, raw[:, 2] - 128.0], axis=1)
    return raw.reshape(rgb.shape[:-1] + (3,))


def _offset_lab(arr: np.ndarray) -> np.ndarray:
    """Pillow's 8-bit LAB (L 0..255, a and b signed bytes) → uint8 with a and b offset by 128, so that
    byte distances are Lab distances (no wrap-around at a = 0 or b = 0)."""
    out = arr.astype(np.uint8).copy()
    out[..., 1:] = (arr[..., 1:].astype(np.uint8).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return out


@lru_cache(maxsize=1)
def _palette() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The W3C names, their sRGB [N, 3] and their Lab [N, 3]."""
    from PIL import ImageColor

    rgb = np.array([ImageColor.getrgb(n.lower()) for n in W3C_NAMES], dtype=np.uint8)
    return list(W3C_NAMES), rgb, lab(rgb)


def nearest_w3c(rgb: np.ndarray) -> list[tuple[str, str]]:
    """(hex, name) of the CSS colour nearest each sRGB colour of ``rgb`` [N, 3], in Lab."""
    names, pal_rgb, pal_lab = _palette()
    d = ((lab(np.asarray(rgb, dtype=np.uint8).reshape(-1, 3))[:, None, :] - pal_lab[None]) ** 2).sum(-1)
    return [(_hex(pal_rgb[i]), names[i]) for i in d.argmin(1)]


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def dominant_colors(img: Image.Image, clusters: int = CLUSTERS) -> list[Color]:
    """The image's dominant colours, largest share first; the values sum to 1."""
    from .decode import to_rgb

    small = to_rgb(img)
    if max(small.size) > SIDE:
        small = small.copy()
        small.thumbnail((SIDE, SIDE), Image.Resampling.BOX)
    lab_img = ImageCms.applyTransform(small, _to_lab())
    # Pillow quantizes RGB-mode images only: the (offset) Lab bytes are handed over as such
    as_rgb = Image.fromarray(_offset_lab(np.asarray(lab_img)), "RGB")
    q = as_rgb.quantize(colors=clusters, method=Image.Quantize.MEDIANCUT, kmeans=KMEANS_PASSES,
                        dither=Image.Dither.NONE)
    labels = np.asarray(q, dtype=np.intp).ravel()
    pixels = np.asarray(small, dtype=np.float64).reshape(-1, 3)
    counts = np.bincount(labels, minlength=clusters)
    sums = np.zeros((counts.size, 3))
    np.add.at(sums, labels, pixels)
    order = [k for k in np.argsort(-counts, kind="stable") if counts[k]]
    means = np.rint(sums[order] / counts[order, None]).astype(np.uint8)
    total = float(labels.size)
    return [Color(_hex(m), w3c_hex, name, float(counts[k]) / total)
            for k, m, (w3c_hex, name) in zip(order, means, nearest_w3c(means), strict=True)]
