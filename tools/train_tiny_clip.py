#!/usr/bin/env python
"""Train a tiny CLIP on CIFAR-10 with open_clip's own ``CLIP`` class, reproducibly, on CPU.

No pretrained CLIP weights can be downloaded here, so localtag's tests and benchmarks use this
small model, trained from scratch on the CIFAR-10 train split (50,000 32x32 JPEGs), as a real
CLIP with real signal. The run is seeded and single-process (about 10 minutes on 2 CPU cores):

    .venv/bin/python tools/train_tiny_clip.py [--out models/cifar10-tiny] [--data PATH]
                                              [--epochs N] [--seed S]

Data: the tarball (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) is read with ``tarfile``
and decoded once into uint8 arrays in memory, sorted by path (deterministic order).

Model: ``open_clip.CLIP`` with a ModifiedResNet image tower (``vision_cfg.layers`` a 4-tuple) and
a small causal text transformer over open_clip's default SimpleTokenizer (vocab 49408,
context 16), so ``open_clip.create_model_and_transforms('local-dir:DIR')`` rebuilds it.

Objective: each step encodes one caption per class (a random template per class) and takes the
cross-entropy of the image-vs-these-10-text logits (scaled by ``logit_scale``), i.e. CLIP's
contrastive loss against de-duplicated texts, averaged with the symmetric text-vs-image term
(each class caption against the batch's images, its positives being the images of that class).
Augmentation: random crop (zero pad 4) and horizontal flip. Inputs are normalised exactly as
open_clip's validation transform for the saved ``preprocess_cfg``.

Outputs in ``--out``: ``open_clip_model.safetensors`` (fp16), ``open_clip_config.json``
(open_clip's local-dir format), ``vocab.txt`` (localtag format), ``templates.txt`` and
``training.json``. The final evaluation reloads those files the way inference runs (open_clip's
``local-dir:`` loader and its PIL ``preprocess``) and classifies all 10,000 test JPEGs zero-shot
with template-averaged text embeddings.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shlex
import sys
import tarfile
import time
from copy import deepcopy
from pathlib import Path

# Idle OpenMP workers sleep instead of spinning: on a shared CPU a spinning 2-thread team is
# several times slower (and slows everyone else). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models" / "cifar10-tiny"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_DATASET_MEAN
STD = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_DATASET_STD
IMAGE_SIZE = 32

TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a pixelated photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a jpeg photo of a {}.",
    "an image of a {}.",
]

MODEL_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": [1, 1, 1, 1],  # a 4-tuple selects open_clip's ModifiedResNet
        "width": 16,
        "head_width": 32,  # attention-pool heads = width * 32 // head_width = 16
    },
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 4.0,
    },
}

PREPROCESS_CFG = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": list(MEAN),
    "std": list(STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def load_cifar10(path: Path):
    """Read the tarball once: uint8 arrays (N, 32, 32, 3), labels, class names, raw test JPEGs."""
    items: dict[str, list] = {"train": [], "test": []}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith(".jpg"):
                continue
            parts = Path(m.name).parts
            if len(parts) < 3 or parts[-3] not in items:
                continue
            split, cls = parts[-3], parts[-2]
            data = tar.extractfile(m).read()
            items[split].append((cls, parts[-1], data))
    classes = sorted({cls for cls, _, _ in items["train"]})
    if sorted({cls for cls, _, _ in items["test"]}) != classes:
        raise SystemExit("train and test class folders differ")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, rows in items.items():
        rows.sort(key=lambda r: (r[0], r[1]))  # deterministic order, independent of tar order
        arr = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i, (_, _, data) in enumerate(rows):
            with Image.open(io.BytesIO(data)) as im:
                a = np.asarray(im.convert("RGB"))
            if a.shape != arr.shape[1:]:
                raise SystemExit(f"unexpected image shape {a.shape} in {split}")
            arr[i] = a
        labels = np.array([index[r[0]] for r in rows], dtype=np.int64)
        out[split] = (arr, labels, [r[2] for r in rows])
    return out, classes


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float, exactly ToTensor() + Normalize(MEAN, STD)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def augment(padded: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded images plus random horizontal flip."""
    b = idx.numel()
    pad = (padded.shape[-1] - IMAGE_SIZE) // 2
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.empty((b, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for j in range(b):
        crop = padded[idx[j], :, oy[j]:oy[j] + IMAGE_SIZE, ox[j]:ox[j] + IMAGE_SIZE]
        out[j] = crop.flip(-1) if flip[j] else crop
    return out


@torch.no_grad()
def text_classifier(model, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (C, T, L) -> (D, C): normalise each template embedding, mean, renormalise."""
    c, t, length = tokens.shape
    emb = model.encode_text(tokens.view(c * t, length), normalize=True).view(c, t, -1).mean(1)
    return F.normalize(emb, dim=-1).T


@torch.no_grad()
def evaluate_arrays(model, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, bs: int = 1000):
    was_training = model.training
    model.eval()
    clf = text_classifier(model, tokens)
    correct = 0
    for i in range(0, len(images), bs):
        f = model.encode_image(normalize(images[i:i + bs]), normalize=True)
        correct += (f @ clf).argmax(1).eq(labels[i:i + bs]).sum().item()
    model.train(was_training)
    return correct / len(images)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def save_model(model, out: Path, classes: list[str], templates: list[str]) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    weights = out / "open_clip_model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    os.chmod(weights, 0o644)  # safetensors may create it owner-only
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n", encoding="utf-8")
    (out / "vocab.txt").write_text(
        "# CIFAR-10 classes (Krizhevsky 2009), the vocabulary of the cifar10-tiny CLIP trained by\n"
        "# tools/train_tiny_clip.py; one concept per line, the dataset's folder names.\n"
        + "".join(f"{c}\n" for c in classes), encoding="utf-8")
    (out / "templates.txt").write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
    return weights


@torch.no_grad()
def evaluate_reloaded(out: Path, classes: list[str], templates: list[str], test_jpegs, test_labels, t0: float):
    """Reload from disk the way inference does and classify the raw test JPEGs zero-shot."""
    model_id = f"local-dir:{out.resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(model_id)
    tokenizer = open_clip.get_tokenizer(model_id)
    model.eval()
    clf = build_zero_shot_classifier(model, tokenizer, classes, templates, num_classes_per_batch=None)
    labels = torch.as_tensor(test_labels)
    top1 = top5 = 0
    bs = 500
    for i in range(0, len(test_jpegs), bs):
        batch = []
        for data in test_jpegs[i:i + bs]:
            with Image.open(io.BytesIO(data)) as im:
                batch.append(preprocess(im))
        f = model.encode_image(torch.stack(batch), normalize=True)
        logits = model.logit_scale.exp() * f @ clf
        y = labels[i:i + bs]
        top = logits.topk(5, dim=1).indices
        top1 += top[:, 0].eq(y).sum().item()
        top5 += top.eq(y[:, None]).any(1).sum().item()
    n = len(test_jpegs)
    log(t0, f"reloaded {model_id}: preprocess = {preprocess}")
    return top1 / n, top5 / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default models/cifar10-tiny)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpeg.tar.gz")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N shuffled train images (quick tests)")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data, classes = load_cifar10(args.data)
    x_train, y_train, _ = data["train"]
    x_test, y_test, test_jpegs = data["test"]
    log(t0, f"decoded {len(x_train)} train + {len(x_test)} test images, classes {classes}")

    x_train = torch.from_numpy(x_train).permute(0, 3, 1, 2).contiguous()
    y_train = torch.from_numpy(y_train)
    x_test_t = torch.from_numpy(x_test).permute(0, 3, 1, 2).contiguous()
    y_test_t = torch.from_numpy(y_test)
    if args.train_limit:
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + 1))[:args.train_limit]
        x_train, y_train = x_train[keep], y_train[keep]
    padded = F.pad(x_train, (4, 4, 4, 4))  # zero padding in pixel space

    model = open_clip.CLIP(**deepcopy(MODEL_CFG))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.visual.parameters())
    log(t0, f"model: {n_params:,} params ({n_vis:,} image tower, {n_params - n_vis:,} text tower + scale)")

    # open_clip's default SimpleTokenizer (what get_tokenizer returns for this config)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    tokens = torch.stack([tokenizer([t.format(c) for t in TEMPLATES]) for c in classes])  # (C, T, L)
    eot = tokenizer.eot_token_id
    if not (tokens == eot).any(-1).all():
        raise SystemExit("a caption does not fit in the context length")

    steps_per_epoch = len(x_train) // args.batch_size  # drop the last partial batch
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos",
        div_factor=25.0, final_div_factor=1e3, cycle_momentum=False)
    max_log_scale = math.log(100.0)
    n_cls = len(classes)
    cls_range = torch.arange(n_cls)

    train_loss = float("nan")
    history = []
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum = correct = seen = 0
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            x = normalize(augment(padded, idx, gen))
            y = y_train[idx]
            t_idx = torch.randint(0, len(TEMPLATES), (n_cls,), generator=gen)
            img = model.encode_image(x, normalize=True)
            txt = model.encode_text(tokens[cls_range, t_idx], normalize=True)
            logits = model.logit_scale.exp() * img @ txt.T  # (B, C)
            loss_i = F.cross_entropy(logits, y)
            # text -> image: each class caption against the batch, positives = that class's images
            target = F.one_hot(y, n_cls).T.float()
            present = target.sum(1) > 0
            target = target[present] / target[present].sum(1, keepdim=True)
            loss_t = -(target * F.log_softmax(logits.T[present], dim=1)).sum(1).mean()
            loss = 0.5 * (loss_i + loss_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)
            loss_sum += loss.item() * len(idx)
            correct += logits.argmax(1).eq(y).sum().item()
            seen += len(idx)
        train_loss = loss_sum / seen
        test_acc = evaluate_arrays(model, x_test_t, y_test_t, tokens)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "train_acc": round(correct / seen, 4),
                        "test_top1": round(test_acc, 4)})
        log(t0, f"epoch {epoch:2d}/{args.epochs}  loss {train_loss:.4f}  train acc {correct / seen:.4f}  "
                f"test top-1 {test_acc:.4f}  logit_scale {model.logit_scale.exp().item():.1f}  "
                f"lr {sched.get_last_lr()[0]:.2e}")

    model.eval()
    weights = save_model(model, args.out, classes, TEMPLATES)
    size = weights.stat().st_size
    log(t0, f"saved {weights} ({size:,} bytes)")

    top1, top5 = evaluate_reloaded(args.out, classes, TEMPLATES, test_jpegs, y_test, t0)
    wall = time.time() - t0
    log(t0, f"CIFAR-10 test (reloaded, PIL preprocess, zero-shot over {len(TEMPLATES)} templates): "
            f"top-1 {top1:.4f}  top-5 {top5:.4f}")

    try:
        script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    except ValueError:
        script = str(Path(__file__).resolve())
    info = {
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay, "betas": [0.9, 0.98],
                      "schedule": "one-cycle cosine, 15% warm-up"},
        "loss": "symmetric CLIP cross-entropy, images vs one caption per class (random template)",
        "augmentation": "random crop (zero pad 4) + horizontal flip",
        "train_images": len(x_train),
        "architecture": {
            "class": "open_clip.CLIP",
            "image_tower": "ModifiedResNet layers [1,1,1,1], width 16, attention pool (16 heads), 32x32 input",
            "text_tower": "causal transformer, 2 layers, width 64, 2 heads, context 16, SimpleTokenizer (49408)",
            "embed_dim": MODEL_CFG["embed_dim"],
            "params": n_params,
            "image_tower_params": n_vis,
            "text_tower_params": n_params - n_vis,
        },
        "weights_file_bytes": size,
        "weights_dtype": "float16",
        "final_train_loss": round(train_loss, 4),
        "history": history,
        "cifar10_test": {"top1": round(top1, 4), "top5": round(top5, 4), "images": len(test_jpegs),
                         "method": "local-dir reload, open_clip preprocess on JPEGs, template-averaged "
                                   "zero-shot classifier"},
        "wall_time_s": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # the CPU may be shared
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "numpy": np.__version__},
        "command": " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]]),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log(t0, f"wrote {args.out / 'training.json'}; total wall time {wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
