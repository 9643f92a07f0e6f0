"""Re-tag 10,000 cached images with a new 3,000-concept vocabulary (target: < 5 s on CPU).

Setup (not timed): the 10,000 CIFAR-10 test JPEGs (real, distinct files) extracted to a folder; the
default model's architecture ViT-B-32-256 (random init, 512-d embeddings); a 3,000-concept vocabulary
of common English words (whole-word tokens of open_clip's BPE vocabulary). The embedding cache is
filled under the files' real content hashes with random unit vectors, and the file index with their
real size and mtime: computing 10,000 real ViT-B-32-256 embeddings takes most of an hour on this
2-core CPU, and a re-tag costs the same whatever the values are.

Timed, in process, with the text embeddings of the new vocabulary cached (``cache_dir/text``):
load the tagger (model build), load the text embeddings, look the 10,000 files up (stat + SQLite),
score + pick 20 tags each, and write Clarifai JSONL (to /dev/null), i.e. ``localtag retag``'s
``cmd_retag``. Then the same as a separate ``localtag retag`` process (adds Python + torch imports).

Without the text cache: the text tower must encode 3,000 concepts × 5 templates = 15,000 prompts
(+ 5 neutral). That is measured on ``--text-sample`` concepts and scaled linearly (the cost is linear
in the number of prompts), because the full build takes over half an hour of this shared CPU.

    .venv/bin/python bench/bench_retag.py --images 10000 --concepts 3000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import _common as C


def cifar_folder(n: int):
    out = C.BENCH_DIR / "cifar10k"
    files = sorted(out.rglob("*.jpg"))
    if len(files) < n:
        with tarfile.open(C.CIFAR_TAR) as tar:
            for m in tar:
                if m.isfile() and m.name.startswith("test/"):
                    dst = out / m.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(tar.extractfile(m).read())
        files = sorted(out.rglob("*.jpg"))
    return out, files[:n]


def word_vocab(n: int):
    import open_clip

    path = C.BENCH_DIR / f"vocab{n}.txt"
    if not path.is_file():
        tok = open_clip.SimpleTokenizer()
        words, seen = [], set()
        for t in tok.encoder:
            w = t[:-4] if t.endswith("</w>") else ""
            if len(w) >= 4 and w.isalpha() and w.isascii() and w not in seen:
                seen.add(w)
                words.append(w)
        path.write_text("".join(w + "\n" for w in words[:n]))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--concepts", type=int, default=3000)
    ap.add_argument("--text-sample", type=int, default=100, help="0: skip the uncached text measurement")
    args = ap.parse_args()
    print(json.dumps(C.machine()), flush=True)

    import numpy as np
    import torch

    from localtag.core.cache import EmbeddingCache, cached_results
    from localtag.core.config import Settings
    from localtag.core.loader import load
    from localtag.core.scorer import Picking
    from localtag.core.sources import walk
    from localtag.core.writers import write_tags

    arch = C.DEFAULT_ARCH
    root = C.random_store(arch)
    folder, files = cifar_folder(args.images)
    vocab = word_vocab(args.concepts)
    cache_dir = C.BENCH_DIR / "retag-cache"
    settings = Settings(models_dir=root, model=f"{arch}-random", vocab=vocab, cache_dir=cache_dir, device="cpu")

    # -- setup: the embedding cache and the text cache ------------------------------------------------
    tagger = load(settings).tagger
    cache = EmbeddingCache(cache_dir, tagger.model_sha256)
    if len(cache) < len(files):
        rng = np.random.default_rng(0)
        emb = rng.standard_normal((len(files), 512)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        cache.put_many(list(zip(digests, emb, strict=True)))
        cache.remember_files([(os.path.abspath(f), f.stat().st_size, f.stat().st_mtime_ns, d)
                              for f, d in zip(files, digests, strict=True)])
    text_file = cache_dir / "text" / f"{tagger.text_key()}.npz"
    if not text_file.is_file():  # seed the text cache through the tagger's own save path
        dim = 512
        rng = np.random.default_rng(1)
        t = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((len(tagger.vocab), dim))).float(), dim=-1)
        n = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal(dim)).float(), dim=0)
        tagger.text.build = lambda: (t, n)
        tagger.text_embeddings  # noqa: B018
    del tagger

    # -- in process ------------------------------------------------------------------------------------
    phases = {}
    with C.Timer() as total:
        with C.Timer() as t:
            tagger = load(settings).tagger
        phases["load tagger (build model)"] = t.s
        with C.Timer() as t:
            tagger.text_embeddings  # noqa: B018
        phases[f"text embeddings of {len(tagger.vocab)} concepts (text cache hit)"] = t.s
        with C.Timer() as t:
            jobs = list(walk([folder]))[: args.images]
            results = list(cached_results(EmbeddingCache(cache_dir, tagger.model_sha256), jobs))
        assert all(r.ok for r in results), [r.error.message for r in results if not r.ok][:3]
        phases[f"look up {len(jobs)} files (stat + SQLite)"] = t.s
        with C.Timer() as t, open(os.devnull, "w") as null:
            written = write_tags(tagger, results, fmt="jsonl", picking=Picking(settings.max_concepts), out=null)
        assert written.failed == 0 and written.total == len(results)
        phases["score + pick 20 + write JSONL"] = t.s
    phases["total in process"] = total.s
    core = total.s - phases["load tagger (build model)"]
    phases["total without the model build"] = core
    for k, v in phases.items():
        print(f"{v:8.2f} s  {k}", flush=True)

    # -- as a command ------------------------------------------------------------------------------------
    cmd = [sys.executable, "-m", "localtag", "retag", str(folder), "--jsonl", "--models-dir", str(root),
           "--model", f"{arch}-random", "--vocab", str(vocab), "--cache-dir", str(cache_dir), "--device", "cpu"]
    with C.Timer() as t:
        r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.count("\n")
    print(f"{t.s:8.2f} s  `localtag retag` process ({lines} JSONL lines), imports included", flush=True)
    phases["`localtag retag` process, imports included"] = t.s

    # -- without the text cache: a measured sample, scaled -------------------------------------------------
    if not args.text_sample:
        return print_table(phases)
    sample = C.BENCH_DIR / f"vocab{args.text_sample}-sample.txt"
    sample.write_text("".join(vocab.read_text().splitlines(keepends=True)[: args.text_sample]))
    tagger = load(settings.model_copy(update={"vocab": sample})).tagger
    tagger.cache_dir = None  # no text cache: the text tower encodes every prompt
    with C.Timer() as t:
        tagger.text_embeddings  # noqa: B018
    per_concept = t.s / args.text_sample
    est = per_concept * args.concepts
    print(f"{t.s:8.2f} s  text embeddings of {args.text_sample} concepts, no text cache "
          f"→ {est:.0f} s for {args.concepts} (scaled)", flush=True)
    phases[f"text embeddings of {args.text_sample} concepts, no text cache (measured)"] = t.s
    phases[f"text embeddings of {args.concepts} concepts, no text cache (scaled)"] = est
    print_table(phases)


def print_table(phases: dict) -> None:
    print()
    print(C.md_table([{"phase": k, "seconds": f"{v:.2f}"} for k, v in phases.items()], ["phase", "seconds"]))


if __name__ == "__main__":
    main()
