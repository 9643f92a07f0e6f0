"""Numeric precision of the image tower: ``fp32``, ``bf16``, ``fp16``, ``int8``, or ``auto``.

A leaf module: it knows nothing of the pipeline. The image encoder calls it twice::

    choice = precision.resolve(settings.precision, device, info.sha256, settings.cache_dir, model=model)
    tower = precision.prepare_image_tower(model, choice, device)
    with torch.inference_mode():
        feats = tower(batch)          # un-normalised float32 features, like model.encode_image

What each choice is:

- ``fp32``: ``model.visual`` itself, no autocast: bit-for-bit open_clip's ``encode_image``.
- ``bf16`` / ``fp16``: ``model.visual`` under ``torch.autocast`` of that dtype (weights stay fp32).
- ``int8``: dynamic int8 (``torch.ao.quantization.quantize_dynamic``) of the ``nn.Linear`` layers of a
  **copy** of ``model.visual``: weights int8 per tensor, activations quantised per batch. Only the
  visual tower is copied; quantising the whole model would break open_clip's text path
  (``get_cast_dtype()`` reads ``c_fc.weight.dtype``). CPU only. In a ViT this covers the MLP layers
  (about two thirds of the FLOPs; the attention's ``in_proj`` is a bare parameter and ``out_proj`` a
  ``NonDynamicallyQuantizableLinear``, both left in fp32); in a conv tower (ModifiedResNet) nothing: its
  attention pool reads the projections' weights directly, so they stay fp32. :func:`quantised_fraction` says how much.

``auto`` (see :func:`resolve`):

- CUDA: ``bf16`` where the device supports it, else ``fp16`` (what the CUDA path always did).
- CPU: ``fp32`` unless a candidate was **measured** faster on this CPU, for this model, by at least
  :data:`MIN_GAIN`. Candidates: ``bf16`` only on CPUs with native bf16 (``amx_bf16`` or
  ``avx512_bf16`` flags; without them bf16 measured 0.10–0.15× fp32), and ``int8`` only when
  :data:`AUTO_INT8` allows it, which it does not (top-5 agreement 97.3 % < 99 %, see there). On a CPU
  without native bf16, such as the 2-core AMD EPYC of development, ``auto`` is therefore ``fp32``
  without measuring anything. The measurement (a few interleaved forward passes, a few
  seconds) runs once; its result is cached in ``cache_dir/precision/`` per model sha256, CPU identity
  (model name, flags, thread count) and torch version. Without a model to measure, ``auto`` is ``fp32``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import autocast

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: a CPU candidate must be at least this much faster than fp32 for ``auto`` to leave fp32 (parity).
MIN_GAIN = 1.10
#: whether ``auto`` may pick int8 on a CPU. The bar (issue 11) is top-5 agreement ≥ 99 % against fp32.
#: Measured (bench/bench_precision.py, bench/RESULTS.md): random-init ViT-B-32-256 over the 128 COCO
#: photos and the 80 COCO names, 97.3 % (centred cosine min 0.9974); the trained fixture cannot tell
#: (a ModifiedResNet: int8 quantises 0 % of it). Below the bar, so int8 is opt-in (``--precision int8``).
AUTO_INT8 = False
_CACHE_VERSION = "precision-v1"
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_identity() -> str:
    """What a cached CPU measurement depends on: CPU model and flags, threads, torch version."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    flags = " ".join(sorted(cpu_flags()))
    return f"{name}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def native_bf16() -> bool:
    return bool(cpu_flags() & set(_BF16_FLAGS))


def _check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def resolve(
    precision: str,
    device: torch.device,
    model_key: str,
    cache_dir: Path | str | None = None,
    *,
    model: torch.nn.Module | None = None,
    image_size: int | None = None,
) -> str:
    """``auto`` → a concrete precision for ``device`` (others are checked and returned as they are).

    ``model_key`` identifies the weights (the manifest's sha256). ``model`` (an open_clip model, or its
    ``visual`` tower) lets ``auto`` measure on a CPU; ``image_size`` defaults to the tower's own.
    """
    _check(precision)
    device = torch.device(device)
    if precision != "auto":
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision 'int8' is a CPU path; use bf16 or fp16 on " + device.type)
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu":
        return "fp32"
    candidates = [p for p, ok in (("int8", AUTO_INT8), ("bf16", native_bf16())) if ok]
    if not candidates or model is None:
        return "fp32"
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{_CACHE_VERSION}|{model_key}|{cpu_identity()}".encode()).hexdigest()
        path = Path(cache_dir) / "precision" / f"{key}.json"
        try:
            cached = json.loads(path.read_text())
            if cached.get("choice") in PRECISIONS[1:]:
                return cached["choice"]
        except (OSError, ValueError):
            pass
    visual = getattr(model, "visual", model)
    size = image_size or _image_size(visual)
    speed = measure(visual, ["fp32", *candidates], size)
    best = max(candidates, key=lambda p: speed[p])
    choice = best if speed[best] >= MIN_GAIN else "fp32"
    log.info("precision auto on this CPU: %s (× fp32: %s)", choice,
             ", ".join(f"{p} {v:.2f}" for p, v in speed.items()))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"choice": choice, "speed_vs_fp32": speed, "model": model_key,
                                       "cpu": cpu_identity(), "measured_at": time.time()}) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot cache the precision choice in %s: %s", path, e)
    return choice


