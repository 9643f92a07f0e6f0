"""Numeric precision of the image tower: ``fp32``, ``bf16``, ``fp16``, ``int8``, or ``auto``.

A leaf module: it knows nothing of the pipeline. The image encoder calls it twice, and the tower it
gets is the one ``auto`` times (one wrapper, :class:`ImageTower`, for both)::

    choice = precision.choose(settings.precision, device, info.sha256, settings.cache_dir, model=model)
    tower = precision.prepare_image_tower(model, choice.precision, device)
    with torch.inference_mode():
        feats = tower(batch)          # un-normalised float32 features, like model.encode_image

What each choice is:

- ``fp32``: ``model.visual`` itself: bit-for-bit open_clip's ``encode_image``.
- ``bf16`` / ``fp16`` on a CPU: a **copy of the tower with bf16 (fp16) weights**, fed a bf16 (fp16)
  input. On a CPU with AMX this is 3.9–4.3× fp32 for a ViT-B-32; autocast, which casts the fp32
  weights on every call, was 0.34–0.39× there (issue 15). On CUDA: ``model.visual`` under
  ``torch.autocast`` of that dtype (what the CUDA path always ran; the weights stay fp32).
- ``int8``: dynamic int8 (``torch.ao.quantization.quantize_dynamic``) of the ``nn.Linear`` layers of a
  **copy** of ``model.visual``: weights int8 per tensor, activations quantised per batch. Quantising
  the whole model would break open_clip's text path (``get_cast_dtype()`` reads ``c_fc.weight.dtype``).
  CPU only. In a ViT this covers the MLP layers (about two thirds of the FLOPs); in a conv tower
  (ModifiedResNet) nothing, see :func:`quantised_fraction`.

``auto`` (see :func:`choose`):

- CUDA: ``bf16`` where the device supports it, else ``fp16`` (what the CUDA path always did).
- CPU: the fastest **candidate** measured at least :data:`MIN_GAIN` × fp32 on this CPU for this model,
  else ``fp32``. A candidate is a precision whose agreement with fp32 passes :data:`BARS` for the
  tower's family (:data:`AGREEMENT`, policy measured by ``bench/bench_precision.py --agreement`` and
  checked by ``tests/test_precision.py``) and, for bf16, a CPU with native bf16 (``amx_bf16`` or
  ``avx512_bf16``; without it bf16 ran 0.10–0.15× fp32). int8 misses the bar, so on a CPU without
  native bf16, such as the AMD EPYC of development, ``auto`` is ``fp32`` without measuring anything.
- Speed is measured once per model sha256 and CPU identity (model name, flags, threads, torch
  version) and kept in ``cache_dir/precision/<key>.json`` with the choice and the agreement it rests
  on; every later start reads it, so an automatic choice never changes between restarts of one host
  (``/readyz`` reports it). Without a model to measure, ``auto`` is ``fp32``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: a CPU candidate must be at least this much faster than fp32 for ``auto`` to leave fp32 (parity).
MIN_GAIN = 1.10
#: what a precision must keep of fp32's answers before ``auto`` may pick it (issue 15): on the trained
#: fixture's CIFAR-10 test set, top-5 agreement with fp32 and top-1 accuracy within 0.5 points; on a
#: random-init ViT over the 128 COCO photos, the mean-centred cosine to fp32 (its minimum over the
#: photos: random ViT embeddings share a common direction, which makes plain cosine lenient).
BARS = {"fixture_top5_agreement": 0.99, "fixture_top1_drop_points": 0.5, "random_vit_centred_cos_min": 0.999}
#: agreement with fp32 per precision, the policy ``auto`` follows. Measured by ``bench/bench_precision.py
#: --agreement --cifar 0`` on the 2-core AMD EPYC (2026-12-07, bench/RESULTS.md): bf16 weights on the
#: fixture over all 10,000 CIFAR-10 test photos (top-1 0.7434 fp32, 0.7429 bf16) and on a random-init
#: ViT-B-32-256 over the 128 COCO photos (centred cosine mean 0.9998; issue 15 measured 0.99936 and
#: 99.5 % on a Xeon with AMX). ``None``: not measurable (int8 quantises none of the conv fixture).
AGREEMENT: dict[str, dict[str, float | None]] = {
    "bf16": {"fixture_top5_agreement": 0.9961, "fixture_top1_drop_points": 0.05, "random_vit_centred_cos_min": 0.99931},
    "int8": {"fixture_top5_agreement": None, "fixture_top1_drop_points": None,
             "random_vit_centred_cos_min": 0.99739, "random_vit_top5_agreement": 0.9734},
}
_CACHE_VERSION = "precision-v2"  # v1 timed bf16 under autocast, a path that no longer runs
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def passes_bar(precision: str) -> bool:
    """Whether ``precision``'s recorded agreement with fp32 meets every bar (fp32 trivially does)."""
    if precision == "fp32":
        return True
    got = AGREEMENT.get(precision)
    if got is None:
        return False
    return all(got.get(k) is not None and (got[k] <= bar if k.endswith("_points") else got[k] >= bar)
               for k, bar in BARS.items())


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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def cpu_identity() -> str:
    """What a cached CPU measurement depends on: CPU model and flags, threads, torch version."""
    flags = " ".join(sorted(cpu_flags()))
    return (f"{cpu_name()}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}")


def native_bf16() -> bool:
    return bool(cpu_flags() & set(_BF16_FLAGS))


def _check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


