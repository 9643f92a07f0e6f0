#!/usr/bin/env python
"""Labels CSVs for ``localtag eval`` / ``localtag calibrate`` from two public datasets.

CIFAR-10 (single-label; the class is the folder name): extracts ``<split>/<class>/*.jpg`` from the
tarball into OUT and writes ``OUT/labels.csv``::

    python tools/make_labels.py cifar --out /tmp/cifar-test [--split test] [--per-class 0]
    localtag eval /tmp/cifar-test --model models/cifar10-tiny

COCO (multi-label; an image's labels are the categories of its instance annotations)::

    python tools/make_labels.py coco --out /tmp/coco128.csv [--vocab VOCAB] [--map "boat=ship" ...]
    localtag eval ../shared/data/coco128/images --labels /tmp/coco128.csv --vocab VOCAB

With ``--vocab`` every COCO category name is mapped to a concept of that vocabulary: by name or
synonym, else through ``--map COCO=CONCEPT`` or the built-in aliases below; categories without a
concept are dropped from the labels (and listed on stderr). Images without annotations, or whose
categories all dropped, stay in the file with empty labels: they are negatives for every concept.
Without ``--vocab`` the labels are COCO's own category names (``localtag vocab build CSV`` turns them
into a vocabulary).

CSV format: ``path,labels``, paths relative to the folder given to ``localtag eval``, labels separated
by ``;`` (see ``localtag.core.evaluate``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

# COCO category name -> other common names a vocabulary may use for it (tried in order).
COCO_ALIASES = {
    "airplane": ["aeroplane", "plane", "aircraft"],
    "car": ["automobile"],
    "motorcycle": ["motorbike"],
    "boat": ["ship"],
    "tv": ["television", "tv monitor"],
    "couch": ["sofa"],
    "cell phone": ["mobile phone", "smartphone"],
    "dining table": ["table"],
    "sports ball": ["ball"],
    "hair drier": ["hair dryer"],
    "potted plant": ["houseplant", "plant"],
    "donut": ["doughnut"],
    "laptop": ["laptop computer"],
    "mouse": ["computer mouse"],
    "remote": ["remote control"],
    "person": ["people"],
}


def write_csv(path: Path, rows: list[tuple[str, list[str]]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "labels"])
    for p, labels in rows:
        w.writerow([p, ";".join(labels)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")


def cifar(args: argparse.Namespace) -> int:
    out = Path(args.out)
    counts: dict[str, int] = {}
    rows = []
    wanted: dict[str, list[str]] = {}
    with tarfile.open(args.tar) as tar:  # pass 1: the names (sorted, so --per-class picks the same files)
        for m in tar:
            if m.isfile() and m.name.startswith(f"{args.split}/") and m.name.lower().endswith(".jpg"):
                wanted.setdefault(m.name.split("/")[1], []).append(m.name)
    keep = {n for names in wanted.values() for n in sorted(names)[: args.per_class or None]}
    with tarfile.open(args.tar) as tar:  # pass 2: stream in archive order (a gzip stream cannot seek back)
        for m in tar:
            if m.name in keep:
                target = out / m.name
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
    for name in sorted(keep):
        cls = name.split("/")[1]
        counts[cls] = counts.get(cls, 0) + 1
        rows.append((name, [cls]))
    if not rows:
        print(f"no {args.split}/<class>/*.jpg in {args.tar}", file=sys.stderr)
        return 1
    write_csv(out / "labels.csv", rows)
    print(json.dumps({"labels": str(out / "labels.csv"), "images": len(rows), "classes": counts}))
    return 0


def coco_mapping(names: list[str], vocab_path: str | None, extra: list[str]) -> dict[str, str | None]:
    """COCO category name -> concept name of the vocabulary (None: not in it)."""
    if not vocab_path:
        return {n: n for n in names}
    from localtag.core import vocab as vocab_mod

    v = vocab_mod.load(vocab_path)
    explicit = {}
    for item in extra:
        coco_name, sep, concept = item.partition("=")
        if not sep:
            raise SystemExit(f"--map expects COCO=CONCEPT, got {item!r}")
        explicit[coco_name.strip()] = concept.strip()
    out: dict[str, str | None] = {}
    for n in names:
        out[n] = None
        for candidate in ([explicit[n]] if n in explicit else []) + [n] + COCO_ALIASES.get(n, []):
            i = v.index(candidate)
            if i is not None:
                out[n] = v[i].name
                break
    return out


def coco(args: argparse.Namespace) -> int:
    data = json.loads(Path(args.instances).read_text())
    cats = {c["id"]: c["name"] for c in data["categories"]}
    mapping = coco_mapping([cats[k] for k in sorted(cats)], args.vocab, args.map or [])
    per_image: dict[int, list[str]] = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        concept = mapping[cats[a["category_id"]]]
        if concept is not None and concept not in per_image[a["image_id"]]:
            per_image[a["image_id"]].append(concept)
    images = Path(args.images)
    rows = []
    for im in sorted(data["images"], key=lambda im: im["file_name"]):
        if (images / im["file_name"]).is_file():
            rows.append((im["file_name"], sorted(per_image[im["id"]])))
    write_csv(Path(args.out), rows)
    used = sorted({c for _, labs in rows for c in labs})
    dropped = sorted(n for n, c in mapping.items() if c is None)
    renamed = {n: c for n, c in mapping.items() if c is not None and c != n}
    if dropped:
        print(f"{len(dropped)} COCO categories have no concept in {args.vocab}: {', '.join(dropped)}", file=sys.stderr)
    print(json.dumps({"labels": args.out, "images": len(rows), "labelled_images": sum(bool(labs) for _, labs in rows),
                      "concepts": len(used), "renamed": renamed, "dropped": len(dropped)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    c = sub.add_parser("cifar", help="CIFAR-10 JPEG tarball -> extracted folder + labels.csv")
    c.add_argument("--tar", default=str(SHARED / "cifar10-jpeg.tar.gz"))
    c.add_argument("--split", default="test", choices=["test", "train"])
    c.add_argument("--per-class", type=int, default=0, help="first N images (sorted) per class; 0: all")
    c.add_argument("--out", required=True, help="folder to extract into; labels.csv is written there")
    c.set_defaults(func=cifar)
    k = sub.add_parser("coco", help="COCO instances JSON -> multi-label CSV")
    k.add_argument("--instances", default=str(SHARED / "coco128" / "instances_train2017.json"))
    k.add_argument("--images", default=str(SHARED / "coco128" / "images"))
    k.add_argument("--vocab", help="map category names to this vocabulary's concepts")
    k.add_argument("--map", action="append", metavar="COCO=CONCEPT", help="explicit mapping (repeatable)")
    k.add_argument("--out", required=True, help="CSV to write (paths relative to --images)")
    k.set_defaults(func=coco)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
