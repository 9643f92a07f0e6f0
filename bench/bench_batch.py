"""`localtag batch run`: Ray's overhead against the local engine, 1 vs 2 workers, and driver memory.

Side by side in one run, on the same list of images (the 128 COCO photos repeated to ``--images``):

1. ``--engine local``, then ``--engine ray --workers 1`` on ``ray.init(num_cpus=2)``: throughput ratio.
   Two figures: *wall* (the whole command, Ray's start and the actor's model load included) and
   *steady* (items ÷ the span from the first shard's start to the last commit, from the run's markers).
2. A fake cluster (``ray.cluster_utils.Cluster``: a head without CPUs and two 2-CPU nodes, all on this
   machine's cores): ``--workers 1`` vs ``--workers 2``.
3. Driver peak RSS (``ru_maxrss`` of the driver process alone) of ``--engine ray`` and ``--engine local``
   runs of 1,000 and 50,000 items (CIFAR-10 32×32 JPEGs, repeated, shards of 1,000).

Model: the trained fixture ``models/cifar10-tiny`` (a small ModifiedResNet, 32 px input) unless ``--model``; with it,
JPEG decoding dominates, as it does on real GPU clusters.

    .venv/bin/python bench/bench_batch.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import COCO_DIR, REPO, machine

sys.path.insert(0, str(REPO / "tests"))


def run_cli(args: list[str]) -> tuple[int, dict, float]:
    import contextlib
    import io

    from localtag import cli

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["--log-level", "WARNING", "batch", "run", *args])
    wall = time.perf_counter() - t0
    return code, json.loads(buf.getvalue()), wall


def steady(run_dir: Path) -> float:
    from localtag.batch.store import RunStore

    store = RunStore(run_dir)
    ms = list(store.committed(store.read_run()["shards"]))
    span = max(m["committed_at"] for m in ms) - min(m["committed_at"] - m["seconds"] for m in ms)
    return sum(m["items"] for m in ms) / span


def driver_rss(args: list[str]) -> tuple[int, float]:
    """(peak RSS in MB of the driver process only, wall seconds) of one `batch run` in a fresh process."""
    code = ("import json, resource, sys, contextlib, io; from localtag import cli\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = cli.main(['--log-level', 'WARNING', 'batch', 'run', "
            "*json.loads(sys.argv[1])])\n"
            "print(json.dumps({'rc': rc, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "'items': json.loads(buf.getvalue())['items']}))")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["items"]["ok"] == out["items"]["planned"], out
    return out["rss_mb"], wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--model", default=str(REPO / "models" / "cifar10-tiny"))
    ap.add_argument("--rss-items", type=int, nargs="*", default=[1000, 50000])
    ap.add_argument("--rss-engines", nargs="*", default=["ray", "local"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["overhead", "scaling", "rss"])
    a = ap.parse_args()
    os.environ["PYTHONPATH"] = str(REPO)  # for Ray's worker processes
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    coco = sorted(COCO_DIR.glob("*.jpg"))
    lst = tmp / "coco.txt"
    lst.write_text("".join(f"{coco[i % len(coco)]}\n" for i in range(a.images)))
    common = ["--shard-size", str(a.shard_size), "--model", a.model, "--device", "cpu",
              "--cache-dir", str(tmp / "cache")]
    report: dict = {"machine": machine(), "images": a.images, "shard_size": a.shard_size, "model": a.model}
    print(json.dumps(report["machine"]), flush=True)

    if "overhead" not in a.skip:
        import ray

        # warm the text cache once, so neither engine pays for the prompts
        run_cli([str(coco[0]), "--out", str(tmp / "warm"), *common])
        code, res, wall_l = run_cli([str(lst), "--out", str(tmp / "local"), *common])
        assert code == 0 and res["complete"]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        code, res, wall_r = run_cli([str(lst), "--out", str(tmp / "ray"), "--engine", "ray", "--workers", "1",
                                     *common])
        assert code == 0 and res["complete"]
        ray.shutdown()
        s_l, s_r = steady(tmp / "local"), steady(tmp / "ray")
        report["overhead"] = {
            "local_wall_items_per_s": round(a.images / wall_l, 1), "ray_wall_items_per_s": round(a.images / wall_r, 1),
            "ratio_wall": round(wall_l / wall_r, 3),
            "local_steady_items_per_s": round(s_l, 1), "ray_steady_items_per_s": round(s_r, 1),
            "ratio_steady": round(s_r / s_l, 3),
        }
        from batch_helpers import committed_rows, tags_by_id

        report["overhead"]["identical_tags"] = (tags_by_id(committed_rows(tmp / "local"))
                                                == tags_by_id(committed_rows(tmp / "ray")))
        print(json.dumps({"overhead": report["overhead"]}), flush=True)

    if "scaling" not in a.skip:
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        sc = {}
        for w in (1, 2):
            code, res, wall = run_cli([str(lst), "--out", str(tmp / f"cluster-{w}"), "--engine", "ray",
                                       "--workers", str(w), *common])
            assert code == 0 and res["complete"]
            sc[w] = {"wall_items_per_s": round(a.images / wall, 1), "steady_items_per_s": round(steady(tmp / f"cluster-{w}"), 1)}
        ray.shutdown()
        cluster.shutdown()
        report["scaling"] = {**{f"workers_{w}": v for w, v in sc.items()},
                             "ratio_2_over_1_steady": round(sc[2]["steady_items_per_s"] / sc[1]["steady_items_per_s"], 3),
                             "ratio_2_over_1_wall": round(sc[2]["wall_items_per_s"] / sc[1]["wall_items_per_s"], 3)}
        print(json.dumps({"scaling": report["scaling"]}), flush=True)

    if "rss" not in a.skip:
        from conftest import extract_cifar

        cifar = [p for ps in extract_cifar(tmp / "cifar", per_class=20).values() for p in ps]
        rss = {}
        for n in a.rss_items:
            cl = tmp / f"cifar-{n}.txt"
            cl.write_text("".join(f"{cifar[i % len(cifar)]}\n" for i in range(n)))
            for engine in a.rss_engines:
                args = [str(cl), "--out", str(tmp / f"rss-{engine}-{n}"), "--shard-size", "1000", "--model", a.model,
                        "--device", "cpu", "--cache-dir", str(tmp / "cache"), "--engine", engine]
                mb, wall = driver_rss(args)
                rss[f"{engine}_{n}"] = {"driver_peak_rss_mb": round(mb, 1), "wall_s": round(wall, 1),
                                        "items_per_s": round(n / wall, 1)}
                print(json.dumps({f"{engine}_{n}": rss[f"{engine}_{n}"]}), flush=True)
        report["driver_rss"] = rss
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