def _image_size(visual: torch.nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def measure(visual: torch.nn.Module, precisions: list[str], image_size: int, *, batch: int = 8,
            rounds: int = 3) -> dict[str, float]:
    """Speed of each precision relative to ``fp32`` on this CPU: medians of interleaved rounds."""
    x = torch.randn(batch, 3, image_size, image_size)
    towers = {p: prepare_image_tower(visual, p, torch.device("cpu")) for p in dict.fromkeys(["fp32", *precisions])}
    times: dict[str, list[float]] = {p: [] for p in towers}
    with torch.inference_mode():
        for t in towers.values():  # warm-up
            t(x[:2])
        for _ in range(rounds):
            for p, t in towers.items():
                start = time.perf_counter()
                t(x)
                times[p].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    return {p: round(base / statistics.median(v), 3) for p, v in times.items()}


@dataclass
class ImageTower:
    """A prepared image tower: ``tower(batch)`` → float32 features (not normalised)."""

    precision: str
    module: torch.nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.module(batch).float()


def prepare_image_tower(model: torch.nn.Module, precision: str, device: torch.device) -> ImageTower:
    """The image tower of ``model`` (an open_clip model or its ``visual``) for a concrete precision.

    ``model`` must already be on ``device``. It is never modified: int8 quantises a copy.
    """
    if _check(precision) == "auto":
        raise ValueError("resolve() 'auto' to a concrete precision first")
    device = torch.device(device)
    visual = getattr(model, "visual", model)
    if precision == "fp32":
        return ImageTower("fp32", visual, contextlib.nullcontext)
    if precision in ("bf16", "fp16"):
        return ImageTower(precision, visual, lambda: autocast(device, precision))
    if device.type != "cpu":
        raise ValueError("precision 'int8' is a CPU path; use bf16 or fp16 on " + device.type)
    return ImageTower("int8", quantize_int8(visual), contextlib.nullcontext)


def quantize_int8(visual: torch.nn.Module, image_size: int | None = None) -> torch.nn.Module:
    """Dynamic int8 on the ``nn.Linear`` layers of a copy of ``visual`` (CPU, eval mode).

    Only layers the forward pass calls as modules are quantised: some towers read a Linear's
    ``weight`` directly (ModifiedResNet's attention pool), which a quantised layer no longer has.
    """
    from torch.ao.quantization import quantize_dynamic

    tower = copy.deepcopy(visual).cpu().eval()
    names = called_linears(tower, image_size)
    if not names:
        return tower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return quantize_dynamic(tower, set(names), dtype=torch.qint8)


def called_linears(visual: torch.nn.Module, image_size: int | None = None) -> list[str]:
    """Names of the exact ``nn.Linear`` modules that one forward pass of ``visual`` calls."""
    size = image_size or _image_size(visual)
    called: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: called.append(name))
             for name, m in visual.named_modules() if type(m) is torch.nn.Linear]
    try:
        with torch.inference_mode():
            visual(torch.zeros(1, 3, size, size, device=next(visual.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(called))


def quantised_fraction(visual: torch.nn.Module, image_size: int | None = None) -> dict[str, float]:
    """Share of the tower's weights and of its multiply-accumulates that :func:`quantize_int8` quantises.

    Counted with forward hooks on one image: Linear and Conv2d MACs, plus the projections and the two
    attention products of ``nn.MultiheadAttention`` (never quantised). Attention done by functional
    calls outside a module (ModifiedResNet's attention pool) is not counted.
    """
    size = image_size or _image_size(visual)
    macs = {"quantised": 0, "other": 0}
    hooks = []

    def linear_hook(mod, inp, out):
        macs["quantised" if type(mod) is torch.nn.Linear else "other"] += out.numel() * mod.in_features

    def conv_hook(mod, inp, out):
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        macs["other"] += out.numel() * k

    def mha_hook(mod, inp, out):  # in_proj + out_proj + the two attention products, all fp32
        q, e = inp[0], mod.embed_dim
        tokens = q.numel() // e
        length = q.shape[1] if mod.batch_first else q.shape[0]
        macs["other"] += tokens * 4 * e * e + 2 * tokens * length * e

    for m in visual.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(mha_hook))
    try:
        with torch.inference_mode():
            visual(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    total_params = sum(p.numel() for p in visual.parameters())
    called = set(called_linears(visual, size))
    q_params = sum(m.weight.numel() for n, m in visual.named_modules() if n in called)
    total_macs = macs["quantised"] + macs["other"]
    return {"params": round(q_params / total_params, 4),
            "macs": round(macs["quantised"] / total_macs, 4) if total_macs else 0.0}
