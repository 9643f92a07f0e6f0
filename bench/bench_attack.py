"""Attacks on a real ``localtag serve`` (issues 10 and 16): good clients' success rate and latency under
attack, and the server's RSS before, at peak and after.

The server runs as its own process (``python -m localtag serve``, default limits, REST and gRPC) on
127.0.0.1; ``--repo`` runs another checkout's server (the "before" column). Good clients post one COCO
JPEG each from 127.0.0.1 (``--good`` threads, ``--duration`` seconds per phase); every attacker binds
127.0.0.2 (one hostile client that per-client limits can tell apart). Every loop is bounded by the
phase's duration and stays on loopback. Phases (``--phases``):

- ``baseline``: no attack;
- ``gzip-url``: a loop of predicts whose 2 image URLs serve 1 GiB of zeros as ``Content-Encoding:
  gzip, gzip`` (a couple of KB on the wire), from a web server on 127.0.0.2;
- ``thin-images``: a loop of predicts of a 1×500,000 PNG and an EXIF-rotated 50,000×1 JPEG;
- ``trickle``: 1,023 connections: ``GET /healthz`` and keyless predicts, each declaring a 1 GB body
  and sending a byte a second (reopened when closed);
- ``slow-bodies``: 800 keyed predict bodies sent a byte a second (reopened when answered);
- ``half-headers``: 1,030 half-sent request heads, reopened every 10 s;
- ``grpc-idle``: 3,000 silent TCP connections to the gRPC port (reopened when closed);
- ``large-bodies``: 10 predict bodies of 120 MB each held one byte short (reopened when closed);
- ``multipart``: 40 chunked 20 MB Filestack uploads held unfinished (reopened when closed); the server's
  open temp files are measured too;
- issue 10's ``slow-body``, ``bomb`` and ``overload`` are still there (not run by default).

Usage: ``python bench/bench_attack.py [--duration 10] [--repo /tmp/old-checkout] [--phases a,b]``
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from raw_http import (  # noqa: E402
    EncodedFiles,
    alive,
    chunk,
    connect,
    filestack_head,
    gzip_zeros,
    one,
    post_head,
    rotated_jpeg,
    thin_png,
    wait_ready,
)

KEY = "bench-key-0123"
ATTACKER = "127.0.0.2"
PATH = "/v2/models/general-image-recognition/outputs"
HDR = {"Authorization": f"Key {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tmp_bytes(pid: int) -> int:
    """Bytes of the regular files under /tmp the process holds open (its spooled uploads)."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/tmp/"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, tmp: bool = False):
        super().__init__(daemon=True)
        self.pid, self.peak, self.tmp_peak, self.stop, self.tmp = pid, 0, 0, threading.Event(), tmp

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))
            if self.tmp:
                self.tmp_peak = max(self.tmp_peak, tmp_bytes(self.pid))


