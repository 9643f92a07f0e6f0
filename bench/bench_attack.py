"""Issue 10's attacks on a real ``localtag serve``: good clients' success rate and latency under attack,
and the server's RSS before, at peak and after.

The server runs as its own process (``python -m localtag serve``, default limits unless given), on
127.0.0.1. Phases, each ``--duration`` seconds of good traffic (``--good`` threads posting one COCO
JPEG each, in a loop):

- ``baseline``: no attack;
- ``slow-body``: ``--tricklers`` connections (513 in the issue) send a POST body one byte a second;
- ``bomb``: two clients each loop on requests of 16 PNGs of 84.6 MP (a few hundred KB each);
- ``overload``: 32 clients loop on 8-image requests as fast as they can (``--max-queue``).

Usage: ``python bench/bench_attack.py [--model models/cifar10-tiny] [--duration 10]``
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123"
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


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))


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
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Key {KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n".encode())
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "cifar10-tiny"))
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--good", type=int, default=4)
    p.add_argument("--tricklers", type=int, default=513)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--photo", default=str(REPO.parent / "shared" / "data" / "coco128" / "images"))
    args = p.parse_args()

    photo = sorted(Path(args.photo).glob("*.jpg"))[0].read_bytes() if Path(args.photo).is_dir() \
        else Path(args.photo).read_bytes()
    good = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(photo).decode()}}}]}).encode()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOCALTAG_API_KEYS": json.dumps([KEY]), "LOCALTAG_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "localtag", "--log-level", "WARNING", "serve", "--model", args.model,
           "--port", str(port), "--max-queue", str(args.max_queue)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open("bench_attack.log", "w"))
    results: dict = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start; see bench_attack.log")
            time.sleep(0.2)
        good_load(base, good, 2, 2.0)  # warm
        results["baseline"] = good_load(base, good, args.good, args.duration)

        stop = threading.Event()
        t = threading.Thread(target=tricklers, args=(port, args.tricklers, stop))
        t.start()
        time.sleep(2.0)
        results["slow-body"] = good_load(base, good, args.good, args.duration)
        results["slow-body"]["readyz_during"] = httpx.get(base + "/readyz").json()
        stop.set()
        t.join()

        bomb = bomb_png()
        bomb_body = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(bomb).decode()}}}] * 16})
        rss_before = rss(server.pid)
        sampler = Sampler(server.pid)
        sampler.start()
        stop, counts = threading.Event(), {}
        hs = [threading.Thread(target=hammer, args=(base, bomb_body.encode(), stop, counts)) for _ in range(2)]
        for h in hs:
            h.start()
        results["bomb"] = good_load(base, good, args.good, args.duration)
        stop.set()
        for h in hs:
            h.join()
        time.sleep(3.0)
        sampler.stop.set()
        sampler.join()
        results["bomb"].update({"bomb_png_bytes": len(bomb), "bomb_requests": counts,
                                "rss_before_mb": rss_before / 1e6, "rss_peak_mb": sampler.peak / 1e6,
                                "rss_after_mb": rss(server.pid) / 1e6})

        over = json.dumps({"inputs": [{"data": {"image": {"base64": base64.b64encode(photo).decode()}}}] * 8})
        stop, counts = threading.Event(), {}
        hs = [threading.Thread(target=hammer, args=(base, over.encode(), stop, counts)) for _ in range(32)]
        for h in hs:
            h.start()
        results["overload"] = good_load(base, good, args.good, args.duration)
        stop.set()
        for h in hs:
            h.join()
        results["overload"]["attacker_statuses"] = counts
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(results, indent=2, default=str))
    print("\n| phase | good requests | success | p50 s | p99 s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests']} | {r['success']:.1%} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
