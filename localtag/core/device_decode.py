"""JPEG decoding on the model's device (CUDA: nvjpeg), for batch runs with ``--fast``.

The decode workers only read a JPEG's header (:func:`jpeg_header`: its EXIF orientation and size,
and the pixel limit) and hand the bytes on; the image encoder decodes a whole batch on the device
(:func:`decode_jpegs`), applies the orientation (:func:`orient`) and open_clip's resize and crop there.
"""

from __future__ import annotations

import io

import torch

from . import decode
from .errors import TOO_MANY_PIXELS, ImageError
from .preprocess import Prepared, Preprocess

#: at most this many decoded pixels on the device at once (nvjpeg output before the resize)
DEVICE_DECODE_PIXELS = 256_000_000


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a [C, H, W] tensor, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def jpeg_header(data: bytes, max_pixels: int) -> tuple[int, float] | None:
    """``(exif orientation, megapixels)`` of a JPEG the device can decode, else None (Pillow's job).

    Raises :class:`ImageError` for a JPEG over the pixel limit, before anything is decoded.
    """
    from PIL import Image

    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        mode = img.mode
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - Pillow will say what is wrong
        return None
    if img.format != "JPEG" or mode not in ("RGB", "L") or w <= 0 or h <= 0:
        return None
    if max(w, h) > decode.MAX_ASPECT * min(w, h):
        return None  # long and thin: Pillow's path refuses it (decode.MAX_ASPECT)
    if w * h > max_pixels:
        raise ImageError(TOO_MANY_PIXELS,
                         f"{w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:.1f} MP limit")
    return (orientation if 1 <= orientation <= 8 else 1), w * h / 1e6


def decode_jpegs(items: list[Prepared], device: torch.device, pre: Preprocess, *, max_pixels: int,
                 max_bytes: int, draft: int | None) -> tuple[list[torch.Tensor | None], dict[int, ImageError]]:
    """JPEG bytes → resized, cropped [3, S, S] uint8 tensors on ``device``, and the errors by index.

    nvjpeg decodes whole chunks (at most :data:`DEVICE_DECODE_PIXELS` pixels at once); a chunk that
    fails is retried image by image, and an image the device cannot decode (CMYK, unusual sampling)
    goes through Pillow, which also gives the exact error of a broken file.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(items)
    errors: dict[int, ImageError] = {}
    chunks: list[list[int]] = [[]]
    budget = 0.0
    for i, p in enumerate(items):
        if chunks[-1] and budget + p.megapixels > DEVICE_DECODE_PIXELS / 1e6:
            chunks.append([])
            budget = 0.0
        chunks[-1].append(i)
        budget += p.megapixels
    for chunk in chunks:
        raw = [torch.frombuffer(bytearray(items[i].jpeg), dtype=torch.uint8) for i in chunk]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(chunk, decoded, strict=True):
            p = items[i]
            if img is None:
                try:
                    pil = decode.decode(p.jpeg, max_pixels=max_pixels, max_bytes=max_bytes, draft=draft)
                    out[i] = pre.pixels(pil).permute(2, 0, 1).to(device)
                except ImageError as e:
                    errors[i] = e
                continue
            out[i] = pre.geometry(orient(img, p.orientation))
    return out, errors
