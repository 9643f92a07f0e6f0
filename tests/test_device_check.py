"""The GPU device script stays ready (issue 15): bin/test dry-runs bench/device_check.sh on the CPU.

On a machine without CUDA the script checks its imports, runs tests/test_cuda.py (skipped: "needs CUDA")
and runs bench/bench_cuda.py as a dry run with small sizes. A refactor that breaks any step (an import,
a renamed function, a bench that no longer runs) fails here instead of on the device, where a GPU
minute is scarce. bench/check_wheels.py, the check before a device run, is run as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU run, not a dry run: run bench/device_check.sh")
def test_device_script_dry_run_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "imports ok" in r.stdout and "needs CUDA" in r.stdout  # the CUDA tests ran, and skipped
    (result,) = tmp_path.glob("cuda-*.json")
    report = json.loads(result.read_text())
    assert report["dry_run"] is True and report["device_name"]
    (summary,) = [m["summary"] for m in report["models"].values()]
    rates = {k: v for k, v in summary.items() if k.endswith("_img_per_s")}
    assert len(rates) == 4 and all(v > 0 for v in rates.values()), summary


def test_check_wheels_imports_everything(tmp_path):
    """No wheels here: the check lists what would be missing on the device, and must not crash."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "check_wheels.py"), str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "distributions imported here:" in r.stdout
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("MISSING") and ln.endswith(": torch")]
