"""Preprocessing: a decoded image → what the image encoder takes, and the item the pipeline carries.

:class:`Preprocess` splits the model's open_clip transform at ``ToTensor``: the geometry (resize,
crop) runs per image in the decode workers and keeps uint8 pixels; :meth:`Preprocess.normalize`
(ToTensor + Normalize, the same float32 operations in the same order, so bit-identical) runs once per
batch, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ImageError


def short_side(size: int | list | tuple) -> int:
    """The short side of an open_clip image size (an int, or [H, W])."""
    return int(min(size)) if isinstance(size, list | tuple) else int(size)


@dataclass
class Prepared:
    """One job after fetch + decode: exactly one of the payload fields is set, or ``error``."""

    digest: str | None = None  # sha256 of the content (when an embedding cache is in use)
    tensor: torch.Tensor | None = None  # [3, S, S] float32, normalised (an unsplit transform)
    pixels: torch.Tensor | None = None  # [S, S, 3] uint8, resized and cropped
    jpeg: bytes | None = None  # undecoded JPEG, for decoding on the device
    orientation: int = 1  # EXIF orientation of ``jpeg``
    megapixels: float = 0.0  # size of ``jpeg`` once decoded
    embedding: np.ndarray | None = None  # a cache hit: nothing left to do
    error: ImageError | None = None
    seen: tuple[str, int, int, str] | None = None  # (path, size, mtime_ns, digest) of a file just read

    @property
    def needs_model(self) -> bool:
        return self.error is None and self.embedding is None


class Preprocess:
    """The model's open_clip transform, split at ``ToTensor``.

    ``geometry`` is open_clip's own resize / crop / mode steps (PIL images, or CHW uint8 tensors on
    any device); :meth:`normalize` applied to :meth:`pixels` equals ``transform(img)`` bit for bit. A
    transform that does not end in ToTensor + Normalize is not split (``split`` False) and is applied
    whole, per image (:meth:`tensor`).
    """

    def __init__(self, transform: Callable):
        from torchvision.transforms import Compose, Normalize, ToTensor

        self.transform = transform
        steps = list(transform.transforms) if isinstance(transform, Compose) else []
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        self.split = cut is not None and cut == len(steps) - 2 and isinstance(steps[-1], Normalize)
        if self.split:
            self.geometry = Compose(steps[:cut])
            self.mean = torch.tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

    def tensor(self, img) -> torch.Tensor:
        """A decoded PIL image → normalised float32 [3, S, S] (the whole transform)."""
        return self.transform(img)

    def pixels(self, img) -> torch.Tensor:
        """A decoded PIL image → resized, cropped [S, S, 3] uint8 (what ToTensor would read)."""
        out = self.geometry(img)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return torch.from_numpy(np.array(out, dtype=np.uint8))

    def normalize(self, batch: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 [N, 3, S, S] (any memory layout, any device) → normalised float32 [N, 3, S, S]."""
        if self.mean.device != batch.device:
            self.mean, self.std = self.mean.to(batch.device), self.std.to(batch.device)
        x = batch.to(torch.float32).div_(255)
        x = x.sub_(self.mean).div_(self.std)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)