def good_load(base: str, body: bytes, threads: int, duration: float) -> dict:
    lat, codes, lock = [], [], threading.Lock()
    end = time.monotonic() + duration

    def worker():
        with httpx.Client(base_url=base, headers={**HDR, "Content-Type": "application/json"}, timeout=60) as c:
            while time.monotonic() < end:
                t = time.monotonic()
                try:
                    r = c.post(PATH, content=body)
                    ok = r.status_code == 200 and r.json()["status"]["code"] == 10000
                    code = r.status_code
                except httpx.HTTPError as e:
                    ok, code = False, type(e).__name__
                with lock:
                    lat.append(time.monotonic() - t)
                    codes.append(code if not ok else 200)
                if not ok:
                    time.sleep(0.05)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lat.sort()
    n = len(lat)
    ok = sum(1 for c in codes if c == 200)
    return {"requests": n, "success": ok / n if n else 0.0, "p50_s": lat[n // 2] if n else None,
            "p99_s": lat[min(n - 1, int(n * 0.99))] if n else None,
            "failures": {str(c): codes.count(c) for c in set(codes) if c != 200}}


def tricklers(port: int, n: int, stop: threading.Event) -> None:
    socks = []
    for _ in range(n):
        try:
            s = connect(port, timeout=5)
            s.sendall(post_head(PATH, KEY, 1_000_000))
            socks.append(s)
        except OSError:
            break
    while not stop.wait(1.0):
        for s in socks:
            try:
                s.send(b" ")
            except OSError:
                pass
    for s in socks:
        s.close()


def bomb_png(side: int = 9198) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (30, 60, 90)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def hammer(base: str, body: bytes, stop: threading.Event, counts: dict) -> None:
    with httpx.Client(base_url=base, headers={**HDR, "Content-Type": "application/json"}, timeout=120) as c:
        while not stop.is_set():
            try:
                r = c.post(PATH, content=body)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
            except httpx.HTTPError as e:
                counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1


# -- issue 16's attacks: each runs until ``stop`` is set, from ATTACKER ------------------------------------
def open_from(port: int) -> socket.socket:
    return connect(port, ATTACKER, timeout=5)


def hold(n: int, opener, stop: threading.Event, counts: dict, drip: bytes = b"", every: float = 1.0,
         reopen_after: float | None = None, answers_ok: bool = False) -> None:
    """Keep ``n`` connections made by ``opener`` open, a ``drip`` byte each every ``every`` s; a connection
    the server closes (or answers, unless ``answers_ok``) is reopened at the next round (and every
    ``reopen_after`` s). ``counts["open_at_end"]``: how many were open at the last round."""
    slots: list[tuple[socket.socket, float] | None] = [None] * n
    while not stop.is_set():
        t0 = time.monotonic()
        for i in range(n):
            if stop.is_set():
                break
            slot = slots[i]
            if slot is not None:
                s, born = slot
                ok = alive(s, answers_ok)
                if ok and drip:
                    try:
                        s.send(drip)
                    except OSError:
                        ok = False
                if not ok or (reopen_after and t0 - born > reopen_after):
                    counts["closed"] = counts.get("closed", 0) + (not ok)
                    s.close()
                    slot = None
            if slot is None:
                try:
                    slots[i] = (opener(), time.monotonic())
                    counts["opened"] = counts.get("opened", 0) + 1
                except OSError:
                    slots[i] = None
                    counts["open_failed"] = counts.get("open_failed", 0) + 1
        counts["open_at_end"] = sum(slot is not None for slot in slots)
        stop.wait(max(0.0, every - (time.monotonic() - t0)))
    for slot in slots:
        if slot is not None:
            slot[0].close()


def trickle_opener(port: int):
    turn = [0]

    def opener() -> socket.socket:
        s = open_from(port)
        turn[0] += 1
        if turn[0] % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        else:  # no key: answered 401 at once
            s.sendall(post_head(PATH, None, 1_000_000_000) + b"{")
        return s
    return opener


def body_opener(port: int):
    def opener() -> socket.socket:
        s = open_from(port)
        s.sendall(post_head(PATH, KEY, 1_000_000) + b"{")
        return s
    return opener


def head_opener(port: int):
    def opener() -> socket.socket:
        s = open_from(port)
        s.sendall(post_head(PATH, KEY, complete=False))
        return s
    return opener


def streamer(port: int, head: bytes, pieces, stop: threading.Event, counts: dict) -> None:
    """Open, send ``head`` and every piece of ``pieces()`` (never the end), hold; reopen once closed."""
    while not stop.is_set():
        try:
            s = open_from(port)
            s.sendall(head)
            for piece in pieces():
                if stop.is_set():
                    break
                s.sendall(piece)
            counts["held"] = counts.get("held", 0) + 1
            while not stop.wait(0.5) and alive(s):
                pass
            counts["closed"] = counts.get("closed", 0) + (not stop.is_set())
            s.close()
        except OSError as e:
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
            stop.wait(0.5)


def large_bodies(port: int, stop: threading.Event, counts: dict, n: int = 10, size: int = 120_000_000) -> None:
    head = post_head(PATH, KEY, size + 1)
    block = b" " * 1_000_000
    ts = [threading.Thread(target=streamer, args=(port, head, lambda: (block for _ in range(size // len(block))),
                                                  stop, counts)) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def multipart_uploads(port: int, stop: threading.Event, counts: dict, n: int = 40, size: int = 20_000_000) -> None:
    head = filestack_head(KEY)
    framed = chunk(b"z" * 65536)
    ts = [threading.Thread(target=streamer, args=(port, head, lambda: (framed for _ in range(size // 65536)),
                                                  stop, counts)) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def gzip_bomb(zeros: int = 1 << 30) -> bytes:
    """``zeros`` bytes of zeros, gzipped twice (about 2 KB for 1 GiB)."""
    return gzip_zeros(zeros, layers=2)


class BombServer(EncodedFiles):
    """Serves the nested-gzip bomb at ``/bomb`` from ATTACKER."""

    def __init__(self):
        body = gzip_bomb()
        super().__init__({"/bomb": (body, "gzip, gzip", "image/png")}, ATTACKER)
        self.bomb_bytes = len(body)


def poster(base: str, bodies: list[bytes], stop: threading.Event, counts: dict) -> None:
    """Post ``bodies`` in turn from ATTACKER until stopped."""
    transport = httpx.HTTPTransport(local_address=ATTACKER)
    with httpx.Client(base_url=base, transport=transport, headers={**HDR, "Content-Type": "application/json"},
                      timeout=120) as c:
        i = 0
        while not stop.is_set():
            try:
                r = c.post(PATH, content=bodies[i % len(bodies)])
                key = str(r.status_code) if r.status_code != 200 else str(r.json()["outputs"][0]["status"]["code"])
            except (httpx.HTTPError, ValueError, KeyError) as e:
                key = type(e).__name__
                stop.wait(0.2)
            counts[key] = counts.get(key, 0) + 1
            i += 1


def thin_bodies() -> list[bytes]:
    return [json.dumps(one(b)).encode() for b in (thin_png(1, 500_000), rotated_jpeg(50_000, 1))]


def silent(port: int):
    return lambda: open_from(port)


def attacks(base: str, port: int, grpc_port: int, bomb_host: str) -> dict:
    """Issue 16's attacks by name: each a function of (stop, counts)."""
    bomb_url = f"http://{bomb_host}/bomb"
    bomb = json.dumps({"inputs": [{"data": {"image": {"url": bomb_url}}}] * 2}).encode()
    return {
        "gzip-url": lambda stop, c: poster(base, [bomb], stop, c),
        "thin-images": lambda stop, c: poster(base, thin_bodies(), stop, c),
        # answered at once, then kept open by a byte a second
        "trickle": lambda stop, c: hold(1023, trickle_opener(port), stop, c, drip=b"x", answers_ok=True),
        "slow-bodies": lambda stop, c: hold(800, body_opener(port), stop, c, drip=b" "),
        "half-headers": lambda stop, c: hold(1030, head_opener(port), stop, c, reopen_after=10.0),
        "grpc-idle": lambda stop, c: hold(3000, silent(grpc_port), stop, c, answers_ok=True),  # HTTP/2 SETTINGS
        "large-bodies": lambda stop, c: large_bodies(port, stop, c),
        "multipart": lambda stop, c: multipart_uploads(port, stop, c),
    }


def run_phase(pid: int, base: str, good: bytes, args, attack, tmp: bool = False) -> dict:
    """Good traffic while ``attack`` runs (after ``--setup`` s to set it up); RSS before, peak and after."""
    rss_before = rss(pid)
    sampler = Sampler(pid, tmp=tmp)
    sampler.start()
    stop, counts = threading.Event(), {}
    t = threading.Thread(target=attack, args=(stop, counts), daemon=True)
    t.start()
    time.sleep(args.setup)
    result = good_load(base, good, args.good, args.duration)
    stop.set()
    t.join(timeout=60)
    time.sleep(args.settle)
    sampler.stop.set()
    sampler.join()
    result.update({"attack": counts, "rss_before_mb": rss_before / 1e6, "rss_peak_mb": sampler.peak / 1e6,
                   "rss_after_mb": rss(pid) / 1e6})
    if tmp:
        result["tmp_peak_mb"] = sampler.tmp_peak / 1e6
    return result


def issue10_attacks(base: str, port: int, photo: bytes, tricklers_n: int) -> dict:
    def many(n: int, body: bytes):
        def run(stop, counts):
            hs = [threading.Thread(target=hammer, args=(base, body, stop, counts)) for _ in range(n)]
            for h in hs:
                h.start()
            for h in hs:
                h.join()
        return run

    bomb = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(bomb_png()).decode()}}}] * 16})
    over = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(photo).decode()}}}] * 8})
    return {"slow-body": lambda stop, c: tricklers(port, tricklers_n, stop),
            "bomb": many(2, bomb.encode()), "overload": many(32, over.encode())}


