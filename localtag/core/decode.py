"""Decoding: bytes or a path in, an upright RGB ``PIL.Image`` out, or an :class:`ImageError`.

- EXIF orientation is applied.
- Every mode becomes RGB: palette and alpha images are composited on white, 16-bit greyscale is
  scaled (not clipped), CMYK is converted, an animation gives its first frame.
- The pixel count is checked from the header, before any pixel is decoded (decompression bombs),
  and so is the aspect ratio: past 1::data:`MAX_ASPECT` (a 1×500,000 PNG, whose resize to the model's
  short side would be gigapixels) the image is refused as too large (Clarifai's 30105).
- A PNG whose text metadata is too large for Pillow (a zTXt / iTXt chunk inflating past 1 MB) is
  decoded without its text chunks, as a browser shows it.
- HEIC / HEIF (phone photos) decode through ``pillow-heif`` (the ``heic`` extra); without it the error
  says what to install.
- ``draft`` lets the JPEG decoder produce a reduced-scale image (1/2, 1/4, 1/8) directly, which is
  several times cheaper for photos much larger than the model input.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import CORRUPT, NOT_FOUND, NOT_IMAGE, TOO_MANY_BYTES, TOO_MANY_PIXELS, ImageError

# Our own limit (``max_pixels``) replaces Pillow's global one, checked before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1", b"heif"}
HEIF_MISSING = ("a HEIC/HEIF image, and pillow-heif is not installed: install it with "
                "`pip install 'localtag[heic]'` (or `pip install pillow-heif`)")
_heif: bool | None = None
#: the longest side may be at most this many times the shortest
MAX_ASPECT = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")


def is_heif(data: bytes) -> bool:
    """An ISO-BMFF file whose ftyp brand is a HEIF one (phones' .heic / .heif)."""
    return len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS


def heif_ready() -> bool:
    """Register pillow-heif's opener with Pillow once; False when it is not installed."""
    global _heif
    if _heif is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif = False
        else:
            register_heif_opener()
            _heif = True
    return _heif


def read_source(source: str | Path | bytes, max_bytes: int) -> bytes:
    """The bytes of a path or of bytes already in memory, with the byte cap applied.

    Only regular files are read (opened non-blocking, then checked), so a FIFO or a socket named
    ``*.jpg`` fails at once instead of hanging. Messages do not repeat the path: callers name the input.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        data = _read_file(Path(source), max_bytes)
    if len(data) > max_bytes:
        raise ImageError(TOO_MANY_BYTES, f"{len(data)} bytes is over the {max_bytes}-byte limit")
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(NOT_FOUND, "no such file") from None
    except IsADirectoryError:
        raise ImageError(NOT_IMAGE, "is a directory") from None
    except PermissionError:
        raise ImageError(NOT_FOUND, "permission denied") from None
    except OSError as e:  # a looping symlink, a socket, a name too long, ...
        raise ImageError(NOT_FOUND, f"cannot open: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(NOT_IMAGE, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(NOT_IMAGE, "not a regular file (a FIFO, socket or device)")
        if st.st_size > max_bytes:
            raise ImageError(TOO_MANY_BYTES, f"{st.st_size} bytes is over the {max_bytes}-byte limit")
        try:
            return f.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(NOT_FOUND, f"cannot read: {e.strerror or e}") from None


def decode(
    source: str | Path | bytes,
    *,
    max_pixels: int = 85_000_000,
    max_bytes: int = 20_000_000,
    draft: int | None = None,
    on_size: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Decode to an upright RGB image. ``draft``: the shortest side the caller needs (JPEG only).

    ``on_size(width, height)`` is called with the size about to be decoded (after any draft
    reduction), before any pixel is; it may raise :class:`ImageError` to refuse the image."""
    data = read_source(source, max_bytes)
    if not data:
        raise ImageError(NOT_IMAGE, "empty input")
    if is_heif(data) and not heif_ready():
        raise ImageError(NOT_IMAGE, HEIF_MISSING)
    try:
        return _decode(data, max_pixels, draft, on_size)
    except ImageError as e:
        if not (data.startswith(PNG_SIGNATURE) and "MAX_TEXT_CHUNK" in e.message):
            raise
    return _decode(strip_png_text(data), max_pixels, draft, on_size)


def strip_png_text(data: bytes) -> bytes:
    """A PNG without its text chunks (tEXt, zTXt, iTXt): metadata only, never pixels."""
    out, i = [data[:8]], 8
    while i + 12 <= len(data):
        kind, end = data[i + 4:i + 8], i + 12 + int.from_bytes(data[i:i + 4], "big")
        if kind not in PNG_TEXT:
            out.append(data[i:end])
        i = end
        if kind == b"IEND":
            break
    return b"".join(out)


def _decode(data: bytes, max_pixels: int, draft: int | None, on_size: Callable[[int, int], None] | None):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(NOT_IMAGE, "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on garbage
        raise ImageError(CORRUPT, f"cannot read image header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(CORRUPT, f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            TOO_MANY_PIXELS, f"{w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:.1f} MP limit"
        )
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(TOO_MANY_PIXELS, f"{w}x{h} is longer and thinner than the 1:{MAX_ASPECT} limit")
    try:
        if draft and img.format == "JPEG" and min(w, h) >= 2 * draft:
            scale = min(w, h) / draft
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
    except Exception as e:  # noqa: BLE001
        raise ImageError(CORRUPT, f"cannot decode image: {e}") from None
    if on_size is not None:
        on_size(*img.size)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageError(CORRUPT, f"cannot decode image: {e}") from None


class _Sized(Exception):
    pass


def peek_size(source: str | Path | bytes, *, max_pixels: int = 85_000_000, max_bytes: int = 20_000_000,
              draft: int | None = None) -> tuple[int, int]:
    """The size :func:`decode` would decode (after any draft reduction), from the header alone;
    raises :class:`ImageError` as :func:`decode` would for the header."""
    size: list[tuple[int, int]] = []

    def stop(w: int, h: int) -> None:
        size.append((w, h))
        raise _Sized

    try:
        decode(source, max_pixels=max_pixels, max_bytes=max_bytes, draft=draft, on_size=stop)
    except _Sized:
        return size[0]
    raise ImageError(CORRUPT, "no image size")  # not reached: decode calls on_size or raises


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype("uint8"), "L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(arr.astype("uint8"), "L").convert("RGB")
    if mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")
