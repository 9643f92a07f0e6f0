"""Learnt concepts (issue 20): few-shot curve, training time and predict cost, side by side.

Data: the first ``--per-class`` (default 200) CIFAR-10 *test* JPEGs of each class (the fixture model
``models/cifar10-tiny`` was trained on the train split), embedded once (fp32, CPU; kept in
``$LOCALTAG_BENCH_DIR/learn``). Per seed and class the images are shuffled: the first 100 are the pool
examples are drawn from, the rest (100 per class, 1,000 images) are held out.

Few-shot: for k = 1, 2, 4, 8, 16, 64 examples per concept, one head over 10 concepts (a concept's
examples are its k images positive and the other classes' 9·k images negative), in two settings:
``made-up``: concepts named by made-up words no prompt knows (no prior); ``prior``: the 10 CIFAR
class names, whose zero-shot text embedding is the prior. Reported: held-out mAP (mean AP over the
10 concepts, 1,000 images) and top-1 (the highest of the 10 values is the true class), mean over 5
seeds, against the zero-shot scorer on the same held-out images. Each cell is before → now: the
plain L2 pull on w (``shaped=False``) against the default (the within-class shaped pull for concepts
without a prior; docs/learn.md), trained on the same examples in the same run.

Issue 20's done-when on ``--draws`` random draws (default 50): 16 ships as the made-up ``vessel-x``,
32 other photos, AP on 200 held-out photos; draw 0 is tests/test_learn.py's own split.

Training time: 10 concepts × 64 positives (+ 576 negatives each), the fixture's 64-d embeddings and
512-d embeddings (the default model's width; CIFAR's 64-d embeddings zero-padded and re-normalised
would be degenerate, so 512-d Gaussian unit vectors with the same labels). Predict cost: the head's
values against the general scorer's (the fixture vocabulary, 10 concepts, and the shipped
3,604-concept vocabulary), per image, and against the image tower per image.

    .venv/bin/python bench/bench_learn.py
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time

import numpy as np
from _common import BENCH_DIR, CIFAR_TAR, REPO, machine

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MADE_UP = ["blorft", "quimzle", "drabnix", "feltrop", "zungash", "mirpek", "glontho", "spraveck", "trundix", "wombrel"]
KS = (1, 2, 4, 8, 16, 64)
POOL = 100


def embed_cifar(per_class: int):
    """Embeddings [10·per_class, 64] and class labels, cached as .npz."""
    from PIL import Image

    from localtag.core.config import Settings
    from localtag.core.loader import load

    out = BENCH_DIR / "learn" / f"cifar-test-{per_class}.npz"
    settings = Settings(model=str(REPO / "models" / "cifar10-tiny"), device="cpu", precision="fp32",
                        cache_dir=BENCH_DIR / "learn" / "cache")
    tagger, encoder = load(settings)
    if out.is_file():
        z = np.load(out)
        return tagger, encoder, z["emb"], z["y"]
    wanted = {c: [] for c in CLASSES}
    with tarfile.open(CIFAR_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith("test/")), key=lambda m: m.name)
        for m in members:
            cls = m.name.split("/")[1]
            if len(wanted[cls]) < per_class:
                wanted[cls].append(tar.extractfile(m).read())
    embs, ys = [], []
    for j, c in enumerate(CLASSES):
        imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in wanted[c]]
        embs.append(encoder.embed(imgs))
        ys += [j] * len(imgs)
    emb, y = np.concatenate(embs).astype(np.float32), np.array(ys)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, emb=emb, y=y)
    return tagger, encoder, emb, y


def split(y: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    pool, held = [], []
    for j in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(y == j))
        pool.append(idx[:POOL])
        held.append(idx[POOL:])
    return pool, np.concatenate(held)


def head_for(emb, y, pool, k, names, priors, model_sha, shaped=None):
    from localtag.core import learn

    rows = np.concatenate([p[:k] for p in pool])
    keys = [str(i) for i in rows]
    ann = [learn.Annotation(str(i), names[j], y[i] == j) for i in rows for j in range(len(names))]
    t = learn.targets(keys, emb[rows], ann)
    return learn.train(emb[rows], t, model_sha256=model_sha, priors=priors, min_positives=1, min_negatives=1,
                       shaped=shaped)


def vessel_draws(emb, y, draws: int, model_sha: str, shaped) -> np.ndarray:
    """Issue 20's done-when on ``draws`` draws: 16 ships = ``vessel-x``, 32 others (round-robin over the 9
    other classes) not; AP of ``vessel-x`` on 200 held-out photos (20 per class). Draw 0 is
    tests/test_learn.py's split (the first 40 test JPEGs of each class, sorted by name: the same files)."""
    from localtag.core import learn
    from localtag.core.evaluate import average_precision

    ship = CLASSES.index("ship")
    out = []
    for d in range(draws):
        rng = np.random.default_rng(1000 + d)
        order = {c: np.flatnonzero(y == c) if d == 0 else rng.permutation(np.flatnonzero(y == c)) for c in range(10)}
        neg = [order[c][i] for i in range(4) for c in range(10) if c != ship][:32]
        rows = np.r_[order[ship][:16], neg]
        held = np.concatenate([order[c][20:40] for c in range(10)])
        ann = [learn.Annotation(str(i), "vessel-x", i in set(order[ship][:16])) for i in rows]
        t = learn.targets([str(i) for i in rows], emb[rows], ann)
        head = learn.train(emb[rows], t, model_sha256=model_sha, shaped=shaped)
        out.append(average_precision(head.values(emb[held])[:, 0], y[held] == ship))
    return np.array(out)


