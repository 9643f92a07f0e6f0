"""`localtag batch run --engine ray` on a real Ray: same answers as the local engine, and kills.

One local Ray (``ray.init(num_cpus=2)``) is shared by the session; the node-removal test fakes a
two-node cluster with ``ray.cluster_utils.Cluster`` and drives it from a subprocess. Every wait is
bounded. After each kill: the committed item ids are the planned ones, none twice, each shard once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from batch_helpers import assert_complete_once, batch, committed_rows, model_args

from localtag import cli
from localtag.batch.store import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SHARD = 16


@pytest.fixture(scope="session")
def ray_address():
    import ray

    # Ray's workers are fresh processes: they must import this checkout's localtag
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def margs(fixture_model, cache_dir) -> list[str]:
    return [*model_args(fixture_model, cache_dir), "--batch-size", "5"]  # short batches: sensitive to threads


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, margs, coco_images) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    assert cli.main(["batch", "run", str(coco_images[0].parent), "--out", str(out), "--shard-size", str(SHARD),
                     *margs]) == 0
    return out


def repeated_list(path: Path, coco_images: list[Path], times: int) -> Path:
    """The 128 photos ``times`` over: shard k (of 16) holds the same photos as the folder run's shard k % 8."""
    path.write_text("".join(f"{p}\n" for _ in range(times) for p in coco_images))
    return path


def tags_by_sha(run_dir: Path) -> dict[str, list]:
    store = RunStore(run_dir)
    out: dict[str, list] = {}
    for m in store.committed(store.read_run()["shards"]):
        for r in store.read_shard(m, ["sha256", "concepts"]).to_pylist():
            tags = [(c["id"], c["name"], c["value"]) for c in r["concepts"]]
            assert out.setdefault(r["sha256"], tags) == tags, "one photo got two answers"
    return out


def workers(run_dir: Path) -> list[dict]:
    d = run_dir / "workers"
    out = []
    for f in d.glob("*.json") if d.is_dir() else ():
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:  # being written
            pass
    return [w for w in out if w.get("engine") == "ray"]


def n_committed(run_dir: Path) -> int:
    d = run_dir / "shards"
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_ray_gives_the_local_engine_answers(ray_address, local_run, tmp_path, margs, coco_images, capsys):
    out = tmp_path / "ray"
    code, res = batch(capsys, "run", str(coco_images[0].parent), "--out", str(out), "--shard-size", str(SHARD),
                      "--engine", "ray", "--workers", "2", *margs)
    assert code == 0 and res["complete"] and res["this_run"]["shards_committed"] == 8, res
    assert_complete_once(out)
    ray_rows = committed_rows(out)
    local_rows = committed_rows(local_run)
    assert [(r["id"], r["concepts"]) for r in ray_rows] == [(r["id"], r["concepts"]) for r in local_rows]
    assert len({w["pid"] for w in workers(out)}) >= 2  # two actors (or more, after a restart) did the work
    store_r, store_l = RunStore(out), RunStore(local_run)
    for shard in (0, 7):  # the embeddings are bit-identical too
        a = store_r.read_shard(store_r.marker(shard), ["embedding"]).column(0).to_pylist()
        b = store_l.read_shard(store_l.marker(shard), ["embedding"]).column(0).to_pylist()
        assert a == b
    code, text = batch(capsys, "export", str(out), "--format", "jsonl")
    code2, text2 = batch(capsys, "export", str(local_run), "--format", "jsonl")
    strip = [(o["input"], o["data"]) for o in map(json.loads, text.splitlines())]
    assert strip == [(o["input"], o["data"]) for o in map(json.loads, text2.splitlines())]