DEFAULT_PHASES = ("baseline,gzip-url,thin-images,trickle,slow-bodies,half-headers,grpc-idle,large-bodies,"
                  "multipart")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "cifar10-tiny"))
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server is attacked")
    p.add_argument("--phases", default=DEFAULT_PHASES)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of good traffic per phase")
    p.add_argument("--setup", type=float, default=3.0, help="seconds an attack runs before good traffic starts")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after an attack before RSS 'after'")
    p.add_argument("--good", type=int, default=4)
    p.add_argument("--tricklers", type=int, default=513)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--photo", default=str(REPO.parent / "shared" / "data" / "coco128" / "images"))
    p.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = p.parse_args()

    photo = sorted(Path(args.photo).glob("*.jpg"))[0].read_bytes() if Path(args.photo).is_dir() \
        else Path(args.photo).read_bytes()
    good = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(photo).decode()}}}]}).encode()
    bomb_server = BombServer()
    port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(args.repo), "LOCALTAG_API_KEYS": json.dumps([KEY]),
           "LOCALTAG_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "localtag", "--log-level", "WARNING", "serve", "--model", args.model,
           "--port", str(port), "--grpc-port", str(grpc_port), "--max-queue", str(args.max_queue),
           "--allow-host", bomb_server.host]
    log_path = Path("bench_attack.log")
    server = subprocess.Popen(cmd, env=env, cwd=args.repo, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    results: dict = {}
    try:
        if not wait_ready(base, server, 180):
            raise SystemExit("serve did not start; see bench_attack.log")
        good_load(base, good, 2, 2.0)  # warm
        idle = rss(server.pid)
        table = {**attacks(base, port, grpc_port, bomb_server.host),
                 **issue10_attacks(base, port, photo, args.tricklers)}
        for name in args.phases.split(","):
            if name == "baseline":
                results[name] = run_phase(server.pid, base, good, args, lambda stop, c: None)
                continue
            results[name] = run_phase(server.pid, base, good, args, table[name], tmp=name == "multipart")
            if server.poll() is not None:
                results[name]["server_died"] = server.returncode
                break
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        bomb_server.shutdown()
    log_lines = log_path.read_text(errors="replace").count("\n")
    facts = {"repo": str(args.repo), "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
             "idle_rss_mb": idle / 1e6, "server_log_lines": log_lines, "nested_gzip_bytes": bomb_server.bomb_bytes}
    print(json.dumps({"facts": facts, "phases": results}, indent=2, default=str))
    if args.out:
        args.out.write_text(json.dumps({"facts": facts, "phases": results}, indent=2, default=str))
    print(f"\nidle RSS {idle / 1e6:.0f} MB; {facts['cpu']}, {facts['cores']} cores")
    print("| phase | good requests | success | p99 s | RSS before / peak / after MB | peak ÷ idle | after ÷ before |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p99 = f"{r['p99_s']:.3f}" if r["p99_s"] is not None else "-"
        print(f"| {name} | {r['requests']} | {r['success']:.1%} | {p99} | {r['rss_before_mb']:.0f} / "
              f"{r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f} | {r['rss_peak_mb'] * 1e6 / idle:.2f} | "
              f"{r['rss_after_mb'] / r['rss_before_mb']:.2f} |")
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
