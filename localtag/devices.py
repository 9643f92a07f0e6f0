"""Devices and precisions (a leaf module): which device, and which autocast on it."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA without it is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → a concrete precision for ``device``; anything else is checked and returned.

    ``auto`` is bf16 on CUDA where supported (else fp16) and fp32 on CPU: bf16 without native CPU
    support ran 6–7× slower than fp32 here (bench/RESULTS.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a concrete precision (a no-op for fp32)."""
    if precision in _DTYPES:
        return torch.autocast(device.type, dtype=_DTYPES[precision])
    return contextlib.nullcontext()