def test_a_sigkilled_actor_is_restarted_and_its_shard_redone(ray_address, local_run, tmp_path, margs, coco_images):
    out = tmp_path / "run"
    lst = repeated_list(tmp_path / "list.txt", coco_images, 3)  # 384 items, 24 shards
    result: dict = {}

    def drive() -> None:
        result["code"] = cli.main(["batch", "run", str(lst), "--out", str(out), "--shard-size", str(SHARD),
                                   "--engine", "ray", "--workers", "2", *margs])

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    wait_until(lambda: n_committed(out) >= 1 and len(workers(out)) == 2, 120, "two actors and a commit")
    victim = workers(out)[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert n_committed(out) < 24, "the job finished before the kill"
    killed_at = time.time()
    t.join(timeout=240)
    assert not t.is_alive(), "the job did not finish after the actor was killed"
    assert result["code"] == 0
    assert_complete_once(out)
    assert any(w["started_at"] > killed_at for w in workers(out)), "no actor was restarted"
    assert tags_by_sha(out) == tags_by_sha(local_run)


def _driver(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "localtag", "batch", "run", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_a_sigkilled_driver_then_the_same_command_again(ray_address, local_run, tmp_path, margs, coco_images,
                                                        capsys):
    out = tmp_path / "run"
    lst = repeated_list(tmp_path / "list.txt", coco_images, 3)
    args = [str(lst), "--out", str(out), "--shard-size", str(SHARD), "--engine", "ray", "--workers", "2", *margs]
    proc = _driver([*args, "--ray-address", ray_address])
    try:
        wait_until(lambda: n_committed(out) >= 2 or proc.poll() is not None, 180, "the first commits")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = n_committed(out)
    assert 2 <= before < 24, f"the driver was not killed mid-job ({before} of 24 committed)"
    code, res = batch(capsys, "run", *args)  # the same command again (here: in-process, on the session's Ray)
    assert code == 0 and res["complete"], res
    assert 1 <= res["this_run"]["shards_committed"] <= 24 - before
    assert_complete_once(out)
    assert tags_by_sha(out) == tags_by_sha(local_run)


def test_a_node_removed_mid_job(tmp_path, local_run, margs, coco_images):
    from ray.cluster_utils import Cluster

    # the head only runs the driver's bookkeeping; two worker nodes of 2 CPUs run actors and read tasks
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    out = tmp_path / "run"
    lst = repeated_list(tmp_path / "list.txt", coco_images, 3)
    proc = _driver([str(lst), "--out", str(out), "--shard-size", str(SHARD), "--engine", "ray", "--workers", "2",
                    "--ray-address", cluster.address, *margs])
    try:
        wait_until(lambda: (n_committed(out) >= 1 and len(workers(out)) == 2) or proc.poll() is not None, 180,
                   "two actors and a commit")
        victim_node = workers(out)[0]["node_id"]
        node = next(n for n in nodes if n.node_id == victim_node)
        removed_at = time.time()
        cluster.remove_node(node, allow_graceful=False)
        assert n_committed(out) < 24, "the job finished before the node was removed"
        survivor = next(n for n in nodes if n is not node).node_id
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert_complete_once(out)
    assert any(w["node_id"] == survivor for w in workers(out)), "nothing ran on the node that stayed"
    late = [m for m in RunStore(out).committed(24) if m["committed_at"] > removed_at]
    assert late, "no shard was committed after the node went"
    assert tags_by_sha(out) == tags_by_sha(local_run)


def test_an_explicit_address_joins_a_token_cluster(tmp_path, margs, coco_images):
    """`ray start --head` with token authentication (Ray >= 2.60), then `--ray-address HOST:PORT` from
    another process that has the token: the driver sends it (Ray itself does only for "auto")."""
    import secrets
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    home.mkdir()
    base = {**os.environ, "HOME": str(home), "RAY_AUTH_TOKEN": token,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    base.pop("RAY_ADDRESS", None)
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", tempfile.mkdtemp(prefix="rt", dir="/tmp")],  # short: socket paths
                            env={**base, "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lst = tmp_path / "list.txt"
        lst.write_text("".join(f"{p}\n" for p in coco_images[:16]))
        out = tmp_path / "run"
        args = [str(lst), "--out", str(out), "--shard-size", "8", "--engine", "ray", "--workers", "1", *margs,
                "--ray-address", f"127.0.0.1:{port}"]
        deadline = time.monotonic() + 180
        while True:  # the head needs a few seconds before it takes drivers
            r = subprocess.run([sys.executable, "-m", "localtag", "batch", "run", *args], env=base, cwd=REPO,
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0 or time.monotonic() > deadline or "Authentication" in r.stderr:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stderr[-3000:]
        assert n_committed(out) == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
