"""Start-up of the command line: ``localtag --help`` and ``localtag tag ONE.jpg`` as real processes.

With ``--against DIR`` (a checkout of another revision, e.g. ``git worktree add /tmp/old REV``) both
checkouts run in interleaved rounds in the same sitting, so a busy machine slows both alike; the table
gives medians and the ratio. Each process imports the checkout it is given (``PYTHONPATH``).

    .venv/bin/python bench/bench_startup.py --against /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(checkout: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "localtag", *args], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=600)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: localtag {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout to compare with, in the same rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", type=Path, default=REPO / "samples" / "000000000309.jpg")
    args = ap.parse_args()
    model = str(REPO / "models" / "cifar10-tiny")
    commands = {"--help": ["--help"],
                "tag ONE.jpg": ["tag", str(args.image), "--model", model, "--no-cache", "--device", "cpu"]}
    checkouts = {"this": REPO, **({"against": args.against.resolve()} if args.against else {})}
    times: dict[tuple[str, str], list[float]] = {(c, k): [] for c in checkouts for k in commands}
    for _ in range(args.rounds):
        for k, cmd in commands.items():
            for c, path in checkouts.items():
                times[(c, k)].append(timed(path, cmd))
    print(f"| command | {' | '.join(f'{c} (median s)' for c in checkouts)} |"
          + (" against ÷ this |" if args.against else ""))
    print("|---|" + "---|" * len(checkouts) + ("---|" if args.against else ""))
    for k in commands:
        med = {c: statistics.median(times[(c, k)]) for c in checkouts}
        row = f"| `localtag {k}` | " + " | ".join(f"{med[c]:.2f}" for c in checkouts) + " |"
        if args.against:
            row += f" {med['against'] / med['this']:.1f}× |"
        print(row)
    print(f"rounds: {args.rounds}, interleaved; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
