"""The colour model's core (localtag.core.colors) on real encoded files: alpha, greyscale, 16-bit, CMYK,
EXIF orientation; values are pixel shares summing to 1."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from localtag.core import decode
from localtag.core.colors import W3C_NAMES, dominant_colors, nearest_w3c


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _names(data: bytes) -> list[tuple[str, float]]:
    return [(c.w3c_name, c.value) for c in dominant_colors(decode.decode(data))]


def test_quarter_green_three_quarters_yellow_in_every_encoding():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20] = (0, 128, 0)
    a[:, 20:] = (255, 255, 0)
    rgb = Image.fromarray(a)
    for data in (_encode(rgb, "PNG"), _encode(rgb, "JPEG", quality=95), _encode(rgb.convert("CMYK"), "JPEG"),
                 _encode(rgb.convert("RGBA"), "PNG"), _encode(rgb, "WEBP", lossless=True)):
        got = _names(data)
        assert [n for n, _ in got[:2]] == ["Yellow", "Green"], got
        assert got[0][1] == pytest.approx(0.75, abs=0.05)
        assert sum(v for _, v in got) == pytest.approx(1.0, abs=1e-9)


def test_transparent_pixels_count_as_white_and_greyscale_16_bit_works():
    a = np.zeros((40, 40, 4), np.uint8)
    a[:, :20] = (0, 0, 255, 255)  # opaque blue; the rest fully transparent → composited on white
    got = _names(_encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert {n for n, _ in got[:2]} == {"Blue", "White"}
    g = np.zeros((30, 60), np.uint16)
    g[:, 30:] = 65535
    got16 = _names(_encode(Image.fromarray(g), "PNG"))
    assert {n for n, _ in got16[:2]} == {"Black", "White"} and got16[0][1] == pytest.approx(0.5, abs=0.05)
    grey = _names(_encode(Image.fromarray((g >> 8).astype(np.uint8), "L"), "JPEG"))
    assert {n for n, _ in grey[:2]} == {"Black", "White"}


def test_exif_orientation_is_applied_before_the_colours():
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :15] = (255, 0, 0)
    a[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = _encode(Image.fromarray(a), "JPEG", quality=95, exif=exif)
    img = decode.decode(data)
    assert img.size == (20, 60)  # upright: the colours are read from the turned picture
    got = [(c.w3c_name, c.value) for c in dominant_colors(img)]
    assert [n for n, _ in got[:2]] == ["Blue", "Red"] and got[0][1] == pytest.approx(0.75, abs=0.05)


def test_nearest_w3c_names():
    names = [n for _, n in nearest_w3c(np.array([[250, 250, 250], [0, 0, 130], [255, 140, 0]]))]
    assert names[0] in {"Snow", "White", "WhiteSmoke", "GhostWhite"} and names[1:] == ["Navy", "DarkOrange"]
    assert len(W3C_NAMES) == len(set(W3C_NAMES)) >= 140
