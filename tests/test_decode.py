"""Decoding real and odd images: EXIF orientation, every mode to RGB, limits, corrupt input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from localtag.core import errors
from localtag.core.decode import decode
from localtag.core.errors import ImageError


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_real_jpeg_decodes_to_rgb(coco_images):
    img = decode(coco_images[0])
    assert img.mode == "RGB" and min(img.size) > 100


def test_exif_orientation_is_applied():
    # a 40x20 image, left half red; stored with orientation 6 ("rotate 90° CW to display")
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _bytes(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    img = decode(data)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[2, 10], np.asarray(img)[37, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    assert bottom[0] < 60


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent → white
        (lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        (lambda: Image.new("L", (8, 8), 128), (128, 128, 128)),
        (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (8, 8), 32768), (128, 128, 128)),
    ],
)
def test_modes_become_rgb(make, expected):
    img = make()
    fmt = "TIFF" if img.mode in ("CMYK", "I;16") else "PNG"
    out = decode(_bytes(img, fmt))
    assert out.mode == "RGB"
    assert tuple(int(x) for x in np.asarray(out)[4, 4]) == pytest.approx(expected, abs=2)


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 255] + [0] * 765)
    img.info["transparency"] = 0
    out = decode(_bytes(img, "PNG", transparency=0))
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode(buf.getvalue())
    r, g, _ = np.asarray(out)[4, 4]
    assert r > 200 and g < 50


def png_bomb(width: int, height: int) -> bytes:
    """A small file whose header claims width×height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\0" + b"\0" * (3 * width)
    comp = zlib.compressobj(9)
    idat = comp.compress(row * 16) + comp.flush()  # a few rows only; the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_refuses_bombs_from_the_header():
    data = png_bomb(30000, 30000)
    assert len(data) < 200_000
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.kind == errors.TOO_MANY_PIXELS and "900.0 MP" in e.value.message
    with pytest.raises(ImageError, match="over the 0.0 MP limit"):
        decode(_bytes(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)


def test_byte_limit(tmp_path):
    data = _bytes(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageError) as e:
        decode(data, max_bytes=10)
    assert e.value.kind == errors.TOO_MANY_BYTES
    p = tmp_path / "x.png"
    p.write_bytes(data)
    with pytest.raises(ImageError, match="over the 10-byte limit"):
        decode(p, max_bytes=10)


def test_bad_inputs_fail_with_clear_errors(tmp_path, coco_images):
    jpeg = coco_images[0].read_bytes()
    cases = {
        b"": errors.NOT_IMAGE,
        b"hello, I am text": errors.NOT_IMAGE,
        jpeg[: len(jpeg) // 2]: errors.CORRUPT,  # truncated
        jpeg[:200]: errors.CORRUPT,
    }
    for data, kind in cases.items():
        with pytest.raises(ImageError) as e:
            decode(data)
        assert e.value.kind == kind, (data[:20], e.value)
        assert e.value.message
    with pytest.raises(ImageError) as e:
        decode(tmp_path / "missing.jpg")
    assert e.value.kind == errors.NOT_FOUND and "no such file" in e.value.message


def test_draft_decodes_large_jpeg_at_reduced_scale(coco_images):
    big = Image.open(coco_images[0]).resize((3200, 2400))
    data = _bytes(big, "JPEG", quality=90)
    small = decode(data, draft=224)
    assert small.mode == "RGB" and min(small.size) >= 224 and small.size[0] < 3200
    assert decode(data).size == (3200, 2400)