@dataclass
class Choice:
    """A resolved precision and why: what ``/readyz`` and the stored measurement report."""

    precision: str
    requested: str
    reason: str
    speed_vs_fp32: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    measured_at: float | None = None
    stored: str | None = None  # the file the measurement is kept in

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def candidates(device: torch.device) -> list[str]:
    """The precisions ``auto`` may time against fp32 on this CPU (see the module docstring)."""
    out = []
    for p in ("int8", "bf16"):
        if p == "bf16" and not native_bf16():
            continue
        if passes_bar(p):
            out.append(p)
    return out


def resolve(precision: str, device: torch.device, model_key: str, cache_dir: Path | str | None = None, *,
            model: torch.nn.Module | None = None, image_size: int | None = None) -> str:
    """``auto`` → a concrete precision for ``device`` (:func:`choose` without the reasons)."""
    return choose(precision, device, model_key, cache_dir, model=model, image_size=image_size).precision


def choose(precision: str, device: torch.device, model_key: str, cache_dir: Path | str | None = None, *,
           model: torch.nn.Module | None = None, image_size: int | None = None) -> Choice:
    """``auto`` → a concrete precision for ``device``, with the reason (others are checked and kept).

    ``model_key`` identifies the weights (the manifest's sha256). ``model`` (an open_clip model, or its
    ``visual`` tower) lets ``auto`` measure on a CPU; ``image_size`` defaults to the tower's own.
    """
    _check(precision)
    device = torch.device(device)
    if precision != "auto":
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision 'int8' is a CPU path; use bf16 or fp16 on " + device.type)
        return Choice(precision, precision, "asked for")
    if device.type == "cuda":
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Choice(p, "auto", "CUDA: bf16 where supported, else fp16")
    if device.type != "cpu":
        return Choice("fp32", "auto", f"{device.type}: fp32")
    cands = candidates(device)
    policy = {p: AGREEMENT.get(p) for p in cands}
    if not cands:
        why = "no precision passes the agreement bar" + ("" if native_bf16() else " on a CPU without native bf16")
        return Choice("fp32", "auto", why, agreement={"bars": BARS})
    if model is None:
        return Choice("fp32", "auto", "no model to measure")
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{_CACHE_VERSION}|{model_key}|{cpu_identity()}".encode()).hexdigest()
        path = Path(cache_dir) / "precision" / f"{key}.json"
        try:
            kept = json.loads(path.read_text())
            if kept.get("precision") in PRECISIONS[1:]:
                kept["stored"] = str(path)
                return Choice(**{k: kept[k] for k in Choice.__dataclass_fields__ if k in kept})
        except (OSError, ValueError, TypeError):
            pass
    visual = getattr(model, "visual", model)
    size = image_size or _image_size(visual)
    speed = measure(visual, ["fp32", *cands], size)
    best = max(cands, key=lambda p: speed[p])
    chosen = best if speed[best] >= MIN_GAIN else "fp32"
    why = (f"measured fastest on this CPU ({speed[best]:.2f}× fp32)" if chosen != "fp32"
           else f"no candidate measured ≥ {MIN_GAIN}× fp32 on this CPU")
    choice = Choice(chosen, "auto", why, speed_vs_fp32=speed, agreement={"bars": BARS, **policy},
                    measured_at=time.time())
    log.info("precision auto on this CPU: %s (× fp32: %s)", chosen,
             ", ".join(f"{p} {v:.2f}" for p, v in speed.items()))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**choice.to_json(), "stored": None, "model": model_key,
                                       "cpu": cpu_identity()}) + "\n")
            os.replace(tmp, path)
            choice.stored = str(path)
        except OSError as e:
            log.warning("cannot keep the precision choice in %s: %s", path, e)
    return choice


def _image_size(visual: torch.nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, tuple | list) else size)


def measure(visual: torch.nn.Module, precisions: list[str], image_size: int, *, batch: int = 8,
            rounds: int = 3) -> dict[str, float]:
    """Speed of each precision relative to ``fp32`` on this CPU: medians of interleaved rounds of the
    very towers the encoder runs (:func:`prepare_image_tower`)."""
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


class ImageTower(torch.nn.Module):
    """A prepared image tower: ``tower(batch)`` → float32 features (not normalised).

    ``dtype``: the input is cast to it (a tower with bf16/fp16 weights); ``autocast``: the forward pass
    runs under ``torch.autocast`` of that dtype on ``device_type`` (CUDA bf16/fp16).
    """

    def __init__(self, precision: str, module: torch.nn.Module, *, dtype: torch.dtype | None = None,
                 autocast: torch.dtype | None = None, device_type: str = "cpu"):
        super().__init__()
        self.precision, self.module, self.dtype = precision, module, dtype
        self._autocast, self._device_type = autocast, device_type

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            batch = batch.to(self.dtype)
        if self._autocast is None:
            return self.module(batch).float()
        with torch.autocast(self._device_type, dtype=self._autocast):
            return self.module(batch).float()


def prepare_image_tower(model: torch.nn.Module, precision: str, device: torch.device) -> ImageTower:
    """The image tower of ``model`` (an open_clip model or its ``visual``) for a concrete precision.

    ``model`` must already be on ``device``. It is never modified: bf16/fp16 (CPU) and int8 work on a copy.
    """
    if _check(precision) == "auto":
        raise ValueError("resolve() 'auto' to a concrete precision first")
    device = torch.device(device)
    visual = getattr(model, "visual", model)
    if precision == "fp32":
        return ImageTower("fp32", visual)
    if precision in _DTYPES:
        dtype = _DTYPES[precision]
        if device.type == "cuda":
            return ImageTower(precision, visual, autocast=dtype, device_type="cuda")
        return ImageTower(precision, copy.deepcopy(visual).to(dtype).eval(), dtype=dtype)
    if device.type != "cpu":
        raise ValueError("precision 'int8' is a CPU path; use bf16 or fp16 on " + device.type)
    return ImageTower("int8", quantize_int8(visual))


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
