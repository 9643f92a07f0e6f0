"""The image encoder: the one place the image tower runs.

Everything that turns pixels into embeddings goes through :class:`ImageEncoder`: the batch pipeline
(``tag``, ``embed``, ``retag --embed-missing``, ``eval``, ``directus sync``), the server's request
batcher (REST, gRPC, Filestack, the Directus flow) and the tests. It owns:

- the device and the precision (:mod:`localtag.core.precision`: ``fp32``, bit-for-bit open_clip; ``bf16`` /
  ``fp16``, a bf16-weight copy of the tower on CPU, autocast on CUDA; ``int8``, dynamic int8 on a copy
  of the visual tower, CPU; ``auto``, bf16 on CUDA where supported, else fp16, and on CPU fp32 unless
  another precision passes the agreement bar and was measured faster, once per model and CPU). The
  tower it runs is :func:`localtag.core.precision.prepare_image_tower`'s, the one ``auto`` times;
- channels_last and optional ``torch.compile`` (CUDA batch runs; one static shape, the last batch
  padded);
- host batches: uint8 pixels pinned and copied non-blocking, normalised on the device; on CUDA batch
  k+1 is launched before batch k is collected (:meth:`launch` / :meth:`collect`);
- JPEG decoding on the device (:mod:`localtag.core.device_decode`) and the automatic batch size
  (:mod:`localtag.core.autotune`).

Output: L2-normalised float32 embeddings on the CPU, in input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import autotune, device_decode
from .devices import pick_device
from .errors import ImageError
from .precision import choose, prepare_image_tower
from .preprocess import Prepared, Preprocess, short_side

log = logging.getLogger(__name__)

@dataclass
class InFlight:
    """A batch handed to the device: its embeddings arrive in ``out`` once ``event`` has happened."""

    out: Any = None  # np.ndarray (CPU) or a pinned tensor being filled (CUDA)
    errors: dict[int, ImageError] = field(default_factory=dict)
    event: Any = None
    n: int = 0


class ImageEncoder:
    """Images → L2-normalised float32 embeddings with one open_clip model's image tower."""

    def __init__(self, model: torch.nn.Module, transform: Any, *, image_size: int | Sequence[int],
                 device: torch.device | str = "cpu", precision: str = "auto", compile: bool = False,
                 batch_size: int = 32, max_pixels: int = 85_000_000, max_bytes: int = 20_000_000,
                 model_key: str = "", cache_dir: Any = None):
        """``model_key`` (the weights' sha256) and ``cache_dir`` key the measured choice of ``auto``."""
        self.device = pick_device(device)
        self.cuda = self.device.type == "cuda"
        #: the precision and why (``auto``: measured once per model and CPU, kept in ``cache_dir``)
        self.choice = choose(precision, self.device, model_key, cache_dir, model=model,
                             image_size=short_side(image_size))
        self.precision = self.choice.precision
        self.model = model
        self.channels_last = self.cuda
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pre = Preprocess(transform)
        self.image_size = short_side(image_size)
        self.asynchronous = self.cuda  # launch k+1 before collecting k
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self._batch_size = batch_size
        # the image tower: model.visual itself (fp32, exact; CUDA bf16/fp16 under autocast), or a copy
        # of it with bf16/fp16 (CPU) or int8 weights; the text path keeps the fp32 weights
        self._tower = prepare_image_tower(self.model, self.precision, self.device)
        self._eager = self._tower
        self.compiled = False
        if compile:
            try:
                self._tower = torch.compile(self._tower, dynamic=False)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - compile is an optimisation only
                log.warning("torch.compile unavailable (%s); running eagerly", e)

    def variant(self, fast: bool) -> dict[str, str]:
        """What besides the weights changes this encoder's embeddings: the preprocessing (``exact``;
        ``--fast``: ``draft``, or ``device`` decoding on CUDA), the precision actually used and the
        device kind (CUDA and CPU kernels round differently). The embedding cache keys on it."""
        pre = "exact" if not fast else "device" if self.cuda and self.pre.split else "draft"
        return {"preprocess": pre, "precision": self.precision, "device": self.device.type}

    @property
    def batch_size(self) -> int:
        """Images per model batch; a setting ≤ 0 is measured once (:func:`autotune.best_batch_size`)."""
        if self._batch_size <= 0:
            self._batch_size = autotune.best_batch_size(self.forward, self.device, self.image_size,
                                                        channels_last=self.channels_last)
        return self._batch_size

    # -- the image tower ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw float32 image features of a normalised batch on the device, under the encoder's precision."""
        try:
            return self._tower(x)
        except Exception as e:  # noqa: BLE001 - torch.compile fails lazily, at the first call
            if not self.compiled:
                raise
            log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, e)
            self._tower, self.compiled = self._eager, False
            return self._tower(x)

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised [N, 3, S, S] tensors (any device) → L2-normalised float32 embeddings on the CPU."""
        x = batch.to(self.device, non_blocking=True)
        n = x.shape[0]
        if self.compiled and n < self.batch_size:  # one static shape: pad instead of recompiling
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.normalize(self.forward(x)[:n].float(), dim=-1).cpu()

    def embed(self, images: Sequence) -> np.ndarray:
        """Decoded PIL images → [N, dim] float32 L2-normalised embeddings (the whole transform each)."""
        if not images:
            return np.zeros((0, int(self.model.visual.output_dim)), dtype=np.float32)
        return self.encode(torch.stack([self.pre.tensor(im) for im in images])).numpy()

    # -- batches from the pipeline -----------------------------------------------------------------
    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host batch on the device: pinned and copied non-blocking on CUDA."""
        if not self.cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def launch(self, items: list[Prepared], *, draft: int | None = None) -> InFlight:
        """Start encoding prepared items (uint8 pixels, float tensors or JPEG bytes, mixed)."""
        if not items:
            return InFlight(out=np.zeros((0, 0), dtype=np.float32))
        parts: list[tuple[list[int], torch.Tensor]] = []
        errors: dict[int, ImageError] = {}
        pix = [i for i, p in enumerate(items) if p.pixels is not None]
        if pix:  # [N, S, S, 3] uint8 (pinned, one copy) → NCHW view → normalised on the device
            host = torch.stack([items[i].pixels for i in pix])
            x = self.to_device(host).permute(0, 3, 1, 2)
            parts.append((pix, self.pre.normalize(x, channels_last=self.channels_last)))
        ten = [i for i, p in enumerate(items) if p.tensor is not None]
        if ten:
            parts.append((ten, self.to_device(torch.stack([items[i].tensor for i in ten]))))
        jpg = [i for i, p in enumerate(items) if p.jpeg is not None]
        if jpg:
            decoded, errs = device_decode.decode_jpegs([items[i] for i in jpg], self.device, self.pre,
                                                       max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                                       draft=draft)
            errors.update({jpg[j]: e for j, e in errs.items()})
            ok = [jpg[j] for j in range(len(jpg)) if j not in errs]
            if ok:
                stacked = torch.stack([d for d in decoded if d is not None])
                parts.append((ok, self.pre.normalize(stacked, channels_last=self.channels_last)))
        order = sorted(i for idx, _ in parts for i in idx)
        if not order:
            return InFlight(out=np.zeros((0, 0), dtype=np.float32), errors=errors)
        if len(parts) == 1:
            x = parts[0][1]
        else:  # mixed kinds: put the rows back in input order
            pos = {i: k for k, i in enumerate(order)}
            x = torch.empty((len(order), *parts[0][1].shape[1:]), dtype=torch.float32, device=parts[0][1].device)
            for idx, t in parts:
                x[torch.tensor([pos[i] for i in idx], device=x.device)] = t.to(x.device)
        if not self.cuda:
            return InFlight(out=self.encode(x.contiguous()).numpy(), errors=errors, n=len(order))
        return self._launch_cuda(x, errors)

    def _launch_cuda(self, x: torch.Tensor, errors: dict[int, ImageError]) -> InFlight:
        n = x.shape[0]
        bs = self.batch_size
        if self.compiled and n < bs:  # one static shape: pad the last batch instead of recompiling
            x = torch.cat([x, x[-1:].expand(bs - n, *x.shape[1:])])
        x = x.contiguous(memory_format=torch.channels_last)
        feats = torch.nn.functional.normalize(self.forward(x)[:n].float(), dim=-1)
        out = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(feats, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return InFlight(out=out, errors=errors, event=event, n=n)

    def collect(self, batch: InFlight) -> tuple[np.ndarray, dict[int, ImageError]]:
        """The embeddings [n, dim] and the per-item errors of a launched batch (waits on CUDA)."""
        if batch.event is not None:
            batch.event.synchronize()
            return batch.out.numpy(), batch.errors
        return batch.out, batch.errors
