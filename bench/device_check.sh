#!/usr/bin/env bash
# Issue 11, part B, in one run on the GPU device machine (also runs here, as a CPU dry run).
#
#   1. installs the carried wheels (./wheels, from bench/prepare_device.sh) into /tmp/site;
#   2. runs the CUDA tests (tests/test_cuda.py; without CUDA they are skipped, and say so);
#   3. runs bench/bench_cuda.py and writes $OUT/cuda-<date>.json (OUT: the device tool's folder that
#      comes back; default /tmp/localtag-device-check).
# Exit status: 0 all passed; 3 the wheels did not install; 4 localtag does not import; 1 tests or bench
# failed. tests/test_device_check.py dry-runs it on the CPU in every `bin/test`, so a refactor cannot
# break it unnoticed.
# Data: ./devdata/coco128 when carried, else LOCALTAG_SHARED_DATA, else ../shared/data.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-/tmp/localtag-device-check}
mkdir -p "$OUT"
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1 && ! "$PY" -c "import open_clip, pydantic_settings, fastapi" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d devdata/coco128 ] && export LOCALTAG_SHARED_DATA=$PWD/devdata
"$PY" - <<'PY' || exit 4
import importlib, pkgutil, torch, localtag, localtag.cli as cli
# every module, subpackages included, and every command's parser (what `localtag --help` builds)
for m in pkgutil.walk_packages(localtag.__path__, "localtag."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
cli.build_parser()
print("imports ok; torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(none: CPU dry run, CUDA tests skip)")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date=$(date -u +%F)
echo "== CUDA tests"
"$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider --junitxml="$OUT/cuda-tests-$date.xml" 2>&1 | tee "$OUT/cuda-tests-$date.log"
tests=${PIPESTATUS[0]}
echo "== benchmarks"
"$PY" bench/bench_cuda.py --out "$OUT/cuda-$date.json" 2>&1 | tee "$OUT/cuda-bench-$date.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench; results in $OUT"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