def metrics(values: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from localtag.core.evaluate import mean_average_precision

    onehot = np.eye(len(CLASSES), dtype=bool)[y]
    return mean_average_precision(values, onehot), float((values.argmax(1) == y).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--draws", type=int, default=50, help="draws of issue 20's 16 ships / 32 others")
    ap.add_argument("--prior-shaped", action="store_true",
                    help="also the shaped pull around the zero-shot prior (not the default: why, in its column)")
    args = ap.parse_args()
    print(json.dumps(machine()), file=sys.stderr)
    from localtag.core import learn

    tagger, encoder, emb, y = embed_cifar(args.per_class)
    sha = tagger.info.sha256
    priors = {c: learn.prior_of(tagger.scorer, c) for c in CLASSES}
    cls_idx = [tagger.vocab.index(c) for c in CLASSES]
    # before: the plain L2 pull everywhere (shaped=False); now: the default (shaped where no prior)
    settings = (("made-up", MADE_UP, None, False), ("made-up", MADE_UP, None, None),
                ("prior", CLASSES, priors, False), ("prior", CLASSES, priors, None))
    if args.prior_shaped:
        settings += (("prior", CLASSES, priors, True),)
    rows = {("zero-shot", None, None): [], **{(s, k, sh): [] for s, _, _, sh in settings for k in KS}}
    for seed in range(args.seeds):
        pool, held = split(y, seed)
        rows[("zero-shot", None, None)].append(metrics(tagger.values(emb[held])[:, cls_idx], y[held]))
        for k in KS:
            for setting, names, pri, shaped in settings:
                head = head_for(emb, y, pool, k, names, pri, sha, shaped)
                rows[(setting, k, shaped)].append(metrics(head.values(emb[held]), y[held]))
    print(f"\nfew-shot, held-out {len(held)} CIFAR-10 test images, mean over {args.seeds} seeds (models/cifar10-tiny); "
          "before (L2 pull) → now")
    print(f"{'k/concept':>10} | {'made-up mAP':>13} {'top-1':>13} | {'prior mAP':>13} {'top-1':>13} | "
          f"{'zero-shot mAP':>13} {'top-1':>6}")
    zs = np.mean(rows[("zero-shot", None, None)], axis=0)
    for k in KS:
        cells = []
        for setting in ("made-up", "prior"):
            b, n = np.mean(rows[(setting, k, False)], axis=0), np.mean(rows[(setting, k, None)], axis=0)
            cells.append(f"{b[0]:.3f} → {n[0]:.3f} {b[1]:.3f} → {n[1]:.3f}")
        extra = ""
        if args.prior_shaped:
            p = np.mean(rows[("prior", k, True)], axis=0)
            extra = f" | prior, shaped pull: mAP {p[0]:.3f} top-1 {p[1]:.3f}"
        print(f"{k:>10} | {cells[0]} | {cells[1]} | {zs[0]:13.3f} {zs[1]:6.3f}{extra}")

    # -- issue 20's done-when on many draws --------------------------------------------------------
    if args.draws:
        before, now = (vessel_draws(emb, y, args.draws, sha, shaped) for shaped in (False, None))
        print(f"\nvessel-x (16 ships / 32 others → 200 held out), {args.draws} draws (draw 0: tests/test_learn.py's), "
              "held-out AP, before (L2 pull) → now:")
        for label, f in (("draw 0 (the test's)", lambda v: v[0]), ("mean", np.mean), ("median", np.median),
                         ("min", np.min), ("share >= 0.85", lambda v: np.mean(v >= 0.85))):
            print(f"  {label:<20} {f(before):.3f} → {f(now):.3f}")
        print(f"  now better on {int((now > before).sum())} of {args.draws} draws, worse on {int((now < before).sum())}")

    # -- training time: 10 concepts × 64 examples --------------------------------------------------
    pool, held = split(y, 0)
    timings = {}
    for label, names, pri in (("64-d, made-up (no prior)", MADE_UP, None), ("64-d, prior", CLASSES, priors)):
        best = min(_timed(lambda n=names, p=pri: head_for(emb, y, pool, 64, n, p, sha)) for _ in range(3))
        timings[label] = best
    timings["64-d, made-up, L2 pull (before)"] = min(_timed(lambda: head_for(emb, y, pool, 64, MADE_UP, None, sha, False))
                                                     for _ in range(3))
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((len(emb), 512)).astype(np.float32)
    wide += 0.5 * np.eye(len(CLASSES), 512, dtype=np.float32)[y] * np.sqrt(512) / 8  # some class signal
    wide /= np.linalg.norm(wide, axis=1, keepdims=True)
    timings["512-d, made-up (no prior)"] = min(_timed(lambda: head_for(wide, y, pool, 64, MADE_UP, None, sha))
                                              for _ in range(2))
    timings["512-d, made-up, L2 pull (before)"] = min(_timed(lambda: head_for(wide, y, pool, 64, MADE_UP, None, sha, False))
                                                      for _ in range(2))
    print("\ntraining time, 10 concepts × 64 positives (640 images, each concept 64 positive / 576 negative), "
          "best of 3 (512-d: of 2), CPU s:")
    for label, s in timings.items():
        print(f"  {label:<34} {s:7.3f} s")

    # -- predict cost ----------------------------------------------------------------------------------
    head = head_for(emb, y, pool, 64, CLASSES, priors, sha)
    X = emb[held]
    from localtag.core.config import Settings, shipped
    from localtag.core.loader import load

    general = load(Settings(model=str(REPO / "models" / "cifar10-tiny"), device="cpu", precision="fp32",
                            vocab=shipped("vocab.txt"), cache_dir=BENCH_DIR / "learn" / "cache")).tagger
    general.values(X[:1])  # encode the 3,604 concepts' prompts once (cached)
    n = len(X)
    t_head = _best(lambda: head.values(X)) / n
    t_fix = _best(lambda: tagger.values(X)) / n
    t_gen = _best(lambda: general.values(X)) / n
    from PIL import Image

    imgs = [Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))] * 64
    t_img = _best(lambda: encoder.embed(imgs), 3) / len(imgs)
    print(f"\npredict cost per image ({n} embeddings per call, best of 5):")
    print(f"  {'learnt head (10 concepts)':<42} {t_head * 1e6:8.2f} µs")
    print(f"  {'general scorer, fixture vocab (10)':<42} {t_fix * 1e6:8.2f} µs   head/this = {t_head / t_fix:.2f}")
    print(f"  {'general scorer, shipped vocab (3,604)':<42} {t_gen * 1e6:8.2f} µs   head/this = {t_head / t_gen:.3f}")
    print(f"  {'image tower (fixture, 32 px, batch 64)':<42} {t_img * 1e6:8.2f} µs   head/this = {t_head / t_img:.4f}")
    return 0


def _timed(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def _best(fn, repeat: int = 5) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


if __name__ == "__main__":
    sys.exit(main())
