"""Automatic batch size: 32 on CPU; on CUDA, measured once per encoder.

On CUDA the smallest power of two whose throughput is within 5 % of the best that fits in memory
(doubling stops at the first out-of-memory, or once a doubling gains less than 5 %).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

CPU_BATCH = 32


def best_batch_size(forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device, image_size: int, *,
                    limit: int = 1024, channels_last: bool = True) -> int:
    """The batch size for ``forward`` (the encoder's image tower under its precision) on ``device``."""
    if device.type != "cuda":
        return CPU_BATCH
    rates: dict[int, float] = {}
    memory: dict[int, float] = {}
    bs = 32
    while bs <= limit:
        try:
            x = torch.randn(bs, 3, image_size, image_size, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.inference_mode():
                forward(x)  # warm-up
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(3):
                    forward(x)
                torch.cuda.synchronize(device)
            rates[bs] = 3 * bs / (time.perf_counter() - t0)
            memory[bs] = torch.cuda.max_memory_allocated(device) / 2**30
            del x
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        if len(rates) >= 2 and rates[bs] < 1.05 * max(r for b, r in rates.items() if b < bs):
            break
        bs *= 2
    if not rates:
        return 8
    best = max(rates.values())
    chosen = min(b for b, r in rates.items() if r >= 0.95 * best)
    log.info("batch size %d chosen on %s (%s)", chosen, device,
             ", ".join(f"{b}: {r:.0f} img/s, {memory[b]:.1f} GiB" for b, r in sorted(rates.items())))
    return chosen
