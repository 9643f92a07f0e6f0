"""The Directus loop of issue 20: people tag 20 ships "our-boat", `directus learn`, `sync --retag`.

A real Directus on 127.0.0.1 (tests/directus_harness.py, SQLite), the fixture model ``models/cifar10-tiny``
and 200 real CIFAR-10 test JPEGs (60 ships, 140 of the other 9 classes). Each round uploads the library
afresh, runs ``directus sync``, lets a "person" tag 20 of the ships ``our-boat`` (their own tag), delete a
machine tag on 10 other files and add "holiday" to 8 more, runs ``directus learn --min-count 10`` and
``directus sync --retag --model-head boats`` (tests/test_directus_learn.py's ``directus_loop``), and
measures ``our-boat`` on the 180 files nobody tagged: precision and recall, side by side with the
vocabulary's own zero-shot ``ship`` tag on the same files in the same run. Three rounds: the person
tags ships 0-19, 20-39, 40-59.

    .venv/bin/python bench/bench_directus_learn.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO / "tests"))
sys.path.insert(0, str(C.REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from directus_harness import DirectusServer
    from test_directus_learn import directus_loop

    model = C.REPO / "models" / "cifar10-tiny"
    rows = []
    with DirectusServer() as server:
        for r in range(args.rounds):
            lib = directus_loop(server.url, server.token, model, Path(tempfile.mkdtemp(prefix="dlearn-")),
                                offset=20 * r, table=False)
            (c,) = lib["learn"]["concepts"]
            (h,) = lib["learn"]["heldout"] or [{}]
            m = lib["measure"]
            rows.append({"taught": f"ships {20 * r}-{20 * r + 19}", "positives": c["positives"],
                         "negatives": c["negatives"], "unsure": c["unsure"], "heldout_ap": h.get("ap_learnt"),
                         "precision": m["precision"], "recall": m["recall"], "tagged": m["tagged"],
                         "zs_ship": m["zero_shot_ship"], "seconds": lib["seconds"]})
    print(json.dumps({"machine": C.machine(), "rounds": rows}, indent=1))
    print("\n| person tagged | pos | neg | unsure | held-out AP | our-boat P | our-boat R | zero-shot `ship` P | "
          "zero-shot `ship` R | learn s | retag s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['taught']} | {x['positives']} | {x['negatives']} | {x['unsure']} | {x['heldout_ap']:.3f} | "
              f"{x['precision']:.3f} | {x['recall']:.3f} | {x['zs_ship']['precision']:.3f} | "
              f"{x['zs_ship']['recall']:.3f} | {x['seconds']['learn']:.1f} | {x['seconds']['retag']:.1f} |")
    mean = {k: sum(x[k] for x in rows) / len(rows) for k in ("precision", "recall")}
    print(f"\nmean over {len(rows)} rounds: our-boat precision {mean['precision']:.3f}, recall {mean['recall']:.3f}")


if __name__ == "__main__":
    main()
